//! Rules engine cost per request against 212 rules: a benign API request and a malicious
//! one (SQL injection in a JSON body), through the same evaluation the proxy runs.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use palisade::rules::compile::load;
use palisade::rules::eval::{evaluate, AttachedRuleSet};
use palisade::rules::fields::RuleInput;

/// The proxy's allocator, so allocation costs match production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// 212 rules of the kinds a managed rule set has: regexes and phrase lists on arguments,
/// headers, path and cookies, under decode transforms, plus libinjection SQLi/XSS.
fn ruleset_yaml() -> String {
    let words = [
        "union",
        "select",
        "sleep",
        "benchmark",
        "waitfor",
        "xp_cmdshell",
        "information_schema",
        "load_file",
        "outfile",
        "script",
        "onerror",
        "onload",
        "javascript",
        "vbscript",
        "iframe",
        "etc/passwd",
        "win.ini",
        "proc/self",
        "cmd.exe",
        "powershell",
        "wget",
        "curl",
        "nc -e",
        "bash -i",
        "jndi",
        "ldap",
        "rmi",
        "classloader",
        "phpinfo",
        "base64_decode",
    ];
    let fields = [
        "args.values",
        "headers.values",
        "path",
        "cookies.values",
        "query_string",
    ];
    let chains = [
        "[url_decode_uni, lowercase]",
        "[url_decode_uni, html_entity_decode, lowercase]",
        "[lowercase]",
    ];
    let mut y = String::from("name: bench\nrules:\n");
    let mut n = 0;
    for (i, w) in words.iter().enumerate() {
        for (j, f) in fields.iter().enumerate() {
            let chain = chains[(i + j) % chains.len()];
            y.push_str(&format!(
                "  - id: r{n}\n    match: {{field: {f}, transforms: {chain}, regex: \"\\\\b{}\\\\b.{{0,40}}(\\\\(|=|;|/)\"}}\n",
                regex_escape(w)
            ));
            n += 1;
        }
        y.push_str(&format!(
            "  - id: p{n}\n    match: {{field: args.values, transforms: [url_decode_uni, lowercase], phrases: [\"{w}(\", \"{w}%28\", \"{w}/*\"]}}\n"
        ));
        n += 1;
        y.push_str(&format!(
            "  - id: h{n}\n    match: {{field: \"header:user-agent\", transforms: [lowercase], contains: \"{w}-scanner\"}}\n"
        ));
        n += 1;
    }
    y.push_str(
        "  - id: sqli\n    match: {field: args.values, transforms: [url_decode_uni], sqli: true}\n",
    );
    y.push_str("  - id: xss\n    match: {field: args.values, transforms: [url_decode_uni, html_entity_decode], xss: true}\n");
    n += 2;
    assert!(n >= 200, "{n} rules");
    y
}

fn regex_escape(s: &str) -> String {
    regex::escape(s).replace('\\', "\\\\")
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.yaml");
    std::fs::write(&path, ruleset_yaml()).unwrap();
    let set = Arc::new(load(&path, &BTreeMap::new()).unwrap());
    eprintln!("{} rules, {} sources", set.rules.len(), set.sources.len());
    let sets = vec![AttachedRuleSet::plain(set)];

    let mut headers = http::HeaderMap::new();
    headers.insert(
        "user-agent",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0"
            .parse()
            .unwrap(),
    );
    headers.insert("accept", "application/json".parse().unwrap());
    headers.insert(
        "cookie",
        "session=8f14e45fceea167a5a36dedd4bea2543; theme=dark"
            .parse()
            .unwrap(),
    );
    headers.insert("content-type", "application/json".parse().unwrap());
    let benign = serde_json::json!({
        "type": "run", "title": "Morning run along the river", "duration_s": 1820, "distance_m": 5230,
        "heart_rate": {"avg": 148, "max": 171}, "notes": "Felt great; select a faster pace next time?", "tags": ["easy", "outdoor"]
    })
    .to_string();
    let malicious = serde_json::json!({
        "type": "run", "title": "x' UNION SELECT password FROM users--", "duration_s": 1820
    })
    .to_string();
    let query = "athlete=1842&since=2026-10-01&limit=25&sort=-started_at";

    // The managed rule sets, attached in the embedded default config's order.
    let managed: Vec<AttachedRuleSet> = palisade::rules::compile::load_managed(&BTreeMap::new())
        .into_iter()
        .map(|r| AttachedRuleSet::plain(Arc::new(r.unwrap())))
        .collect();
    eprintln!(
        "managed: {} rules in {} sets",
        managed.iter().map(|s| s.set.rules.len()).sum::<usize>(),
        managed.len()
    );

    if std::env::var_os("PALISADE_BENCH_PER_SET").is_some() {
        // Where the managed sets' time goes: each set alone on the benign request.
        for one in &managed {
            let name = format!("managed_only_{}", one.set.name);
            bench_post(
                c,
                &name,
                std::slice::from_ref(one),
                query,
                &headers,
                benign.as_bytes(),
            );
        }
    }

    for (name, sets, body) in [
        ("rules_212_benign_json_post", &sets, &benign),
        ("rules_212_malicious_json_post", &sets, &malicious),
        ("managed_benign_json_post", &managed, &benign),
        ("managed_malicious_json_post", &managed, &malicious),
    ] {
        bench_post(c, name, sets, query, &headers, body.as_bytes());
    }
    for (what, body) in [("malicious", &malicious), ("benign", &benign)] {
        let out = evaluate(
            &sets,
            &activity_post(query, &headers, body.as_bytes()),
            &mut (),
        );
        eprintln!("{what} verdict: {:?}", out.verdict);
    }
}

/// The benchmarked request: a POST to the activities API with this body.
fn activity_post<'a>(
    query: &'a str,
    headers: &'a http::HeaderMap,
    body: &'a [u8],
) -> RuleInput<'a> {
    RuleInput::new(
        "POST",
        "/api/v1/activities",
        query,
        headers,
        body,
        None,
        None,
        None,
    )
}

/// One criterion benchmark: `sets` evaluated on the POST with `body`.
fn bench_post(
    c: &mut Criterion,
    name: &str,
    sets: &[AttachedRuleSet],
    query: &str,
    headers: &http::HeaderMap,
    body: &[u8],
) {
    c.bench_function(name, |b| {
        b.iter(|| {
            black_box(evaluate(
                sets,
                &activity_post(query, headers, body),
                &mut (),
            ))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
