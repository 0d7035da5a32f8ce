//! Redirect listeners (`listeners[].redirect_to_https`): every request gets a redirect to
//! the same host and target over `https://`, as nginx's `return 301 https://$host$request_uri`.
//! Nothing is proxied or inspected there.

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use super::reply;

/// Answers every request with a redirect to `https://<host>[:port]<target>`.
pub struct RedirectToHttps {
    /// The HTTPS port (omitted from the URL when 443).
    pub port: u16,
}

/// The host of a `Host` header or absolute-form authority, without its port, when it is a
/// plain host name or IP literal: anything else gets a 400, never a redirect built from it.
fn host_only(authority: &str) -> Option<&str> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        // An IPv6 literal keeps its brackets.
        let end = rest.find(']')?;
        &authority[..end + 2]
    } else {
        authority.split(':').next()?
    };
    let ok = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':')
        });
    ok.then_some(host)
}

fn answer(status: u16, location: Option<String>) -> Response<Vec<u8>> {
    let body = match &location {
        Some(l) => serde_json::json!({"status": status, "location": l}),
        None => {
            serde_json::json!({"status": status, "error": "bad_request", "message": "no valid Host header to redirect to"})
        }
    };
    let mut r = reply(status, "application/json", body.to_string().into_bytes());
    if let Some(v) = location.and_then(|l| http::HeaderValue::from_str(&l).ok()) {
        r.headers_mut().insert(http::header::LOCATION, v);
    }
    r
}

#[async_trait]
impl ServeHttp for RedirectToHttps {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // A body is not read: the connection closes after the answer.
        session.set_keepalive(None);
        let req = session.req_header();
        let authority = req
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            });
        let Some(host) = authority.as_deref().and_then(host_only) else {
            return answer(400, None);
        };
        let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let port = if self.port == 443 {
            String::new()
        } else {
            format!(":{}", self.port)
        };
        let status = if matches!(req.method, http::Method::GET | http::Method::HEAD) {
            301
        } else {
            308
        };
        answer(status, Some(format!("https://{host}{port}{target}")))
    }
}

#[cfg(test)]
mod tests {
    use super::host_only;

    #[test]
    fn hosts() {
        assert_eq!(host_only("api.example.com:8080"), Some("api.example.com"));
        assert_eq!(host_only("api.example.com"), Some("api.example.com"));
        assert_eq!(host_only("[::1]:8080"), Some("[::1]"));
        assert_eq!(host_only("evil.example/x"), None);
        assert_eq!(host_only("a b"), None);
        assert_eq!(host_only(""), None);
    }
}
