//! Fuzz targets: the config and rule-set loaders, every transform, the request model's parsers
//! (canonical head, JSON, urlencoded, multipart, XML, cookies) and a whole-request inspection
//! through the managed rule sets, and MCP bodies through the worked example's MCP route.
//!
//! Each target is a `bolero` harness. `cargo test -p palisade-fuzz` runs every target for a
//! few seconds of random inputs (`PALISADE_FUZZ_SECS`, default 3) on the stable toolchain;
//! `cargo bolero test <target> -p palisade-fuzz` runs it coverage-guided under libFuzzer where
//! a nightly toolchain exists (see `fuzz/README.md`). Random bytes rarely form a JSON document
//! or a multipart body, so inputs are *edits* of real seeds (the repository's configs, rule
//! sets and request samples): the first byte picks a seed, the rest drive insertions of
//! tokens parsers care about, deletions, duplications and splices. A panic anywhere fails the
//! target; some targets also check properties (normalization is idempotent, the two JSON
//! readers agree).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use palisade::request::canon::{self, EncodedSlash};
use palisade::request::Request;

fn budget() -> Duration {
    let secs = std::env::var("PALISADE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

/// Tokens parsers treat specially, inserted by the mutator.
const TOKENS: &[&[u8]] = &[
    b"%",
    b"%2e",
    b"%2f",
    b"%2F",
    b"%5c",
    b"%00",
    b"%c0%af",
    b"%u002e",
    b"%zz",
    b"..",
    b"../",
    b"..;/",
    b";",
    b"//",
    b"\\",
    b"\"",
    b"'",
    b"\\u0000",
    b"\\\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"=",
    b"&",
    b"\r\n",
    b"\n",
    b"\r\n\r\n",
    b"--B",
    b"--B--",
    b"filename=",
    b"name=",
    b"boundary=",
    b"<",
    b">",
    b"<!ENTITY",
    b"]]>",
    b"&amp;",
    b"&#x",
    b"${",
    b"\xff",
    b"\xc3",
    b"\xef\xbb\xbf",
    b" ",
    b"\t",
    b"*",
    b"#",
    b"?",
    b"+",
    b"0",
    b"9999999999999999999999",
];

/// An input made from a seed and an edit script.
fn mutate(seeds: &[&[u8]], data: &[u8]) -> Vec<u8> {
    let Some((&pick, mut script)) = data.split_first() else {
        return seeds.first().map(|s| s.to_vec()).unwrap_or_default();
    };
    let mut out = seeds[usize::from(pick) % seeds.len()].to_vec();
    while script.len() >= 3 {
        let (op, a, b) = (script[0], usize::from(script[1]), usize::from(script[2]));
        script = &script[3..];
        let len = out.len().max(1);
        let at = (a * 257 + b) % len;
        match op % 7 {
            0 => {
                if let Some(x) = out.get_mut(at) {
                    *x ^= 1 << (b % 8);
                }
            }
            1 => {
                let t = TOKENS[b % TOKENS.len()];
                let at = at.min(out.len());
                out.splice(at..at, t.iter().copied());
            }
            2 => {
                let end = (at + b % 32 + 1).min(out.len());
                if at < end {
                    out.drain(at..end);
                }
            }
            3 => {
                let end = (at + b % 64 + 1).min(out.len());
                if at < end {
                    let piece = out[at..end].to_vec();
                    out.splice(end..end, piece);
                }
            }
            4 => {
                let other = seeds[b % seeds.len()];
                let from = (a * 31) % other.len().max(1);
                let piece = &other[from.min(other.len())..other.len().min(from + 48)];
                let at = at.min(out.len());
                out.splice(at..at, piece.iter().copied());
            }
            5 => {
                if let Some(x) = out.get_mut(at) {
                    *x = b as u8;
                }
            }
            _ => {
                // Repeat a token many times (deep nesting, long runs).
                let t = TOKENS[a % TOKENS.len()];
                let at = at.min(out.len());
                let n = b % 200;
                let run: Vec<u8> = t.iter().copied().cycle().take(t.len() * n).collect();
                out.splice(at..at, run);
            }
        }
        if out.len() > 256 * 1024 {
            out.truncate(256 * 1024);
        }
    }
    out
}

fn fuzz(seeds: &[&[u8]], target: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
    bolero::check!()
        .with_test_time(budget())
        .for_each(|data: &[u8]| target(&mutate(seeds, data)));
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const CONFIGS: &[&[u8]] = &[
    include_bytes!("../../proxy/src/config/default.yaml"),
    include_bytes!("../../examples/palisade.yaml"),
    include_bytes!("../../examples/managed.yaml"),
    include_bytes!("../../examples/validation.yaml"),
    include_bytes!("../../examples/rules-demo.yaml"),
];

const RULESETS: &[&[u8]] = &[
    include_bytes!("../../rulesets/core.yaml"),
    include_bytes!("../../rulesets/sqli.yaml"),
    include_bytes!("../../rulesets/xss.yaml"),
    include_bytes!("../../rulesets/examples/engine-coverage.yaml"),
];

const BODIES: &[&[u8]] = &[
    br#"{"user":{"name":"alice","tags":["a","b"],"age":30,"ok":true,"n":null},"q":"x","q":"y"}"#,
    b"a=1&b=%41%42&c=x+y&d=&e&a=2",
    b"--B\r\nContent-Disposition: form-data; name=\"q\"\r\n\r\nvalue\r\n--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nfile text\r\n--B--\r\n",
    b"<?xml version=\"1.0\"?><!DOCTYPE a [<!ENTITY e \"x\">]><a k=\"v\" xmlns:p=\"u\"><b>t&e;</b><![CDATA[c]]></a>",
    b"session=abc; theme=\"dark\"; a=1; a=2",
    b"/api/v1/./users/../%61dmin;x=1//a%2Fb/caf%C3%A9",
];

const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=B",
    "application/xml",
    "text/plain",
    "",
    "multipart/form-data; boundary=\"B\"; charset=utf-8",
    "application/json; charset=utf-16",
];

#[test]
fn config_loader() {
    let overrides = palisade::config::Overrides::default();
    fuzz(CONFIGS, |b| {
        let _ = palisade::config::load_str("fuzz.yaml", &text(b), &overrides);
    });
}

#[test]
fn ruleset_loader() {
    let ip_sets = BTreeMap::new();
    fuzz(RULESETS, |b| {
        let _ = palisade::rules::compile::load_text(Path::new("fuzz.yaml"), &text(b), &ip_sets);
    });
}

#[test]
fn transforms() {
    use palisade::rules::transforms::{apply_chain, Transform};
    let all: Vec<Transform> = Transform::NAMES
        .iter()
        .filter_map(|n| Transform::parse(n))
        .collect();
    assert_eq!(all.len(), Transform::NAMES.len());
    fuzz(BODIES, |b| {
        let s = text(b);
        for t in &all {
            let _ = t.apply(&s);
        }
        let _ = apply_chain(&all, &s);
    });
}

#[test]
fn path_normalization_is_idempotent() {
    fuzz(BODIES, |b| {
        let raw = text(b);
        for slash in [
            EncodedSlash::Decode,
            EncodedSlash::Keep,
            EncodedSlash::Reject,
        ] {
            if let Ok(n) = canon::normalize_path(&raw, slash) {
                // What is forwarded normalizes to itself: routing it again gives the same path.
                let again = canon::normalize_path(&n.encoded(), slash)
                    .unwrap_or_else(|e| panic!("{raw:?} -> {:?}: {e:?}", n.encoded()));
                assert_eq!(again, n, "{raw:?}");
                assert!(!n.decoded().contains("/../") && !n.decoded().contains("//"));
            }
        }
    });
}

#[test]
fn head_parsers() {
    fuzz(BODIES, |b| {
        let v = http::HeaderValue::from_bytes(b).ok();
        let mut h = http::HeaderMap::new();
        if let Some(v) = v {
            h.insert(http::header::CONTENT_LENGTH, v.clone());
            h.insert(http::header::HOST, v.clone());
            let _ = canon::framing(&h);
            let _ = canon::authority(None, &h);
            let _ = canon::authority(Some(b), &http::HeaderMap::new());
            h.insert(http::header::COOKIE, v);
            let _ = palisade::request::parse_cookies(&h);
        }
        let _ = palisade::request::parse_urlencoded(b);
    });
}

#[test]
fn body_parsers() {
    fuzz(BODIES, |b| {
        let ct = CONTENT_TYPES[b.len() % CONTENT_TYPES.len()];
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ct),
        );
        let req = Request::new("POST", "/x", "a=1", &h, b, None, None, None);
        let _ = req.body_refusal();
        let members = req.json();
        let _ = req.form();
        let _ = req.xml();
        let _ = req.query_pairs();
        // The two JSON readers agree: what validation parses, inspection walks.
        if let Ok(doc) = palisade::request::json::parse_strict(b) {
            let walked = palisade::request::json::members(b)
                .unwrap_or_else(|e| panic!("strict parse ok, walk failed: {e}"));
            if ct == "application/json" {
                assert!(!members.malformed || b.is_empty());
            }
            let scalars = count_scalars(&doc);
            assert_eq!(
                walked.iter().filter(|m| m.scalar.is_some()).count(),
                scalars
            );
        }
    });
}

fn count_scalars(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Object(m) => m.values().map(count_scalars).sum(),
        serde_json::Value::Array(a) => a.iter().map(count_scalars).sum(),
        _ => 1,
    }
}

struct Inspect {
    snapshot: palisade::snapshot::Snapshot,
}

fn inspector() -> &'static Inspect {
    static S: OnceLock<Inspect> = OnceLock::new();
    S.get_or_init(|| {
        let yaml = "listeners: [{address: \"127.0.0.1:1\"}]\nrulesets: [builtin:managed]\nupstreams:\n  a: {targets: [\"127.0.0.1:9\"]}\nroutes:\n  - name: r\n    upstream: a\n    policy:\n      rulesets: [{name: core}, {name: known-bad-inputs}, {name: sqli}, {name: xss}, {name: lfi-rfi}, {name: rce}, {name: injection}]\n";
        let config =
            palisade::config::load_str("fuzz.yaml", yaml, &Default::default()).unwrap();
        let metrics = Arc::new(palisade::metrics::Metrics::new().unwrap());
        let cx = palisade::compile::CompileContext::first(&metrics, None);
        Inspect {
            snapshot: palisade::compile::compile(config, &cx).unwrap(),
        }
    })
}

#[test]
fn whole_request_inspection() {
    inspector();
    fuzz(BODIES, |b| {
        let inspect = inspector();
        // Split the input into path, query, a header value and a body.
        let mut parts = b.splitn(4, |c| *c == 0xff || *c == b'\n');
        let path = text(parts.next().unwrap_or(b"/"));
        let query = text(parts.next().unwrap_or(b""));
        let header = parts.next().unwrap_or(b"");
        let body = parts.next().unwrap_or(b"");
        let mut h = http::HeaderMap::new();
        let ct = CONTENT_TYPES[b.len() % CONTENT_TYPES.len()];
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ct),
        );
        h.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static("fuzz"),
        );
        if let Ok(v) = http::HeaderValue::from_bytes(header) {
            h.insert("x-fuzz", v.clone());
            h.insert(http::header::COOKIE, v.clone());
            h.insert(http::header::ACCEPT_LANGUAGE, v);
        }
        let req = Request::new("POST", &path, &query, &h, body, None, None, None);
        let route = &inspect.snapshot.routes[0];
        let mut notes = palisade::pipeline::Notes::default();
        let _ = route.pipeline.run_blocking(&req, &mut notes);
    });
}

/// JSON-RPC bodies of an MCP client, as the worked example's agent sends them.
const MCP_BODIES: &[&[u8]] = &[
    br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_activities","arguments":{"user":"alice","limit":5}}}"#,
    br#"{"jsonrpc":"2.0","id":"d","method":"tools/call","params":{"name":"delete_route","arguments":{"user":"alice","route":"r1"}}}"#,
    br#"[{"jsonrpc":"2.0","id":2,"method":"tools/list"},{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"get_activities","arguments":{"user":"bob"}}}]"#,
    br#"{"jsonrpc":"2.0","id":4,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"agent","version":"1"}}}"#,
    br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    br#"{"jsonrpc":"2.0","id":5,"method":"resources/read","params":{"uri":"file:///etc/passwd"}}"#,
];

/// Members an attacker adds to an MCP message, to be read one way by Palisade and another by
/// the server: a second tool name, method or user, and members the policies do not look at.
const MCP_MEMBERS: &[&[u8]] = &[
    br#""name":"delete_route","#,
    br#""method":"tools/call","#,
    br#""method":"resources/read","#,
    br#""params":{"name":"delete_route","arguments":{}},"#,
    br#""arguments":{"user":"bob"},"#,
    br#""user":"bob","#,
    br#""user":"alice","#,
    br#""id":7,"#,
    br#""jsonrpc":"2.0","#,
    br#""__proto__":{"name":"delete_route"},"#,
    br#""name":null,"#,
    br#""user":["bob"],"#,
];

/// An MCP body from a seed and at most four edits that mostly keep it JSON (random bytes
/// almost never do): members inserted after `{` or `,`, letters replaced by their `\u`
/// escapes or turned upper case, whitespace, or two messages joined into a batch.
fn mcp_mutate(data: &[u8]) -> Vec<u8> {
    let Some((&pick, script)) = data.split_first() else {
        return MCP_BODIES[0].to_vec();
    };
    let mut out = MCP_BODIES[usize::from(pick) % MCP_BODIES.len()].to_vec();
    for edit in script.chunks_exact(3).take(4) {
        let (op, a, b) = (edit[0], usize::from(edit[1]), usize::from(edit[2]));
        let at = |pred: &dyn Fn(u8) -> bool, out: &[u8]| {
            let spots: Vec<usize> = (0..out.len()).filter(|&i| pred(out[i])).collect();
            (!spots.is_empty()).then(|| spots[(a * 256 + b) % spots.len()])
        };
        match op % 5 {
            0 => {
                if let Some(i) = at(&|c| c == b'{' || c == b',', &out) {
                    let m = MCP_MEMBERS[b % MCP_MEMBERS.len()];
                    // After `{` the member needs its comma; after `,` it brings its own.
                    out.splice(i + 1..i + 1, m.iter().copied());
                }
            }
            1 => {
                if let Some(i) = at(&|c| c.is_ascii_lowercase() || c == b'_' || c == b'/', &out) {
                    let esc = format!("\\u{:04x}", out[i]);
                    out.splice(i..=i, esc.bytes());
                }
            }
            2 => {
                if let Some(i) = at(&|c| c.is_ascii_lowercase(), &out) {
                    out[i] = out[i].to_ascii_uppercase();
                }
            }
            3 => {
                if let Some(i) = at(
                    &|c| matches!(c, b'{' | b'}' | b'[' | b']' | b',' | b':'),
                    &out,
                ) {
                    let ws: &[u8] =
                        [&b" "[..], b"\n", b"\t", b"\r\n", b"\xef\xbb\xbf", b"\x00"][b % 6];
                    out.splice(i..i, ws.iter().copied());
                }
            }
            _ => {
                let other = MCP_BODIES[b % MCP_BODIES.len()];
                let strip = |m: &[u8]| -> Vec<u8> {
                    let m = m.strip_prefix(b"[").unwrap_or(m);
                    m.strip_suffix(b"]").unwrap_or(m).to_vec()
                };
                let mut batch = b"[".to_vec();
                batch.extend(strip(&out));
                batch.push(b',');
                batch.extend(strip(other));
                batch.push(b']');
                out = batch;
            }
        }
    }
    out
}

/// The worked example (`examples/fitness`) compiled as the proxy compiles it, and the headers
/// of its agent: a token for alice (athletes, scope `mcp`) for the MCP resource.
fn fitness() -> &'static (palisade::snapshot::Snapshot, http::HeaderMap) {
    static S: OnceLock<(palisade::snapshot::Snapshot, http::HeaderMap)> = OnceLock::new();
    S.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut config = palisade::config::load_file(
            &root.join("examples/fitness/palisade.yaml"),
            &Default::default(),
        )
        .unwrap();
        // Its rate limits would refuse everything after the first minute's calls.
        config.rate_limits.clear();
        let metrics = Arc::new(palisade::metrics::Metrics::new().unwrap());
        // The example's `demo: true` upstreams: an address nothing is sent to.
        let demo = Some(([127, 0, 0, 1], 9).into());
        let cx = palisade::compile::CompileContext::first(&metrics, demo);
        let snapshot = palisade::compile::compile(config, &cx).unwrap();
        let alg = jsonwebtoken::Algorithm::ES256;
        let pem = std::fs::read(root.join("examples/fitness/dev-signing-key.pem")).unwrap();
        let key = palisade::auth::mint::load_key(&pem, alg).unwrap();
        let spec = palisade::auth::mint::MintSpec {
            issuer: "https://id.fitness.test".into(),
            subject: "alice".into(),
            audiences: vec!["http://127.0.0.1:8080/mcp".into()],
            scope: Some("mcp".into()),
            groups: vec!["athletes".into()],
            groups_claim: "cognito:groups".into(),
            ttl: Duration::from_secs(3600),
            kid: Some("fitness-dev-1".into()),
            ..Default::default()
        };
        let token = palisade::auth::mint::mint(&spec, &key, alg).unwrap();
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        (snapshot, h)
    })
}

/// The example's MCP route on `body`.
fn mcp_verdict(body: &[u8]) -> palisade::pipeline::Verdict {
    let (snapshot, headers) = fitness();
    let route = snapshot.routes.iter().find(|r| r.name == "mcp").unwrap();
    let req = Request::new("POST", "/mcp", "", headers, body, None, None, None);
    route
        .pipeline
        .run_blocking(&req, &mut palisade::pipeline::Notes::default())
}

/// MCP bodies through the example's MCP route (JWT, JSON-RPC parse, argument schemas, Cedar
/// per message). Besides not panicking: whatever is forwarded, a common JSON reader
/// (`serde_json`: the last of duplicate keys wins, as in Python and JavaScript) reads as the
/// policies allow — never `delete_route`, never another user's activities, no method without
/// a permit. A body that two parsers read differently must not get through.
#[test]
fn mcp_messages_forwarded_are_what_the_policies_allow() {
    use palisade::pipeline::Verdict;
    let allowed = |body: &[u8]| matches!(mcp_verdict(body), Verdict::Forward | Verdict::Allow);
    // The target reaches the decisions: the seeds are decided as the policies say.
    assert!(allowed(MCP_BODIES[0]));
    assert!(!allowed(MCP_BODIES[1]));
    assert!(!allowed(MCP_BODIES[2]), "bob's activities");
    assert!(allowed(MCP_BODIES[3]) && allowed(MCP_BODIES[4]));
    assert!(!allowed(MCP_BODIES[5]), "no permit for resources/read");
    bolero::check!()
        .with_test_time(budget())
        .for_each(|data: &[u8]| {
            let b = &mcp_mutate(data)[..];
            if !allowed(b) {
                return;
            }
            // A leading byte order mark: RFC 8259 lets readers ignore it (Palisade does) or
            // refuse the text (serde_json, Python); neither reads it as something else.
            let json = b.strip_prefix(b"\xef\xbb\xbf").unwrap_or(b);
            let doc: serde_json::Value = serde_json::from_slice(json).unwrap_or_else(|e| {
                panic!("forwarded, but not JSON to serde_json ({e}): {:?}", text(b))
            });
            let messages = match &doc {
                serde_json::Value::Array(a) => a.iter().collect(),
                one => vec![one],
            };
            for m in messages {
                let Some(method) = m.get("method") else {
                    continue; // a response to the server
                };
                let method = method.as_str().unwrap_or_default();
                assert!(
                    [
                        "initialize",
                        "notifications/initialized",
                        "ping",
                        "tools/list",
                        "tools/call"
                    ]
                    .contains(&method),
                    "forwarded method {method:?}: {:?}",
                    text(b)
                );
                if method == "tools/call" {
                    assert_eq!(m["params"]["name"], "get_activities", "{:?}", text(b));
                    let user = &m["params"]["arguments"]["user"];
                    assert!(user.is_null() || user == "alice", "{:?}", text(b));
                }
            }
        });
}
