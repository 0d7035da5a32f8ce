//! Rules step (evaluate): text transformations applied, in order, to a field's values before
//! an operator looks at them. Each is a pure `&str → Cow<str>` that borrows when it changes
//! nothing, so a chain over clean input allocates nothing.

use crate::request::bytes_to_text;
use std::borrow::Cow;

use base64::Engine as _;
use unicode_normalization::UnicodeNormalization;

/// One transformation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transform {
    /// `%XX` and `+` decoding, once.
    UrlDecode,
    /// `%XX`, `%uXXXX` and `+` decoding, repeated until stable (at most 4 rounds): double and
    /// IIS-style Unicode encodings.
    UrlDecodeUni,
    /// HTML entities: named, decimal and hex (`&lt;`, `&#60;`, `&#x3c;`, also without `;`),
    /// repeated until stable (at most 3 rounds) for double-encoded text.
    HtmlEntityDecode,
    /// ASCII and Unicode lower-casing.
    Lowercase,
    /// Runs of whitespace become one space.
    CompressWhitespace,
    /// Deletes all whitespace.
    RemoveWhitespace,
    /// Deletes NUL bytes.
    RemoveNulls,
    /// `/./`, `/../`, `//` and backslashes resolved; `..` cannot climb above the root.
    NormalizePath,
    /// Base64 (standard or URL-safe, padding optional); undecodable input is left as is.
    Base64Decode,
    /// Base64 decoding only when the whole value (leading `/` and `+` ignored, as in a path)
    /// is base64 of printable UTF-8 text (NULs allowed: they are an evasion of their own); anything else is left as is. Lets one chain inspect
    /// both plain and base64-wrapped payloads without turning random tokens into noise.
    Base64DecodeText,
    /// Hex pairs to bytes; undecodable input is left as is.
    HexDecode,
    /// JavaScript escapes: `\xHH`, `\uHHHH`, `\u{H…}`, octal, `\n` `\t` `\r`, escaped quotes
    /// and `/`; other backslashes are kept (so Windows paths survive).
    JsDecode,
    /// CSS escapes: `\H…` (1–6 hex digits, optional trailing space).
    CssDecode,
    /// AWS `CMD_LINE`: delete `\ " ' ^`, spaces before `/` and `(`, `,;` to space, compress
    /// whitespace, lowercase.
    CmdLine,
    /// Deletes SQL comments (`/* */`, `-- …`, `# …`), keeping a space where one was.
    RemoveComments,
    /// Unicode NFKC (fullwidth `ＳＥＬＥＣＴ` → `SELECT`) and overlong UTF-8 (`%c0%ae` → `.`)
    /// when the text came from raw bytes.
    Utf8Normalize,
    /// Every character above U+00FF becomes the Latin-1 character of its low byte
    /// (U+560A `嘊` → `\n`, U+010D `č` → `\r`): the bytes a backend emits when it writes a
    /// header value as Latin-1 (Node.js `latin1`/`binary` buffers, Java's `(byte) c`). Makes
    /// CRLF injection through multi-byte characters visible to a plain `[\r\n]`.
    Latin1Truncate,
}

impl Transform {
    /// Parses a transform name as written in rule files.
    pub fn parse(name: &str) -> Option<Transform> {
        Some(match name {
            "url_decode" => Transform::UrlDecode,
            "url_decode_uni" => Transform::UrlDecodeUni,
            "html_entity_decode" => Transform::HtmlEntityDecode,
            "lowercase" => Transform::Lowercase,
            "compress_whitespace" => Transform::CompressWhitespace,
            "remove_whitespace" => Transform::RemoveWhitespace,
            "remove_nulls" => Transform::RemoveNulls,
            "normalize_path" => Transform::NormalizePath,
            "base64_decode" => Transform::Base64Decode,
            "base64_decode_text" => Transform::Base64DecodeText,
            "hex_decode" => Transform::HexDecode,
            "js_decode" => Transform::JsDecode,
            "css_decode" => Transform::CssDecode,
            "cmd_line" => Transform::CmdLine,
            "remove_comments" => Transform::RemoveComments,
            "utf8_normalize" => Transform::Utf8Normalize,
            "latin1_truncate" => Transform::Latin1Truncate,
            _ => return None,
        })
    }

    /// The transform's name in rule files.
    pub fn name(&self) -> &'static str {
        Self::NAMES
            .iter()
            .copied()
            .find(|n| Transform::parse(n) == Some(*self))
            .unwrap_or("?")
    }

    /// Every transform name, for error messages and the JSON Schema.
    pub const NAMES: &'static [&'static str] = &[
        "url_decode",
        "url_decode_uni",
        "html_entity_decode",
        "lowercase",
        "compress_whitespace",
        "remove_whitespace",
        "remove_nulls",
        "normalize_path",
        "base64_decode",
        "base64_decode_text",
        "hex_decode",
        "js_decode",
        "css_decode",
        "cmd_line",
        "remove_comments",
        "utf8_normalize",
        "latin1_truncate",
    ];

    /// Applies the transform.
    pub fn apply<'a>(&self, s: &'a str) -> Cow<'a, str> {
        match self {
            Transform::UrlDecode => url_decode(s, false),
            Transform::UrlDecodeUni => until_stable(s, 4, |x| url_decode(x, true)),
            // `&amp;lt;` (double encoding) is an evasion too.
            Transform::HtmlEntityDecode => until_stable(s, 3, html_decode),
            Transform::Lowercase => {
                let upper = if s.is_ascii() {
                    s.bytes().any(|b| b.is_ascii_uppercase())
                } else {
                    s.chars().any(char::is_uppercase)
                };
                if upper {
                    Cow::Owned(s.to_lowercase())
                } else {
                    Cow::Borrowed(s)
                }
            }
            Transform::CompressWhitespace => compress_ws(s),
            Transform::RemoveWhitespace => {
                if s.contains(char::is_whitespace) {
                    // Copy the runs between whitespace (not char by char).
                    let mut out = String::with_capacity(s.len());
                    s.split(char::is_whitespace).for_each(|p| out.push_str(p));
                    Cow::Owned(out)
                } else {
                    Cow::Borrowed(s)
                }
            }
            Transform::RemoveNulls => {
                if s.contains('\0') {
                    Cow::Owned(s.replace('\0', ""))
                } else {
                    Cow::Borrowed(s)
                }
            }
            Transform::NormalizePath => normalize_path(s),
            Transform::Base64Decode => base64_decode(s),
            Transform::Base64DecodeText => base64_decode_text(s),
            Transform::HexDecode => hex_decode(s),
            Transform::JsDecode => js_decode(s),
            Transform::CssDecode => css_decode(s),
            Transform::CmdLine => cmd_line(s),
            Transform::RemoveComments => remove_comments(s),
            Transform::Utf8Normalize => utf8_normalize(s),
            Transform::Latin1Truncate => latin1_truncate(s),
        }
    }
}

/// Byte classes of a text (see [`classes`]): a transform whose trigger classes a text lacks
/// returns it unchanged, so the engine skips the call (and its scan of the text).
pub mod class {
    /// `%` or `+` (URL encoding).
    pub const PCT: u32 = 1;
    /// `&` (HTML entities).
    pub const AMP: u32 = 1 << 1;
    /// `\` (JS and CSS escapes, Windows paths).
    pub const BSLASH: u32 = 1 << 2;
    /// An ASCII upper-case letter.
    pub const UPPER: u32 = 1 << 3;
    /// A byte of a non-ASCII character.
    pub const NONASCII: u32 = 1 << 4;
    /// A space.
    pub const SPACE: u32 = 1 << 5;
    /// Whitespace other than a space (`\t \n \x0b \x0c \r`).
    pub const WS: u32 = 1 << 6;
    /// A NUL byte.
    pub const NUL: u32 = 1 << 7;
    /// `/` or `.` (paths).
    pub const PATH: u32 = 1 << 8;
    /// `/`, `-` or `#` (SQL comments).
    pub const COMMENT: u32 = 1 << 9;
    /// A byte outside the base64 alphabets and whitespace.
    pub const NON_B64: u32 = 1 << 10;
    /// Two whitespace bytes in a row.
    pub const WS_RUN: u32 = 1 << 11;
    /// `"`, `'`, `^`, `,` or `;` (what `cmd_line` deletes or turns into a space).
    pub const CMD: u32 = 1 << 12;
    /// An ASCII lower-case letter.
    pub const LOWER: u32 = 1 << 13;
    /// An ASCII digit.
    pub const DIGIT: u32 = 1 << 14;
    /// `+`, `/`, `-` or `_` (the base64 alphabets' symbols).
    pub const B64SYM: u32 = 1 << 15;
    /// An ASCII byte that is neither a hex digit, `x`/`X`, nor whitespace.
    pub const NON_HEX: u32 = 1 << 16;
    /// `/` or `(` (before which `cmd_line` drops spaces).
    pub const SLASH_PAREN: u32 = 1 << 17;
}

const fn byte_classes(b: u8) -> u32 {
    use class::*;
    let mut c = 0;
    if b == b'%' || b == b'+' {
        c |= PCT;
    }
    if b == b'&' {
        c |= AMP;
    }
    if b == b'\\' {
        c |= BSLASH;
    }
    if b.is_ascii_uppercase() {
        c |= UPPER;
    }
    if b.is_ascii_lowercase() {
        c |= LOWER;
    }
    if b.is_ascii_digit() {
        c |= DIGIT;
    }
    if b >= 0x80 {
        c |= NONASCII;
    }
    if b == b' ' {
        c |= SPACE;
    }
    let ws = matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r');
    if ws {
        c |= WS;
    }
    if b == 0 {
        c |= NUL;
    }
    if b == b'/' || b == b'.' {
        c |= PATH;
    }
    if b == b'/' || b == b'-' || b == b'#' {
        c |= COMMENT;
    }
    if matches!(b, b'"' | b'\'' | b'^' | b',' | b';') {
        c |= CMD;
    }
    if matches!(b, b'+' | b'/' | b'-' | b'_') {
        c |= B64SYM;
    }
    if matches!(b, b'/' | b'(') {
        c |= SLASH_PAREN;
    }
    if b < 0x80 && !(b.is_ascii_hexdigit() || b == b'x' || b == b'X' || b == b' ' || ws) {
        c |= NON_HEX;
    }
    if !(b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'+' | b'/' | b'=' | b'-' | b'_' | b' ' | b'\t' | b'\n' | b'\r'
        ))
    {
        c |= NON_B64;
    }
    c
}

static BYTE_CLASSES: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = byte_classes(i as u8);
        i += 1;
    }
    t
};

/// The byte classes present in `s` (one table lookup per byte).
pub fn classes(s: &str) -> u32 {
    const WS_ANY: u32 = class::SPACE | class::WS;
    // Branch-free: `run` collects whitespace that follows whitespace.
    let (mut acc, mut prev, mut run) = (0u32, 0u32, 0u32);
    for &b in s.as_bytes() {
        let c = BYTE_CLASSES[b as usize];
        let ws = c & WS_ANY;
        run |= ws & prev;
        prev = if ws != 0 { WS_ANY } else { 0 };
        acc |= c;
    }
    if run != 0 {
        acc |= class::WS_RUN;
    }
    acc
}

impl Transform {
    /// Whether the transform may change a text with these byte classes; `false` means it
    /// certainly returns the text as is.
    pub fn may_change(&self, classes: u32) -> bool {
        use class::*;
        let any = |m: u32| classes & m != 0;
        match self {
            Transform::UrlDecode | Transform::UrlDecodeUni => any(PCT),
            Transform::HtmlEntityDecode => any(AMP),
            Transform::Lowercase => any(UPPER | NONASCII),
            // Single spaces are already compressed.
            Transform::CompressWhitespace => any(WS | WS_RUN | NONASCII),
            Transform::RemoveWhitespace => any(SPACE | WS | NONASCII),
            Transform::RemoveNulls => any(NUL),
            Transform::NormalizePath => any(PATH | BSLASH),
            // `trim` also strips other whitespace (Unicode, `\x0b`) around a base64 text.
            Transform::Base64Decode => !any(NON_B64) || any(NONASCII | WS),
            Transform::Base64DecodeText => {
                // Letters of one case only, or digits only (with `=` padding): a word or a
                // number, which the decoder leaves alone.
                let kinds = (classes & (UPPER | LOWER | DIGIT)).count_ones();
                let one_kind = kinds <= 1 && !any(B64SYM | SPACE | WS | NONASCII);
                (!any(NON_B64) || any(NONASCII | WS)) && !one_kind
            }
            Transform::HexDecode => !any(NON_HEX),
            Transform::JsDecode | Transform::CssDecode => any(BSLASH),
            // It deletes `\ " ' ^`, turns `, ;` into spaces, drops spaces before `/` and `(`,
            // compresses whitespace and lower-cases.
            Transform::CmdLine => {
                any(BSLASH | CMD | UPPER | NONASCII | WS | WS_RUN)
                    || (any(SPACE) && any(SLASH_PAREN))
            }
            Transform::RemoveComments => any(COMMENT),
            Transform::Utf8Normalize | Transform::Latin1Truncate => any(NONASCII),
        }
    }
}

/// Applies `decode` until it changes nothing, at most `rounds` times: double (and triple)
/// encodings decode fully, and hostile input cannot make it loop.
fn until_stable<'a>(
    s: &'a str,
    rounds: usize,
    decode: impl Fn(&str) -> Cow<'_, str>,
) -> Cow<'a, str> {
    let mut cur = Cow::Borrowed(s);
    for _ in 0..rounds {
        match decode(&cur) {
            Cow::Borrowed(_) => break,
            Cow::Owned(next) => cur = Cow::Owned(next),
        }
    }
    cur
}

/// Applies a chain of transforms.
pub fn apply_chain<'a>(chain: &[Transform], s: &'a str) -> Cow<'a, str> {
    let mut cur = Cow::Borrowed(s);
    for t in chain {
        cur = match cur {
            Cow::Borrowed(b) => t.apply(b),
            Cow::Owned(o) => {
                // Keep the owned text when the transform changed nothing (no copy).
                let changed = match t.apply(&o) {
                    Cow::Owned(n) => Some(n),
                    Cow::Borrowed(_) => None,
                };
                Cow::Owned(changed.unwrap_or(o))
            }
        };
    }
    cur
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn url_decode(s: &str, uni: bool) -> Cow<'_, str> {
    // Byte scan: `str::contains` with a char array walks chars one by one (hot: every value).
    if memchr::memchr2(b'%', b'+', s.as_bytes()).is_none() {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if uni && i + 6 <= b.len() && (b[i + 1] == b'u' || b[i + 1] == b'U') => {
                let hex = &b[i + 2..i + 6];
                let v = hex
                    .iter()
                    .try_fold(0u32, |acc, &h| hex_val(h).map(|d| acc * 16 + u32::from(d)));
                match (hex.len() == 4, v.and_then(char::from_u32)) {
                    (true, Some(c)) => {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        i += 6;
                    }
                    _ => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'%' if i + 3 <= b.len() => match (hex_val(b[i + 1]), hex_val(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(bytes_to_text(out))
}

fn html_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('&') {
        return Cow::Borrowed(s);
    }
    // html-escape handles named, decimal and hex entities; entities without `;` (`&#60`) are
    // common in XSS evasions, so they are completed first.
    let mut fixed = String::with_capacity(s.len() + 8);
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        fixed.push(b[i] as char);
        if b[i] == b'&' && i + 1 < b.len() && b[i + 1] == b'#' {
            let start = i + 2;
            let mut j = start;
            let hex = j < b.len() && (b[j] == b'x' || b[j] == b'X');
            if hex {
                j += 1;
            }
            let digits_start = j;
            while j < b.len()
                && (if hex {
                    b[j].is_ascii_hexdigit()
                } else {
                    b[j].is_ascii_digit()
                })
            {
                j += 1;
            }
            if j > digits_start && (j >= b.len() || b[j] != b';') {
                fixed.push_str(&s[i + 1..j]);
                fixed.push(';');
                i = j;
                continue;
            }
        }
        i += 1;
    }
    // Bytes pushed one by one above are ASCII-only for the entity parts; rebuild safely from
    // the original for non-ASCII text.
    let source = if s.is_ascii() { fixed } else { s.to_string() };
    Cow::Owned(html_escape::decode_html_entities(&source).into_owned())
}

fn compress_ws(s: &str) -> Cow<'_, str> {
    let mut prev_ws = false;
    let needs = if s.is_ascii() {
        s.bytes().any(|b| {
            let ws = b.is_ascii_whitespace() || b == 0x0b;
            let bad = ws && (prev_ws || b != b' ');
            prev_ws = ws;
            bad
        })
    } else {
        s.chars().any(|c| {
            let ws = c.is_whitespace();
            let bad = ws && (prev_ws || c != ' ');
            prev_ws = ws;
            bad
        })
    };
    if !needs {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut prev_ws = false;
    for c in s.chars() {
        if c.is_whitespace() {
            if !prev_ws {
                out.push(' ');
            }
            prev_ws = true;
        } else {
            out.push(c);
            prev_ws = false;
        }
    }
    Cow::Owned(out)
}

fn normalize_path(s: &str) -> Cow<'_, str> {
    if !s.contains(['\\']) && !s.contains("//") && !s.contains("/.") && !s.starts_with('.') {
        return Cow::Borrowed(s);
    }
    let unified = s.replace('\\', "/");
    let absolute = unified.starts_with('/');
    let trailing = unified.ends_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for seg in unified.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    let mut out = String::with_capacity(unified.len());
    if absolute {
        out.push('/');
    }
    out.push_str(&parts.join("/"));
    if trailing && !out.ends_with('/') {
        out.push('/');
    }
    Cow::Owned(out)
}

fn base64_decode(s: &str) -> Cow<'_, str> {
    let t = s.trim();
    if t.len() < 4 {
        return Cow::Borrowed(s);
    }
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    for e in engines {
        if let Ok(bytes) = e.decode(t) {
            return Cow::Owned(bytes_to_text(bytes));
        }
    }
    Cow::Borrowed(s)
}

/// Shortest value `base64_decode_text` tries: shorter base64 carries no useful payload and
/// short words (`test`, `admin`) are valid base64 of binary noise.
const BASE64_TEXT_MIN_LEN: usize = 6;

fn base64_decode_text(s: &str) -> Cow<'_, str> {
    // Base64 of text never starts with `/` or `+` (they encode a first byte >= 0xF8, which
    // UTF-8 forbids), so stripping them only removes a path's slash.
    let t = s.trim().trim_start_matches(['/', '+', ' ']);
    // A `+` of base64 sent unescaped in a query or form becomes a space when decoded.
    let plus: Cow<'_, str> = if t.contains(' ') {
        Cow::Owned(t.replace(' ', "+"))
    } else {
        Cow::Borrowed(t)
    };
    let body = plus.trim_end_matches('=');
    if body.len() < BASE64_TEXT_MIN_LEN
        || body.len() % 4 == 1
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_'))
        // All letters of one case or all digits: words and numbers, not encodings.
        || body.bytes().all(|b| b.is_ascii_digit())
        || body.bytes().all(|b| b.is_ascii_lowercase())
        || body.bytes().all(|b| b.is_ascii_uppercase())
    {
        return Cow::Borrowed(s);
    }
    let engine = if body.contains(['-', '_']) {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
    } else {
        base64::engine::general_purpose::STANDARD_NO_PAD
    };
    let Ok(bytes) = engine.decode(body) else {
        return Cow::Borrowed(s);
    };
    match String::from_utf8(bytes) {
        Ok(text)
            if text
                .chars()
                .all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r' | '\0')) =>
        {
            Cow::Owned(text)
        }
        _ => Cow::Borrowed(s),
    }
}

fn hex_decode(s: &str) -> Cow<'_, str> {
    let t = s.trim().trim_start_matches("0x");
    if t.len() < 2 || !t.len().is_multiple_of(2) || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Cow::Borrowed(s);
    }
    let bytes: Vec<u8> = t
        .as_bytes()
        .chunks(2)
        .filter_map(|p| Some(hex_val(p[0])? * 16 + hex_val(p[1])?))
        .collect();
    Cow::Owned(bytes_to_text(bytes))
}

fn js_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('\\') {
        return Cow::Borrowed(s);
    }
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let hex_at = |from: usize, n: usize| -> Option<u32> {
        if from + n > chars.len() {
            return None;
        }
        chars[from..from + n]
            .iter()
            .try_fold(0u32, |a, c| c.to_digit(16).map(|d| a * 16 + d))
    };
    while i < chars.len() {
        if chars[i] != '\\' || i + 1 >= chars.len() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let n = chars[i + 1];
        match n {
            'x' => match hex_at(i + 2, 2).and_then(char::from_u32) {
                Some(c) => {
                    out.push(c);
                    i += 4;
                }
                None => {
                    out.push('\\');
                    out.push(n);
                    i += 2;
                }
            },
            'u' if chars.get(i + 2) == Some(&'{') => {
                let end = chars[i + 3..]
                    .iter()
                    .position(|c| *c == '}')
                    .map(|p| p + i + 3);
                match end.and_then(|e| {
                    hex_at(i + 3, e - i - 3)
                        .and_then(char::from_u32)
                        .map(|c| (c, e))
                }) {
                    Some((c, e)) => {
                        out.push(c);
                        i = e + 1;
                    }
                    None => {
                        out.push('\\');
                        out.push(n);
                        i += 2;
                    }
                }
            }
            'u' => match hex_at(i + 2, 4).and_then(char::from_u32) {
                Some(c) => {
                    out.push(c);
                    i += 6;
                }
                None => {
                    out.push('\\');
                    out.push(n);
                    i += 2;
                }
            },
            'n' => {
                out.push('\n');
                i += 2;
            }
            't' => {
                out.push('\t');
                i += 2;
            }
            'r' => {
                out.push('\r');
                i += 2;
            }
            '0'..='7' => {
                let mut j = i + 1;
                let mut v = 0u32;
                while j < chars.len() && j < i + 4 && chars[j].is_digit(8) {
                    v = v * 8 + chars[j].to_digit(8).unwrap_or(0);
                    j += 1;
                }
                out.push(char::from_u32(v).unwrap_or('\u{fffd}'));
                i = j;
            }
            '\'' | '"' | '/' | '`' => {
                out.push(n);
                i += 2;
            }
            // Unknown escapes keep their backslash: `..\windows` must stay a Windows path.
            other => {
                out.push('\\');
                out.push(other);
                i += 2;
            }
        }
    }
    Cow::Owned(out)
}

fn css_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('\\') {
        return Cow::Borrowed(s);
    }
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\\' && i + 1 < chars.len() {
            let mut j = i + 1;
            let mut v = 0u32;
            while j < chars.len() && j < i + 7 && chars[j].is_ascii_hexdigit() {
                v = v * 16 + chars[j].to_digit(16).unwrap_or(0);
                j += 1;
            }
            if j > i + 1 {
                out.push(char::from_u32(v).unwrap_or('\u{fffd}'));
                if j < chars.len() && chars[j] == ' ' {
                    j += 1;
                }
                i = j;
            } else {
                // `\x` for a non-hex x is just x (CSS drops the backslash).
                out.push(chars[i + 1]);
                i += 2;
            }
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    Cow::Owned(out)
}

fn cmd_line(s: &str) -> Cow<'_, str> {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' | '"' | '\'' | '^' => {}
            ',' | ';' => out.push(' '),
            '/' | '(' => {
                while out.ends_with(' ') {
                    out.pop();
                }
                out.push(c);
            }
            c => out.push(c),
        }
    }
    let compressed = compress_ws(&out).into_owned();
    let lowered = compressed.to_lowercase();
    if lowered == s {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(lowered)
    }
}

fn remove_comments(s: &str) -> Cow<'_, str> {
    if !s.contains("/*") && !s.contains("--") && !s.contains('#') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |e| &after[e + 2..]);
            out.push(' ');
        } else if rest.starts_with("--") || rest.starts_with('#') {
            rest = rest.find('\n').map_or("", |e| &rest[e..]);
            out.push(' ');
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    Cow::Owned(out)
}

fn latin1_truncate(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| u32::from(c) > 0xff) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| char::from((u32::from(c) & 0xff) as u8))
            .collect(),
    )
}

fn utf8_normalize(s: &str) -> Cow<'_, str> {
    if s.is_ascii() {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.nfkc().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(tr: Transform, input: &str) -> String {
        tr.apply(input).into_owned()
    }

    #[test]
    fn decoders() {
        assert_eq!(t(Transform::UrlDecode, "a%20b+c%2"), "a b c%2");
        assert_eq!(t(Transform::UrlDecode, "%252e%252e%252f"), "%2e%2e%2f");
        assert_eq!(t(Transform::UrlDecodeUni, "%252e%252e%252f"), "../");
        assert_eq!(t(Transform::UrlDecodeUni, "%u003cscript%u003e"), "<script>");
        assert_eq!(
            t(Transform::UrlDecodeUni, "%c0%ae%c0%ae/etc"),
            "../etc",
            "overlong UTF-8"
        );
        assert_eq!(
            t(
                Transform::HtmlEntityDecode,
                "&lt;img src=x onerror=&#97;lert(1)&#x3e;"
            ),
            "<img src=x onerror=alert(1)>"
        );
        assert_eq!(t(Transform::HtmlEntityDecode, "&#60script&#62"), "<script>");
        assert_eq!(t(Transform::HtmlEntityDecode, "&amp;#39;&amp;lt;"), "'<");
        assert_eq!(
            t(Transform::JsDecode, "\\x3cscript\\u003e\\u{61}"),
            "<script>a"
        );
        assert_eq!(
            t(Transform::JsDecode, "..\\windows\\win.ini"),
            "..\\windows\\win.ini"
        );
        assert_eq!(t(Transform::JsDecode, "\\u0027\\'x"), "''x");
        assert_eq!(t(Transform::CssDecode, "\\6a avascript:"), "javascript:");
        assert_eq!(t(Transform::Base64Decode, "PHNjcmlwdD4="), "<script>");
        assert_eq!(t(Transform::Base64Decode, "not base64!"), "not base64!");
        let b = Transform::Base64DecodeText;
        assert_eq!(t(b, "J3x8c2xlZXAoNSk="), "'||sleep(5)");
        assert_eq!(
            t(b, "/J3x8c2xlZXAoNSk"),
            "'||sleep(5)",
            "as a path, unpadded"
        );
        assert_eq!(t(b, "PD94bWw_"), "<?xml?", "URL-safe alphabet");
        assert_eq!(t(b, "PGI PjwvYj4="), "<b>></b>", "`+` decoded to a space");
        assert_eq!(t(b, "O2lkOw"), ";id;", "short payloads");
        for kept in [
            "password",
            "TESTCASE",
            "12345678",
            "dGVz",
            "hello world",
            "iVBORw0KGgo=",
        ] {
            assert_eq!(
                t(b, kept),
                kept,
                "{kept}: a word, too short, not base64, or binary"
            );
        }
        assert_eq!(t(Transform::HexDecode, "3c7363726970743e"), "<script>");
        assert_eq!(t(Transform::Utf8Normalize, "ＳＥＬＥＣＴ"), "SELECT");
    }

    /// `may_change` is exact where it says no: on texts without a transform's trigger
    /// classes, the transform returns its input.
    #[test]
    fn byte_classes_predict_no_change() {
        let samples = [
            "plain words",
            "Mixed Case",
            "a%20b",
            "x+y",
            "&lt;b&gt;",
            "\\x41",
            "  two  spaces",
            "tab\there",
            "nul\0x",
            "../etc/passwd",
            "/a/./b",
            "1 -- c",
            "# x",
            "/* c */",
            "ＳＥＬＥＣＴ",
            "J3x8c2xlZXAoNSk=",
            "dGVzdA",
            "3c7363726970743e",
            "ok",
            "",
            "Morning run along the river",
            "C:\\windows\\win.ini",
            "é",
            "a\u{2003}b",
            "J3x8c2xlZXAoNSk=\u{3000}",
            "\x0bJ3x8c2xlZXAoNSk=",
            "J3x8 c2xlZXAoNSk",
            "x--y",
            "a \tb",
            "a\t b",
            "a\u{a0}b",
            // Lower-case letters and base64 symbols only: valid base64 of text.
            "esesdmk/",
            "0x4142",
            " 4142 ",
        ];
        let all = [
            Transform::UrlDecode,
            Transform::UrlDecodeUni,
            Transform::HtmlEntityDecode,
            Transform::Lowercase,
            Transform::CompressWhitespace,
            Transform::RemoveWhitespace,
            Transform::RemoveNulls,
            Transform::NormalizePath,
            Transform::Base64Decode,
            Transform::Base64DecodeText,
            Transform::HexDecode,
            Transform::JsDecode,
            Transform::CssDecode,
            Transform::CmdLine,
            Transform::RemoveComments,
            Transform::Utf8Normalize,
            Transform::Latin1Truncate,
        ];
        let check = |s: &str| {
            for t in all {
                if !t.may_change(classes(s)) {
                    assert_eq!(t.apply(s), s, "{t:?} on {s:?}");
                }
            }
        };
        samples.iter().for_each(|s| check(s));
        // And on random texts over the characters the transforms care about.
        // The second alphabet makes words, numbers, hex and base64 (the decoders' inputs).
        let alphabets: [Vec<char>; 2] = [
            "aZ09 +%&\\/.-#=_;<'\"\t\n\x0b\0éＡ\u{3000}xX,^("
                .chars()
                .collect(),
            "abfzABFZ0189xX=+/-_ ".chars().collect(),
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..60_000 {
            let alphabet = &alphabets[round % 2];
            let mut text = String::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 16) as usize;
            let mut r = seed;
            for i in 0..len {
                if i % 12 == 0 {
                    r ^= r << 13;
                    r ^= r >> 7;
                    r ^= r << 17;
                }
                text.push(alphabet[((r >> ((i % 12) * 5)) % alphabet.len() as u64) as usize]);
            }
            check(&text);
        }
    }

    #[test]
    fn normalizers() {
        assert_eq!(
            t(Transform::NormalizePath, "/a/./b/../../../etc//passwd"),
            "/etc/passwd"
        );
        assert_eq!(
            t(Transform::NormalizePath, "..\\..\\windows\\win.ini"),
            "windows/win.ini"
        );
        assert_eq!(t(Transform::CompressWhitespace, "a \t\n b"), "a b");
        assert_eq!(t(Transform::RemoveNulls, "a\0b"), "ab");
        assert_eq!(
            t(Transform::CmdLine, "C^at \"/etc/pass\"'wd' ; W\\hoami"),
            "cat/etc/passwd whoami"
        );
        assert_eq!(
            t(Transform::RemoveComments, "1/**/UNION/*x*/SELECT -- rest"),
            "1 UNION SELECT  "
        );
        assert_eq!(t(Transform::Lowercase, "SeLeCt"), "select");
        assert_eq!(
            t(Transform::Latin1Truncate, "a\u{560a}\u{560d}Set-Cookie é"),
            "a\n\rSet-Cookie é"
        );
        assert!(matches!(
            Transform::Latin1Truncate.apply("café"),
            Cow::Borrowed(_)
        ));
        assert!(matches!(
            Transform::Lowercase.apply("plain"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            apply_chain(
                &[Transform::UrlDecodeUni, Transform::Lowercase],
                "%3CSCRIPT%3E"
            ),
            "<script>"
        );
    }
}
