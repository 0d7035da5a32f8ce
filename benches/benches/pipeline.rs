//! Per-request cost of Palisade's own request-path code, without the network: route matching
//! over a realistic route table and the header-stage pipeline.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use palisade::config::{load_str, Overrides};
use palisade::metrics::Metrics;
use palisade::pipeline::RequestView;
use palisade::snapshot::Snapshot;

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
    let config = Arc::new(load_str("bench.yaml", &config_yaml(50), &Overrides::default()).unwrap());
    let metrics = std::sync::Arc::new(Metrics::new().unwrap());
    let snapshot = Snapshot::build(config, Vec::new(), &[], &metrics);
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
        let mut counted = Vec::new();
        b.iter(|| {
            let view = RequestView {
                head: &parts,
                client_ip: None,
                geo: Default::default(),
                body: None,
                body_complete: false,
            };
            black_box(route.pipeline.run_header_stages(&view, &mut counted))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
