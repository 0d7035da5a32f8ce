//! Allocations per inspected request: the managed rule sets (and the scaling sets) on the
//! requests of the `rules` benchmark, counted with a counting allocator around the proxy's
//! own. Prints a table; no timing (time is the `rules` benchmark's job).
//!
//! `cargo bench -p palisade-benches --bench allocs`
//! Also a stable profile target: `valgrind --tool=callgrind <bench binary> CASE N` runs one
//! case N times (instruction counts do not depend on the machine's load).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;

use palisade::rules::engine::Engine;
use palisade::rules::fields::RuleInput;
use palisade_benches::{
    api_headers, engine_with_extra, get, json_of_size, malicious_json, managed_any_body_size, post,
    small_json, GET_QUERY,
};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

/// Counts are the same whatever allocator serves them (stats_alloc wraps only `System` in a
/// `static` on stable Rust).
#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

fn count(engine: &Engine, input: &RuleInput<'_>) -> (usize, usize) {
    // Warm the engine's lazily built parts (regex caches) first.
    black_box(engine.evaluate(&input.fresh(), &mut ()));
    const N: usize = 100;
    let region = Region::new(GLOBAL);
    for _ in 0..N {
        let fresh = input.fresh();
        black_box(engine.evaluate(&fresh, &mut ()));
    }
    let s = region.change();
    (s.allocations / N, s.bytes_allocated / N)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let headers = api_headers();
    let (small, bad, kb1, kb32) = (
        small_json(),
        malicious_json(),
        json_of_size(1024),
        json_of_size(32 * 1024),
    );
    // The body of ../shared/peer/post-json.lua, which load.sh's post1k sends: one long prose
    // note, so that this case and the end-to-end run inspect the same values.
    let note = "Easy recovery run along the river, legs felt fresh after the long weekend. ";
    let mut text = String::new();
    while text.len() < 1024 - 200 {
        text.push_str(note);
    }
    let prose = format!(
        "{{\"type\":\"run\",\"started_at\":\"2026-11-20T07:15:00Z\",\"duration_s\":3120,\"distance_m\":10240.5,\"heart_rate\":{{\"avg\":148,\"max\":171}},\"tags\":[\"easy\",\"river\"],\"notes\":\"{text}\"}}"
    );
    let query = "athlete=1842&since=2026-10-01";
    let managed = managed_any_body_size();
    let cases: Vec<(&str, RuleInput<'_>)> = vec![
        ("json_post_small", post(query, &headers, small.as_bytes())),
        ("json_post_malicious", post(query, &headers, bad.as_bytes())),
        ("json_post_1k", post(query, &headers, kb1.as_bytes())),
        (
            "json_post_1k_prose",
            post(query, &headers, prose.as_bytes()),
        ),
        ("json_post_32k", post(query, &headers, kb32.as_bytes())),
        ("get_5_params", get(GET_QUERY, &headers)),
    ];
    if let [case, n] = args.as_slice() {
        // Profile mode: one case, n times.
        let n: usize = n.parse().unwrap();
        let (_, input) = cases.iter().find(|(c, _)| c == case).expect("case");
        for _ in 0..n {
            black_box(managed.evaluate(&input.fresh(), &mut ()));
        }
        return;
    }
    println!("managed engine: {}", managed.describe());
    println!(
        "{:24} {:>14} {:>14}",
        "case (managed sets)", "allocs/request", "bytes/request"
    );
    for (name, input) in &cases {
        let (a, b) = count(&managed, input);
        println!("{name:24} {a:>14} {b:>14}");
    }
    for extra in [100, 1000, 5000] {
        let engine = engine_with_extra(extra);
        let (a, b) = count(&engine, &cases[0].1);
        println!("{:24} {a:>14} {b:>14}", format!("+{extra} rules, small"));
    }
}
