//! IP sets (used by the `ip` stage, trusted proxies and, later, rules): named sets of IPv4/IPv6
//! CIDRs, inline or loaded from files.
//!
//! Representation: sorted, merged, non-overlapping inclusive ranges, one vector per family, and
//! a binary search per lookup: O(log n), about 20 comparisons for a million entries, no
//! allocation, no pointer chasing. Written here rather than taken from a trie crate because a
//! static set needs nothing more: the vectors are half the memory of a prefix trie and faster
//! to search, and building them is one sort.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are folded into IPv4 both when a set is built
//! and when it is queried, so they match their IPv4 entries.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// One unparsable line of an IP list file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based line number.
    pub line: usize,
    /// The offending text.
    pub text: String,
}

/// Why an IP list could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IpListError {
    /// The file could not be read.
    #[error("{path}: cannot read IP list: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Lines that are neither a CIDR, an address, a comment nor blank.
    #[error("{}", format_bad_lines(path, lines, *total))]
    BadLines {
        /// The file.
        path: String,
        /// The first bad lines (at most 20 are kept).
        lines: Vec<BadLine>,
        /// How many bad lines in all.
        total: usize,
    },
}

fn format_bad_lines(path: &str, lines: &[BadLine], total: usize) -> String {
    let mut s = String::new();
    for (i, l) in lines.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        s.push_str(&format!(
            "{path}:{}: invalid IP or CIDR {:?}: write one address or CIDR per line (`10.0.0.0/8`, `2001:db8::/32`), `#` starts a comment",
            l.line, l.text
        ));
    }
    if total > lines.len() {
        s.push_str(&format!(
            "\n{path}: … and {} more invalid lines",
            total - lines.len()
        ));
    }
    s
}

/// Parses one address or CIDR. A bare address is a /32 or /128; host bits of a CIDR are
/// ignored (`10.1.2.3/8` is `10.0.0.0/8`), as in most published block lists.
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    let t = text.trim();
    if let Ok(n) = t.parse::<IpNet>() {
        return Some(n.trunc());
    }
    t.parse::<IpAddr>().ok().map(IpNet::from)
}

/// Collects networks, then builds an immutable [`IpSet`].
#[derive(Default)]
pub struct IpSetBuilder {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl IpSetBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one network.
    pub fn add(&mut self, net: IpNet) {
        match net {
            IpNet::V4(n) => self.add_v4(n),
            IpNet::V6(n) => {
                // ::ffff:0:0/96 and longer are IPv4-mapped: store them as IPv4.
                let mapped = Ipv6Net::new(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96);
                match (n.addr().to_ipv4_mapped(), mapped) {
                    (Some(v4), Ok(m)) if n.prefix_len() >= 96 && m.contains(&n) => {
                        if let Ok(n4) = Ipv4Net::new(v4, n.prefix_len() - 96) {
                            self.add_v4(n4.trunc());
                        }
                    }
                    _ => self
                        .v6
                        .push((u128::from(n.network()), u128::from(n.broadcast()))),
                }
            }
        }
    }

    /// Adds every range of an existing set (set union).
    pub fn add_set(&mut self, set: &IpSet) {
        self.v4.extend_from_slice(&set.v4);
        self.v6.extend_from_slice(&set.v6);
    }

    fn add_v4(&mut self, n: Ipv4Net) {
        self.v4
            .push((u32::from(n.network()), u32::from(n.broadcast())));
    }

    /// Adds every line of an IP list text (one address or CIDR per line, `#` comments, blank
    /// lines ignored). Returns the bad lines (at most `keep` of them) and their total count.
    pub fn add_list(&mut self, text: &str, keep: usize) -> (Vec<BadLine>, usize) {
        let mut bad = Vec::new();
        let mut total = 0;
        let mut good = 0;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            match parse_cidr(line) {
                Some(n) => {
                    good += 1;
                    self.add(n);
                }
                None => {
                    total += 1;
                    if bad.len() < keep {
                        bad.push(BadLine {
                            line: i + 1,
                            text: line.chars().take(80).collect(),
                        });
                    }
                }
            }
        }
        // A file with no address at all is not an IP list (a config pointed at `/etc/shadow`):
        // its lines are named, never printed, unless they look like attempted addresses.
        if good == 0 {
            for b in &mut bad {
                let addressy = b
                    .text
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || ".:/ \t".contains(c));
                if !addressy {
                    b.text = "(not an address; text not shown)".into();
                }
            }
        }
        (bad, total)
    }

    /// Adds every entry of an IP list file; any bad line is an error naming file and line.
    pub fn add_file(&mut self, path: &Path) -> Result<(), IpListError> {
        let name = path.display().to_string();
        let text =
            crate::files::read_text_file(path, crate::files::MAX_TEXT_FILE).map_err(|source| {
                IpListError::Read {
                    path: name.clone(),
                    source,
                }
            })?;
        let (lines, total) = self.add_list(&text, 20);
        if total > 0 {
            return Err(IpListError::BadLines {
                path: name,
                lines,
                total,
            });
        }
        Ok(())
    }

    /// Sorts and merges overlapping or adjacent ranges. O(n log n).
    pub fn build(self) -> IpSet {
        IpSet {
            v4: merge(self.v4),
            v6: merge(self.v6),
        }
    }
}

fn merge<T: Ord + Copy + Successor>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if start <= last.1.succ() => {
                if end > last.1 {
                    last.1 = end;
                }
            }
            _ => out.push((start, end)),
        }
    }
    out.shrink_to_fit();
    out
}

/// `x + 1`, saturating at the maximum (so ranges ending at the top still merge correctly).
trait Successor {
    fn succ(self) -> Self;
}
impl Successor for u32 {
    fn succ(self) -> Self {
        self.saturating_add(1)
    }
}
impl Successor for u128 {
    fn succ(self) -> Self {
        self.saturating_add(1)
    }
}

/// An immutable set of IPv4/IPv6 ranges.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct IpSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl fmt::Debug for IpSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IpSet({} v4 ranges, {} v6 ranges)",
            self.v4.len(),
            self.v6.len()
        )
    }
}

impl IpSet {
    /// Whether `ip` is in the set. O(log n), no allocation. IPv4-mapped IPv6 addresses are
    /// looked up as IPv4.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => contains(&self.v4, u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => contains(&self.v4, u32::from(v4)),
                None => contains(&self.v6, u128::from(a)),
            },
        }
    }

    /// Number of merged ranges (IPv4, IPv6).
    pub fn range_counts(&self) -> (usize, usize) {
        (self.v4.len(), self.v6.len())
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// A set from an iterator of networks.
    pub fn from_nets(nets: impl IntoIterator<Item = IpNet>) -> IpSet {
        let mut b = IpSetBuilder::new();
        for n in nets {
            b.add(n);
        }
        b.build()
    }
}

#[inline]
fn contains<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    // Index of the first range starting after x; the one before it is the only candidate.
    let i = ranges.partition_point(|r| r.0 <= x);
    i > 0 && ranges[i - 1].1 >= x
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn set(lines: &str) -> IpSet {
        let mut b = IpSetBuilder::new();
        let (bad, _) = b.add_list(lines, 10);
        assert!(bad.is_empty(), "{bad:?}");
        b.build()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn matches_v4_v6_and_mapped_addresses() {
        let s = set("10.0.0.0/8\n# comment\n\n192.0.2.7 # one host\n2001:db8::/32\n::ffff:198.51.100.0/120\n");
        for yes in [
            "10.0.0.0",
            "10.255.255.255",
            "192.0.2.7",
            "2001:db8::1",
            "::ffff:10.1.2.3",
            "198.51.100.200",
        ] {
            assert!(s.contains(ip(yes)), "{yes}");
        }
        for no in [
            "9.255.255.255",
            "11.0.0.0",
            "192.0.2.8",
            "2001:db9::1",
            "::1",
            "198.51.101.0",
        ] {
            assert!(!s.contains(ip(no)), "{no}");
        }
    }

    #[test]
    fn overlapping_and_adjacent_ranges_merge() {
        let s = set("10.0.0.0/9\n10.128.0.0/9\n10.0.0.0/16\n0.0.0.0/0\n255.255.255.255\n");
        assert_eq!(s.range_counts(), (1, 0));
        assert!(s.contains(ip("255.255.255.255")));
        let s = set("::/0\nffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff\n");
        assert!(s.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(
            !s.contains(ip("1.2.3.4")),
            "IPv4 is not in ::/0 once mapped addresses fold to v4"
        );
    }

    #[test]
    fn host_bits_are_ignored_and_bad_lines_are_reported_with_numbers() {
        let s = set("10.1.2.3/8\n");
        assert!(s.contains(ip("10.200.0.1")));
        let mut b = IpSetBuilder::new();
        let (bad, total) = b.add_list("10.0.0.0/8\nnot-an-ip\n10.0.0.0/33\n\n1.2.3.4\n", 10);
        assert_eq!(total, 2);
        assert_eq!(
            bad[0],
            BadLine {
                line: 2,
                text: "not-an-ip".into()
            }
        );
        assert_eq!(bad[1].line, 3);
        let (bad, _) = IpSetBuilder::new().add_list("root:$6$salt$hash:19000::\n::1/200\n", 10);
        assert_eq!(bad[0].text, "(not an address; text not shown)");
        assert_eq!(bad[1].text, "::1/200");
    }

    #[test]
    fn empty_set_contains_nothing() {
        let s = IpSet::default();
        assert!(!s.contains(ip("0.0.0.0")));
        assert!(s.is_empty());
    }
}
