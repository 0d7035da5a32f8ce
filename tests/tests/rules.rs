//! End-to-end rules engine through the real binary: block, count (dry run), allow, per-rule
//! overrides, disabled rules, exclusions and anomaly mode, on JSON, urlencoded and multipart
//! bodies, headers and query strings.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use palisade_tests::*;

const RULESET: &str = r#"
name: test-waf
rules:
  - id: allow-health
    action: allow
    match: {field: "header:x-health-check", equals: "secret-probe"}
  - id: sqli-1
    labels: [t:sqli]
    match: {field: args.values, transforms: [url_decode_uni], sqli: true}
  - id: xss-1
    labels: [t:xss]
    match: {field: args.values, transforms: [url_decode_uni, html_entity_decode], xss: true}
  - id: ua-count
    action: count
    match: {field: "header:user-agent", transforms: [lowercase], contains: "curl"}
  - id: traversal
    status: 400
    match: {field: path, transforms: [url_decode_uni, normalize_path], starts_with: "/etc/"}
"#;

const ANOMALY: &str = r#"
name: scored
mode: anomaly
anomaly_threshold: 7
rules:
  - id: s-select
    score: 4
    match: {field: query.values, transforms: [lowercase], contains: "select"}
  - id: s-from
    score: 4
    match: {field: query.values, transforms: [lowercase], contains: "from"}
"#;

async fn start(b: &Backend) -> Palisade {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules/waf.yaml"), RULESET).unwrap();
    std::fs::write(dir.path().join("rules/scored.yaml"), ANOMALY).unwrap();
    let cfg = format!(
        r#"rulesets: [rules]
upstreams:
  b:
    targets: ["{}"]
routes:
  - name: api
    upstream: b
    policy:
      rulesets: [{{name: test-waf}}]
  - name: dry
    path_prefix: /dry
    upstream: b
    policy:
      rulesets: [{{name: test-waf, action_override: count}}]
  - name: tuned
    path_prefix: /tuned
    upstream: b
    policy:
      rulesets:
        - name: test-waf
          disabled_rules: [traversal]
          rule_overrides: {{sqli-1: count}}
      exclusions:
        - rules: ["label:t:xss"]
          fields: ["json:/bio", "query:html"]
  - name: scored
    path_prefix: /scored
    upstream: b
    policy:
      rulesets: [{{name: scored}}]
"#,
        b.addr
    );
    Palisade::start_in(dir, &cfg, false).await
}

fn post(path: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn attacks_in_every_body_kind_are_blocked_before_the_backend() {
    let b = Backend::start("b").await;
    let p = start(&b).await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (post("/api/users", "application/json", r#"{"user":{"name":"x' OR '1'='1"}}"#), "rule:sqli-1"),
        (post("/api/users", "application/x-www-form-urlencoded", "name=%3Cscript%3Ealert(1)%3C%2Fscript%3E"), "rule:xss-1"),
        (
            post(
                "/api/upload",
                "multipart/form-data; boundary=XX",
                "--XX\r\nContent-Disposition: form-data; name=\"q\"\r\n\r\n1 UNION SELECT password FROM users--\r\n--XX--\r\n",
            ),
            "rule:sqli-1",
        ),
        (b"GET /api/search?q=%27%20or%201%3D1--%20 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(), "rule:sqli-1"),
    ];
    for (req, reason) in &cases {
        let r = raw_request(p.addr, req).await.unwrap();
        assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(req));
        assert_eq!(r.json()["error"], *reason);
    }
    let r = raw_get(p.addr, "/static/..%252f..%252fetc/passwd")
        .await
        .unwrap();
    assert_eq!(r.status, 400, "rule status applies");
    assert_eq!(b.count(), 0, "a blocked request reached the backend");
    p.expect_metric(
        "palisade_blocked_total{reason=\"rule:sqli-1\",route=\"api\",stage=\"rules\"}",
        3.0,
    )
    .await;
}

#[tokio::test]
async fn benign_bodies_reach_the_backend_byte_for_byte() {
    let b = Backend::start("b").await;
    let p = start(&b).await;
    let bodies = [
        ("application/json", r#"{"name":"O'Brien","note":"Select the best option from the list; it's <b>bold</b>?","n":[1,2,3]}"#),
        ("application/x-www-form-urlencoded", "title=Fish+%26+Chips&body=I+ran+5km+%E2%80%94+felt+great"),
        ("multipart/form-data; boundary=ZZ", "--ZZ\r\nContent-Disposition: form-data; name=\"caption\"\r\n\r\nSunset at the beach\r\n--ZZ\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\u{1}PNG data\r\n--ZZ--\r\n"),
    ];
    for (i, (ct, body)) in bodies.iter().enumerate() {
        let r = raw_request(p.addr, &post("/api/items", ct, body))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{ct}: {}", r.body_string());
        let seen = b.seen();
        assert_eq!(seen.len(), i + 1);
        assert_eq!(
            &seen[i].body[..],
            body.as_bytes(),
            "{ct}: body changed on the way"
        );
    }
}

#[tokio::test]
async fn dry_run_override_counts_instead_of_blocking() {
    let b = Backend::start("b").await;
    let p = start(&b).await;
    let r = raw_request(
        p.addr,
        &post("/dry/x", "application/json", r#"{"q":"1' or '1'='1"}"#),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(b.count(), 1);
    p.expect_metric(
        "palisade_counted_total{label=\"rule:sqli-1\",route=\"dry\"}",
        1.0,
    )
    .await;
    // A `count` rule counts everywhere, and does not stop evaluation.
    let r = get_from("127.0.0.1", p.addr, "/api/x", &["User-Agent: curl/8.1"]).await;
    assert_eq!(r.status, 200);
    p.expect_metric(
        "palisade_counted_total{label=\"rule:ua-count\",route=\"api\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn overrides_disabled_rules_and_exclusions_apply_per_route() {
    let b = Backend::start("b").await;
    let p = start(&b).await;
    // sqli-1 is overridden to count on /tuned.
    let r = raw_request(
        p.addr,
        &post("/tuned/x", "application/json", r#"{"q":"1' or '1'='1"}"#),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    // traversal is disabled on /tuned but active on /api.
    assert_eq!(
        raw_get(p.addr, "/tuned/..%252f..%252fetc/passwd")
            .await
            .unwrap()
            .status,
        200
    );
    // XSS in an excluded field passes; the same payload in another field is blocked.
    let xss = "<img src=x onerror=alert(1)>";
    let ok = raw_request(
        p.addr,
        &post(
            "/tuned/profile",
            "application/json",
            &format!(r#"{{"bio":"{xss}"}}"#),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        ok.status, 200,
        "json:/bio is excluded from XSS rules on /tuned"
    );
    let blocked = raw_request(
        p.addr,
        &post(
            "/tuned/profile",
            "application/json",
            &format!(r#"{{"name":"{xss}"}}"#),
        ),
    )
    .await
    .unwrap();
    assert_eq!(blocked.status, 403);
    assert_eq!(
        raw_get(
            p.addr,
            "/tuned/x?html=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E"
        )
        .await
        .unwrap()
        .status,
        200
    );
    assert_eq!(
        raw_get(
            p.addr,
            "/tuned/x?other=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E"
        )
        .await
        .unwrap()
        .status,
        403
    );
    // Exclusions are per route: on /api the excluded field is inspected.
    let r = raw_request(
        p.addr,
        &post(
            "/api/profile",
            "application/json",
            &format!(r#"{{"bio":"{xss}"}}"#),
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);
}

#[tokio::test]
async fn allow_rule_stops_evaluation_and_anomaly_mode_adds_scores() {
    let b = Backend::start("b").await;
    let p = start(&b).await;
    // The allow rule comes first: the SQLi in the query is not evaluated.
    let r = get_from(
        "127.0.0.1",
        p.addr,
        "/api/x?q=1%27%20or%20%271%27%3D%271",
        &["X-Health-Check: secret-probe"],
    )
    .await;
    assert_eq!(r.status, 200);
    let r = get_from(
        "127.0.0.1",
        p.addr,
        "/api/x?q=1%27%20or%20%271%27%3D%271",
        &[],
    )
    .await;
    assert_eq!(r.status, 403);
    // Anomaly: one rule (4) stays under 7; two (8) block.
    assert_eq!(
        raw_get(p.addr, "/scored?q=select").await.unwrap().status,
        200
    );
    let r = raw_get(p.addr, "/scored?q=select%20x%20from%20y")
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "anomaly:scored");
}

#[test]
fn rule_file_errors_name_file_line_and_rule() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "name: bad\nrules:\n  - id: r1\n    match: {field: query.valuez, contains: x}\n  - id: r2\n    match: {field: path, regex: \"(unclosed\"}\n  - id: r1\n    match: {field: path, transforms: [lowercas], contains: x}\n  - id: r4\n    match: {field: path, contains: x, equals: y}\n",
    )
    .unwrap();
    let (code, out, _) = run_cli(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    let f = dir.path().join("bad.yaml").display().to_string();
    assert!(
        out.contains(&format!(
            "{f}:4:12: rule \"r1\": unknown field \"query.valuez\""
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("{f}:6:33: rule \"r2\": invalid regex")),
        "{out}"
    );
    assert!(
        out.contains(&format!("{f}:7:9: rule \"r1\": duplicate rule id \"r1\"")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{f}:8:39: rule \"r1\": unknown transform \"lowercas\""
        )),
        "{out}"
    );
    assert!(
        out.contains("rule \"r4\": a field test takes exactly one operator"),
        "{out}"
    );
    assert!(
        !out.contains("rule \"r2\": a field test needs one operator"),
        "a bad regex is reported once: {out}"
    );

    // A failing inline test prints a diff and exits 1.
    std::fs::write(
        dir.path().join("bad.yaml"),
        "name: t\nrules:\n  - id: r1\n    match: {field: query.values, equals: x}\n    tests:\n      - {request: {path: \"/?a=y\"}, expect: match}\n",
    )
    .unwrap();
    let (code, out, _) = run_cli(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.contains("expected: match") && out.contains("actual:   no match"),
        "{out}"
    );
}

/// `{{list:FILE}}` in a regex becomes an alternation of the file's escaped entries (comments
/// and blank lines skipped); a missing or empty list, or an unterminated placeholder, is an
/// error at the regex's file and line.
#[test]
fn regex_lists_expand_data_files_and_report_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("words.txt"),
        "# commands\nwhoami\n\nnet.exe\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("empty.txt"), "# nothing here\n\n").unwrap();
    std::fs::write(
        dir.path().join("ok.yaml"),
        "name: ok\nrules:\n  - id: cmd\n    match: {field: query.values, regex: \"(?:^|;)\\\\s*{{list:words.txt}}\\\\b\"}\n    tests:\n      - {request: {path: \"/?a=x;whoami\"}, expect: match}\n      - {request: {path: \"/?a=net.exe\"}, expect: match}\n      - {request: {path: \"/?a=netxexe\"}, expect: no_match}\n      - {request: {path: \"/?a=whoami2\"}, expect: no_match}\n",
    )
    .unwrap();
    let (code, out, _) = run_cli(&["test", dir.path().join("ok.yaml").to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 passed, 0 failed"), "{out}");

    std::fs::write(
        dir.path().join("bad.yaml"),
        "name: bad\nrules:\n  - id: missing\n    match: {field: path, regex: \"{{list:nope.txt}}\"}\n  - id: empty\n    match: {field: path, regex: \"x{{list:empty.txt}}\"}\n  - id: open\n    match: {field: path, regex: \"{{list:words.txt\"}\n",
    )
    .unwrap();
    let (code, out, _) = run_cli(&["test", dir.path().join("bad.yaml").to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let f = dir.path().join("bad.yaml").display().to_string();
    assert!(
        out.contains(&format!(
            "{f}:4:33: rule \"missing\": cannot read list file"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("{f}:6:33: rule \"empty\": list file"))
            && out.contains("has no entries"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{f}:8:33: rule \"open\": unterminated `{{{{list:FILE}}}}`"
        )),
        "{out}"
    );
}
