//! Per-request cost of Palisade's own request-path code, without the network: route matching
//! over a realistic route table and the header-stage pipeline.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use palisade::compile::{compile, CompileContext};
use palisade::config::{load_str, Overrides};
use palisade::metrics::Metrics;
use palisade::pipeline::{Notes, Step};
use palisade::request::{Request, RequestCache};

fn config_yaml(routes: usize) -> String {
    let mut y = String::from(
        "listeners: [{address: \"127.0.0.1:1\"}]\nupstreams:\n  app:\n    targets: [\"127.0.0.1:2\"]\nroutes:\n",
    );
    for i in 0..routes {
        y.push_str(&format!(
            "  - name: r{i}\n    host: \"h{}.example.com\"\n    path_prefix: /api/v{}/svc{i}\n    upstream: app\n    policy: {{methods: [GET, POST]}}\n",
            i % 5,
            i % 3
        ));
    }
    y.push_str("  - name: fallback\n    upstream: app\n");
    y
}

fn bench(c: &mut Criterion) {
    let config = load_str("bench.yaml", &config_yaml(50), &Overrides::default()).unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    let snapshot = compile(config, &CompileContext::first(&metrics, None)).unwrap();
    let req = http::Request::get("http://h2.example.com/api/v1/svc37/items?limit=10")
        .body(())
        .unwrap();
    let (parts, ()) = req.into_parts();

    c.bench_function("route_match_51_routes", |b| {
        b.iter(|| {
            snapshot.route_for(
                black_box("h2.example.com"),
                black_box("/api/v1/svc37/items"),
            )
        })
    });
    let ri = snapshot
        .route_for("h2.example.com", "/api/v1/svc37/items")
        .unwrap();
    let route = &snapshot.routes[ri];
    c.bench_function("header_stages_access", |b| {
        b.iter(|| {
            let cache = RequestCache::default();
            let view = Request::of_head(&parts, &cache);
            let mut notes = Notes::default();
            // Runs up to the body step (the header stages).
            black_box(matches!(
                route.pipeline.resume(0, false, &view, &mut notes),
                Step::Done(_)
            ))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
