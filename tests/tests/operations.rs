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

/// Every `palisade_*` metric name in `text`, histogram suffixes removed.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("palisade_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let mut name = &text[start..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                name = base;
            }
        }
        names.insert(name.to_string());
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_and_alerts_is_exported_after_a_mixed_workload() {
    let dashboard = std::fs::read_to_string(repo_path("deploy/grafana/palisade.json")).unwrap();
    let alerts =
        std::fs::read_to_string(repo_path("deploy/prometheus/palisade-alerts.yaml")).unwrap();
    let mut wanted = metric_names(&dashboard);
    let from_alerts = metric_names(&alerts);
    assert!(wanted.len() >= 25, "{wanted:?}");
    assert!(from_alerts.len() >= 8, "{from_alerts:?}");
    wanted.extend(from_alerts);

    // TLS on one listener, cleartext on another; rules, a count rule, validation, a local
    // and a Redis-backed rate limit (Redis down: errors and fallbacks), a decision log.
    let backend = Backend::start("api").await;
    let dir = tempfile::tempdir().unwrap();
    beta_rules(dir.path());
    let cert = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=a.example",
            "-addext",
            "subjectAltName=DNS:a.example",
            "-keyout",
            "a.key",
            "-out",
            "a.pem",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(cert.status.success(), "{cert:?}");
    let plain = free_port();
    let dead_redis = free_port();
    let tls = format!(
        "{{certificates: [{{cert: a.pem, key: a.key}}]}}\n  - address: \"127.0.0.1:{plain}\""
    );
    let body = format!(
        "logging:\n  decisions: {{stdout: false, file: d.log}}\nrulesets: [builtin:managed, beta.yaml]\nredis:\n  url: \"redis://127.0.0.1:{dead_redis}\"\n  timeout: 100ms\n  on_error: local\nupstreams:\n  app: {{targets: [\"{}\"]}}\nrate_limits:\n  - name: per-tenant\n    key: [\"header:x-tenant\"]\n    rate: 1/min\n    burst: 1\n  - name: fleet\n    key: [ip]\n    rate: 1000/min\n    burst: 1000\n    store: redis\nroutes:\n  - name: v1\n    path_prefix: /v1/\n    upstream: app\n    policy:\n      validate:\n        operations:\n          - methods: [GET]\n            path: /v1/activities\n            query:\n              limit: {{schema: {{type: integer}}}}\n  - name: api\n    upstream: app\n    policy:\n      rulesets: [{{name: sqli}}, {{name: beta}}]\n",
        backend.addr
    );
    let p = Palisade::start_tls(dir, &tls, &body).await;
    let plain: std::net::SocketAddr = format!("127.0.0.1:{plain}").parse().unwrap();
    let send = |path: &str, headers: &[&str]| {
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: a.example\r\nUser-Agent: {UA}\r\nConnection: close\r\n"
        );
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        req
    };
    for (path, headers, status) in [
        ("/items", &[][..], 200),
        ("/items?q=1%27%20or%201%3D1--", &[], 403),
        ("/items", &["X-Beta: 1"], 200),
        ("/items", &["X-Tenant: t"], 200),
        ("/items", &["X-Tenant: t"], 429),
        ("/v1/activities?limit=ten", &[], 400),
    ] {
        let r = raw_request(plain, send(path, headers).as_bytes())
            .await
            .unwrap();
        assert_eq!(r.status, status, "{path} {headers:?}: {}", p.log());
    }
    // A request with two Content-Types is refused before routing.
    let r = raw_request(
        plain,
        b"POST /items HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);
    // One HTTPS request (a TLS handshake).
    let port = p.addr.port();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("https://127.0.0.1:{port}/items"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&status.stdout), "200");

    let text = p.metrics().await;
    let exported = metric_names(
        &text
            .lines()
            .filter(|l| l.starts_with("# TYPE "))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let missing: Vec<&String> = wanted.difference(&exported).collect();
    assert!(missing.is_empty(), "not exported: {missing:?}\n{text}");
    // And the workload moved them.
    for sample in [
        "palisade_rule_matches_total{action=\"block\",rule=\"",
        "palisade_request_methods_total{method=\"GET\",route=\"api\"}",
        "palisade_upstream_responses_total{class=\"2xx\",upstream=\"app\"}",
        "palisade_ratelimit_fallback_total{",
        "palisade_validation_failures_total{",
    ] {
        assert!(text.contains(sample), "{sample} not in\n{text}");
    }
}

#[test]
fn alert_rules_pass_promtool() {
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo_path("deploy/prometheus/palisade-alerts.yaml"))
        .output()
        .expect("promtool (installed by scripts/ensure-deps.sh, Debian package prometheus)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A YAML document's string at a path of keys.
fn at<'a>(v: &'a serde_json::Value, path: &[&str]) -> &'a serde_json::Value {
    path.iter().fold(v, |v, k| &v[*k])
}

#[test]
fn kubernetes_manifests_are_complete_and_consistent() {
    let dir = repo_path("deploy/kubernetes");
    let kustomization: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
            .unwrap();
    let mut docs: Vec<serde_json::Value> = Vec::new();
    for r in kustomization["resources"].as_array().unwrap() {
        let text = std::fs::read_to_string(dir.join(r.as_str().unwrap())).unwrap();
        let parsed: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        docs.extend(parsed);
    }
    for d in &docs {
        for key in ["apiVersion", "kind"] {
            assert!(d[key].is_string(), "{key} missing in {d}");
        }
        assert!(at(d, &["metadata", "name"]).is_string(), "{d}");
    }
    let kind = |k: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == k && at(d, &["metadata", "name"]) == name)
            .unwrap_or_else(|| panic!("no {k} {name}"))
    };
    let dep = kind("Deployment", "palisade");
    let pod = at(dep, &["spec", "template", "spec"]);
    let c = &pod["containers"][0];
    assert_eq!(at(c, &["readinessProbe", "httpGet", "path"]), "/readyz");
    assert_eq!(at(c, &["livenessProbe", "httpGet", "path"]), "/healthz");
    assert_eq!(at(c, &["securityContext", "readOnlyRootFilesystem"]), true);
    assert_eq!(
        at(c, &["securityContext", "allowPrivilegeEscalation"]),
        false
    );
    assert_eq!(at(pod, &["securityContext", "runAsNonRoot"]), true);
    assert!(at(c, &["resources", "requests", "cpu"]).is_string());
    assert!(at(c, &["resources", "limits", "memory"]).is_string());
    // Longer than Palisade's 5 s drain plus the preStop pause.
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 10);
    assert_eq!(
        at(&pod["volumes"][0], &["configMap", "name"]),
        "palisade-config"
    );
    let labels = at(dep, &["spec", "selector", "matchLabels"]);
    assert_eq!(
        at(kind("Service", "palisade"), &["spec", "selector"]),
        labels
    );
    assert_eq!(
        at(
            kind("PodDisruptionBudget", "palisade"),
            &["spec", "selector", "matchLabels"]
        ),
        labels
    );
    let hpa = kind("HorizontalPodAutoscaler", "palisade");
    assert_eq!(at(hpa, &["spec", "scaleTargetRef", "name"]), "palisade");
    kind("Service", "palisade-redis");
    kind("Deployment", "palisade-redis");
    // The ConfigMap's config is valid (the in-cluster upstream name aside).
    let generated = &kustomization["configMapGenerator"][0];
    assert_eq!(generated["name"], "palisade-config");
    assert_eq!(
        generated["options"]["disableNameSuffixHash"], true,
        "hot reload, no rollout"
    );
    let config = std::fs::read_to_string(dir.join("palisade.yaml"))
        .unwrap()
        .replace("api.default.svc.cluster.local:80", "127.0.0.1:80");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("palisade.yaml");
    std::fs::write(&path, config).unwrap();
    let (code, out, err) = run_cli(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    // kubectl, where installed, renders the kustomization offline.
    if let Ok(o) = std::process::Command::new("kubectl")
        .args(["kustomize"])
        .arg(&dir)
        .output()
    {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("kind: HorizontalPodAutoscaler"));
    }
}

#[test]
fn the_systemd_unit_is_hardened_and_verifies() {
    let unit = std::fs::read_to_string(repo_path("deploy/systemd/palisade.service")).unwrap();
    for line in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing");
    }
    // systemd-analyze, where installed, verifies it (with the binary this build made).
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("palisade.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/palisade", palisade_bin().to_str().unwrap()),
    )
    .unwrap();
    if let Ok(o) = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
    {
        assert!(
            o.status.success() && o.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
