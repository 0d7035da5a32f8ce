//! Counts, for a text, how often each prefilter literal of the managed rule sets (paranoia 1)
//! occurs in it (case-insensitive, overlapping, as the engine's Aho-Corasick scan reports
//! them), and which rules' regexes each hit makes the engine confirm. Literals that hit often
//! on benign text are where a rule's prefilter is too weak (benches/README.md).
//!
//!   cargo run -p palisade-benches --example literal_hits -- FILE   (default: the load.sh prose)
use std::collections::BTreeMap;

use palisade::rules::compile::{Cond, Op};

fn walk(c: &Cond, id: &str, out: &mut Vec<(String, Vec<Vec<u8>>)>) {
    match c {
        Cond::All(v) | Cond::Any(v) => v.iter().for_each(|x| walk(x, id, out)),
        Cond::Not(b) => walk(b, id, out),
        Cond::Leaf(l) => {
            if let Op::Regex(r) = &l.op {
                if let Some(set) = palisade::rules::literals::required_literals(r.as_str()) {
                    out.push((id.to_string(), set));
                }
            }
        }
    }
}

fn main() -> std::io::Result<()> {
    let text = match std::env::args().nth(1) {
        Some(f) => std::fs::read_to_string(&f)?,
        None => {
            "Easy recovery run along the river, legs felt fresh after the long weekend. ".repeat(11)
        }
    };
    let lower = text.to_ascii_lowercase();
    let mut leaves = Vec::new();
    for s in palisade_benches::managed() {
        for r in s.set.rules.iter().filter(|r| r.paranoia <= 1) {
            walk(&r.cond, &r.id, &mut leaves);
        }
    }
    // literal -> (hits in the text, rules whose regex it gates)
    let mut hits: BTreeMap<Vec<u8>, (usize, Vec<String>)> = BTreeMap::new();
    for (id, set) in &leaves {
        for lit in set {
            let l = lit.to_ascii_lowercase();
            let n = if l.is_empty() || l.len() > lower.len() {
                0
            } else {
                lower
                    .as_bytes()
                    .windows(l.len())
                    .filter(|w| *w == l.as_slice())
                    .count()
            };
            if n > 0 {
                let e = hits.entry(l).or_insert((n, Vec::new()));
                if !e.1.contains(id) {
                    e.1.push(id.clone());
                }
            }
        }
    }
    let mut rows: Vec<_> = hits.into_iter().collect();
    rows.sort_by_key(|(_, (n, _))| std::cmp::Reverse(*n));
    let total: usize = rows.iter().map(|(_, (n, _))| n).sum();
    println!("{total} literal hits in {} bytes:", text.len());
    for (lit, (n, ids)) in rows {
        println!(
            "{n:5}  {:<16} {}",
            String::from_utf8_lossy(&lit),
            ids.join(" ")
        );
    }
    Ok(())
}
