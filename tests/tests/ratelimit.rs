//! End-to-end rate limiting through the real binary: local GCRA, headers, independent keys,
//! scope, count mode, and fleet-wide limits shared by two proxies through a real redis-server,
//! including Redis dying mid-test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::time::{Duration, Instant};

use palisade_tests::*;

fn upstream(b: &Backend) -> String {
    format!("upstreams:\n  b:\n    targets: [\"{}\"]\nroutes:\n  - name: api\n    upstream: b\n  - name: login\n    path_prefix: /login\n    upstream: b\n", b.addr)
}

async fn get(addr: std::net::SocketAddr, path: &str, headers: &[&str]) -> RawResponse {
    get_from("127.0.0.1", addr, path, headers).await
}

#[tokio::test]
async fn burst_over_the_limit_gets_429_with_standard_headers() {
    let b = Backend::start("b").await;
    let cfg = format!(
        "{}rate_limits:\n  - name: per-ip\n    key: [ip]\n    rate: 1/min\n    burst: 5\n    headers: always\n",
        upstream(&b)
    );
    let p = Palisade::start(&cfg).await;
    let mut statuses = vec![];
    let mut last_ok = None;
    let mut first_limited = None;
    for _ in 0..8 {
        let r = get(p.addr, "/x", &[]).await;
        statuses.push(r.status);
        if r.status == 200 {
            last_ok = Some(r);
        } else if first_limited.is_none() {
            first_limited = Some(r);
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    assert_eq!(b.count(), 5, "limited requests must not reach the backend");

    let ok = last_ok.unwrap();
    assert_eq!(ok.header("ratelimit-policy"), Some("\"per-ip\";q=1;w=60"));
    assert!(
        ok.header("ratelimit")
            .unwrap()
            .starts_with("\"per-ip\";r=0;t="),
        "{:?}",
        ok.headers
    );

    let l = first_limited.unwrap();
    assert_eq!(l.json()["error"], "rate_limited");
    let retry: u64 = l.header("retry-after").unwrap().parse().unwrap();
    assert!((55..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(l.header("ratelimit-policy"), Some("\"per-ip\";q=1;w=60"));
    assert!(l
        .header("ratelimit")
        .unwrap()
        .starts_with("\"per-ip\";r=0;t="));
    p.expect_metric(
        "palisade_ratelimit_limited_total{action=\"block\",rule=\"per-ip\"}",
        3.0,
    )
    .await;
    p.expect_metric(
        "palisade_blocked_total{reason=\"rate_limited\",route=\"api\",stage=\"ratelimit\"}",
        3.0,
    )
    .await;
}

#[tokio::test]
async fn allowed_count_follows_the_rate_over_time() {
    let b = Backend::start("b").await;
    // 20/s with a burst of 5: over 1.5 s of hammering, about 5 + 20 × 1.5 = 35 get through.
    let cfg = format!(
        "{}rate_limits:\n  - name: r\n    key: [ip]\n    rate: 20/s\n    burst: 5\n",
        upstream(&b)
    );
    let p = Palisade::start(&cfg).await;
    let start = Instant::now();
    let mut ok = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        if get(p.addr, "/", &[]).await.status == 200 {
            ok += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let expected = 5.0 + 20.0 * elapsed;
    assert!(
        (ok as f64 - expected).abs() <= 4.0,
        "allowed {ok}, expected about {expected:.1} over {elapsed:.2}s"
    );
}

#[tokio::test]
async fn different_keys_are_independent_and_scope_applies() {
    let b = Backend::start("b").await;
    let cfg = format!(
        "{}rate_limits:\n  - name: per-key\n    key: [\"header:x-api-key\"]\n    rate: 1/min\n    burst: 2\n  - name: login\n    key: [ip]\n    rate: 1/min\n    burst: 1\n    scope: {{routes: [login], methods: [POST]}}\n",
        upstream(&b)
    );
    let p = Palisade::start(&cfg).await;
    let st = |k: &'static str| {
        let addr = p.addr;
        async move { get(addr, "/", &[&format!("X-Api-Key: {k}")]).await.status }
    };
    assert_eq!(
        [st("a").await, st("a").await, st("a").await],
        [200, 200, 429]
    );
    assert_eq!(
        [st("b").await, st("b").await, st("b").await],
        [200, 200, 429],
        "key b has its own bucket"
    );
    // Requests without the key part are not counted by the rule (as in AWS WAF).
    for _ in 0..4 {
        assert_eq!(get(p.addr, "/", &[]).await.status, 200);
    }
    // The login rule only applies to POST on the login route.
    for _ in 0..3 {
        assert_eq!(
            get(p.addr, "/login", &[]).await.status,
            200,
            "GET is out of scope"
        );
    }
    let post = b"POST /login HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_request(p.addr, post).await.unwrap().status, 200);
    assert_eq!(raw_request(p.addr, post).await.unwrap().status, 429);
}

#[tokio::test]
async fn count_mode_only_counts() {
    let b = Backend::start("b").await;
    let cfg = format!(
        "{}rate_limits:\n  - name: dry\n    key: [ip]\n    rate: 1/min\n    burst: 1\n    action: count\n",
        upstream(&b)
    );
    let p = Palisade::start(&cfg).await;
    for _ in 0..4 {
        assert_eq!(get(p.addr, "/", &[]).await.status, 200);
    }
    assert_eq!(b.count(), 4);
    p.expect_metric(
        "palisade_ratelimit_limited_total{action=\"count\",rule=\"dry\"}",
        3.0,
    )
    .await;
    p.expect_metric(
        "palisade_counted_total{label=\"ratelimit:dry\",route=\"api\"}",
        3.0,
    )
    .await;
}

fn redis_cfg(b: &Backend, redis: &RedisServer, on_error: &str) -> String {
    format!(
        "{}redis:\n  url: \"{}\"\n  timeout: 200ms\n  on_error: {on_error}\n  retry_after: 300ms\nrate_limits:\n  - name: shared\n    key: [\"header:x-tenant\"]\n    rate: 1/min\n    burst: 10\n    store: redis\n",
        upstream(b),
        redis.url()
    )
}

#[tokio::test]
async fn two_proxies_share_one_limit_through_redis() {
    let redis = RedisServer::start().await;
    let b = Backend::start("b").await;
    let p1 = Palisade::start(&redis_cfg(&b, &redis, "local")).await;
    let p2 = Palisade::start(&redis_cfg(&b, &redis, "local")).await;
    let mut ok = 0;
    for i in 0..16 {
        let p = if i % 2 == 0 { &p1 } else { &p2 };
        let r = get(p.addr, "/", &["X-Tenant: acme"]).await;
        match r.status {
            200 => ok += 1,
            429 => assert!(r.header("retry-after").is_some()),
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(
        ok, 10,
        "the two proxies must enforce one shared burst of 10"
    );
    // Another tenant is a separate bucket, on either proxy.
    assert_eq!(get(p2.addr, "/", &["X-Tenant: other"]).await.status, 200);
    let m = p1.metrics().await;
    assert!(
        metric_value(&m, "palisade_redis_duration_seconds_count") >= 8.0,
        "{m}"
    );
}

async fn hammer_quickly(p: &Palisade, n: usize) -> Vec<u16> {
    let mut out = vec![];
    for _ in 0..n {
        let t = Instant::now();
        let r = get(p.addr, "/", &["X-Tenant: acme"]).await;
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a request hung while Redis was down"
        );
        out.push(r.status);
    }
    out
}

#[tokio::test]
async fn redis_dying_mid_test_follows_the_failure_policy() {
    let mut redis = RedisServer::start().await;
    let b = Backend::start("b").await;
    let open = Palisade::start(&redis_cfg(&b, &redis, "allow")).await;
    let closed = Palisade::start(&redis_cfg(&b, &redis, "block")).await;
    let local = Palisade::start(&redis_cfg(&b, &redis, "local")).await;
    // Healthy: the shared burst of 10 is used up across the three proxies.
    let mut ok = 0;
    for p in [&open, &closed, &local, &open] {
        ok += hammer_quickly(p, 4)
            .await
            .iter()
            .filter(|s| **s == 200)
            .count();
    }
    assert_eq!(ok, 10);

    redis.kill();
    // Fail open: everything passes. Fail closed: 503. Local fallback: a per-proxy limiter
    // with the same rule (burst 10), so 10 of 14 pass.
    assert!(hammer_quickly(&open, 14).await.iter().all(|s| *s == 200));
    let c = hammer_quickly(&closed, 5).await;
    assert!(c.iter().all(|s| *s == 503), "{c:?}");
    let l = hammer_quickly(&local, 14).await;
    assert_eq!(l.iter().filter(|s| **s == 200).count(), 10, "{l:?}");
    assert_eq!(l.iter().filter(|s| **s == 429).count(), 4, "{l:?}");
    for p in [&open, &closed, &local] {
        assert!(
            p.metric("palisade_redis_errors_total{kind=\"error\"}")
                .await
                + p.metric("palisade_redis_errors_total{kind=\"timeout\"}")
                    .await
                >= 1.0
        );
        assert!(
            p.log().contains("redis rate-limit check failed"),
            "{}",
            p.log()
        );
    }
    let r = get(closed.addr, "/", &["X-Tenant: acme"]).await;
    assert_eq!(r.json()["error"], "rate_limit_unavailable");

    // Redis comes back (empty): the shared limit applies again once the retry window passes.
    redis.restart().await;
    let back = eventually(Duration::from_secs(10), || async {
        get(closed.addr, "/", &["X-Tenant: fresh"]).await.status == 200
    })
    .await;
    assert!(
        back,
        "fail-closed proxy did not recover after Redis came back"
    );
}

#[test]
fn rate_limit_config_errors_are_located() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.yaml");
    std::fs::write(
        &cfg,
        "listeners: [{address: \"127.0.0.1:1\"}]\nupstreams:\n  b:\n    targets: [\"127.0.0.1:2\"]\nroutes:\n  - name: r\n    upstream: b\nrate_limits:\n  - name: a\n    key: [ip/40, \"header:\"]\n    rate: 10/fortnight\n  - name: b\n    rate: 5/s\n    store: redis\n    scope: {routes: [nope], path: \"([\"}\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(":10:11: rate limit \"a\": invalid rate-limit key part \"ip/40\""),
        "{err}"
    );
    assert!(
        err.contains(":10:18: rate limit \"a\": invalid rate-limit key part \"header:\""),
        "{err}"
    );
    assert!(
        err.contains(":11:11: rate limit \"a\": invalid rate \"10/fortnight\""),
        "{err}"
    );
    assert!(
        err.contains("rate limit \"b\": `store: redis` needs a `redis:` section"),
        "{err}"
    );
    assert!(
        err.contains(":15:22: rate limit \"b\": scope names unknown route \"nope\""),
        "{err}"
    );
    assert!(
        err.contains("rate limit \"b\": invalid path regex"),
        "{err}"
    );
}
