//! Rules step 2 (compile): the literal strings a regex cannot match without, used as the
//! prefilter of the inspection engine (`engine`): one Aho-Corasick automaton over the
//! required literals of every pattern on a source finds the few candidate patterns of a
//! value, and only those run their regex.
//!
//! Hand-written over `regex-syntax`'s HIR because its own `hir::literal::Extractor` yields
//! prefixes and suffixes only: `[;'"]\s*drop\s+table` has the weak prefixes `;`, `'`, `"`,
//! whereas the factor that makes a good prefilter, `drop`, is inside. This walks the HIR the
//! way trigram indexes do (Russ Cox, "Regular Expression Matching with a Trigram Index"):
//! each node gets the set of its exact strings when that set is small, and a set of strings
//! one of which every match must contain; a concatenation keeps its most selective factor.
//!
//! The result is a necessary condition, never a match: look-around assertions count as
//! empty, and the regex always confirms. Literals are ASCII-lowercased (the automaton is
//! ASCII-case-insensitive). Unicode case folding gives two ASCII letters non-ASCII variants:
//! `(?i)k` also matches the Kelvin sign `K` and `(?i)s` the long s `ſ`. Those are folded to
//! `k` and `s` here, and the engine scans a text holding either with them folded the same
//! way ([`fold_ascii_variants`]), so a case-insensitive regex is never bypassed. Any other
//! non-ASCII character of a class is kept as a string of its own.

use regex_syntax::hir::{Class, Hir, HirKind};

/// Most strings a concatenation's combinations may reach; beyond it the run is cut in two.
const MAX_SET: usize = 64;
/// Most strings an alternation's set may have (word lists of a few hundred are common).
const MAX_ALT: usize = 1024;
/// Most characters a class may have to be spelled out.
const MAX_CLASS: usize = 8;

/// A set of literal strings (ASCII-lowercased, sorted, deduplicated).
type Set = Vec<Vec<u8>>;

#[derive(Debug, Default, Clone)]
struct Info {
    /// Every string the node matches, when few.
    exact: Option<Set>,
    /// Strings one of which every match of the node contains.
    need: Option<Set>,
}

/// The literals one of which every match of `pattern` contains, or `None` when the pattern
/// has none useful as a prefilter (`^\s*$`, `\d{3,}`, or a factor of one common byte).
pub fn required_literals(pattern: &str) -> Option<Vec<Vec<u8>>> {
    required_literals_in(pattern, Context::Values)
}

/// What kind of text a pattern's literals are chosen for: the bytes that make a good
/// prefilter differ between a decoded value and a raw, structured one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// Decoded values: arguments, JSON leaves, cookie values, custom headers, text bodies.
    Values,
    /// Raw texts whose syntax is made of the bytes injections need: the query string and
    /// urlencoded body (`&`, `=`), header values (`;` `(` `=` in every browser User-Agent,
    /// Cookie and Accept-Language). There those bytes rank as ordinary letters.
    Structured,
}

/// [`required_literals`] for a kind of text.
pub fn required_literals_in(pattern: &str, ctx: Context) -> Option<Vec<Vec<u8>>> {
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(pattern)
        .ok()?;
    let info = walk(&hir, 0, ctx);
    let set = minimal(best(&info, ctx)?);
    selective(&set).then_some(set)
}

/// Drops strings that contain another string of the set (`bar` when `ba` is there): the
/// shorter one is required anyway.
fn minimal(set: Set) -> Set {
    let keep: Vec<bool> = set
        .iter()
        .map(|s| {
            !set.iter()
                .any(|t| t.len() < s.len() && s.windows(t.len()).any(|w| w == t.as_slice()))
        })
        .collect();
    set.into_iter()
        .zip(keep)
        .filter_map(|(s, k)| k.then_some(s))
        .collect()
}

/// Whether a literal set is worth prefiltering on: every string has two bytes or more, or is
/// one byte that benign text rarely holds (`<`, `'`, `;`, `$`, …) or that is still rarer
/// than a short word (`=`, `&`, `(`: see [`weight`]).
fn selective(set: &Set) -> bool {
    set.iter().all(|s| match s.as_slice() {
        [] => false,
        [b] => {
            !(b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b' ' | b'.' | b',' | b'-' | b'_' | b'/' | b':' | b')' | b'+'
                ))
        }
        _ => true,
    })
}

/// Bytes that benign values (prose, JSON leaves, identifiers) almost never hold but that
/// injections need: shell separators and substitutions, markup, escapes.
fn rare(b: u8) -> bool {
    matches!(b, b';' | b'|' | b'`' | b'<' | b'>' | b'$' | b'\\' | b'^')
}

/// How selective a literal is, in "letters": its length, plus three when it holds a rare
/// byte ([`rare`]), plus two for `&`, `=`, `(` and line breaks (frequent in query strings,
/// code and long text, but in few values). A set of shell separators (`;` `|` `&` newline)
/// then outranks the command names behind it (`sh`, `ver`, `tex`, `esh`) and `=` or `(` the
/// event-handler and SQL function names before them (`end`, `elt`), all of which prose is
/// full of (`fresh`, `river`, `context`, `weekend`, `felt`): fewer candidates per value for
/// the same verdicts, since the regex always confirms.
fn weight(s: &[u8], ctx: Context) -> usize {
    let structural = |b: u8| ctx == Context::Structured && matches!(b, b';' | b'&' | b'=' | b'(');
    let bonus = if s.iter().any(|&b| rare(b) && !structural(b)) {
        3
    } else if s
        .iter()
        .any(|&b| matches!(b, b'&' | b'=' | b'(' | b'\n' | b'\r') && !structural(b))
    {
        2
    } else {
        0
    };
    s.len() + bonus
}

/// Ranks a usable set: the least selective string's [`weight`] first, then fewer strings.
fn score(set: &Set, ctx: Context) -> Option<(usize, std::cmp::Reverse<usize>)> {
    // Only sets worth prefiltering on compete: a weak set must not win over a usable one.
    if set.iter().any(Vec::is_empty) || !selective(set) {
        return None;
    }
    let min = set.iter().map(|s| weight(s, ctx)).min()?;
    Some((min.min(8), std::cmp::Reverse(set.len())))
}

fn best(info: &Info, ctx: Context) -> Option<Set> {
    let mut cands: Vec<&Set> = Vec::new();
    if let Some(e) = &info.exact {
        cands.push(e);
    }
    if let Some(n) = &info.need {
        cands.push(n);
    }
    cands
        .into_iter()
        .filter_map(|s| score(s, ctx).map(|sc| (sc, s)))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, s)| s.clone())
}

fn normalize(mut set: Set) -> Set {
    set.sort();
    set.dedup();
    set
}

fn product(a: &Set, b: &Set) -> Option<Set> {
    if a.len().saturating_mul(b.len()) > MAX_SET {
        return None;
    }
    let mut out = Vec::with_capacity(a.len() * b.len());
    for x in a {
        for y in b {
            let mut s = x.clone();
            s.extend_from_slice(y);
            out.push(s);
        }
    }
    Some(normalize(out))
}

fn lower(bytes: &[u8]) -> Vec<u8> {
    bytes.to_ascii_lowercase()
}

/// The non-ASCII characters that Unicode simple case folding maps to ASCII letters.
const ASCII_VARIANTS: [(char, char); 2] = [('\u{212A}', 'k'), ('\u{17F}', 's')];

/// `text` with the Kelvin sign and the long s replaced by `k` and `s` (see the module
/// documentation), when it holds either; `None` otherwise (the common case, checked with
/// one byte search).
pub fn fold_ascii_variants(text: &str) -> Option<String> {
    // U+212A is E2 84 AA and U+017F is C5 BF in UTF-8.
    memchr::memchr2(0xE2, 0xC5, text.as_bytes())?;
    if !text.contains(['\u{212A}', '\u{17F}']) {
        return None;
    }
    Some(text.replace('\u{212A}', "k").replace('\u{17F}', "s"))
}

fn class(c: &Class) -> Option<Set> {
    let mut out = Vec::new();
    match c {
        Class::Unicode(u) => {
            let n: usize = u
                .ranges()
                .iter()
                .map(|r| (r.end() as usize).saturating_sub(r.start() as usize) + 1)
                .sum();
            if n > MAX_CLASS {
                return None;
            }
            for r in u.ranges() {
                for ch in r.start()..=r.end() {
                    let ch = ASCII_VARIANTS
                        .iter()
                        .find(|(v, _)| *v == ch)
                        .map_or(ch, |(_, a)| *a);
                    let mut buf = [0u8; 4];
                    out.push(lower(ch.encode_utf8(&mut buf).as_bytes()));
                }
            }
        }
        Class::Bytes(b) => {
            let n: usize = b
                .ranges()
                .iter()
                .map(|r| usize::from(r.end() - r.start()) + 1)
                .sum();
            if n > MAX_CLASS {
                return None;
            }
            for r in b.ranges() {
                for byte in r.start()..=r.end() {
                    out.push(vec![byte.to_ascii_lowercase()]);
                }
            }
        }
    }
    Some(normalize(out))
}

/// Deep patterns are not worth analysing (and must not exhaust the stack).
const MAX_DEPTH: usize = 64;

fn walk(hir: &Hir, depth: usize, ctx: Context) -> Info {
    if depth > MAX_DEPTH {
        return Info::default();
    }
    match hir.kind() {
        HirKind::Empty | HirKind::Look(_) => Info {
            exact: Some(vec![Vec::new()]),
            need: None,
        },
        HirKind::Literal(l) => Info {
            exact: Some(vec![lower(&l.0)]),
            need: None,
        },
        HirKind::Class(c) => Info {
            exact: class(c),
            need: None,
        },
        HirKind::Capture(c) => walk(&c.sub, depth + 1, ctx),
        HirKind::Repetition(r) => {
            let sub = walk(&r.sub, depth + 1, ctx);
            if r.min == 0 {
                // `x?` is {""} ∪ x; anything longer is unbounded and needs nothing.
                let exact = match (&sub.exact, r.max) {
                    (Some(e), Some(1)) if e.len() < MAX_SET => {
                        let mut s = e.clone();
                        s.push(Vec::new());
                        Some(normalize(s))
                    }
                    _ => None,
                };
                return Info { exact, need: None };
            }
            // The first `min` repetitions are contiguous: `\.{2,}` needs `..`.
            let repeated = sub.exact.as_ref().and_then(|e| {
                let mut acc: Option<Set> = Some(vec![Vec::new()]);
                for _ in 0..r.min.min(4) {
                    acc = acc.and_then(|a| product(&a, e));
                }
                acc
            });
            let exact = if r.max == Some(r.min) && r.min <= 4 {
                repeated.clone()
            } else {
                None
            };
            let mut need = Info {
                exact: repeated,
                need: best(&sub, ctx),
            };
            need.exact = best(&need, ctx);
            Info {
                exact,
                need: need.exact,
            }
        }
        HirKind::Concat(children) => {
            let mut cur: Set = vec![Vec::new()];
            let mut all_exact = true;
            let mut cands: Vec<Set> = Vec::new();
            for c in children {
                let ci = walk(c, depth + 1, ctx);
                match &ci.exact {
                    Some(e) => match product(&cur, e) {
                        Some(p) => cur = p,
                        None => {
                            // Too many combinations: the run so far is one factor, and a
                            // new run starts here.
                            all_exact = false;
                            cands.push(std::mem::replace(&mut cur, e.clone()));
                        }
                    },
                    None => {
                        all_exact = false;
                        cands.push(std::mem::replace(&mut cur, vec![Vec::new()]));
                        if let Some(n) = ci.need {
                            cands.push(n);
                        }
                    }
                }
            }
            let exact = all_exact.then(|| cur.clone());
            cands.push(cur);
            let need = cands
                .into_iter()
                .filter_map(|s| score(&s, ctx).map(|sc| (sc, s)))
                .max_by(|a, b| a.0.cmp(&b.0))
                .map(|(_, s)| s);
            Info { exact, need }
        }
        HirKind::Alternation(children) => {
            let infos: Vec<Info> = children.iter().map(|c| walk(c, depth + 1, ctx)).collect();
            let exact = infos
                .iter()
                .try_fold(Vec::new(), |mut acc: Set, i| {
                    acc.extend(i.exact.clone()?);
                    (acc.len() <= MAX_ALT).then_some(acc)
                })
                .map(normalize);
            let need = infos
                .iter()
                .try_fold(Vec::new(), |mut acc: Set, i| {
                    acc.extend(best(i, ctx)?);
                    (acc.len() <= MAX_ALT).then_some(acc)
                })
                .map(normalize);
            Info { exact, need }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn lits(p: &str) -> Option<Vec<String>> {
        required_literals(p).map(|v| {
            v.into_iter()
                .map(|s| String::from_utf8(s).unwrap())
                .collect()
        })
    }

    #[test]
    fn picks_the_most_selective_factor() {
        assert_eq!(
            lits(r#"[;'"]\s*drop\s+table"#).unwrap(),
            ["table"],
            "inner factor, not the prefix"
        );
        assert_eq!(
            lits(r"(?i)\bunion\b").unwrap(),
            ["union"],
            "case-insensitive letters fold to one ASCII literal"
        );
        assert_eq!(
            lits(r"(?i)\b(?:sleep|benchmark)\s*\(").unwrap(),
            ["benchmark", "sleep"],
            "the long s and the Kelvin sign fold to s and k"
        );
        assert_eq!(lits("(?i)kill").unwrap(), ["kill"]);
        // Rare bytes outrank the short words prose is full of (`fresh`, `river`, `felt`).
        assert_eq!(lits(r"[;|&]\s*(?:sh|id|ver)\b").unwrap(), ["&", ";", "|"]);
        assert_eq!(lits(r"\b(?:if|elt|left)\s*\(").unwrap(), ["("]);
        assert_eq!(lits(r"(?i)\bon[a-z]{3,}\s*=").unwrap(), ["="]);
        // In raw structured text (query strings, header values) they are ordinary bytes.
        assert_eq!(
            required_literals_in(r"[;|&]\s*(?:sh|id|ver)\b", Context::Structured).unwrap(),
            [b"id".to_vec(), b"sh".to_vec(), b"ver".to_vec()]
        );
        assert_eq!(
            required_literals_in(r"(?i)\bon[a-z]{3,}\s*=", Context::Structured).unwrap(),
            [b"on".to_vec()]
        );
        // A longer word still wins over them.
        assert_eq!(lits(r"\bsleep\s*\(").unwrap(), ["sleep"]);
        assert_eq!(
            fold_ascii_variants("\u{212A}ill \u{17F}leep").as_deref(),
            Some("kill sleep")
        );
        assert_eq!(fold_ascii_variants("café"), None);
        assert_eq!(
            lits("(?i)é").unwrap(),
            ["É", "é"],
            "other variants are kept"
        );
        assert_eq!(lits(r"\.{2,}[/\\]").unwrap(), [".."]);
        assert_eq!(lits(r"(?:ab){2}").unwrap(), ["abab"]);
        assert_eq!(lits(r"\.\./").unwrap(), ["../"]);
        assert_eq!(lits(r"[\r\n]").unwrap(), ["\n", "\r"]);
        assert_eq!(lits(r"a(?:bc|de)?f").unwrap(), ["abcf", "adef", "af"]);
        assert_eq!(lits(r"x(?:ab|abc)y").unwrap(), ["xabcy", "xaby"]);
        assert_eq!(lits(r"(?:ab|abc)").unwrap(), ["ab"], "abc holds ab");
    }

    #[test]
    fn nothing_useful() {
        for p in [
            r"^\s*$",
            r"\d{3,}",
            r"[a-z]+",
            "(?:x|y)",
            r"a?b*",
            r"(?:foo|\w+)b?",
        ] {
            assert_eq!(lits(p), None, "{p}");
        }
        assert_eq!(lits(r"(?:foo|\w+)bar?").unwrap(), ["ba"], "bar? needs ba");
    }

    /// The literals are necessary: every input a regex matches contains one of them.
    #[test]
    fn necessary_on_samples() {
        let cases = [
            (
                r"(?i)\bunion(?:\s|/\*.*?\*/|\(|\+)+(?:all|distinct)?(?:\s|/\*.*?\*/)*select\b",
                "x UnIoN/**/ALL SELECT 1",
            ),
            (r"(?i)<\s*script\b", "< SCRIPT"),
            (r"(?i)on(?:error|load)\s*=", "ONERROR ="),
            (r"(?:\$\{|%24%7b)jndi", "${jndi"),
        ];
        for (p, input) in cases {
            let re = regex::Regex::new(p).unwrap();
            let set = required_literals(p).unwrap();
            let hay = input.to_ascii_lowercase();
            let found = set
                .iter()
                .any(|l| hay.as_bytes().windows(l.len()).any(|w| w == l.as_slice()));
            assert_eq!(re.is_match(input), found, "{p} on {input:?}: {set:?}");
        }
    }
}
