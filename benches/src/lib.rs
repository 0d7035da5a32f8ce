//! Shared fixtures of the benchmarks: the requests the rules engine is measured on, the
//! managed rule sets as the default config attaches them, and a generator of extra rules of
//! the kind a rule author adds (phrase lists and regexes over arguments, headers and body).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use palisade::rules::compile::{load_managed, load_text};
use palisade::rules::engine::Engine;
use palisade::rules::eval::AttachedRuleSet;
use palisade::rules::fields::RuleInput;

/// The managed rule sets, attached in the embedded default config's order.
pub fn managed() -> Vec<AttachedRuleSet> {
    load_managed(&BTreeMap::new())
        .into_iter()
        .map(|r| AttachedRuleSet::plain(Arc::new(r.unwrap())))
        .collect()
}

/// The managed sets plus `extra` generated rules (in one extra set), as one engine.
pub fn engine_with_extra(extra: usize) -> Engine {
    let mut sets = managed();
    if extra > 0 {
        let path = std::path::Path::new("generated-extra.yaml");
        let set = load_text(path, &extra_rules_yaml(extra), &BTreeMap::new()).unwrap();
        sets.push(AttachedRuleSet::plain(Arc::new(set)));
    }
    Engine::new(sets)
}

/// The managed sets with their body-size rule (`core-size-body`, 8 KiB) disabled, as a
/// route with a larger body limit has it: the whole 32 KB body is inspected.
pub fn managed_any_body_size() -> Engine {
    let mut sets = managed();
    for s in &mut sets {
        for (i, r) in s.set.rules.iter().enumerate() {
            if r.id == "core-size-body" {
                s.tuning[i].disabled = true;
            }
        }
    }
    Engine::new(sets)
}

/// A small deterministic generator (xorshift), so every run measures the same rules.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a, T>(&mut self, list: &'a [T]) -> &'a T {
        &list[(self.next() % list.len() as u64) as usize]
    }
    /// A made-up identifier of 5 to 9 letters: product names, internal tool names, the
    /// strings custom rules look for.
    fn word(&mut self) -> String {
        const SYL: &[&str] = &[
            "ka", "zor", "vel", "tri", "mun", "dax", "qui", "bro", "sel", "tan", "vor", "lix",
            "pem", "gra", "hud", "nox", "fey", "jul", "wim", "cor",
        ];
        let n = 2 + (self.next() % 2) as usize;
        (0..n).map(|_| *self.pick(SYL)).collect()
    }
}

/// `n` rules of the kinds a rule author adds to the managed ones: half phrase lists (known bad
/// tool names, leaked internal identifiers), half regexes (parameter shapes, paths, header
/// values), over arguments, headers, the query string and the body, under the usual decode
/// chains.
pub fn extra_rules_yaml(n: usize) -> String {
    let fields = [
        "args.values",
        "[args.names, args.values]",
        "headers.values",
        "\"header:user-agent\"",
        "query_string",
        "body",
        "[args.values, cookies.values, headers.custom]",
    ];
    let chains = [
        "[url_decode_uni, lowercase]",
        "[url_decode_uni, html_entity_decode, lowercase]",
        "[lowercase]",
        "[]",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut y = String::from(
        "name: extra\ndescription: generated rules for the scaling benchmark\nrules:\n",
    );
    for i in 0..n {
        let field = rng.pick(&fields);
        let chain = rng.pick(&chains);
        let (w1, w2, w3) = (rng.word(), rng.word(), rng.word());
        let op = match i % 6 {
            0..=2 => format!("phrases: [\"{w1}\", \"{w2}-{w3}\", \"{w3}.exe\"]"),
            3 => format!(
                "regex: \"(?i)\\\\b{w1}[_-]?(?:id|key|token)\\\\s*[:=]\\\\s*['\\\"]?[a-z0-9]{{8,}}\""
            ),
            4 => format!("regex: \"/(?:{w1}|{w2})/(?:admin|debug|internal)\\\\b\""),
            _ => format!("regex: \"(?i){w1}\\\\s*\\\\(\\\\s*['\\\"]?{w2}\""),
        };
        writeln!(
            y,
            "  - id: x{i}\n    action: block\n    match: {{field: {field}, transforms: {chain}, {op}}}"
        )
        .unwrap();
    }
    y
}

/// Headers of a typical API request from a browser application.
pub fn api_headers() -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "user-agent",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
            .parse()
            .unwrap(),
    );
    headers.insert("accept", "application/json".parse().unwrap());
    headers.insert("accept-language", "en-US,en;q=0.9".parse().unwrap());
    headers.insert(
        "authorization",
        "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl"
            .parse()
            .unwrap(),
    );
    headers.insert(
        "cookie",
        "session=8f14e45fceea167a5a36dedd4bea2543; theme=dark"
            .parse()
            .unwrap(),
    );
    headers.insert(
        "x-request-id",
        "7d3c1a9e-52f4-4b8e-9c1d-2f6a8b0e4d11".parse().unwrap(),
    );
    headers.insert("content-type", "application/json".parse().unwrap());
    headers
}

/// A small benign JSON body (~250 bytes): an activity of a fitness API.
pub fn small_json() -> String {
    serde_json::json!({
        "type": "run", "title": "Morning run along the river", "duration_s": 1820, "distance_m": 5230,
        "heart_rate": {"avg": 148, "max": 171}, "notes": "Felt great; select a faster pace next time?", "tags": ["easy", "outdoor"]
    })
    .to_string()
}

/// A benign JSON body of about `size` bytes: a list of activities with prose notes.
pub fn json_of_size(size: usize) -> String {
    let notes = [
        "Easy recovery run, legs felt heavy after Sunday's long run.",
        "Intervals: 6 x 800 m at 5k pace, 400 m jog between; windy on the back straight.",
        "Group ride with the club, coffee stop in town, rain for the last hour.",
        "Tempo 20 min, then strides. New shoes <- need to break them in.",
    ];
    let mut items = Vec::new();
    let mut i = 0;
    loop {
        let body = serde_json::json!({"items": items}).to_string();
        if body.len() >= size {
            return body;
        }
        items.push(serde_json::json!({
            "id": format!("act_{i:06}"), "type": if i % 3 == 0 { "ride" } else { "run" },
            "started_at": "2026-11-28T07:12:00Z", "duration_s": 1800 + i * 7, "distance_m": 5000 + i * 13,
            "notes": notes[i % notes.len()], "tags": ["outdoor", "club"]
        }));
        i += 1;
    }
}

/// A JSON body with SQL injection in a field.
pub fn malicious_json() -> String {
    serde_json::json!({
        "type": "run", "title": "x' UNION SELECT password FROM users--", "duration_s": 1820
    })
    .to_string()
}

/// The query of a typical API GET: five parameters.
pub const GET_QUERY: &str =
    "athlete=1842&since=2026-10-01&limit=25&sort=-started_at&fields=id,title,distance_m";

/// A POST of `body` to the activities API.
pub fn post<'a>(query: &'a str, headers: &'a http::HeaderMap, body: &'a [u8]) -> RuleInput<'a> {
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

/// A GET of the activities list with `query`.
pub fn get<'a>(query: &'a str, headers: &'a http::HeaderMap) -> RuleInput<'a> {
    RuleInput::new(
        "GET",
        "/api/v1/activities",
        query,
        headers,
        b"",
        None,
        None,
        None,
    )
}
