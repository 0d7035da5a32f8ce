//! Hot reload end to end: the real binary under steady load while its config is rewritten
//! between two versions through all three triggers (file watch, SIGHUP, `POST /reload`);
//! invalid changes kept out whole and reported with file and line; rate-limit state that
//! survives a reload of an unrelated rule.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_tests::{listeners_yaml, raw_get, raw_request, Backend, Palisade};

/// Config body of a version: route `api` with rule set `set-<v>`, which blocks `q` containing
/// `alpha` (version a) or `beta` (version b).
fn version(v: char, backend: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "upstreams:\n  app:\n    targets: [\"{backend}\"]\nrulesets: [rules-{v}.yaml]\n{extra}\
         routes:\n  - name: api\n    upstream: app\n    policy:\n      rulesets: [{{name: set-{v}}}]\n"
    )
}

fn write_rules(dir: &std::path::Path) {
    for (v, word) in [('a', "alpha"), ('b', "beta")] {
        std::fs::write(
            dir.join(format!("rules-{v}.yaml")),
            format!(
                "name: set-{v}\nrules:\n  - id: block-{word}\n    match: {{field: \"query:q\", contains: {word}}}\n"
            ),
        )
        .unwrap();
    }
}

/// A backend, and a directory holding both versions' rule files.
async fn setup() -> (Backend, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_rules(dir.path());
    (Backend::start("app").await, dir)
}

async fn post_reload(p: &Palisade) -> palisade_tests::RawResponse {
    raw_request(
        p.admin,
        b"POST /reload HTTP/1.1\r\nHost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await
    .expect("admin answers POST /reload")
}

async fn generation(p: &Palisade) -> u64 {
    raw_get(p.admin, "/config").await.unwrap().json()["generation"]
        .as_u64()
        .unwrap()
}

fn rewrite(p: &Palisade, body: &str) {
    let text = listeners_yaml(p.addr, p.admin) + body;
    // Write then rename, as editors and config management do: a reader never sees half a file.
    let tmp = p.dir.join("palisade.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, p.dir.join("palisade.yaml")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steady_load_while_the_config_flips_through_all_three_triggers() {
    let (backend, dir) = setup().await;
    let a = version('a', backend.addr, "");
    let b = version('b', backend.addr, "");
    let p = Palisade::start_in(dir, &a, false).await;
    assert_eq!(generation(&p).await, 1);

    let stop = Arc::new(AtomicBool::new(false));
    let stats: Arc<[AtomicUsize; 6]> = Arc::new(Default::default());
    // [0] forwarded, [1] blocked alpha, [2] blocked beta, [3] wrong, [4] 5xx, [5] conn errors
    let mut clients = Vec::new();
    for c in 0..3 {
        let (stop, stats, addr) = (Arc::clone(&stop), Arc::clone(&stats), p.addr);
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let q = ["alpha", "beta", "alphabeta", "gamma"][i % 4];
                let r = match http.get(format!("http://{addr}/x?q={q}")).send().await {
                    Ok(r) => r,
                    Err(_) => {
                        stats[5].fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                let reason = body["error"].as_str().unwrap_or("").to_string();
                let slot = match (status, reason.as_str()) {
                    (500..=599, _) => 4,
                    // Forwarded: only what one of the versions lets through.
                    (200, _) if q != "alphabeta" => 0,
                    // Blocked: only by the rule of a version that blocks this value.
                    (403, "rule:block-alpha") if q.contains("alpha") => 1,
                    (403, "rule:block-beta") if q.contains("beta") => 2,
                    _ => {
                        eprintln!("unexpected answer to q={q}: {status} {body}");
                        3
                    }
                };
                stats[slot].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Flip every ~200 ms for 12 s, cycling the trigger.
    let started = Instant::now();
    let mut flips = 0u64;
    let (mut by_admin, mut by_signal) = (0, 0);
    while started.elapsed() < Duration::from_secs(12) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        flips += 1;
        rewrite(&p, if flips % 2 == 1 { &b } else { &a });
        match flips % 3 {
            0 => {
                let r = post_reload(&p).await;
                assert_eq!(r.status, 200, "{}", r.body_string());
                by_admin += 1;
            }
            1 => {
                let ok = std::process::Command::new("kill")
                    .args(["-HUP", &p.pid().to_string()])
                    .status()
                    .unwrap()
                    .success();
                assert!(ok);
                by_signal += 1;
            }
            _ => {} // the file watch alone
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let s: Vec<usize> = stats.iter().map(|x| x.load(Ordering::Relaxed)).collect();
    eprintln!(
        "forwarded {}, blocked-a {}, blocked-b {}, flips {flips}",
        s[0], s[1], s[2]
    );
    assert_eq!(s[3], 0, "answers no generation dictates");
    assert_eq!(s[4], 0, "5xx during reloads");
    assert_eq!(s[5], 0, "connection errors during reloads");
    assert!(s[1] > 0 && s[2] > 0, "both versions served requests: {s:?}");
    assert!(by_admin > 0 && by_signal > 0);
    let log = p.log();
    assert!(log.contains("sighup"), "a SIGHUP reload is logged:\n{log}");
    assert!(log.contains("watch"), "a watched-file reload is logged");
    assert!(
        p.metric("palisade_config_reloads_total{result=\"success\"}")
            .await
            >= flips as f64 / 2.0
    );
    assert_eq!(
        p.metric("palisade_config_reloads_total{result=\"failure\"}")
            .await,
        0.0
    );
    assert!(generation(&p).await > flips / 2);
}

#[tokio::test]
async fn an_invalid_change_keeps_the_old_rules_and_is_reported_with_file_and_line() {
    let (backend, dir) = setup().await;
    let good = version('a', backend.addr, "reload: {watch: false}\n");
    let p = Palisade::start_in(dir, &good, false).await;
    let blocked = || async { raw_get(p.addr, "/x?q=alpha").await.unwrap().status };
    assert_eq!(blocked().await, 403);

    let config = p.dir.join("palisade.yaml").display().to_string();
    let rules_a = p.dir.join("rules-a.yaml").display().to_string();
    // (what is broken, file named in the error, line)
    let cases: Vec<(String, Option<String>, String, u64)> = vec![
        (good.replace("routes:", "routes: [\n"), None, config.clone(), 0),
        (
            good.replace("upstream: app", "upstream: app\n    tragets: 1"),
            None,
            config.clone(),
            13,
        ),
        (
            good.clone(),
            Some("name: set-a\nrules:\n  - id: r1\n    matchh: {field: \"query:q\", contains: x}\n".into()),
            rules_a.clone(),
            4,
        ),
        (
            good.clone(),
            Some("name: set-a\nrules:\n  - id: r1\n    match: {field: \"query:q\", regex: \"(unclosed\"}\n".into()),
            rules_a.clone(),
            4,
        ),
        (
            good.replace(
                "rulesets: [{name: set-a}]",
                "rulesets: [{name: set-a}]\n      validate:\n        operations:\n          - path: /x\n            body: missing.schema.json",
            ),
            None,
            config.clone(),
            0,
        ),
    ];
    let mut failures = 0.0;
    for (i, (cfg, rules, file, line)) in cases.into_iter().enumerate() {
        rewrite(&p, &cfg);
        if let Some(r) = &rules {
            std::fs::write(p.dir.join("rules-a.yaml"), r).unwrap();
        }
        let r = post_reload(&p).await;
        failures += 1.0;
        assert_eq!(r.status, 422, "case {i}: {}", r.body_string());
        let errors = r.json()["errors"].clone();
        let first = &errors[0];
        assert_eq!(first["file"], file.as_str(), "case {i}: {errors}");
        if line > 0 {
            assert_eq!(first["line"], line, "case {i}: {errors}");
        }
        // The old snapshot keeps serving, and /config and the metrics say why.
        assert_eq!(blocked().await, 403, "case {i}");
        assert_eq!(raw_get(p.addr, "/x?q=ok").await.unwrap().status, 200);
        let report = raw_get(p.admin, "/config").await.unwrap().json();
        assert_eq!(report["generation"], 1, "case {i}");
        assert_eq!(report["last_error"][0]["file"], file.as_str(), "case {i}");
        p.expect_metric(
            "palisade_config_reloads_total{result=\"failure\"}",
            failures,
        )
        .await;
        write_rules(&p.dir);
    }
    // Fixed: the next reload goes through.
    rewrite(
        &p,
        &good.replace("set-a", "set-b").replace("rules-a", "rules-b"),
    );
    assert_eq!(post_reload(&p).await.status, 200);
    assert_eq!(blocked().await, 200);
    assert_eq!(raw_get(p.addr, "/x?q=beta").await.unwrap().status, 403);
    let report = raw_get(p.admin, "/config").await.unwrap().json();
    assert_eq!(report["generation"], 2);
    assert!(report["last_error"].is_null());
    assert!(report["files"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["path"].as_str().unwrap().ends_with("rules-b.yaml")));
    p.expect_metric("palisade_config_generation", 2.0).await;
}

#[tokio::test]
async fn rate_limit_counters_survive_a_reload_of_an_unrelated_rule() {
    let (backend, dir) = setup().await;
    let limit =
        "reload: {watch: false}\nrate_limits:\n  - name: per-ip\n    key: [ip]\n    rate: 3/min\n    scope: {path: \"^/limited\"}\n";
    let p = Palisade::start_in(dir, &version('a', backend.addr, limit), false).await;
    for _ in 0..3 {
        assert_eq!(raw_get(p.addr, "/limited").await.unwrap().status, 200);
    }
    // Another rule set: the rate-limit rule is unchanged, so its buckets are kept.
    rewrite(&p, &version('b', backend.addr, limit));
    assert_eq!(post_reload(&p).await.status, 200);
    assert_eq!(
        raw_get(p.addr, "/x?q=beta").await.unwrap().status,
        403,
        "new rules in force"
    );
    assert_eq!(
        raw_get(p.addr, "/limited").await.unwrap().status,
        429,
        "the bucket survived"
    );
    // A changed rate-limit rule starts afresh.
    rewrite(
        &p,
        &version('b', backend.addr, &limit.replace("3/min", "5/min")),
    );
    assert_eq!(post_reload(&p).await.status, 200);
    assert_eq!(raw_get(p.addr, "/limited").await.unwrap().status, 200);
}

#[tokio::test]
async fn a_file_that_keeps_changing_is_reloaded_within_a_second_while_it_changes() {
    let (backend, dir) = setup().await;
    let a = version('a', backend.addr, "");
    let b = version('b', backend.addr, "");
    let p = Palisade::start_in(dir, &a, false).await;
    // Rewrite every 50 ms, faster than the watcher's 100 ms tick: the debounce never sees a
    // quiet period, so only the 1 s cap can reload.
    let started = Instant::now();
    let mut i = 0u32;
    let mut reloaded_while_writing = false;
    while started.elapsed() < Duration::from_millis(2500) {
        i += 1;
        rewrite(&p, if i.is_multiple_of(2) { &a } else { &b });
        tokio::time::sleep(Duration::from_millis(50)).await;
        if i.is_multiple_of(10) && generation(&p).await > 1 {
            reloaded_while_writing = true;
            break;
        }
    }
    assert!(
        reloaded_while_writing,
        "no reload within 2.5 s of continuous changes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_hands_the_sockets_over_without_refusing_a_request() {
    let (backend, dir) = setup().await;
    let sock = dir.path().join("upgrade.sock").display().to_string();
    let mut old = Palisade::start_in_with(
        dir,
        &version('a', backend.addr, ""),
        false,
        &["--upgrade-sock", &sock],
    )
    .await;
    let (addr, admin) = (old.addr, old.admin);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (stop, ok, bad) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&bad));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // A new connection each time: every accept goes to whoever holds the socket.
                match raw_get(addr, "/x?q=alpha").await.map(|r| r.status) {
                    Some(403) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => bad.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // The new process waits for the sockets; SIGQUIT makes the old one hand them over.
    let log = std::fs::File::create(old.dir.join("new.log")).unwrap();
    // Killed on drop, so a failing assertion below leaves no process behind.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _new = KillOnDrop(
        std::process::Command::new(palisade_tests::palisade_bin())
            .args(["run", "--config"])
            .arg(old.dir.join("palisade.yaml"))
            .args(["--threads", "2", "--upgrade", "--upgrade-sock", &sock])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let quit = std::process::Command::new("kill")
        .args(["-QUIT", &old.pid().to_string()])
        .status()
        .unwrap();
    assert!(quit.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    while !old.exited() {
        assert!(
            Instant::now() < deadline,
            "the old process did not drain and exit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The new process serves alone now, listeners and admin alike.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    assert_eq!(raw_get(addr, "/x?q=alpha").await.unwrap().status, 403);
    assert_eq!(raw_get(admin, "/healthz").await.unwrap().status, 200);
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "requests refused or failed during the upgrade"
    );
    assert!(
        ok.load(Ordering::Relaxed) > 20,
        "the client ran through the handover"
    );
}
