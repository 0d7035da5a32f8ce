//! Client IP resolution (before every stage): the TCP peer address, unless the peer is a
//! trusted proxy, in which case the configured forwarding header is walked right to left past
//! trusted hops. A header from an untrusted peer is never believed: that is the classic WAF
//! bypass (`X-Forwarded-For: 127.0.0.1` from the internet).

use std::net::IpAddr;
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName};

use super::ipset::IpSet;

/// Which header carries the client chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (several headers are concatenated in order).
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client;proto=https, for="[2001:db8::1]:443"`.
    Forwarded,
    /// A single-address header set by a trusted edge, e.g. `CF-Connecting-IP`, `X-Real-IP`.
    Single(HeaderName),
}

/// Resolves the client address of a request.
#[derive(Debug, Clone)]
pub struct ClientIpResolver {
    trusted: Arc<IpSet>,
    header: ForwardedHeader,
}

impl Default for ClientIpResolver {
    fn default() -> Self {
        ClientIpResolver {
            trusted: Arc::new(IpSet::default()),
            header: ForwardedHeader::XForwardedFor,
        }
    }
}

/// Parses one hop: an address, optionally with a port (`1.2.3.4:80`, `[2001:db8::1]:443`),
/// optionally quoted. IPv4-mapped IPv6 addresses become IPv4.
fn parse_hop(text: &str) -> Option<IpAddr> {
    let t = text.trim().trim_matches('"');
    let ip = if let Some(rest) = t.strip_prefix('[') {
        rest.split_once(']')?.0.parse::<IpAddr>().ok()?
    } else if let Ok(ip) = t.parse::<IpAddr>() {
        ip
    } else {
        // `a.b.c.d:port` (an IPv6 literal with a port must be bracketed).
        let (host, port) = t.rsplit_once(':')?;
        port.parse::<u16>().ok()?;
        host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)?
    };
    Some(ip.to_canonical())
}

impl ClientIpResolver {
    /// A resolver trusting `trusted` peers to set `header`.
    pub fn new(trusted: Arc<IpSet>, header: ForwardedHeader) -> Self {
        ClientIpResolver { trusted, header }
    }

    /// Whether `peer` is a trusted proxy.
    pub fn is_trusted(&self, peer: IpAddr) -> bool {
        self.trusted.contains(peer)
    }

    /// The client address for a request from `peer` with `headers`.
    ///
    /// Walks the chain from the right: each hop is believed only while the hop after it (to
    /// its right, starting with the peer) is trusted. The first untrusted address is the
    /// client; if every hop is trusted, the leftmost is. A malformed entry stops the walk at
    /// the trusted proxy that forwarded it.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if self.trusted.is_empty() || !self.trusted.contains(peer) {
            return peer;
        }
        match &self.header {
            ForwardedHeader::Single(name) => headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_hop)
                .unwrap_or(peer),
            ForwardedHeader::XForwardedFor => {
                let values = headers.get_all("x-forwarded-for");
                let hops = values
                    .iter()
                    .rev()
                    .flat_map(|v| v.to_str().unwrap_or("\u{0}").rsplit(','));
                self.walk(peer, hops.map(|h| parse_hop(h).ok_or(())))
            }
            ForwardedHeader::Forwarded => {
                let values = headers.get_all(http::header::FORWARDED);
                let hops = values
                    .iter()
                    .rev()
                    .flat_map(|v| v.to_str().unwrap_or("\u{0}").rsplit(','))
                    .map(|element| {
                        element
                            .split(';')
                            .find_map(|pair| {
                                let (k, v) = pair.split_once('=')?;
                                k.trim().eq_ignore_ascii_case("for").then_some(v)
                            })
                            .and_then(parse_hop)
                            .ok_or(())
                    });
                self.walk(peer, hops)
            }
        }
    }

    fn walk(&self, peer: IpAddr, hops: impl Iterator<Item = Result<IpAddr, ()>>) -> IpAddr {
        let mut client = peer;
        for hop in hops {
            if !self.trusted.contains(client) {
                break;
            }
            match hop {
                Ok(ip) => client = ip,
                Err(()) => break,
            }
        }
        client
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use crate::identity::ipset::parse_cidr;

    fn resolver(trusted: &[&str], header: ForwardedHeader) -> ClientIpResolver {
        let set = IpSet::from_nets(trusted.iter().map(|t| parse_cidr(t).unwrap()));
        ClientIpResolver::new(Arc::new(set), header)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_header_is_ignored() {
        let r = resolver(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        let h = headers(&[("x-forwarded-for", "127.0.0.1")]);
        assert_eq!(r.resolve(ip("203.0.113.9"), &h), ip("203.0.113.9"));
        // No trusted proxies configured: never believe the header.
        let r = ClientIpResolver::default();
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn xff_walks_right_to_left_past_trusted_hops() {
        let r = resolver(
            &["10.0.0.0/8", "2001:db8:ffff::/48"],
            ForwardedHeader::XForwardedFor,
        );
        // Spoofed leftmost entry is not reached: 198.51.100.7 is the first untrusted hop.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 198.51.100.7, 10.0.0.2")]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("198.51.100.7"));
        // Several headers are one list, in order.
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-for", "10.1.1.1:8080"),
        ]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("198.51.100.7"));
        // All trusted: the leftmost.
        let h = headers(&[("x-forwarded-for", "10.9.9.9, 10.0.0.2")]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("10.9.9.9"));
        // Garbage stops the walk at the trusted proxy that sent it.
        let h = headers(&[("x-forwarded-for", "198.51.100.7, bogus, 10.0.0.2")]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("10.0.0.2"));
        // IPv6 peer and hops, mapped addresses.
        let h = headers(&[("x-forwarded-for", "[2001:db8::5]:1234, ::ffff:10.2.2.2")]);
        assert_eq!(r.resolve(ip("2001:db8:ffff::1"), &h), ip("2001:db8::5"));
        // Trusted peer, no header: the peer.
        assert_eq!(r.resolve(ip("10.0.0.1"), &HeaderMap::new()), ip("10.0.0.1"));
    }

    #[test]
    fn forwarded_and_single_headers() {
        let r = resolver(&["10.0.0.0/8"], ForwardedHeader::Forwarded);
        let h = headers(&[(
            "forwarded",
            "for=192.0.2.60;proto=http;by=203.0.113.43, for=\"[2001:db8:cafe::17]:4711\"",
        )]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("2001:db8:cafe::17"));
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("10.0.0.1"));
        let r = resolver(
            &["10.0.0.0/8"],
            ForwardedHeader::Single(HeaderName::from_static("cf-connecting-ip")),
        );
        let h = headers(&[
            ("cf-connecting-ip", "198.51.100.1"),
            ("x-forwarded-for", "1.1.1.1"),
        ]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h), ip("198.51.100.1"));
        assert_eq!(r.resolve(ip("192.0.2.1"), &h), ip("192.0.2.1"));
    }
}
