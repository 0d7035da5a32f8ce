//! End-to-end request validation: the shipped example configs (`examples/validation.yaml`,
//! hand-written operations over `schemas/fitness/*.json|yaml`, and `examples/openapi.yaml`,
//! the OpenAPI import) run as the real binary in front of a real backend. Valid requests must
//! reach it byte-for-byte; every invalid kind from `tests/fixtures/validation-cases.yaml` must
//! get its status, reason and violation, and never reach it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use palisade_tests::*;
use serde_json::Value;

fn cases() -> Value {
    let text = std::fs::read_to_string(repo_path("tests/fixtures/validation-cases.yaml")).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

/// Raw request bytes for one case, and the body bytes the backend must then see.
fn build(case: &Value, addr: std::net::SocketAddr) -> (Vec<u8>, Vec<u8>) {
    let method = case["method"].as_str().unwrap();
    let path = case["path"].as_str().unwrap();
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(h) = case["headers"].as_object() {
        for (k, v) in h {
            headers.push((k.clone(), v.as_str().unwrap().to_string()));
        }
    }
    let has = |headers: &[(String, String)], n: &str| {
        headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n))
    };
    let body: Vec<u8> = if let Some(j) = case.get("body") {
        if !has(&headers, "content-type") {
            headers.push(("Content-Type".into(), "application/json".into()));
        }
        serde_json::to_vec(j).unwrap()
    } else if let Some(n) = case["oversize"].as_u64() {
        if !has(&headers, "content-type") {
            headers.push(("Content-Type".into(), "application/json".into()));
        }
        let notes = "x".repeat(n as usize);
        format!(r#"{{"type":"run","started_at":"2026-11-20T07:30:00Z","duration_s":60,"notes":"{notes}"}}"#)
            .into_bytes()
    } else {
        case["raw"].as_str().unwrap_or("").as_bytes().to_vec()
    };
    // An empty header value in a fixture means "do not send this header".
    let bytes = http1_request(method, path, &addr.to_string(), &headers, &body);
    (bytes, body)
}

async fn start_example(config: &str, backend: &Backend) -> Palisade {
    let cfg = repo_path(config);
    let upstream = format!("http://{}", backend.addr);
    Palisade::start_args(&["--config", cfg.to_str().unwrap(), "--upstream", &upstream]).await
}

/// Runs every fixture case against one example config.
async fn run_cases(config: &str, route: &str) {
    let backend = Backend::start("api").await;
    let p = start_example(config, &backend).await;
    let cases = cases();

    for case in cases["valid"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let before = backend.count();
        let (req, body) = build(case, p.addr);
        let r = raw_request(p.addr, &req).await.unwrap();
        assert_eq!(r.status, 200, "{config}: {name}: {}", r.body_string());
        assert_eq!(
            backend.count(),
            before + 1,
            "{config}: {name} did not reach the backend"
        );
        let seen = backend.seen().pop().unwrap();
        assert_eq!(&seen.body[..], &body[..], "{config}: {name}: body changed");
        assert_eq!(seen.method, case["method"].as_str().unwrap(), "{name}");
        assert_eq!(
            seen.uri,
            case["path"].as_str().unwrap(),
            "{config}: {name}: target changed"
        );
        if let Some(h) = case["headers"].as_object() {
            for (k, v) in h {
                let v = v.as_str().unwrap();
                if !v.is_empty() {
                    assert_eq!(seen.header(&k.to_ascii_lowercase()), Some(v), "{name}: {k}");
                }
            }
        }
    }

    let mut blocked = 0.0;
    for case in cases["invalid"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let expect = &case["expect"];
        let before = backend.count();
        let (req, _) = build(case, p.addr);
        let r = raw_request(p.addr, &req).await.unwrap();
        let what = format!("{config}: {name}: {}", r.body_string());
        assert_eq!(
            r.status as u64,
            expect["status"].as_u64().unwrap(),
            "{what}"
        );
        let j = r.json();
        assert_eq!(j["error"], expect["error"], "{what}");
        assert!(j["request_id"].is_string(), "{what}");
        if let Some(line) = expect.get("line") {
            assert_eq!(&j["position"]["line"], line, "{what}");
            assert_eq!(&j["position"]["column"], &expect["column"], "{what}");
        }
        if let Some(location) = expect.get("in") {
            let v = &j["violations"][0];
            assert_eq!(&v["in"], location, "{what}");
            assert_eq!(&v["pointer"], &expect["pointer"], "{what}");
            if let Some(k) = expect.get("keyword") {
                assert_eq!(&v["keyword"], k, "{what}");
            }
            assert!(
                !v["message"].as_str().unwrap().is_empty(),
                "{what}: no message"
            );
        }
        if r.status == 405 {
            assert!(r.header("allow").is_some(), "{what}: no Allow header");
        }
        assert_eq!(backend.count(), before, "{what}: reached the backend");
        blocked += 1.0;
    }

    // Every failure is counted by route and reason; the stage is `validate`.
    p.expect_metric(
        &format!(
            "palisade_validation_failures_total{{operation=\"POST /v1/activities\",reason=\"invalid_body\",route=\"{route}\"}}"
        ),
        7.0,
    )
    .await;
    p.expect_metric(
        &format!(
            "palisade_validation_failures_total{{operation=\"-\",reason=\"unknown_operation\",route=\"{route}\"}}"
        ),
        1.0,
    )
    .await;
    let text = p.metrics().await;
    // Every refusal is a validation failure, except bodies the proxy refuses before any stage
    // reads them (a charset that hides ASCII syntax), counted under stage "body".
    let total: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("palisade_validation_failures_total{")
                || (l.starts_with("palisade_blocked_total{") && l.contains("stage=\"body\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(total, blocked, "{text}");
    assert!(
        text.contains(&format!(
            "palisade_blocked_total{{reason=\"invalid_query\",route=\"{route}\",stage=\"validate\"}}"
        )),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_operations_validate_every_kind() {
    run_cases("examples/validation.yaml", "activities").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_import_drives_the_same_checks() {
    run_cases("examples/openapi.yaml", "fitness-api").await;
}

/// A valid body sent chunked is validated on the pre-read body and forwarded byte-for-byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_are_validated_and_forwarded_intact() {
    let backend = Backend::start("api").await;
    let p = start_example("examples/openapi.yaml", &backend).await;
    let good = br#"{"type":"ride","started_at":"2026-11-20T07:30:00Z","duration_s":3600}"#;
    let bad = br#"{"type":"ride","started_at":"2026-11-20T07:30:00Z","duration_s":0}"#;
    for (body, status) in [(&good[..], 200), (&bad[..], 400)] {
        let mut req = String::from(
            "POST /v1/activities HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nIdempotency-Key: 6f1c2b4e-8a3d-4f5e-9b7c-0d1e2f3a4b5c\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        req.extend_from_slice(&chunked(body, 7));
        let before = backend.count();
        let r = raw_request(p.addr, &req).await.unwrap();
        assert_eq!(r.status, status, "{}", r.body_string());
        if status == 200 {
            assert_eq!(&backend.seen().pop().unwrap().body[..], body);
        } else {
            assert_eq!(backend.count(), before);
        }
    }
}

/// `expose_details: false` hides violations from clients but logs them; `action: count`
/// forwards invalid requests and counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_details_and_count_mode() {
    let backend = Backend::start("api").await;
    let schema = repo_path("schemas/fitness/new-activity.schema.json");
    let config = format!(
        r#"upstreams:
  api:
    targets: ["{backend}"]
routes:
  - name: hidden
    path_prefix: /hidden
    upstream: api
    policy:
      validate:
        expose_details: false
        operations:
          - methods: [POST]
            body: "{schema}"
  - name: dry-run
    path_prefix: /dry
    upstream: api
    policy:
      validate:
        action: count
        operations:
          - methods: [POST]
            body: "{schema}"
"#,
        backend = backend.addr,
        schema = schema.display()
    );
    let p = Palisade::start(&config).await;
    let body = r#"{"type":"run","duration_s":"long"}"#;
    let req = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let r = raw_request(p.addr, req("/hidden/a").as_bytes())
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let j = r.json();
    assert_eq!(j["error"], "invalid_body");
    assert!(j.get("violations").is_none(), "details leaked: {j}");
    assert_eq!(backend.count(), 0);
    let logged = eventually(std::time::Duration::from_secs(5), || async {
        p.log().contains("is not of type") && p.log().contains(j["request_id"].as_str().unwrap())
    })
    .await;
    assert!(logged, "violations not logged:\n{}", p.log());

    let r = raw_request(p.addr, req("/dry/a").as_bytes()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body_string());
    assert_eq!(backend.count(), 1);
    p.expect_metric(
        "palisade_counted_total{label=\"validate:invalid_body\",route=\"dry-run\"}",
        1.0,
    )
    .await;
    p.expect_metric(
        "palisade_validation_failures_total{operation=\"POST *\",reason=\"invalid_body\",route=\"dry-run\"}",
        1.0,
    )
    .await;
}

/// Schema problems are load errors that name the config line and the schema file.
#[test]
fn schema_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad-format.json"),
        r#"{"type":"object","properties":{"colour":{"type":"string","format":"colour"}}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("dangling.yaml"),
        "type: object\nproperties:\n  a: {$ref: 'missing.json#/x'}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("broken.yaml"),
        "type: object\nproperties: [\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("api.yaml"), "swagger: '2.0'\npaths: {}\n").unwrap();
    let config = dir.path().join("palisade.yaml");
    std::fs::write(
        &config,
        r#"upstreams:
  api:
    targets: ["127.0.0.1:9"]
routes:
  - name: a
    path_prefix: /a
    upstream: api
    policy:
      validate:
        operations:
          - path: /a/x
            body: bad-format.json
          - path: /a/y
            body: dangling.yaml
          - path: /a/z
            body: broken.yaml
          - path: /a/w
            query:
              n: {schema: {type: integr}}
  - name: b
    path_prefix: /b
    upstream: api
    policy:
      validate:
        openapi: api.yaml
"#,
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let cfg = config.display().to_string();
    for expected in [
        format!("{cfg}:11:19: route \"a\": validate: operation ANY /a/x"),
        "bad-format.json: /properties/colour/format: unknown format \"colour\"".to_string(),
        "missing.json".to_string(),
        "broken.yaml:2:13: invalid YAML".to_string(),
        "query parameter \"n\": invalid schema at /type: \"integr\"".to_string(),
        format!("{cfg}:25:18: route \"b\": validate.openapi:"),
        "not an OpenAPI 3.0 or 3.1 document".to_string(),
    ] {
        assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
    }
}
