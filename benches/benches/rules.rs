//! Rules engine cost per request, through the same engine the proxy builds per route:
//! - a synthetic set of 212 rules, and the managed rule sets of the default config, on a
//!   benign and a malicious JSON POST;
//! - the managed sets on a GET with five query parameters and on 1 KB and 32 KB JSON bodies;
//! - the scaling curve: the managed sets plus 0, 100, 1,000 and 5,000 generated rules of the
//!   kind a rule author adds (`palisade_benches::extra_rules_yaml`), on the same requests.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use palisade::rules::compile::load;
use palisade::rules::engine::Engine;
use palisade::rules::eval::AttachedRuleSet;
use palisade::rules::fields::RuleInput;
use palisade_benches::{
    api_headers, engine_with_extra, get, json_of_size, malicious_json, managed,
    managed_any_body_size, post, small_json, GET_QUERY,
};

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
    let synthetic = Engine::new(vec![AttachedRuleSet::plain(set)]);
    let managed_sets = managed();
    eprintln!(
        "managed: {} rules in {} sets",
        managed_sets
            .iter()
            .map(|s| s.set.rules.len())
            .sum::<usize>(),
        managed_sets.len()
    );
    if std::env::var_os("PALISADE_BENCH_PER_SET").is_some() {
        // Where the managed sets' time goes: each set alone on the benign request.
        let (h, body) = (api_headers(), small_json());
        for one in &managed_sets {
            let e = Engine::new(vec![one.clone()]);
            bench_input(
                c,
                &format!("managed_only_{}", one.set.name),
                &e,
                &post("", &h, body.as_bytes()),
            );
        }
    }
    let managed = Engine::new(managed_sets);
    let (sources, patterns) = managed.stats();
    eprintln!("managed engine: {sources} sources, {patterns} scanned patterns");

    let headers = api_headers();
    let (benign, malicious) = (small_json(), malicious_json());
    let (kb1, kb32) = (json_of_size(1024), json_of_size(32 * 1024));
    let query = "athlete=1842&since=2026-10-01";
    // 1 KB and 32 KB bodies inspected whole (the default 8 KiB body-size rule off).
    let any_size = managed_any_body_size();
    for (name, engine, body) in [
        ("rules_212_benign_json_post", &synthetic, &benign),
        ("rules_212_malicious_json_post", &synthetic, &malicious),
        ("managed_benign_json_post", &managed, &benign),
        ("managed_malicious_json_post", &managed, &malicious),
        ("managed_json_post_1k", &any_size, &kb1),
        ("managed_json_post_32k", &any_size, &kb32),
    ] {
        bench_input(c, name, engine, &post(query, &headers, body.as_bytes()));
    }
    bench_input(
        c,
        "managed_get_5_params",
        &managed,
        &get(GET_QUERY, &headers),
    );
    for (what, body) in [
        ("malicious", &malicious),
        ("benign", &benign),
        ("1k", &kb1),
        ("32k", &kb32),
    ] {
        let out = any_size.evaluate(&post(query, &headers, body.as_bytes()), &mut ());
        eprintln!("managed, {what} ({} bytes): {:?}", body.len(), out.verdict);
    }

    // Flat in rule count: the same requests through the managed sets plus generated rules.
    if std::env::var_os("PALISADE_BENCH_SKIP_SCALING").is_none() {
        for extra in [0, 100, 1000, 5000] {
            let engine = engine_with_extra(extra);
            let (sources, patterns) = engine.stats();
            eprintln!("managed + {extra} extra rules: {sources} sources, {patterns} patterns");
            for body in [&benign, &kb1] {
                let out = engine.evaluate(&post(query, &headers, body.as_bytes()), &mut ());
                assert!(
                    matches!(out.verdict, palisade::rules::eval::RulesVerdict::Pass),
                    "{out:?}"
                );
            }
            bench_input(
                c,
                &format!("scaling_{extra}_extra_json_post"),
                &engine,
                &post(query, &headers, benign.as_bytes()),
            );
            bench_input(
                c,
                &format!("scaling_{extra}_extra_json_post_1k"),
                &engine,
                &post(query, &headers, kb1.as_bytes()),
            );
            bench_input(
                c,
                &format!("scaling_{extra}_extra_get"),
                &engine,
                &get(GET_QUERY, &headers),
            );
        }
    }
}

/// One criterion benchmark: the engine's verdict on `input`, its caches cleared each time
/// (a fresh request model per iteration, as the proxy builds one per request).
fn bench_input(c: &mut Criterion, name: &str, engine: &Engine, input: &RuleInput<'_>) {
    c.bench_function(name, |b| {
        b.iter(|| {
            let fresh = input.fresh();
            black_box(engine.evaluate(&fresh, &mut ()))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
