//! End-to-end: client IP behind trusted proxies, IP allow/deny sets, geo/ASN policies with
//! MaxMind databases that Palisade builds itself from the committed CSVs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::Path;

use palisade_tests::*;

/// Builds the test databases into `dir` with the real binary.
fn build_test_dbs(dir: &Path) {
    for kind in ["country", "asn"] {
        let csv = repo_path(&format!("geoip/test-{kind}.csv"));
        let out = dir.join(format!("test-{kind}.mmdb"));
        let (code, _, err) = run_cli(&[
            "geoip",
            "build",
            "--kind",
            kind,
            "--csv",
            csv.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
    }
}

fn upstream(b: &Backend) -> String {
    format!("upstreams:\n  b:\n    targets: [\"{}\"]\n", b.addr)
}

#[tokio::test]
async fn deny_listed_ipv4_and_ipv6_clients_never_reach_the_backend() {
    let b = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    // A deny-list file with comments, next to the config (relative path).
    std::fs::write(
        dir.path().join("blocklist.txt"),
        "# abusers\n127.0.0.2\n::1/128  # v6 loopback\n",
    )
    .unwrap();
    let cfg = format!(
        "{}ip_sets:\n  blocklist:\n    file: blocklist.txt\nroutes:\n  - name: r\n    upstream: b\n    policy:\n      ip: {{deny: [blocklist]}}\n",
        upstream(&b)
    );
    let p = Palisade::start_in(dir, &cfg, true).await;

    let r = get_from("127.0.0.2", p.addr, "/x", &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "ip_denied");
    let r = get_from("::1", p.addr6.unwrap(), "/x", &[]).await;
    assert_eq!(r.status, 403, "IPv6 client must be denied");
    assert_eq!(b.count(), 0, "a denied client reached the backend");

    let r = get_from("127.0.0.1", p.addr, "/x", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(b.count(), 1);
    p.expect_metric(
        "palisade_blocked_total{reason=\"ip_denied\",route=\"r\",stage=\"ip\"}",
        2.0,
    )
    .await;
}

#[tokio::test]
async fn allow_list_admits_only_listed_ranges() {
    let b = Backend::start("b").await;
    let cfg = format!(
        "{}ip_sets:\n  office:\n    cidrs: [\"127.0.0.3/32\", \"127.0.1.0/24\"]\n  bad:\n    cidrs: [\"127.0.1.66\"]\nroutes:\n  - name: r\n    upstream: b\n    policy:\n      ip: {{allow: [office], deny: [bad]}}\n",
        upstream(&b)
    );
    let p = Palisade::start(&cfg).await;
    assert_eq!(get_from("127.0.0.3", p.addr, "/", &[]).await.status, 200);
    assert_eq!(get_from("127.0.1.9", p.addr, "/", &[]).await.status, 200);
    assert_eq!(get_from("127.0.0.1", p.addr, "/", &[]).await.status, 403);
    assert_eq!(
        get_from("127.0.1.66", p.addr, "/", &[]).await.status,
        403,
        "deny wins over allow"
    );
    assert_eq!(b.count(), 2);
}

#[tokio::test]
async fn trusted_proxy_xff_is_honoured_and_untrusted_xff_is_ignored() {
    let b = Backend::start("b").await;
    let cfg = format!(
        "{}client_ip:\n  trusted_proxies: [\"127.0.0.5/32\"]\nip_sets:\n  bad:\n    cidrs: [\"198.51.100.0/24\", \"127.0.0.9\"]\nroutes:\n  - name: r\n    upstream: b\n    policy:\n      ip: {{deny: [bad]}}\n",
        upstream(&b)
    );
    let p = Palisade::start(&cfg).await;

    // Through the trusted proxy, the client it vouches for is denied.
    let r = get_from("127.0.0.5", p.addr, "/", &["X-Forwarded-For: 198.51.100.9"]).await;
    assert_eq!(r.status, 403);
    // The classic bypass: a denied client claims to be someone else. Not believed.
    let r = get_from("127.0.0.9", p.addr, "/", &["X-Forwarded-For: 203.0.113.1"]).await;
    assert_eq!(
        r.status, 403,
        "an untrusted peer's X-Forwarded-For must not change the client IP"
    );
    // An untrusted client spoofing a bad address is judged by its own address, and the
    // upstream never sees the spoofed chain.
    let r = get_from(
        "127.0.0.1",
        p.addr,
        "/",
        &["X-Forwarded-For: 198.51.100.9", "X-Request-Id: spoofed-id"],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = b.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(last.header("x-real-ip"), Some("127.0.0.1"));
    assert_ne!(last.header("x-request-id"), Some("spoofed-id"));

    // Through the trusted proxy: the chain is kept and extended; its request id is kept.
    let r = get_from(
        "127.0.0.5",
        p.addr,
        "/",
        &["X-Forwarded-For: 203.0.113.7", "X-Request-Id: lb-1234"],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("lb-1234"));
    let seen = b.seen();
    let last = seen.last().unwrap();
    assert_eq!(
        last.header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.5")
    );
    assert_eq!(last.header("x-real-ip"), Some("203.0.113.7"));
    assert_eq!(last.header("x-request-id"), Some("lb-1234"));
    assert_eq!(b.count(), 2);
}

#[tokio::test]
async fn geo_and_asn_policies_with_project_built_databases() {
    let b = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    build_test_dbs(dir.path());
    let cfg = format!(
        "{}client_ip:\n  trusted_proxies: [\"127.0.0.0/8\", \"::1\"]\ngeoip:\n  country_db: test-country.mmdb\n  asn_db: test-asn.mmdb\nroutes:\n  - name: eu\n    path_prefix: /eu\n    upstream: b\n    policy:\n      geo: {{allow: [DE, fr]}}\n  - name: no-us\n    path_prefix: /no-us\n    upstream: b\n    policy:\n      geo: {{deny: [US], unknown: block}}\n  - name: asn\n    path_prefix: /asn\n    upstream: b\n    policy:\n      asn: {{deny: [64501]}}\n",
        upstream(&b)
    );
    let p = Palisade::start_in(dir, &cfg, true).await;
    let via = |client: &'static str, path: &'static str| {
        let addr = p.addr;
        async move {
            get_from(
                "127.0.0.1",
                addr,
                path,
                &[&format!("X-Forwarded-For: {client}")],
            )
            .await
            .status
        }
    };
    assert_eq!(via("192.0.2.10", "/eu").await, 200, "DE allowed");
    assert_eq!(
        via("198.51.100.10", "/eu").await,
        200,
        "FR allowed (codes are case-insensitive)"
    );
    assert_eq!(via("2001:db8:de::1", "/eu").await, 200, "DE over IPv6");
    assert_eq!(
        via("203.0.113.10", "/eu").await,
        403,
        "US not on the allow-list"
    );
    assert_eq!(
        via("2001:db8:cafe::1", "/eu").await,
        403,
        "JP not on the allow-list"
    );
    assert_eq!(
        via("10.1.1.1", "/eu").await,
        403,
        "unknown country is not on an allow-list"
    );
    assert_eq!(via("203.0.113.10", "/no-us").await, 403, "US denied");
    assert_eq!(via("192.0.2.10", "/no-us").await, 200);
    assert_eq!(via("10.1.1.1", "/no-us").await, 403, "unknown: block");
    assert_eq!(via("198.51.100.10", "/asn").await, 403, "AS64501 denied");
    assert_eq!(
        via("2001:db8:cafe::1", "/asn").await,
        403,
        "AS64501 over IPv6"
    );
    assert_eq!(via("192.0.2.10", "/asn").await, 200);
    assert_eq!(
        via("10.1.1.1", "/asn").await,
        200,
        "unknown ASN allowed by default"
    );
    // The IPv6 listener with a v6 trusted peer works too.
    let r = get_from(
        "::1",
        p.addr6.unwrap(),
        "/eu",
        &["X-Forwarded-For: 192.0.2.10"],
    )
    .await;
    assert_eq!(r.status, 200);
    let r = get_from(
        "::1",
        p.addr6.unwrap(),
        "/eu",
        &["X-Forwarded-For: 203.0.113.1"],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "geo_denied");

    p.expect_metric(
        "palisade_blocked_total{reason=\"geo_denied\",route=\"eu\",stage=\"geo\"}",
        4.0,
    )
    .await;
    p.expect_metric("palisade_client_country_total{country=\"DE\"}", 5.0)
        .await;
    p.expect_metric("palisade_client_country_total{country=\"unknown\"}", 3.0)
        .await;
    assert!(
        p.log().contains("country=Some(US)"),
        "blocked lines carry the country"
    );
}

#[test]
fn built_databases_are_readable_by_maxminds_own_reader() {
    let dir = tempfile::tempdir().unwrap();
    build_test_dbs(dir.path());
    let look = |db: &str, ip: &str, path: &[&str]| {
        let out = std::process::Command::new("mmdblookup")
            .args(["--file", dir.path().join(db).to_str().unwrap(), "--ip", ip])
            .args(path)
            .output()
            .expect("mmdblookup (Debian package mmdb-bin; scripts/ensure-deps.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(look("test-country.mmdb", "192.0.2.1", &["country", "iso_code"]).contains("\"DE\""));
    assert!(look(
        "test-country.mmdb",
        "2001:db8:cafe::9",
        &["country", "iso_code"]
    )
    .contains("\"JP\""));
    let asn = look("test-asn.mmdb", "203.0.113.5", &[]);
    assert!(
        asn.contains("64502") && asn.contains("Example, Inc."),
        "{asn}"
    );
}

#[test]
fn identity_config_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("list.txt"),
        "10.0.0.0/8\n\n10.0.0.0/33\nhello\n",
    )
    .unwrap();
    let cfg = dir.path().join("p.yaml");
    std::fs::write(
        &cfg,
        "listeners: [{address: \"127.0.0.1:1\"}]\nupstreams:\n  b:\n    targets: [\"127.0.0.1:2\"]\nip_sets:\n  l:\n    file: list.txt\n  inline:\n    cidrs: [\"10.0.0.1\", \"300.1.1.1\"]\nroutes:\n  - name: r\n    upstream: b\n    policy:\n      ip: {deny: [nope]}\n      geo: {deny: [USA]}\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1);
    let list = dir.path().join("list.txt").display().to_string();
    assert!(
        err.contains(&format!("{list}:3: invalid IP or CIDR \"10.0.0.0/33\"")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{list}:4: invalid IP or CIDR \"hello\"")),
        "{err}"
    );
    assert!(
        err.contains(":9:25: ip set \"inline\": invalid IP or CIDR \"300.1.1.1\""),
        "{err}"
    );
    assert!(
        err.contains(":14:19: route \"r\": policy.ip: unknown ip set \"nope\""),
        "{err}"
    );
    assert!(err.contains("policy.geo needs a country database"), "{err}");
    assert!(
        err.contains(":15:20: route \"r\": policy.geo: \"USA\" is not an ISO 3166-1"),
        "{err}"
    );
}
