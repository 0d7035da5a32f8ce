//! Faults around the proxy, each served per the documented policy (SECURITY.md, "Fail-open and
//! fail-closed"): an upstream that resets mid-response or mid-body, a slow Redis, a reload whose
//! mmdb file is gone. The proxy answers with its JSON errors and keeps serving.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::time::{Duration, Instant};

use palisade_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP "backend" that reads a request head, then misbehaves per `mode` and closes.
async fn bad_backend(mode: &'static str) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                match mode {
                    // Half a response head, then a reset.
                    "reset-mid-response" => {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Le").await;
                    }
                    // A response that promises more body than it sends.
                    "short-body" => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
                            .await;
                    }
                    // Closes while the client is still sending its body.
                    _ => {}
                }
                // A reset rather than an orderly close.
                #[allow(deprecated, reason = "a zero linger never blocks on drop")]
                let _ = s.set_linger(Some(Duration::ZERO));
                drop(s);
            });
        }
    });
    addr
}

#[tokio::test]
async fn upstream_resets_are_502_and_the_proxy_keeps_serving() {
    let reset = bad_backend("reset-mid-response").await;
    let mid_body = bad_backend("close-mid-body").await;
    let short = bad_backend("short-body").await;
    let good = Backend::start("good").await;
    let cfg = format!(
        "timeouts:\n  upstream_read: 2s\nupstreams:\n  reset: {{targets: [\"{reset}\"]}}\n  midbody: {{targets: [\"{mid_body}\"]}}\n  short: {{targets: [\"{short}\"]}}\n  good: {{targets: [\"{}\"]}}\nroutes:\n  - {{name: reset, path_prefix: /reset, upstream: reset}}\n  - {{name: midbody, path_prefix: /midbody, upstream: midbody}}\n  - {{name: short, path_prefix: /short, upstream: short}}\n  - {{name: good, path_prefix: /, upstream: good}}\n",
        good.addr
    );
    let p = Palisade::start(&cfg).await;
    let r = raw_get(p.addr, "/reset").await.unwrap();
    assert_eq!(r.status, 502, "{}", r.body_string());
    assert_eq!(r.json()["error"], "upstream_unavailable");

    // A large body (past the inspection limit, streamed) to an upstream that hangs up.
    let body = pattern_body(2 * 1024 * 1024);
    let req = http1_request(
        "POST",
        "/midbody",
        "t",
        &[("Content-Type".into(), "application/octet-stream".into())],
        &body,
    );
    let r = raw_request(p.addr, &req).await;
    if let Some(r) = r {
        assert!(r.status == 502 || r.status == 413, "{}", r.body_string());
    }

    // A truncated upstream body cannot be turned into an error any more (the head went out):
    // the client's connection is closed early, the proxy goes on.
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /short HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // Still serving, and never a crash.
    for _ in 0..20 {
        let r = raw_get(p.addr, "/ok").await.unwrap();
        assert_eq!(r.status, 200);
    }
    assert!(!p.log().contains("panicked"), "{}", p.log());
}

#[tokio::test]
async fn a_slow_redis_gets_the_on_error_policy_within_its_timeout() {
    let b = Backend::start("b").await;
    let redis = RedisServer::start().await;
    for (policy, status) in [("block", 503), ("allow", 200)] {
        let cfg = format!(
            "upstreams:\n  b: {{targets: [\"{}\"]}}\nredis:\n  url: \"{}\"\n  timeout: 200ms\n  on_error: {policy}\n  retry_after: 100ms\nrate_limits:\n  - name: shared\n    key: [\"header:x-tenant\"]\n    rate: 100/min\n    burst: 100\n    store: redis\nroutes:\n  - {{name: r, upstream: b}}\n",
            b.addr,
            redis.url()
        );
        let p = Palisade::start(&cfg).await;
        let r = get_from("127.0.0.1", p.addr, "/x", &["X-Tenant: a"]).await;
        assert_eq!(r.status, 200, "{}", r.body_string());
        // Redis stalls for 3 s (every client paused): each check times out after 200 ms.
        let paused = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &redis.port().to_string(),
                "CLIENT",
                "PAUSE",
                "3000",
                "ALL",
            ])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&paused.stdout).contains("OK"),
            "{paused:?}"
        );
        let started = Instant::now();
        let r = get_from("127.0.0.1", p.addr, "/x", &["X-Tenant: a"]).await;
        assert_eq!(r.status, status, "{policy}: {}", r.body_string());
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{policy}: waited {:?}",
            started.elapsed()
        );
        // Redis back: checks succeed again.
        let ok = eventually(Duration::from_secs(5), || async {
            get_from("127.0.0.1", p.addr, "/x", &["X-Tenant: a"])
                .await
                .status
                == 200
        })
        .await;
        assert!(ok, "{policy}: not served again after Redis came back");
    }
}

#[tokio::test]
async fn a_reload_with_a_missing_mmdb_keeps_the_running_snapshot() {
    let b = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let csv = repo_path("geoip/test-country.csv");
    let db = dir.path().join("country.mmdb");
    let (code, _, err) = run_cli(&[
        "geoip",
        "build",
        "--kind",
        "country",
        "--csv",
        csv.to_str().unwrap(),
        "--out",
        db.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let cfg = format!(
        "reload: {{watch: false}}\ngeoip:\n  country_db: country.mmdb\nupstreams:\n  b: {{targets: [\"{}\"]}}\nroutes:\n  - name: r\n    upstream: b\n    policy:\n      geo: {{deny: [US], unknown: block}}\n",
        b.addr
    );
    let p = Palisade::start_in(dir, &cfg, false).await;
    // Loopback is in no country: `unknown: block`.
    let r = raw_get(p.addr, "/x").await.unwrap();
    assert_eq!(r.status, 403, "{}", r.body_string());
    std::fs::remove_file(p.dir.join("country.mmdb")).unwrap();
    let r = raw_request(
        p.admin,
        b"POST /reload HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 422, "{}", r.body_string());
    assert!(
        r.body_string().contains("country.mmdb"),
        "{}",
        r.body_string()
    );
    // The running snapshot (with its database) goes on deciding.
    let r = raw_get(p.addr, "/x").await.unwrap();
    assert_eq!(r.status, 403, "{}", r.body_string());
}
