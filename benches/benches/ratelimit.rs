//! Rate-limit cost per request: local GCRA (hot key, distinct keys), Redis GCRA (one Lua
//! round trip to a redis-server on loopback, started here if `redis-server` is installed), and
//! memory with 1,000,000 distinct keys, capped and uncapped.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use palisade::metrics::Metrics;
use palisade::ratelimit::local::LocalLimiter;
use palisade::ratelimit::redis::RedisStore;
use palisade::ratelimit::rule::*;

fn rule(max_keys: usize) -> RateLimitRule {
    RateLimitRule {
        name: "bench".into(),
        key: vec![],
        rate: Rate::parse("100/s").unwrap(),
        burst: 100,
        scope: RateLimitScope::default(),
        action: RateLimitAction::Block,
        store: RateLimitStore::Local,
        headers_always: false,
        max_keys,
    }
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn ip_key(i: u32) -> String {
    std::net::Ipv4Addr::from(0x0a00_0000 | i).to_string()
}

fn bench_local(c: &mut Criterion) {
    let l = LocalLimiter::new(&rule(100_000));
    c.bench_function("ratelimit_local_same_key", |b| {
        b.iter(|| black_box(l.check(black_box("192.0.2.1"))))
    });
    let keys: Vec<String> = (0..65536).map(ip_key).collect();
    let mut i = 0;
    c.bench_function("ratelimit_local_64k_keys", |b| {
        b.iter(|| {
            i = (i + 1) & 65535;
            black_box(l.check(&keys[i]))
        })
    });

    for (label, cap) in [
        ("uncapped (max_keys 2M)", 2_000_000),
        ("default cap (max_keys 100k)", 100_000),
    ] {
        let before = rss_kib();
        let l = LocalLimiter::new(&rule(cap));
        let t = std::time::Instant::now();
        for i in 0..1_000_000 {
            l.check(&ip_key(i));
        }
        let took = t.elapsed();
        let after = rss_kib();
        eprintln!(
            "1M distinct keys, {label}: {} keys tracked, RSS +{} MiB, {:.0} ns/check",
            l.len(),
            (after.saturating_sub(before)) / 1024,
            took.as_nanos() as f64 / 1e6
        );
        drop(l);
    }
}

fn bench_redis(c: &mut Criterion) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Ok(mut child) = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
    else {
        eprintln!("redis-server not installed: skipping the Redis benchmark");
        return;
    };
    std::thread::sleep(Duration::from_millis(300));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = RedisStore::new(RedisSettings {
        target: RedisTarget::Single(format!("redis://127.0.0.1:{port}/0")),
        timeout: Duration::from_secs(1),
        on_error: RedisOnError::Local,
        retry_after: Duration::from_secs(1),
    });
    let metrics = Metrics::new().unwrap();
    let interval = Duration::from_millis(10);
    rt.block_on(store.check("warm", interval, 100, &metrics))
        .unwrap();
    c.bench_function("ratelimit_redis_roundtrip", |b| {
        b.iter(|| {
            black_box(
                rt.block_on(store.check("palisade:rl:bench:k", interval, 100, &metrics))
                    .unwrap(),
            )
        })
    });
    let _ = child.kill();
    let _ = child.wait();
}

criterion_group!(benches, bench_local, bench_redis);
criterion_main!(benches);
