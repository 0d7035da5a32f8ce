//! The operator's kit, end to end: decision logs (fields, redaction, a sink that cannot keep
//! up), and the metrics the shipped dashboard and alerts use.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::time::{Duration, Instant};

use palisade_tests::*;

const UA: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";

/// A rule set with a count rule, next to the managed sets.
fn beta_rules(dir: &std::path::Path) {
    std::fs::write(
        dir.join("beta.yaml"),
        "name: beta\nversion: \"1\"\nrules:\n  - id: count-beta\n    description: clients of the beta\n    action: count\n    match: {field: header:x-beta, equals: \"1\"}\n",
    )
    .unwrap();
}

fn config(backend: &Backend, decisions: &str) -> String {
    format!(
        "logging:\n  decisions: {decisions}\nrulesets: [builtin:managed, beta.yaml]\nupstreams:\n  app: {{targets: [\"{}\"]}}\nrate_limits:\n  - name: per-tenant\n    key: [\"header:x-tenant\"]\n    rate: 1/min\n    burst: 1\nroutes:\n  - name: api\n    upstream: app\n    policy:\n      rulesets: [{{name: sqli}}, {{name: beta}}]\n",
        backend.addr
    )
}

fn get(p: &Palisade, path: &str, headers: &[&str]) -> RawResponse {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: api.example\r\nUser-Agent: {UA}\r\nConnection: close\r\n"
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    block_on(raw_request(p.addr, req.as_bytes()))
}

/// Awaits on the current runtime (the tests are async; this keeps call sites short).
fn block_on<F: std::future::Future<Output = Option<RawResponse>>>(f: F) -> RawResponse {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
        .expect("an answer")
}

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_counted_and_rate_limited_requests_each_log_one_redacted_line() {
    let backend = Backend::start("api").await;
    let dir = tempfile::tempdir().unwrap();
    beta_rules(dir.path());
    let log = dir.path().join("decisions.log");
    let p = Palisade::start_in(
        dir,
        &config(
            &backend,
            "{file: decisions.log, stdout: false, redact_query: [token]}",
        ),
        false,
    )
    .await;

    let blocked = get(
        &p,
        "/items?q=1%27%20or%201%3D1--&token=s3cr3t",
        &[
            "Authorization: Bearer very-secret",
            "Cookie: session=abc123",
        ],
    );
    assert_eq!(blocked.status, 403, "{}", p.log());
    assert_eq!(get(&p, "/items", &["X-Beta: 1"]).status, 200);
    assert_eq!(get(&p, "/items", &["X-Tenant: t1"]).status, 200);
    assert_eq!(get(&p, "/items", &["X-Tenant: t1"]).status, 429);
    assert_eq!(get(&p, "/items", &[]).status, 200, "allowed: not logged");

    assert!(
        eventually(Duration::from_secs(5), || async { lines(&log).len() >= 3 }).await,
        "{}",
        p.log()
    );
    let l = lines(&log);
    assert_eq!(l.len(), 3, "{l:#?}");

    // The SQL injection: the terminating rule, where it matched, redacted credentials.
    let b = &l[0];
    assert_eq!(b["action"], "block");
    assert_eq!(b["status"], 403);
    assert_eq!(b["request_id"], blocked.header("x-request-id").unwrap());
    assert_eq!(b["generation"], 1);
    assert_eq!(b["client_ip"], "127.0.0.1");
    assert_eq!(b["method"], "GET");
    assert_eq!(b["host"], "api.example");
    assert_eq!(b["path"], "/items");
    assert_eq!(b["route"], "api");
    assert_eq!(b["terminating"]["stage"], "rules");
    assert_eq!(b["terminating"]["rule_set"], "sqli");
    let rule = b["terminating"]["rule"].as_str().unwrap();
    assert!(rule.starts_with("sqli"), "{b}");
    let m = b["matches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["rule"] == rule)
        .unwrap();
    assert_eq!(m["field"], "query:q", "{b}");
    assert!(m["snippet"].as_str().unwrap().contains("or 1=1"), "{b}");
    assert!(m["transforms"].is_array(), "{b}");
    assert_eq!(b["headers"]["authorization"], "[redacted]");
    assert_eq!(b["headers"]["cookie"], "[redacted]");
    assert_eq!(b["headers"]["user-agent"], UA);
    assert!(
        b["query"].as_str().unwrap().contains("token=[redacted]"),
        "{b}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    for secret in ["very-secret", "abc123", "s3cr3t"] {
        assert!(!text.contains(secret), "{secret} logged in clear");
    }
    assert!(b["inspection_us"].as_u64().is_some(), "{b}");
    assert_eq!(b["body_bytes"], 0);

    // The count rule: forwarded, logged with its label and where it matched.
    let c = &l[1];
    assert_eq!(c["action"], "count");
    assert_eq!(c["status"], 200);
    assert_eq!(c["labels"][0], "rule:count-beta");
    assert_eq!(c["matches"][0]["field"], "header:x-beta");
    assert_eq!(c["matches"][0]["action"], "count");
    assert!(c.get("terminating").is_none());

    // The rate limit: its rule and a hash of the key, never the key.
    let r = &l[2];
    assert_eq!(r["action"], "block");
    assert_eq!(r["status"], 429);
    assert_eq!(r["terminating"]["stage"], "ratelimit");
    assert_eq!(r["terminating"]["rule"], "per-tenant");
    let hash = r["matches"][0]["key_hash"].as_str().unwrap();
    assert_eq!(hash.len(), 16);
    assert!(!r["matches"].to_string().contains("t1|"), "{r}");
    p.expect_metric("palisade_decision_log_lines_total", 3.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_cannot_keep_up_drops_lines_without_slowing_requests() {
    let backend = Backend::start("api").await;
    let dir = tempfile::tempdir().unwrap();
    beta_rules(dir.path());
    // A FIFO nobody reads: the writer blocks on it forever.
    let fifo = dir.path().join("stuck.log");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let p = Palisade::start_in(
        dir,
        &config(&backend, "{file: stuck.log, stdout: false, queue: 5}"),
        false,
    )
    .await;
    let started = Instant::now();
    for _ in 0..100 {
        let r = get(&p, "/items?q=1%27%20or%201%3D1--", &[]);
        assert_eq!(r.status, 403);
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "100 blocked requests took {:?}",
        started.elapsed()
    );
    let dropped = p.metric("palisade_decision_log_dropped_total").await;
    assert!(dropped >= 94.0, "dropped {dropped}");
}
