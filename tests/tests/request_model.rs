//! The one request model, end to end: rules, validation and rate-limit keys read the same
//! decoded request, so an encoding cannot make one of them see something else than the
//! others (a parser differential inside the proxy).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use palisade_tests::{Backend, Palisade};

const RULES: &str = "name: users\nrules:\n  - id: no-mallory\n    match: {field: \"query:user\", equals: mallory}\n";

fn config(backend: std::net::SocketAddr) -> String {
    format!(
        "upstreams:\n  app:\n    targets: [\"{backend}\"]\nrulesets: [users.yaml]\n\
         rate_limits:\n  - name: per-user\n    key: [\"query:user\", \"cookie:team\"]\n    rate: 1/min\n    scope: {{routes: [rl]}}\n\
         routes:\n\
         \x20 - name: rl\n    path_prefix: /rl\n    upstream: app\n\
         \x20 - name: val\n    path_prefix: /val\n    upstream: app\n    policy:\n      validate:\n        operations:\n          - path: /val\n            query: {{user: {{required: true, schema: {{const: alice}}}}}}\n            cookies: {{team: {{schema: {{const: red}}}}}}\n\
         \x20 - name: rules\n    path_prefix: /rules\n    upstream: app\n    policy: {{rulesets: [{{name: users}}]}}\n"
    )
}

async fn status(p: &Palisade, path: &str, cookie: &str) -> u16 {
    let mut headers = vec![];
    let c = format!("cookie: {cookie}");
    if !cookie.is_empty() {
        headers.push(c.as_str());
    }
    palisade_tests::get_from("127.0.0.1", p.addr, path, &headers)
        .await
        .status
}

#[tokio::test]
async fn rules_validation_and_rate_limit_keys_read_one_decoded_request() {
    let backend = Backend::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("users.yaml"), RULES).unwrap();
    let p = Palisade::start_in(dir, &config(backend.addr), false).await;

    // Rate-limit keys: `%61lice` and `alice`, `"red"` and `red` are one bucket.
    assert_eq!(status(&p, "/rl?user=alice", "team=red").await, 200);
    assert_eq!(status(&p, "/rl?user=%61lice", "team=\"red\"").await, 429);
    assert_eq!(
        status(&p, "/rl?user=%61lic%65+", "team=red").await,
        200,
        "`alice ` is another user"
    );

    // Validation sees the same decoded values.
    assert_eq!(
        status(&p, "/val?user=%61lice", "team=%72ed").await,
        400,
        "cookies are not percent-decoded"
    );
    assert_eq!(
        status(&p, "/val?user=%61lice", " team = \"red\" ").await,
        200
    );
    assert_eq!(status(&p, "/val?user=bob", "team=red").await, 400);

    // The rules too, and on every value of a duplicated parameter.
    assert_eq!(status(&p, "/rules?user=m%61llory", "").await, 403);
    assert_eq!(
        status(&p, "/rules?user=alice&user=%6dallory", "").await,
        403
    );
    assert_eq!(
        status(&p, "/rules?user=%6dallory&user=alice", "").await,
        403
    );
    // Validation checks every value of a duplicated parameter as well.
    assert_eq!(status(&p, "/val?user=alice&user=%62ob", "").await, 400);
    assert_eq!(status(&p, "/val?user=alice&user=%61lice", "").await, 200);
}
