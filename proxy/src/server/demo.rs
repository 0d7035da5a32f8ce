//! The built-in demo backend: a JSON echo on an ephemeral loopback port, so that
//! `palisade run` with no configuration shows a request going through the proxy.

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use super::reply;

/// Echoes the request it received as a small JSON document.
pub struct DemoBackend;

#[async_trait]
impl ServeHttp for DemoBackend {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // Read (and count) the whole body so the connection can be reused.
        let mut body_bytes: u64 = 0;
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => body_bytes += chunk.len() as u64,
                Ok(None) => break,
                Err(_) => {
                    session.set_keepalive(None);
                    break;
                }
            }
        }
        let req = session.req_header();
        let headers: serde_json::Map<String, serde_json::Value> = req
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
                )
            })
            .collect();
        let body = serde_json::json!({
            "service": "palisade demo backend",
            "method": req.method.as_str(),
            "path": req.uri.path(),
            "query": req.uri.query().unwrap_or(""),
            "headers": headers,
            "body_bytes": body_bytes,
        })
        .to_string()
        .into_bytes();
        reply(200, "application/json", body)
    }
}
