//! Request model: `multipart/form-data` bodies parsed into fields, file names and file
//! contents with the `multer` crate. The body is already in memory, so the async parser is
//! driven to completion synchronously on a ready stream: it never waits.
//!
//! Parsers disagree on ambiguous multipart input, and each disagreement is a bypass: a field
//! Palisade reads as a file (so its value is not inspected as a form value) that Werkzeug
//! reads as a form field, or a body split on another boundary than the backend's. So the
//! boundary and every part's `Content-Disposition` are read here by RFC 7578 / RFC 9110
//! grammar (multer's own reading is lenient: it finds `filename=` inside a quoted value), and
//! whatever has more than one reading is refused: two `boundary` parameters, a duplicated
//! disposition parameter, `filename*`, quotes or backslashes where the grammar has none,
//! several `Content-Disposition` fields in a part, an unknown `Content-Transfer-Encoding`.

use bytes::Bytes;

use super::canon::Refusal;
use super::ParsedForm;

/// Most parts inspected; a body with more is inspected as raw text past them.
const MAX_PARTS: usize = 1000;
/// Longest file content inspected as text (per file).
const MAX_FILE_TEXT: usize = 16 * 1024;

const fn ambiguous(detail: &'static str) -> Refusal {
    Refusal {
        status: 400,
        reason: "ambiguous_multipart",
        detail,
    }
}

/// Parameters of a header value after its first `;` (`form-data; name="a"; filename=b`), by
/// the RFC 9110 grammar: `token=token` or `token="quoted"`. Backslash escapes inside quotes
/// are refused (Werkzeug, PHP and multer each read them differently), as is a parameter
/// given twice.
fn params(value: &str) -> Result<(String, Vec<(String, String)>), Refusal> {
    const BAD: Refusal = ambiguous("a multipart header parameter is not `name=value`");
    let is_token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    let (first, mut rest) = match value.find(';') {
        Some(i) => (&value[..i], &value[i..]),
        None => (value, ""),
    };
    let mut out: Vec<(String, String)> = Vec::new();
    loop {
        rest = rest.trim_start_matches([' ', '\t']);
        if rest.is_empty() {
            break;
        }
        rest = rest.strip_prefix(';').ok_or(BAD)?;
        rest = rest.trim_start_matches([' ', '\t']);
        if rest.is_empty() {
            break; // a trailing `;` is harmless
        }
        let name_end = rest.find(|c: char| !is_token(c)).unwrap_or(rest.len());
        let name = rest[..name_end].to_ascii_lowercase();
        rest = rest[name_end..].trim_start_matches([' ', '\t']);
        rest = rest.strip_prefix('=').ok_or(BAD)?;
        rest = rest.trim_start_matches([' ', '\t']);
        let value = if let Some(q) = rest.strip_prefix('"') {
            let end = q.find('"').ok_or(BAD)?;
            let v = &q[..end];
            if v.contains('\\') {
                return Err(ambiguous("a backslash in a quoted multipart parameter"));
            }
            rest = &q[end + 1..];
            v.to_string()
        } else {
            let end = rest.find(|c: char| !is_token(c)).unwrap_or(rest.len());
            let v = &rest[..end];
            rest = &rest[end..];
            v.to_string()
        };
        if name.is_empty() {
            return Err(BAD);
        }
        if out.iter().any(|(n, _)| *n == name) {
            return Err(ambiguous("a multipart header parameter given twice"));
        }
        out.push((name, value));
    }
    Ok((first.trim().to_ascii_lowercase(), out))
}

/// The boundary of a `multipart/form-data` content type, refusing ambiguous forms.
fn boundary(content_type: &str) -> Result<String, Refusal> {
    let (_, ps) = params(content_type)?;
    let b = ps
        .into_iter()
        .find(|(n, _)| n == "boundary")
        .map(|(_, v)| v)
        .ok_or(ambiguous("multipart body without a boundary"))?;
    // RFC 2046 §5.1.1: 1–70 characters of a restricted set.
    let ok = (1..=70).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&c))
        && !b.ends_with(' ');
    if ok {
        Ok(b)
    } else {
        Err(ambiguous("the multipart boundary is not a valid boundary"))
    }
}

/// Parses a multipart body. Malformed input yields what was parsed before the error, with
/// `malformed` set (the rules then also see the raw body as `body.unparsed`); ambiguous input
/// sets `refusal`. Bodies with bare `\n` line ends, which lenient servers such as PHP accept,
/// are parsed again with `\r\n`.
pub fn parse(content_type: &str, body: &[u8]) -> ParsedForm {
    let boundary = match boundary(content_type) {
        Ok(b) => b,
        Err(r) => {
            return ParsedForm {
                malformed: true,
                refusal: Some(r),
                ..ParsedForm::default()
            }
        }
    };
    let first = parse_with(&boundary, Bytes::copy_from_slice(body));
    if !first.malformed || first.refusal.is_some() || !body.contains(&b'\n') {
        return first;
    }
    let mut crlf = Vec::with_capacity(body.len() + body.len() / 16);
    let mut prev = 0u8;
    for &b in body {
        if b == b'\n' && prev != b'\r' {
            crlf.push(b'\r');
        }
        crlf.push(b);
        prev = b;
    }
    let second = parse_with(&boundary, Bytes::from(crlf));
    if second.malformed && second.refusal.is_none() {
        first
    } else {
        second
    }
}

/// Name and file name of a part, from its headers, strictly.
fn disposition(headers: &http::HeaderMap) -> Result<(String, Option<String>), Refusal> {
    let mut cd = headers.get_all(http::header::CONTENT_DISPOSITION).iter();
    let value = match (cd.next(), cd.next()) {
        (Some(v), None) => v,
        (None, _) => return Err(ambiguous("a multipart part without Content-Disposition")),
        (Some(_), Some(_)) => return Err(ambiguous("a multipart part with two dispositions")),
    };
    let value = std::str::from_utf8(value.as_bytes())
        .map_err(|_| ambiguous("a multipart disposition that is not UTF-8"))?;
    let (kind, ps) = params(value)?;
    if kind != "form-data" {
        return Err(ambiguous("a multipart part that is not form-data"));
    }
    let mut name = None;
    let mut file = None;
    for (n, v) in ps {
        match n.as_str() {
            "name" => name = Some(v),
            "filename" => file = Some(v),
            "filename*" | "name*" => {
                return Err(ambiguous("RFC 5987 parameters in a multipart part"))
            }
            _ => {}
        }
    }
    let name = name.ok_or(ambiguous("a multipart part without a name"))?;
    if let Some(ct) = headers.get(http::header::CONTENT_TYPE) {
        let ct = String::from_utf8_lossy(ct.as_bytes());
        if let Some(charset) = super::content_type_param(&ct, "charset") {
            let ok = ["utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "latin1"]
                .iter()
                .any(|c| charset.eq_ignore_ascii_case(c));
            if !ok {
                return Err(ambiguous("a multipart part in a charset that hides ASCII"));
            }
        }
    }
    if let Some(cte) = headers.get("content-transfer-encoding") {
        let known = ["7bit", "8bit", "binary"]
            .iter()
            .any(|k| cte.as_bytes().eq_ignore_ascii_case(k.as_bytes()));
        if !known {
            return Err(ambiguous("a multipart part with a transfer encoding"));
        }
    }
    Ok((name, file))
}

fn parse_with(boundary: &str, data: Bytes) -> ParsedForm {
    let stream =
        futures_util::stream::once(async move { Ok::<Bytes, std::convert::Infallible>(data) });
    let mut mp = multer::Multipart::new(stream, boundary);
    futures_executor::block_on(async move {
        let mut out = ParsedForm::default();
        let mut parts = 0;
        loop {
            if parts == MAX_PARTS {
                // Parts past the cap are not read one by one: the rules see the raw body.
                out.malformed = true;
                break;
            }
            parts += 1;
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => {
                    out.malformed = true;
                    break;
                }
            };
            let (name, file) = match disposition(field.headers()) {
                Ok(d) => d,
                Err(r) => {
                    out.malformed = true;
                    out.refusal = Some(r);
                    break;
                }
            };
            let Ok(bytes) = field.bytes().await else {
                out.malformed = true;
                break;
            };
            match file {
                Some(f) => {
                    out.files.push(f);
                    out.file_fields.push(name);
                    let head = &bytes[..bytes.len().min(MAX_FILE_TEXT)];
                    // Text files (scripts, templates, configs) are inspected; binary ones
                    // (images, archives) would only produce false positives.
                    let text = match std::str::from_utf8(head) {
                        Ok(t) => Some(t),
                        // Cut inside a character at the inspection cap: the valid prefix.
                        Err(e) if e.error_len().is_none() => {
                            std::str::from_utf8(&head[..e.valid_up_to()]).ok()
                        }
                        Err(_) => None,
                    };
                    if let Some(t) = text.filter(|t| !t.is_empty()) {
                        out.file_texts.push(t.to_string());
                    }
                }
                None => out
                    .fields
                    .push((name, String::from_utf8_lossy(&bytes).into_owned())),
            }
        }
        out
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    #[test]
    fn fields_and_files() {
        let body = "--XyZ\r\nContent-Disposition: form-data; name=\"comment\"\r\n\r\nhello <b>\r\n--XyZ\r\nContent-Disposition: form-data; name=\"up\"; filename=\"shell.php\"\r\nContent-Type: application/octet-stream\r\n\r\n<?php ?>\r\n--XyZ--\r\n";
        let f = super::parse("multipart/form-data; boundary=XyZ", body.as_bytes());
        assert_eq!(
            f.fields,
            vec![("comment".to_string(), "hello <b>".to_string())]
        );
        assert_eq!(f.files, vec!["shell.php".to_string()]);
        assert_eq!(f.file_fields, vec!["up".to_string()]);
        assert_eq!(f.file_texts, vec!["<?php ?>".to_string()]);
        assert!(!f.malformed && f.refusal.is_none());
    }

    #[test]
    fn bare_newlines_and_garbage() {
        let lf = "--B\nContent-disposition: form-data; name=\"../../etc/passwd\"\n\nTest\n--B--\n";
        let f = super::parse("multipart/form-data; boundary=B", lf.as_bytes());
        assert_eq!(
            f.fields,
            vec![("../../etc/passwd".to_string(), "Test".to_string())]
        );
        let g = super::parse("multipart/form-data; boundary=B", b"no parts at all");
        assert!(g.malformed);
    }

    #[test]
    fn ambiguous_forms_are_refused() {
        let part = |cd: &str| format!("--B\r\nContent-Disposition: {cd}\r\n\r\nv\r\n--B--\r\n");
        for cd in [
            "form-data; name=\"q\"; x=\"y filename=z\"",
            "form-data; name=\"q\"; name=\"r\"",
            "form-data; name=\"q\"; filename*=UTF-8''a.txt",
            "form-data; name=\"q\\\"x\"",
            "form-data; name=q\"x",
            "attachment; name=\"q\"",
        ] {
            let f = super::parse("multipart/form-data; boundary=B", part(cd).as_bytes());
            // The first one is not ambiguous by grammar: `x` is a parameter whose quoted
            // value contains text; the field is a plain field, as Werkzeug reads it.
            if cd.contains("x=\"y filename") {
                assert!(f.refusal.is_none(), "{cd}");
                assert_eq!(f.fields, vec![("q".to_string(), "v".to_string())]);
                assert!(f.files.is_empty());
            } else {
                assert!(f.refusal.is_some(), "{cd}");
            }
        }
        let two = super::parse(
            "multipart/form-data; boundary=B; boundary=C",
            part("form-data; name=\"q\"").as_bytes(),
        );
        assert!(two.refusal.is_some());
    }
}
