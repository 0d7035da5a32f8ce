//! Request validation cost per request, through the stage the proxy runs: the example fitness
//! API (`examples/openapi.yaml`, imported from `schemas/fitness/openapi.yaml`), a valid and an
//! invalid 1 KB JSON body, and a GET whose query parameters are coerced and checked.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use palisade::config::{load_file, Overrides};
use palisade::pipeline::{Decision, Eval, Notes, Stage};
use palisade::request::{Request, RequestCache};
use palisade::schema::ValidateStage;

/// The proxy's allocator, so allocation costs match production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn stage(config: &str) -> ValidateStage {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cfg = load_file(&root.join(config), &Overrides::default()).unwrap();
    let metrics = std::sync::Arc::new(palisade::metrics::Metrics::new().unwrap());
    let snapshot = palisade::compile::compile(
        cfg,
        &palisade::compile::CompileContext::first(&metrics, Some(([127, 0, 0, 1], 9).into())),
    )
    .unwrap();
    let route = snapshot
        .routes
        .iter()
        .find(|r| r.validation.is_some())
        .unwrap();
    let metric = prometheus::IntCounterVec::new(
        prometheus::Opts::new("bench_failures", "bench"),
        &["route", "operation", "reason"],
    )
    .unwrap();
    ValidateStage::new(
        Arc::clone(route.validation.as_ref().unwrap()),
        &route.name,
        metric,
    )
}

/// A valid activity of about 1 KB (eight laps, tags, device, notes).
fn body_1k() -> String {
    let laps: Vec<String> = (0..8)
        .map(|i| {
            format!(
                r#"{{"duration_s":{},"distance_m":{}.5,"avg_hr":{}}}"#,
                300 + i,
                1000 + i,
                140 + i
            )
        })
        .collect();
    let body = format!(
        r#"{{"type":"run","started_at":"2026-11-20T07:30:00Z","duration_s":2710,"distance_m":8012.5,"elevation_gain_m":64,"heart_rate":{{"avg":151,"max":178,"min":96}},"title":"Morning run by the river","notes":"Felt good. Negative split, easy first half, pushed the last two kilometres along the river path; wind from the west, 6 degrees, dry. Shoes: trail pair, 420 km. Stretching afterwards, ten minutes, calves and hamstrings; breakfast at the cafe by the bridge.","tags":["easy","river-loop","long"],"laps":[{}],"device":{{"vendor":"Garmin","model":"Forerunner 265","firmware":"19.22"}}}}"#,
        laps.join(",")
    );
    assert!(
        (950..1150).contains(&body.len()),
        "body is {} bytes",
        body.len()
    );
    body
}

fn request(method: &str, uri: &str, body: &str) -> http::request::Parts {
    let (parts, ()) = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .header("content-length", body.len().to_string())
        .header("idempotency-key", "6f1c2b4e-8a3d-4f5e-9b7c-0d1e2f3a4b5c")
        .header("x-client-version", "2.31.0")
        .body(())
        .unwrap()
        .into_parts();
    parts
}

fn bench(c: &mut Criterion) {
    let s = stage("examples/openapi.yaml");
    let good = body_1k();
    let bad = good
        .replace(r#""type":"run""#, r#""type":"teleport""#)
        .replace(r#""avg":151"#, r#""avg":351"#);
    let post = request("POST", "/v1/activities", &good);
    let get = request(
        "GET",
        "/v1/activities?limit=20&cursor=eyJvIjoyMH0&type=run&type=ride&since=2026-11-01T00:00:00Z",
        "",
    );
    let post: &'static http::request::Parts = Box::leak(Box::new(post));
    let get: &'static http::request::Parts = Box::leak(Box::new(get));
    let good: &'static [u8] = Box::leak(good.into_bytes().into_boxed_slice());
    let bad: &'static [u8] = Box::leak(bad.into_bytes().into_boxed_slice());
    // A fresh request cache per evaluation, as each proxied request has: nothing parsed twice,
    // nothing carried over between iterations.
    let eval = |parts: &'static http::request::Parts, body: Option<&'static [u8]>| {
        let cache = RequestCache::default();
        let v = Request::of_head(parts, &cache).with_body(body, true);
        let mut notes = Notes::default();
        match s.evaluate(&v, &mut notes) {
            Eval::Done(d) => d,
            Eval::Pending(_) => unreachable!("validation never waits"),
        }
    };
    assert!(matches!(eval(post, Some(good)), Decision::Continue));
    c.bench_function("validate_post_1k_valid", |b| {
        b.iter(|| black_box(eval(black_box(post), Some(good))))
    });
    assert!(matches!(eval(post, Some(bad)), Decision::Block(_)));
    c.bench_function("validate_post_1k_invalid", |b| {
        b.iter(|| black_box(eval(black_box(post), Some(bad))))
    });
    assert!(matches!(eval(get, None), Decision::Continue));
    c.bench_function("validate_get_query_params", |b| {
        b.iter(|| black_box(eval(black_box(get), None)))
    });
    // Parsing alone, to separate JSON parsing from schema evaluation.
    c.bench_function("parse_1k_json_only", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(black_box(good)).unwrap()))
    });
}

/// An OpenAPI 3.0 document of 600 paths / 1200 operations, like a large public API: 300
/// resource schemas that share common component schemas (`User`, `Address`, a recursive
/// `Comment`).
fn large_openapi() -> serde_json::Value {
    use serde_json::json;
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    schemas.insert(
        "Address".into(),
        json!({"type": "object", "properties": {"street": {"type": "string"},
               "country": {"type": "string", "pattern": "^[A-Z]{2}$"}}}),
    );
    schemas.insert(
        "User".into(),
        json!({"type": "object", "required": ["id"], "properties": {
               "id": {"type": "string", "format": "uuid"},
               "address": {"$ref": "#/components/schemas/Address"}}}),
    );
    schemas.insert(
        "Comment".into(),
        json!({"type": "object", "properties": {"text": {"type": "string"},
               "replies": {"type": "array", "items": {"$ref": "#/components/schemas/Comment"}}}}),
    );
    for i in 0..300 {
        schemas.insert(
            format!("Thing{i}"),
            json!({"type": "object", "required": ["name"], "additionalProperties": false,
                   "properties": {"name": {"type": "string", "maxLength": 100},
                                  "count": {"type": "integer", "format": "int32", "minimum": 0},
                                  "owner": {"$ref": "#/components/schemas/User"},
                                  "comments": {"type": "array", "items": {"$ref": "#/components/schemas/Comment"}},
                                  "tags": {"type": "array", "items": {"type": "string"}}}}),
        );
        let body = json!({"required": true, "content": {"application/json": {"schema":
            {"$ref": format!("#/components/schemas/Thing{i}")}}}});
        paths.insert(
            format!("/things{i}"),
            json!({"get": {"parameters": [
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 100}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}}],
                       "responses": {}},
                   "post": {"requestBody": body, "responses": {}}}),
        );
        paths.insert(
            format!("/things{i}/{{id}}"),
            json!({"parameters": [{"name": "id", "in": "path", "required": true,
                                   "schema": {"type": "string", "pattern": "^[a-z0-9]{8}$"}}],
                   "get": {"responses": {}},
                   "put": {"requestBody": body, "responses": {}}}),
        );
    }
    json!({"openapi": "3.0.3", "info": {"title": "large", "version": "1"},
           "paths": paths, "components": {"schemas": schemas}})
}

/// Load-time cost of importing a large OpenAPI document (every operation's validators built).
fn bench_import(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api.json"), large_openapi().to_string()).unwrap();
    let cfg: palisade::config::file::ValidateConfig =
        serde_saphyr::from_str("openapi: api.json\n").unwrap();
    let mut group = c.benchmark_group("openapi_import");
    group.sample_size(10);
    group.bench_function("1200_operations", |b| {
        b.iter(|| {
            let store = palisade::schema::DocumentStore::new();
            let file: std::sync::Arc<str> = "bench.yaml".into();
            let site = palisade::schema::ConfigSite {
                file: &file,
                route: "bench",
                route_at: serde_saphyr::Location::UNKNOWN,
            };
            let v = palisade::schema::compile(&cfg, dir.path(), &store, &site).unwrap();
            assert_eq!(v.operations(), 1200);
            black_box(v)
        })
    });
    group.finish();
}

criterion_group!(benches, bench, bench_import);
criterion_main!(benches);
