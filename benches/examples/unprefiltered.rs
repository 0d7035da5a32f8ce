//! Lists the patterns of the managed rule sets (paranoia 1) that have no literal for the
//! engine's Aho-Corasick prefilter: each of them runs, in a `RegexSet`, over every value of
//! every source it reads, so they are what to rewrite first when inspection gets slower
//! (benches/README.md).
//!
//!   cargo run -p palisade-benches --example unprefiltered
use palisade::rules::compile::{Cond, Op};

fn walk(c: &Cond, id: &str, out: &mut Vec<(usize, String, String)>) {
    match c {
        Cond::All(v) | Cond::Any(v) => v.iter().for_each(|x| walk(x, id, out)),
        Cond::Not(b) => walk(b, id, out),
        Cond::Leaf(l) => {
            if let Op::Regex(r) = &l.op {
                if palisade::rules::literals::required_literals(r.as_str()).is_none() {
                    let head: String = r.as_str().chars().take(100).collect();
                    out.push((l.sources.len(), id.to_string(), head));
                }
            }
        }
    }
}

fn main() {
    let mut out = Vec::new();
    for s in palisade_benches::managed() {
        for r in s.set.rules.iter().filter(|r| r.paranoia <= 1) {
            walk(&r.cond, &r.id, &mut out);
        }
    }
    out.sort_by_key(|o| std::cmp::Reverse(o.0));
    let total: usize = out.iter().map(|o| o.0).sum();
    println!("{total} (source, pattern) pairs without a literal:");
    for (n, id, head) in out {
        println!("{n:3} sources  {id}: {head}");
    }
}
