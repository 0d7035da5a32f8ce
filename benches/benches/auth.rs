//! Cost per request of bearer-token verification with a cached key: the whole auth stage
//! (token extraction, issuer choice, signature, claim checks, scopes) for RS256 (2048-bit),
//! ES256 and EdDSA tokens. `*_verify`: 1,000 distinct tokens in turn, so the per-thread
//! verified-token cache (256 slots) misses and each request pays the signature; `*_repeat`:
//! one client's token again and again (the common case: a token lives an hour). Keys are made
//! by openssl at setup; tokens by jsonwebtoken.
//!
//! `cedar`: one Cedar decision of the worked example (`examples/fitness`, compiled as the
//! proxy compiles it: strict schema, 11 policies) — operation lookup, principal with groups
//! and attributes from claims, resource from path parameters, context, entities checked
//! against the schema, and the decision: a permit, a forbid, and an MCP tool call, each over
//! distinct requests (the decision cache misses); `permit_cold_data` the permit with the data
//! caches emptied before each decision; `permit_repeat` is a cache hit.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use palisade::auth::{AuthStage, Issuer, IssuerSpec, TokenSource};
use palisade::pipeline::{Notes, Stage};
use palisade::request::Request;

/// The proxy's allocator, so allocation costs match production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ISS: &str = "https://issuer.bench";

fn openssl_key(dir: &std::path::Path, name: &str, args: &[&str]) -> Vec<u8> {
    let path = dir.join(name);
    let out = std::process::Command::new("openssl")
        .args(args)
        .arg("-out")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::read(&path).unwrap()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let rsa = EncodingKey::from_rsa_pem(&openssl_key(
        dir.path(),
        "rsa.pem",
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
    ))
    .unwrap();
    let ec = EncodingKey::from_ec_pem(&openssl_key(
        dir.path(),
        "ec.pem",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ],
    ))
    .unwrap();
    let ed = EncodingKey::from_ed_pem(&openssl_key(
        dir.path(),
        "ed.pem",
        &["genpkey", "-algorithm", "ed25519"],
    ))
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({"iss": ISS, "aud": "api", "sub": "alice", "exp": now + 3600,
                                    "scope": "activities:read activities:write"});
    let mut g = c.benchmark_group("auth_stage");
    for (name, alg, key) in [
        ("rs256", Algorithm::RS256, &rsa),
        ("es256", Algorithm::ES256, &ec),
        ("eddsa", Algorithm::EdDSA, &ed),
    ] {
        let mut jwk =
            serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(key, alg).unwrap())
                .unwrap();
        jwk["kid"] = serde_json::json!(name);
        let jwks = dir.path().join(format!("{name}.json"));
        std::fs::write(&jwks, serde_json::json!({"keys": [jwk]}).to_string()).unwrap();
        let algs = [format!("{alg:?}")];
        let issuer = Issuer::build(&IssuerSpec {
            name,
            issuer: ISS,
            algorithms: &algs,
            jwks_file: Some(&jwks),
            jwks_url: None,
            discovery: false,
            previous_keys: None,
            secret: None,
            audiences: &["api".to_string()],
            audience_claim: None,
            token_use: None,
            leeway: 60,
        })
        .unwrap();
        let stage = AuthStage::new(
            vec![Arc::new(issuer)],
            TokenSource::Authorization,
            vec![("GET".into(), vec!["activities:read".into()])],
            "bench".into(),
        );
        let mut header = Header::new(alg);
        header.kid = Some(name.to_string());
        let headers: Vec<http::HeaderMap> = (0..1000)
            .map(|i| {
                let mut c = claims.clone();
                c["jti"] = serde_json::json!(i);
                let token = jsonwebtoken::encode(&header, &c, key).unwrap();
                let mut h = http::HeaderMap::new();
                h.insert(
                    http::header::AUTHORIZATION,
                    format!("Bearer {token}").parse().unwrap(),
                );
                h
            })
            .collect();
        let run = |h: &http::HeaderMap| {
            let req = Request::new("GET", "/activities", "", h, b"", None, None, None);
            let mut notes = Notes::default();
            let verdict = stage.evaluate(black_box(&req), &mut notes);
            assert!(matches!(
                verdict,
                palisade::pipeline::Eval::Done(palisade::pipeline::Decision::Continue)
            ));
            black_box(req.claims().is_some())
        };
        let mut i = 0;
        g.bench_function(format!("{name}_verify"), |b| {
            b.iter(|| {
                i = (i + 1) % headers.len();
                run(&headers[i])
            })
        });
        g.bench_function(format!("{name}_repeat"), |b| b.iter(|| run(&headers[0])));
    }
    g.finish();
}

fn cedar(c: &mut Criterion) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let cfg = palisade::config::load_file(
        &root.join("examples/fitness/palisade.yaml"),
        &palisade::config::Overrides::default(),
    )
    .unwrap();
    let metrics = Arc::new(palisade::metrics::Metrics::new().unwrap());
    let snapshot = palisade::compile::compile(
        cfg,
        &palisade::compile::CompileContext::first(&metrics, Some(([127, 0, 0, 1], 9).into())),
    )
    .unwrap();
    let authz = |name: &str| {
        snapshot
            .routes
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| r.authz.clone())
            .unwrap()
    };
    let (api, mcp) = (authz("fitness"), authz("mcp"));
    let claims = |v: serde_json::Value| v.as_object().unwrap().clone();
    let alice = claims(
        serde_json::json!({"sub": "alice", "cognito:groups": ["athletes"],
                                          "scope": "activities socials mcp"}),
    );
    let bob = claims(
        serde_json::json!({"sub": "bob", "cognito:groups": ["athletes"],
                                        "scope": "activities socials"}),
    );
    let h = http::HeaderMap::new();
    let mut g = c.benchmark_group("cedar");
    // Distinct requests (4,096 activities, more than the 512-slot decision cache holds), so
    // each decision is Cedar's; `*_repeat`: one request again and again (a cache hit).
    let paths: Vec<String> = (0..4096)
        .map(|i| format!("/users/alice/activities/a{i}"))
        .collect();
    let reqs: Vec<Request<'_>> = paths
        .iter()
        .map(|p| Request::new("GET", p, "", &h, b"", None, None, None))
        .collect();
    assert!(matches!(
        api.decide_http(&reqs[0], &alice),
        palisade::authz::Verdict::Allow { .. }
    ));
    let mut i = 0;
    g.bench_function("permit", |b| {
        b.iter(|| {
            i = (i + 1) % reqs.len();
            black_box(api.decide_http(black_box(&reqs[i]), &alice))
        })
    });
    // The same distinct requests with cold data caches: before each decision (untimed), one
    // byte of every 64-byte line of 16 MiB of other memory is read (read, not written: no
    // dirty lines left to write back during the decision), as the rest of a request's work
    // and the kernel's push Cedar's data out of L1/L2 between two decisions under load.
    // Instructions stay warm: the loop runs nothing else.
    let scratch: Vec<u8> = (0..16usize << 20).map(|n| n as u8).collect();
    g.bench_function("permit_cold_data", |b| {
        b.iter_batched(
            || {
                let sum = scratch
                    .iter()
                    .step_by(64)
                    .fold(0u8, |a, x| a.wrapping_add(*x));
                black_box(sum);
                i = (i + 1) % reqs.len();
                i
            },
            |i| black_box(api.decide_http(black_box(&reqs[i]), &alice)),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("permit_repeat", |b| {
        b.iter(|| black_box(api.decide_http(black_box(&reqs[0]), &alice)))
    });
    let routes: Vec<String> = (0..4096)
        .map(|i| format!("/users/alice/routes/r{i}"))
        .collect();
    let dels: Vec<Request<'_>> = routes
        .iter()
        .map(|p| Request::new("DELETE", p, "", &h, b"", None, None, None))
        .collect();
    assert!(matches!(
        api.decide_http(&dels[0], &bob),
        palisade::authz::Verdict::Deny { .. }
    ));
    g.bench_function("forbid", |b| {
        b.iter(|| {
            i = (i + 1) % dels.len();
            black_box(api.decide_http(black_box(&dels[i]), &bob))
        })
    });
    let post = Request::new("POST", "/mcp", "", &h, b"", None, None, None);
    // Distinct arguments (4,096 limits) for distinct decisions.
    let args: Vec<serde_json::Value> = (0..4096)
        .map(|n| serde_json::json!({"user": "alice", "limit": n + 1}))
        .collect();
    assert!(matches!(
        mcp.decide_action(&alice, "tools/call:get_activities", Some(&args[0]), &post),
        palisade::authz::Verdict::Allow { .. }
    ));
    g.bench_function("mcp_tool_call", |b| {
        b.iter(|| {
            i = (i + 1) % args.len();
            black_box(mcp.decide_action(&alice, "tools/call:get_activities", Some(&args[i]), &post))
        })
    });
    g.finish();
}

criterion_group!(benches, bench, cedar);
criterion_main!(benches);
