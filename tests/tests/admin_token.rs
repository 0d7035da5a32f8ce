//! `POST /reload` with an admin token: only `Authorization: Bearer <token>` may reload. A test
//! binary of its own: the token comes from `PALISADE_ADMIN_TOKEN`, which the proxy inherits.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use palisade_tests::{raw_request, Backend, Palisade};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

async fn post_reload(p: &Palisade, auth: Option<&str>) -> u16 {
    let header = auth
        .map(|a| format!("authorization: {a}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST /reload HTTP/1.1\r\nHost: admin\r\n{header}content-length: 0\r\nconnection: close\r\n\r\n"
    );
    raw_request(p.admin, req.as_bytes()).await.unwrap().status
}

#[tokio::test]
async fn reload_needs_the_bearer_token_when_one_is_set() {
    // Set before any proxy starts; no other test runs in this binary.
    std::env::set_var("PALISADE_ADMIN_TOKEN", TOKEN);
    let backend = Backend::start("app").await;
    let p = Palisade::start(&format!(
        "upstreams:\n  app:\n    targets: [\"{}\"]\nroutes:\n  - name: r\n    upstream: app\n",
        backend.addr
    ))
    .await;
    assert_eq!(
        post_reload(&p, None).await,
        401,
        "no token, even from loopback"
    );
    assert_eq!(
        post_reload(&p, Some("Bearer wrong-token-0123456789")).await,
        401
    );
    assert_eq!(post_reload(&p, Some(&format!("Basic {TOKEN}"))).await, 401);
    assert_eq!(post_reload(&p, Some(&format!("Bearer {TOKEN}"))).await, 200);
    assert_eq!(post_reload(&p, Some(&format!("bearer {TOKEN}"))).await, 200);
    let r = raw_request(
        p.admin,
        b"GET /reload HTTP/1.1\r\nHost: admin\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 405, "reload is POST only");
}
