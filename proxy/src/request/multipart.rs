//! Request model: `multipart/form-data` bodies parsed into fields and file names with the
//! `multer` crate. The body is already in memory, so the async parser is driven to completion
//! synchronously on a ready stream: it never waits.

use bytes::Bytes;

use super::ParsedForm;

/// Most parts inspected; a body with more is inspected up to this many.
const MAX_PARTS: usize = 1000;

/// Parses a multipart body. Malformed input yields what was parsed before the error, with
/// `malformed` set (the rules then also see the raw body as `body.unparsed`). Bodies with bare
/// `\n` line ends, which lenient servers such as PHP accept, are parsed again with `\r\n`.
pub fn parse(content_type: &str, body: &[u8]) -> ParsedForm {
    let Ok(boundary) = multer::parse_boundary(content_type) else {
        return ParsedForm {
            malformed: true,
            ..ParsedForm::default()
        };
    };
    let first = parse_with(&boundary, Bytes::copy_from_slice(body));
    if !first.malformed || !body.contains(&b'\n') {
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
    if second.malformed {
        first
    } else {
        second
    }
}

fn parse_with(boundary: &str, data: Bytes) -> ParsedForm {
    let stream =
        futures_util::stream::once(async move { Ok::<Bytes, std::convert::Infallible>(data) });
    let mut mp = multer::Multipart::new(stream, boundary);
    futures_executor::block_on(async move {
        let mut out = ParsedForm::default();
        for _ in 0..MAX_PARTS {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => {
                    out.malformed = true;
                    break;
                }
            };
            let name = field.name().unwrap_or("").to_string();
            let file = field.file_name().map(str::to_string);
            let Ok(bytes) = field.bytes().await else {
                out.malformed = true;
                break;
            };
            match file {
                Some(f) => {
                    out.files.push(f);
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
        assert!(!f.malformed);
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
}
