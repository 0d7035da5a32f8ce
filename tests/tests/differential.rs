//! Differential tests against real backend parsers: a Flask/Werkzeug app and a Node.js `http`
//! server, each answering with everything it parsed (path, host, query, form fields, file
//! names and contents, JSON, cookies, headers).
//!
//! A rule set blocks any *parsed* value that contains a marker (no transforms, no raw body or
//! raw query: only what Palisade's parsers produced). Each case hides the marker where parsers
//! may disagree (encodings, duplicates, parameters, multipart headers, absolute-form hosts …).
//! The invariant: whatever the backend parsed through Palisade never contains the marker,
//! i.e. every value the backend reads was inspected. Sent directly to the backend, most cases
//! do deliver the marker (checked, so the test cannot pass vacuously), and the same requests
//! without the marker pass through Palisade (so it cannot pass by blocking everything).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use palisade_tests::*;

const MARK: &str = "zqxmark";

/// A backend process on a loopback port, killed (by its pid) when dropped.
struct ParserBackend {
    child: Child,
    addr: SocketAddr,
}

impl Drop for ParserBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Python with Flask: Debian's (`python3-flask`, installed by `make test`) or the first
/// `python3` on the PATH.
fn flask_python() -> String {
    for py in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(py)
            .args(["-c", "import flask"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return py.to_string();
        }
    }
    panic!("no python3 with Flask: install python3-flask (scripts/ensure-deps.sh does)");
}

async fn start_backend(program: &str, script: &str) -> ParserBackend {
    let port = free_port();
    let child = Command::new(program)
        .arg(repo_path(&format!("tests/fixtures/differential/{script}")))
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {program} {script}: {e}"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let b = ParserBackend { child, addr };
    let up = eventually(Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    assert!(up, "{script} did not start on {addr}");
    b
}

fn marker_rules(dir: &std::path::Path) {
    std::fs::write(
        dir.join("marker.yaml"),
        format!(
            r#"name: marker
version: "1"
description: Blocks a marker in any value Palisade parsed.
rules:
  - id: parsed-marker
    description: The marker in a parsed value.
    match:
      field: [path, args.names, args.values, files.names, files.contents, cookies.names, cookies.values, headers.names, headers.values, body.unparsed, xml.values]
      contains: "{MARK}"
"#
        ),
    )
    .unwrap();
}

/// One case: raw request bytes (`{M}` stands for the marker or a benign word), and whether
/// Flask only (multipart and cookies: Node's `http` parses neither).
struct Case {
    name: &'static str,
    raw: String,
    flask_only: bool,
}

fn cases(word: &str) -> Vec<Case> {
    let enc = |s: &str| {
        // Percent-encode the 4th letter of the word, as an evasion would.
        let b = s.as_bytes();
        format!("{}%{:02X}{}", &s[..3], b[3], &s[4..])
    };
    let m = word;
    let e = enc(word);
    let get = |target: &str, extra: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: t.example\r\nUser-Agent: diff\r\nConnection: close\r\n{extra}\r\n")
    };
    let post = |ct: &str, body: &str| {
        format!(
            "POST /api/x HTTP/1.1\r\nHost: t.example\r\nUser-Agent: diff\r\nConnection: close\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mp =
        |ct_params: &str, parts: &str| post(&format!("multipart/form-data; {ct_params}"), parts);
    let c = |name: &'static str, raw: String| Case {
        name,
        raw,
        flask_only: false,
    };
    let f = |name: &'static str, raw: String| Case {
        name,
        raw,
        flask_only: true,
    };
    vec![
        c("query value", get(&format!("/api/x?a={m}"), "")),
        c("encoded query value", get(&format!("/api/x?a={e}"), "")),
        c("second of a repeated arg", get(&format!("/api/x?a=1&a={e}"), "")),
        c("encoded query name", get(&format!("/api/x?{e}=1"), "")),
        c("bracketed name", get(&format!("/api/x?a[{m}]=1"), "")),
        c("semicolon in a name", get(&format!("/api/x?a;b={m}"), "")),
        c("encoded path segment", get(&format!("/api/{e}"), "")),
        c("path after a dot segment", get(&format!("/api/x/../{m}"), "")),
        c("path with parameters", get(&format!("/api/{e};v=1"), "")),
        c("encoded slash in the path", get(&format!("/api/{e}%2Fx"), "")),
        c("absolute-form host", format!("GET http://{m}.example/api/x HTTP/1.1\r\nUser-Agent: diff\r\nConnection: close\r\n\r\n")),
        c("host header", get("/api/x", "").replace("t.example", &format!("{m}.example"))),
        c("custom header", get("/api/x", &format!("X-Note: {m}\r\n"))),
        c("form value", post("application/x-www-form-urlencoded", &format!("a={e}"))),
        c("form name", post("application/x-www-form-urlencoded", &format!("{e}=1"))),
        c("form, repeated", post("application/x-www-form-urlencoded", &format!("a=1&a={e}"))),
        c("form type in capitals", post("APPLICATION/X-WWW-FORM-URLENCODED", &format!("a={e}"))),
        c("form with a charset", post("application/x-www-form-urlencoded; charset=UTF-8", &format!("a={e}"))),
        c("JSON value", post("application/json", &format!(r#"{{"a":"{m}"}}"#))),
        c("JSON unicode escape", post("application/json", &format!(r#"{{"a":"{}\u{:04x}{}"}}"#, &m[..3], m.as_bytes()[3], &m[4..]))),
        c("JSON first of a repeated key", post("application/json", &format!(r#"{{"a":"{m}","a":"ok"}}"#))),
        c("JSON last of a repeated key", post("application/json", &format!(r#"{{"a":"ok","a":"{m}"}}"#))),
        c("JSON key", post("application/json", &format!(r#"{{"{m}":1}}"#))),
        c("JSON nested 60 deep", post("application/json", &format!("{}\"{m}\"{}", "[".repeat(60), "]".repeat(60)))),
        c("JSON vendor type", post("application/vnd.api+json", &format!(r#"{{"a":"{m}"}}"#))),
        c("JSON with a BOM", post("application/json", &format!("\u{feff}{{\"a\":\"{m}\"}}"))),
        c("JSON with a BOM and an escape", post("application/json", &format!("\u{feff}{{\"a\":\"{}\\u{:04x}{}\"}}", &m[..3], m.as_bytes()[3], &m[4..]))),
        c("JSON with NaN and an escape", post("application/json", &format!("{{\"n\":NaN,\"a\":\"{}\\u{:04x}{}\"}}", &m[..3], m.as_bytes()[3], &m[4..]))),
        c("JSON sent as text/plain", post("text/plain", &format!("{{\"a\":\"{}\\u{:04x}{}\"}}", &m[..3], m.as_bytes()[3], &m[4..]))),
        c("JSON without a type", post("", &format!("{{\"a\":\"{}\\u{:04x}{}\"}}", &m[..3], m.as_bytes()[3], &m[4..])).replace("Content-Type: \r\n", "")),
        c("two Content-Type fields", post("text/plain", &format!("{{\"a\":\"{}\\u{:04x}{}\"}}", &m[..3], m.as_bytes()[3], &m[4..])).replace("Content-Type: text/plain\r\n", "Content-Type: text/plain\r\nContent-Type: application/json\r\n")),
        f("cookie value", get("/api/x", &format!("Cookie: a={m}\r\n"))),
        f("quoted cookie", get("/api/x", &format!("Cookie: a=\"{m}\"\r\n"))),
        f("cookie name", get("/api/x", &format!("Cookie: {m}=1\r\n"))),
        f("second of a repeated cookie", get("/api/x", &format!("Cookie: a=1; a={m}\r\n"))),
        f("multipart field", mp("boundary=B", &format!("--B\r\nContent-Disposition: form-data; name=\"q\"\r\n\r\n{m}\r\n--B--\r\n"))),
        f("multipart quoted boundary", mp("boundary=\"B\"", &format!("--B\r\nContent-Disposition: form-data; name=\"q\"\r\n\r\n{m}\r\n--B--\r\n"))),
        f("multipart file name", mp("boundary=B", &format!("--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"{m}.txt\"\r\n\r\nhello\r\n--B--\r\n"))),
        f("multipart text file", mp("boundary=B", &format!("--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\n{m}\r\n--B--\r\n"))),
        f("multipart field a lenient parser takes for a file", mp("boundary=B", &format!("--B\r\nContent-Disposition: form-data; name=\"q\"; x=\"y filename=z\"\r\n\r\n{m}\r\n--B--\r\n"))),
        f("multipart bare LF", mp("boundary=B", &format!("--B\nContent-Disposition: form-data; name=\"q\"\n\n{m}\n--B--\n"))),
        f("multipart header in capitals", mp("boundary=B", &format!("--B\r\nCONTENT-DISPOSITION: form-data; name=\"q\"\r\n\r\n{m}\r\n--B--\r\n"))),
        f("multipart part in UTF-7", mp("boundary=B", &format!("--B\r\nContent-Disposition: form-data; name=\"q\"\r\nContent-Type: text/plain; charset=utf-7\r\n\r\n{m}\r\n--B--\r\n"))),
        f("multipart field name", mp("boundary=B", &format!("--B\r\nContent-Disposition: form-data; name=\"{m}\"\r\n\r\nv\r\n--B--\r\n"))),
        f("multipart, two boundary parameters", mp("boundary=B; boundary=C", &format!("--B\r\nContent-Disposition: form-data; name=\"q\"\r\n\r\n{m}\r\n--B--\r\n--C\r\nContent-Disposition: form-data; name=\"q\"\r\n\r\n{m}\r\n--C--\r\n"))),
    ]
}

async fn differential(backend: &ParserBackend, flask: bool) {
    let dir = tempfile::tempdir().unwrap();
    marker_rules(dir.path());
    let p = Palisade::start_in(
        dir,
        &format!(
            "rulesets: [marker.yaml]\nupstreams:\n  app: {{targets: [\"{}\"]}}\nroutes:\n  - name: all\n    upstream: app\n    policy:\n      rulesets: [{{name: marker}}]\n",
            backend.addr
        ),
        false,
    )
    .await;
    let mut meaningful = 0;
    let mut total = 0;
    let mut failures = Vec::new();
    for (case, benign) in cases(MARK).into_iter().zip(cases("hello")) {
        if case.flask_only && !flask {
            continue;
        }
        total += 1;
        // Directly: does this backend's parser deliver the marker at all?
        let direct = raw_request(backend.addr, case.raw.as_bytes()).await;
        if direct.is_some_and(|r| r.body_string().contains(MARK)) {
            meaningful += 1;
        }
        // Through Palisade: it never does.
        let r = raw_request(p.addr, case.raw.as_bytes())
            .await
            .unwrap_or_else(|| panic!("{}: no answer", case.name));
        if r.status < 400 && r.body_string().contains(MARK) {
            failures.push(format!(
                "{}: the backend parsed the marker Palisade did not see: {}",
                case.name,
                r.body_string()
            ));
        }
        // And the same request without the marker passes (unless refused as ambiguous,
        // which must then hold for both).
        let b = raw_request(p.addr, benign.raw.as_bytes()).await.unwrap();
        if b.status >= 400 && r.status != b.status {
            failures.push(format!(
                "{}: the benign twin was refused ({}): {}",
                case.name,
                b.status,
                b.body_string()
            ));
        }
    }
    eprintln!(
        "differential ({}): {total} cases, {meaningful} deliver the marker to the backend directly",
        if flask { "flask" } else { "node" }
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        meaningful * 10 >= total * 7,
        "only {meaningful} of {total} cases deliver the marker to the backend directly"
    );
}

#[tokio::test]
async fn flask_parses_nothing_palisade_did_not_inspect() {
    let b = start_backend(&flask_python(), "flask_app.py").await;
    differential(&b, true).await;
}

#[tokio::test]
async fn node_parses_nothing_palisade_did_not_inspect() {
    let b = start_backend("node", "node_app.js").await;
    differential(&b, false).await;
}
