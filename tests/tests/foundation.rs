//! End-to-end tests of the foundation: the real `palisade` binary in front of real backends.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::time::Duration;

use palisade_tests::*;

fn upstream_yaml(name: &str, backends: &[&Backend]) -> String {
    let targets: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    format!("  {name}:\n    targets: [{}]\n", targets.join(", "))
}

#[tokio::test]
async fn default_config_serves_the_demo_backend_and_counts_it() {
    let p = Palisade::start_args(&[]).await;
    let r = raw_get(p.addr, "/anything?x=1").await.unwrap();
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["service"], "palisade demo backend");
    assert_eq!(j["path"], "/anything");
    assert_eq!(j["query"], "x=1");
    // The upstream got our request id and X-Forwarded-For; the client got the same id.
    let id = r.header("x-request-id").unwrap();
    assert_eq!(j["headers"]["x-request-id"], id);
    assert_eq!(j["headers"]["x-forwarded-for"], "127.0.0.1");
    // Metrics are recorded in the logging phase, just after the response is written.
    p.expect_metric(
        "palisade_requests_total{decision=\"forwarded\",route=\"default\"}",
        1.0,
    )
    .await;
    let m = p.metrics().await;
    assert!(m.contains("palisade_request_duration_seconds_bucket{route=\"default\""));
}

#[tokio::test]
async fn upstream_flag_replaces_the_demo_backend() {
    let b = Backend::start("real").await;
    let p = Palisade::start_args(&["--upstream", &format!("http://{}", b.addr)]).await;
    let r = raw_get(p.addr, "/x").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["backend"], "real");
    assert_eq!(b.count(), 1);
}

#[tokio::test]
async fn routes_by_host_and_longest_path_prefix() {
    let (api, admin, web, other) = (
        Backend::start("api").await,
        Backend::start("admin").await,
        Backend::start("web").await,
        Backend::start("other").await,
    );
    let cfg = format!(
        "upstreams:\n{}{}{}{}routes:\n  - name: web\n    upstream: web\n  - name: api\n    path_prefix: /api\n    upstream: api\n  - name: api-admin\n    path_prefix: /api/admin\n    upstream: admin\n  - name: other-host\n    host: \"*.other.test\"\n    upstream: other\n",
        upstream_yaml("api", &[&api]),
        upstream_yaml("admin", &[&admin]),
        upstream_yaml("web", &[&web]),
        upstream_yaml("other", &[&other]),
    );
    let p = Palisade::start(&cfg).await;
    let get = |host: &'static str, path: &'static str| {
        let addr = p.addr;
        async move {
            let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            let r = raw_request(addr, req.as_bytes()).await.unwrap();
            assert_eq!(r.status, 200, "{host}{path}: {}", r.body_string());
            r.json()["backend"].as_str().unwrap().to_string()
        }
    };
    assert_eq!(get("a.test", "/").await, "web");
    assert_eq!(get("a.test", "/api").await, "api");
    assert_eq!(get("a.test", "/api/users?q=1").await, "api");
    assert_eq!(
        get("a.test", "/apix").await,
        "web",
        "prefixes match whole segments"
    );
    assert_eq!(get("a.test", "/api/admin/x").await, "admin");
    assert_eq!(get("www.other.test:8080", "/api").await, "other");
    assert_eq!(
        get("other.test", "/").await,
        "web",
        "wildcard needs a sub-domain"
    );
}

#[tokio::test]
async fn no_route_is_a_json_404() {
    let b = Backend::start("b").await;
    let cfg = format!(
        "upstreams:\n{}routes:\n  - name: api\n    path_prefix: /api\n    upstream: b\n",
        upstream_yaml("b", &[&b])
    );
    let p = Palisade::start(&cfg).await;
    let r = raw_get(p.addr, "/elsewhere").await.unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "no_route");
    assert_eq!(b.count(), 0);
}

#[tokio::test]
async fn blocked_requests_never_reach_the_backend() {
    let b = Backend::start("b").await;
    let cfg = format!(
        "upstreams:\n{}routes:\n  - name: api\n    upstream: b\n    policy:\n      methods: [GET, post]\n  - name: internal\n    path_prefix: /internal\n    upstream: b\n    policy:\n      deny: {{status: 403, reason: internal_path}}\n",
        upstream_yaml("b", &[&b])
    );
    let p = Palisade::start(&cfg).await;

    let r = raw_get(p.addr, "/internal/secrets").await.unwrap();
    assert_eq!(r.status, 403);
    let j = r.json();
    assert_eq!(j["error"], "internal_path");
    assert_eq!(j["request_id"], r.header("x-request-id").unwrap());
    assert_eq!(r.header("content-type"), Some("application/json"));

    // A blocked request with a body: the body is never read nor forwarded.
    let req = b"DELETE /users/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
    let r = raw_request(p.addr, req).await.unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"], "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET, POST"));

    assert_eq!(b.count(), 0, "backend saw a blocked request");
    let ok = raw_get(p.addr, "/users").await.unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(b.count(), 1);

    p.expect_metric(
        "palisade_blocked_total{reason=\"internal_path\",route=\"internal\",stage=\"access\"}",
        1.0,
    )
    .await;
    p.expect_metric(
        "palisade_blocked_total{reason=\"method_not_allowed\",route=\"api\",stage=\"access\"}",
        1.0,
    )
    .await;
    // One log line per blocked request.
    assert!(
        eventually(Duration::from_secs(5), || async {
            p.log().matches("request blocked").count() == 2
        })
        .await,
        "{}",
        p.log()
    );
}

#[tokio::test]
async fn passive_failover_to_a_live_server() {
    let live = Backend::start("live").await;
    let dead_port = free_port(); // nothing listens there
    let cfg = format!(
        "upstreams:\n  pool:\n    targets: [\"127.0.0.1:{dead_port}\", \"{}\"]\n    passive: {{failures: 1, ejection: 30s}}\nroutes:\n  - name: r\n    upstream: pool\n",
        live.addr
    );
    let p = Palisade::start(&cfg).await;
    for i in 0..10 {
        let r = raw_get(p.addr, &format!("/{i}")).await.unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.body_string());
    }
    assert_eq!(live.count(), 10);
    // The dead server was tried once, then ejected.
    let m = p.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "palisade_upstream_errors_total{kind=\"connect\",upstream=\"pool\"}"
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn active_health_check_fails_over_and_readyz_follows() {
    let a = Backend::start("a").await;
    let mut b = Backend::start("b").await;
    let cfg = format!(
        "upstreams:\n  pool:\n    targets: [\"{}\", \"{}\"]\n    health_check: {{kind: http, path: /health, interval: 100ms}}\nroutes:\n  - name: r\n    upstream: pool\n",
        a.addr, b.addr
    );
    let p = Palisade::start(&cfg).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            raw_get(p.admin, "/readyz")
                .await
                .is_some_and(|r| r.status == 200)
        })
        .await
    );
    b.stop();
    // Health checks notice; every request then goes to `a` and succeeds.
    assert!(
        eventually(Duration::from_secs(10), || async {
            raw_get(p.admin, "/readyz")
                .await
                .is_some_and(|r| r.json()["upstreams"][0]["usable"] == 1)
        })
        .await
    );
    let before = a.count();
    for _ in 0..6 {
        assert_eq!(raw_get(p.addr, "/").await.unwrap().status, 200);
    }
    assert!(a.count() >= before + 6);
}

#[tokio::test]
async fn readyz_is_503_when_no_server_is_usable() {
    let dead = free_port();
    let cfg = format!(
        "upstreams:\n  pool:\n    targets: [\"127.0.0.1:{dead}\"]\n    health_check: {{kind: tcp, interval: 100ms}}\nroutes:\n  - name: r\n    upstream: pool\n"
    );
    let p = Palisade::start(&cfg).await;
    assert_eq!(raw_get(p.admin, "/healthz").await.unwrap().status, 200);
    assert!(
        eventually(Duration::from_secs(10), || async {
            raw_get(p.admin, "/readyz")
                .await
                .is_some_and(|r| r.status == 503)
        })
        .await
    );
    assert_eq!(raw_get(p.admin, "/nope").await.unwrap().status, 404);
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_upstream_is_504() {
    let dead = free_port();
    let slow = Backend::start_with(
        "slow",
        BackendBehavior {
            delay: Duration::from_secs(5),
            status: 200,
        },
    )
    .await;
    let cfg = format!(
        "timeouts:\n  upstream_connect: 1s\n  upstream_read: 300ms\nupstreams:\n  dead:\n    targets: [\"127.0.0.1:{dead}\"]\n  slow:\n    targets: [\"{}\"]\nroutes:\n  - name: dead\n    path_prefix: /dead\n    upstream: dead\n  - name: slow\n    path_prefix: /slow\n    upstream: slow\n",
        slow.addr
    );
    let p = Palisade::start(&cfg).await;
    let r = raw_get(p.addr, "/dead").await.unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"], "upstream_unavailable");
    assert!(r.json()["request_id"].is_string());
    let started = std::time::Instant::now();
    let r = raw_get(p.addr, "/slow").await.unwrap();
    assert_eq!(r.status, 504, "{}", r.body_string());
    assert_eq!(r.json()["error"], "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "504 must come from the read timeout"
    );
}

// ---- body buffering and the oversize policy ----

const LIMIT: usize = 1024;

async fn body_proxy(oversize: &str, b: &Backend) -> Palisade {
    let cfg = format!(
        "body:\n  inspect_limit: {LIMIT}\n  oversize: {oversize}\nupstreams:\n{}routes:\n  - name: r\n    upstream: b\n",
        upstream_yaml("b", &[b])
    );
    Palisade::start(&cfg).await
}

fn post(body_len: usize, chunk: Option<usize>) -> (Vec<u8>, Vec<u8>) {
    let body = pattern_body(body_len);
    let mut req = b"POST /upload HTTP/1.1\r\nHost: t\r\nConnection: close\r\n".to_vec();
    match chunk {
        None => {
            req.extend_from_slice(format!("Content-Length: {body_len}\r\n\r\n").as_bytes());
            req.extend_from_slice(&body);
        }
        Some(c) => {
            req.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            req.extend_from_slice(&chunked(&body, c));
        }
    }
    (req, body)
}

#[tokio::test]
async fn bodies_within_the_limit_reach_the_backend_byte_for_byte() {
    let b = Backend::start("b").await;
    let p = body_proxy("block", &b).await;
    let mut expected = 0;
    for len in [0, 1, LIMIT - 1, LIMIT] {
        for chunk in [None, Some(100), Some(4096)] {
            if len == 0 && chunk.is_some() {
                continue;
            }
            let (req, body) = post(len, chunk);
            let r = raw_request(p.addr, &req).await.unwrap();
            assert_eq!(
                r.status,
                200,
                "len {len} chunk {chunk:?}: {}",
                r.body_string()
            );
            expected += 1;
            let seen = b.seen();
            assert_eq!(seen.len(), expected);
            assert_eq!(seen.last().unwrap().body, body, "len {len} chunk {chunk:?}");
        }
    }
}

#[tokio::test]
async fn oversize_block_answers_413_and_the_backend_sees_nothing() {
    let b = Backend::start("b").await;
    let p = body_proxy("block", &b).await;
    for (len, chunk) in [
        (LIMIT + 1, None),
        (LIMIT + 1, Some(100)),
        (10 << 20, None),
        (10 << 20, Some(16384)),
    ] {
        let (req, _) = post(len, chunk);
        let r = raw_request(p.addr, &req).await.unwrap();
        assert_eq!(r.status, 413, "len {len} chunk {chunk:?}");
        assert_eq!(r.json()["error"], "body_too_large");
    }
    assert_eq!(b.count(), 0);
    p.expect_metric(
        "palisade_blocked_total{reason=\"body_too_large\",route=\"r\",stage=\"body\"}",
        4.0,
    )
    .await;
}

#[tokio::test]
async fn oversize_continue_forwards_large_bodies_intact() {
    let b = Backend::start("b").await;
    let p = body_proxy("continue", &b).await;
    let mut expected = 0;
    for (len, chunk) in [
        (LIMIT - 1, None),
        (LIMIT, Some(100)),
        (LIMIT + 1, None),
        (LIMIT + 1, Some(100)),
        (10 << 20, None),
        (10 << 20, Some(8192)),
    ] {
        let (req, body) = post(len, chunk);
        let r = raw_request(p.addr, &req).await.unwrap();
        assert_eq!(
            r.status,
            200,
            "len {len} chunk {chunk:?}: {}",
            r.body_string()
        );
        expected += 1;
        let seen = b.seen();
        assert_eq!(seen.len(), expected);
        assert!(
            seen.last().unwrap().body == body,
            "len {len} chunk {chunk:?}: body differs"
        );
    }
}

#[tokio::test]
async fn a_slow_upload_does_not_stall_other_requests() {
    let b = Backend::start("b").await;
    let p = body_proxy("block", &b).await;
    // Start a chunked upload and leave it hanging half-way.
    let mut slow = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    slow.write_all(
        b"POST /slow HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    for _ in 0..20 {
        assert_eq!(raw_get(p.addr, "/fast").await.unwrap().status, 200);
    }
    slow.write_all(b"0\r\n\r\n").await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.seen()
                .iter()
                .any(|s| s.uri == "/slow" && &s.body[..] == b"hello")
        })
        .await
    );
}

// ---- configuration errors ----

#[test]
fn check_reports_every_error_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "listeners:\n  - address: \"127.0.0.1:8080\"\nupstreams:\n  app:\n    targets: [\"127.0.0.1:3000\"]\nroutes:\n  - name: a\n    upstream: missing\n  - name: a\n    path_prefix: /b\n    upstream: app\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    let p = path.display().to_string();
    assert!(
        err.contains(&format!(
            "{p}:8:15: route \"a\": unknown upstream \"missing\""
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{p}:9:11: duplicate route name \"a\"")),
        "{err}"
    );
    assert!(err.contains("2 error(s)"), "{err}");

    std::fs::write(
        &path,
        "listeners: []\nroutes:\n  - name: a\n    upstrem: x\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{p}:4:5: unknown field `upstrem`")),
        "{err}"
    );

    // `run` refuses a bad config the same way, without starting.
    let (code, _, err) = run_cli(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains(":4:5:"), "{err}");
}

#[test]
fn check_accepts_the_embedded_default_and_shipped_examples() {
    let (code, out, err) = run_cli(&["check"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("OK"), "{out}");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (code, _, err) = run_cli(&["check", "--config", path.to_str().unwrap()]);
            assert_eq!(code, 0, "{}: {err}", path.display());
        }
    }
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let b = Backend::start("b").await;
    let cfg = format!(
        "h2c: true\nupstreams:\n{}routes:\n  - name: r\n    upstream: b\n",
        upstream_yaml("b", &[&b])
    );
    let p = Palisade::start(&cfg).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = client
        .post(p.url("/h2"))
        .body("over h2c")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let seen = b.seen();
    assert_eq!(&seen[0].body[..], b"over h2c");
}

/// A listener that cannot be bound when pingora builds it (after Palisade's own check: here two
/// spellings of one address, `127.0.0.1:P` and `[::ffff:127.0.0.1]:P`) stops the process with
/// the reason, instead of leaving it running without that listener. Pingora retries the bind
/// for 30 s first.
#[test]
fn a_listener_that_cannot_be_built_stops_the_process() {
    let [port, admin] = free_ports::<2>();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut child = std::process::Command::new(palisade_bin())
        .args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--listen", &format!("[::ffff:127.0.0.1]:{port}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "still running or wrong exit:\n{err}"
    );
    assert!(
        err.contains("palisade: cannot listen on a configured address"),
        "{err}"
    );
}
