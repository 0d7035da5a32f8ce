//! Cedar authorization and MCP-aware routes through the real binary, on the worked example
//! (`examples/fitness`): its policies, schema and JWKS, tokens minted by `palisade token`
//! with its dev key, a loopback API backend and a loopback MCP server.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_tests::*;
use serde_json::{json, Value};

const RESOURCE: &str = "http://127.0.0.1:8080/mcp";

/// The example's config with its files copied next to it, `demo` upstreams replaced by
/// loopback servers, decisions to a file, the per-tool rate lowered to `tool_rate` and `top`
/// (top-level settings) added.
async fn start_example(api: SocketAddr, mcp: SocketAddr, tool_rate: &str, top: &str) -> Palisade {
    let dir = example_dir(&["jwks.json", "policies.cedar", "fitness.cedarschema"]);
    let text = std::fs::read_to_string(repo_path("examples/fitness/palisade.yaml")).unwrap();
    // Listeners and admin come from the harness.
    let body = &text[text.find("logging:").unwrap()..];
    let mut upstream = 0;
    let body: String = body
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("demo: true") {
                upstream += 1;
                let target = if upstream == 1 { api } else { mcp };
                format!("    targets: [\"{target}\"]")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(upstream, 2, "the example has the API and the MCP upstreams");
    let body = body
        .replace("stdout: true", "file: decisions.log")
        .replace("rate: 60/minute", &format!("rate: {tool_rate}"));
    Palisade::start_in(dir, &format!("{top}{body}"), false).await
}

/// A temporary directory holding copies of these files of `examples/fitness`.
fn example_dir(files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        std::fs::copy(
            repo_path(&format!("examples/fitness/{f}")),
            dir.path().join(f),
        )
        .unwrap();
    }
    dir
}

/// A token from `palisade token` with the example's dev key.
fn mint(sub: &str, groups: &[&str], scope: &str, aud: &str, claims: &[&str]) -> String {
    let key = repo_path("examples/fitness/dev-signing-key.pem");
    let key = key.to_str().unwrap();
    let mut args = vec![
        "token",
        "--key",
        key,
        "--kid",
        "fitness-dev-1",
        "--iss",
        "https://id.fitness.test",
        "--aud",
        aud,
        "--sub",
        sub,
        "--scope",
        scope,
    ];
    for g in groups {
        args.extend(["--group", g]);
    }
    for c in claims {
        args.extend(["--claim", c]);
    }
    let (code, out, err) = run_cli(&args);
    assert_eq!(code, 0, "{err}");
    out.trim().to_string()
}

async fn call(p: &Palisade, method: &str, path: &str, token: &str, body: &str) -> RawResponse {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw_request(p.addr, req.as_bytes())
        .await
        .expect("an answer")
}

#[tokio::test]
async fn cedar_permits_and_forbids_exactly_as_the_example_policies_say() {
    let api = Backend::start("api").await;
    let mcp = McpServer::start().await;
    let p = start_example(api.addr, mcp.addr, "60/minute", "").await;
    let all = "activities socials";
    let alice = mint("alice", &["athletes"], all, "fitness-api", &[]);
    let bob = mint("bob", &["athletes"], all, "fitness-api", &[]);
    let carol = mint(
        "carol",
        &["coaches"],
        all,
        "fitness-api",
        &["athletes=[\"alice\"]"],
    );
    let eve = mint(
        "eve",
        &["coaches"],
        all,
        "fitness-api",
        &["athletes=[\"bob\"]"],
    );
    let dave = mint("dave", &[], "activities", "fitness-api", &[]);
    let who = [
        ("alice", &alice),
        ("bob", &bob),
        ("carol", &carol),
        ("eve", &eve),
        ("dave", &dave),
    ];
    // (method, path, who may) — everyone else gets 403.
    let table: &[(&str, &str, &[&str])] = &[
        // Athletes: their own activities, GET and POST.
        ("GET", "/users/alice/activities", &["alice", "carol"]),
        ("POST", "/users/alice/activities", &["alice"]),
        ("GET", "/users/alice/activities/a1", &["alice", "carol"]),
        ("GET", "/users/bob/activities", &["bob", "eve"]),
        ("POST", "/users/bob/activities", &["bob"]),
        // Coaches only read, and only their athletes'.
        ("GET", "/users/carol/activities", &[]),
        // Routes: anyone may look, only the owner may delete.
        (
            "GET",
            "/users/alice/routes/r1",
            &["alice", "bob", "carol", "eve", "dave"],
        ),
        ("DELETE", "/users/alice/routes/r1", &["alice"]),
        ("DELETE", "/users/bob/routes/r2", &["bob"]),
        // The feed needs the `socials` scope (dave lacks it).
        ("GET", "/socials/feed", &["alice", "bob", "carol", "eve"]),
        ("POST", "/socials/posts", &["alice", "bob", "carol", "eve"]),
        // Operations policy.authorize does not list: refused.
        ("GET", "/users/alice/secrets", &[]),
        ("PUT", "/users/alice/activities", &[]),
    ];
    let mut wrong = Vec::new();
    for (method, path, allowed) in table {
        for (name, token) in &who {
            let r = call(
                &p,
                method,
                path,
                token,
                if *method == "POST" { "{}" } else { "" },
            )
            .await;
            let want = if allowed.contains(name) { 200 } else { 403 };
            if r.status != want {
                wrong.push(format!(
                    "{name} {method} {path}: {} (want {want})",
                    r.status
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    let forwarded = api.count();
    let expected: usize = table.iter().map(|(_, _, a)| a.len()).sum();
    assert_eq!(forwarded, expected, "only permitted requests reach the API");

    // The decision log names the policy that decided; the client only sees `forbidden`.
    let r = call(&p, "DELETE", "/users/alice/routes/r1", &bob, "").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "forbidden");
    assert!(
        !r.body_string().contains("no-deleting"),
        "{}",
        r.body_string()
    );
    let log_path = p.dir.join("decisions.log");
    assert!(
        eventually(std::time::Duration::from_secs(5), || async {
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .contains("\"no-deleting-others-routes\"")
        })
        .await,
        "decision log: {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    let line: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l.to_string().contains("no-deleting-others-routes"))
        .unwrap();
    assert_eq!(line["terminating"]["stage"], "authorize", "{line}");
    assert_eq!(
        line["terminating"]["details"]["policies"][0], "no-deleting-others-routes",
        "{line}"
    );
    assert_eq!(line["token_sub"], "bob", "{line}");
    assert!(!log.contains(&bob), "the token is never logged");
}

#[tokio::test]
async fn mcp_tools_are_authorized_validated_filtered_and_rate_limited() {
    let api = Backend::start("api").await;
    let mcp = McpServer::start().await;
    let p = start_example(api.addr, mcp.addr, "4/minute", "").await;
    let agent = mint("alice", &["athletes"], "mcp", RESOURCE, &[]);

    // A protected resource (RFC 9728): 401 points to the metadata, which is served.
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#;
    let r = raw_request(
        p.addr,
        format!(
            "POST /mcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{init}",
            init.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401);
    let challenge = r.header("www-authenticate").unwrap().to_string();
    assert!(
        challenge.contains(
            "resource_metadata=\"http://127.0.0.1:8080/.well-known/oauth-protected-resource/mcp\""
        ),
        "{challenge}"
    );
    let md = raw_get(p.addr, "/.well-known/oauth-protected-resource/mcp")
        .await
        .unwrap();
    assert_eq!(md.status, 200);
    let doc = md.json();
    assert_eq!(doc["resource"], RESOURCE);
    assert_eq!(doc["authorization_servers"][0], "https://id.fitness.test");
    assert_eq!(doc["scopes_supported"][0], "mcp");

    // RFC 8707: a token for the API, not for this resource, is refused.
    let api_token = mint("alice", &["athletes"], "mcp", "fitness-api", &[]);
    let r = call(&p, "POST", "/mcp", &api_token, init).await;
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("invalid_token"));

    let r = call(&p, "POST", "/mcp", &agent, init).await;
    assert_eq!(r.status, 200, "{}", r.body_string());

    // tools/list answers are filtered to what the caller may call: JSON and event streams.
    for sse in [false, true] {
        let list = if sse {
            r#"{"jsonrpc":"2.0","id":"sse","method":"tools/list"}"#
        } else {
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#
        };
        let r = call(&p, "POST", "/mcp", &agent, list).await;
        assert_eq!(r.status, 200);
        let text = r.body_string();
        assert!(text.contains("get_activities"), "{text}");
        assert!(!text.contains("delete_route"), "{text}");
        if sse {
            assert!(text.starts_with("event: message\n"), "{text}");
            assert!(text.contains("\ndata: {"), "{text}");
            assert!(text.ends_with("\n\n"), "{text:?}");
        } else {
            assert_eq!(r.json()["result"]["tools"].as_array().unwrap().len(), 1);
        }
    }

    // Tools without a schema in the config are checked against the inputSchema the server
    // advertised in its tools/list answer (seen above, though filtered out for this caller).
    let bad = r#"{"jsonrpc":"2.0","id":"w","method":"tools/call","params":{"name":"log_workout","arguments":{"minutes":"ten"}}}"#;
    let r = call(&p, "POST", "/mcp", &agent, bad).await;
    assert_eq!(r.status, 400, "{}", r.body_string());
    assert_eq!(r.json()["error"]["code"], -32602);
    let good = bad.replace("\"ten\"", "10");
    assert_eq!(call(&p, "POST", "/mcp", &agent, &good).await.status, 403);

    // An allowed call reaches the server unchanged, without the client's token.
    let before = mcp.seen().len();
    let ok = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"get_activities","arguments":{"user":"alice","limit":5}}}"#;
    let r = call(&p, "POST", "/mcp", &agent, ok).await;
    assert_eq!(r.status, 200, "{}", r.body_string());
    let seen = mcp.seen();
    assert_eq!(seen.len(), before + 1);
    let last = seen.last().unwrap();
    assert_eq!(last.body, Bytes::from(ok));
    assert!(last.header("authorization").is_none(), "{:?}", last.headers);

    // A forbidden tool: a JSON-RPC error with the request's id; the server never sees it.
    let del = r#"{"jsonrpc":"2.0","id":"d1","method":"tools/call","params":{"name":"delete_route","arguments":{"user":"alice","route":"r1"}}}"#;
    let r = call(&p, "POST", "/mcp", &agent, del).await;
    assert_eq!(r.status, 403);
    let e = r.json();
    assert_eq!(e["jsonrpc"], "2.0");
    assert_eq!(e["id"], "d1");
    assert_eq!(e["error"]["code"], -32001);
    assert!(e["error"]["data"]["request_id"].is_string(), "{e}");
    // Arguments are Cedar context: reading another user's activities is forbidden.
    let other = r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"get_activities","arguments":{"user":"bob"}}}"#;
    assert_eq!(call(&p, "POST", "/mcp", &agent, other).await.status, 403);
    // Arguments outside the tool's schema: -32602.
    let big = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"get_activities","arguments":{"limit":1000}}}"#;
    let r = call(&p, "POST", "/mcp", &agent, big).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32602);
    assert!(r.body_string().contains("limit"), "{}", r.body_string());
    // A batch with one forbidden message is refused whole, with an error for that message.
    let batch = format!("[{ok},{del}]");
    let r = call(&p, "POST", "/mcp", &agent, &batch).await;
    assert_eq!(r.status, 403);
    let errors = r.json();
    assert_eq!(errors.as_array().unwrap().len(), 1);
    assert_eq!(errors[0]["id"], "d1");
    // Read two ways by two parsers: a second `name` (first-wins servers would run
    // get_activities, last-wins delete_route), a second `method`: refused, never forwarded.
    let dup_name = r#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"get_activities","name":"delete_route","arguments":{"user":"alice"}}}"#;
    let dup_method = r#"{"jsonrpc":"2.0","id":7,"method":"ping","method":"tools/call","params":{"name":"delete_route"}}"#;
    for body in [dup_name, dup_method] {
        let r = call(&p, "POST", "/mcp", &agent, body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body_string());
        assert_eq!(r.json()["error"]["code"], -32700, "{body}");
    }
    // An escaped tool name is the tool it decodes to.
    let escaped = del.replace("delete_route", "delete\\u005froute");
    assert_eq!(call(&p, "POST", "/mcp", &agent, &escaped).await.status, 403);
    // Not JSON-RPC at all.
    let r = call(&p, "POST", "/mcp", &agent, r#"{"id":1,"method":"x"}"#).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32600);
    assert_eq!(
        mcp.seen().len(),
        before + 1,
        "no refused message reached the server"
    );

    // Per subject and tool: 4 calls a minute; one was made above, the batch was refused
    // before the limit. Three more pass, the next is limited; another tool's bucket is
    // separate, and so is another subject's.
    for i in 0..3 {
        let r = call(&p, "POST", "/mcp", &agent, ok).await;
        assert_eq!(r.status, 200, "call {i}");
    }
    assert_eq!(call(&p, "POST", "/mcp", &agent, ok).await.status, 429);
    let bob = mint("bob", &["athletes"], "mcp", RESOURCE, &[]);
    let bobs = ok.replace("\"alice\"", "\"bob\"");
    assert_eq!(call(&p, "POST", "/mcp", &bob, &bobs).await.status, 200);
    let list = r#"{"jsonrpc":"2.0","id":9,"method":"tools/list"}"#;
    assert_eq!(call(&p, "POST", "/mcp", &agent, list).await.status, 200);
}

/// HTTP/2 clients (h2c here) get the same MCP checks, and `tools/list` answers rewritten
/// without HTTP/1.1's framing: a wrong `content-length` or a cut stream would fail the client.
#[tokio::test]
async fn http2_clients_get_filtered_tool_lists_and_refusals_too() {
    let api = Backend::start("api").await;
    let mcp = McpServer::start().await;
    let p = start_example(api.addr, mcp.addr, "60/minute", "h2c: true\n").await;
    let agent = mint("alice", &["athletes"], "mcp", RESOURCE, &[]);
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let post = |body: String| {
        client
            .post(p.url("/mcp"))
            .bearer_auth(&agent)
            .header("content-type", "application/json")
            .body(body)
    };
    for id in ["2", "\"sse\""] {
        let r = post(format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#
        ))
        .send()
        .await
        .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(text.contains("get_activities"), "{text}");
        assert!(!text.contains("delete_route"), "{text}");
        if id == "2" {
            let doc: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                doc["result"]["tools"].as_array().unwrap().len(),
                1,
                "{text}"
            );
        } else {
            assert!(text.starts_with("event: message\ndata: {"), "{text}");
            assert!(text.ends_with("\n\n"), "{text:?}");
        }
    }
    let before = mcp.seen().len();
    let del = r#"{"jsonrpc":"2.0","id":"d","method":"tools/call","params":{"name":"delete_route","arguments":{"user":"alice"}}}"#;
    let r = post(del.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        (e["id"].as_str(), e["error"]["code"].as_i64()),
        (Some("d"), Some(-32001))
    );
    let ok = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"get_activities","arguments":{"user":"alice"}}}"#;
    let r = post(ok.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = mcp.seen();
    assert_eq!(
        seen.len(),
        before + 1,
        "only the allowed call reached the server"
    );
    assert_eq!(seen.last().unwrap().body, Bytes::from(ok));
    assert!(seen.last().unwrap().header("authorization").is_none());
}

/// A reload keeps the input schemas the MCP server advertised while the route still talks to
/// the same server: tool calls stay checked without waiting for a client to list the tools
/// again. A reload that points the route at another server starts afresh.
#[tokio::test]
async fn advertised_tool_schemas_survive_a_reload_to_the_same_server() {
    let api = Backend::start("api").await;
    let mcp = McpServer::start().await;
    let other = McpServer::start().await;
    let p = start_example(api.addr, mcp.addr, "60/minute", "").await;
    let agent = mint("alice", &["athletes"], "mcp", RESOURCE, &[]);
    // log_workout has no schema in the config and no permit: unchecked, Cedar refuses (403);
    // checked against what the server advertised, its arguments are wrong first (400).
    let bad = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"log_workout","arguments":{"minutes":"ten"}}}"#;
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let reload = || async {
        let r = raw_request(
            p.admin,
            b"POST /reload HTTP/1.1\r\nHost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body_string());
        raw_get(p.admin, "/config").await.unwrap().json()["generation"].clone()
    };
    assert_eq!(call(&p, "POST", "/mcp", &agent, bad).await.status, 403);
    assert_eq!(call(&p, "POST", "/mcp", &agent, list).await.status, 200);
    assert_eq!(call(&p, "POST", "/mcp", &agent, bad).await.status, 400);
    assert_eq!(reload().await, 2);
    let r = call(&p, "POST", "/mcp", &agent, bad).await;
    assert_eq!(r.status, 400, "still checked after the reload");
    assert_eq!(r.json()["error"]["code"], -32602);
    // The route now goes to another server: what the first advertised no longer applies.
    let path = p.dir.join("palisade.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let tmp = p.dir.join("palisade.yaml.tmp");
    std::fs::write(
        &tmp,
        text.replace(&mcp.addr.to_string(), &other.addr.to_string()),
    )
    .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    // (The file watch may reload it too: one more generation.)
    assert!(reload().await.as_u64().unwrap() >= 3);
    assert_eq!(call(&p, "POST", "/mcp", &agent, bad).await.status, 403);
}

#[tokio::test]
async fn openapi_operation_ids_are_actions_and_policies_reload() {
    let api = Backend::start("api").await;
    let dir = example_dir(&["jwks.json"]);
    std::fs::write(
        dir.path().join("things.yaml"),
        r#"openapi: 3.1.0
info: {title: things, version: "1"}
paths:
  /things/{id}:
    parameters: [{name: id, in: path, required: true, schema: {type: string}}]
    get: {operationId: getThing, responses: {"200": {description: ok}}}
    delete: {operationId: deleteThing, responses: {"204": {description: gone}}}
    put:
      operationId: putThing
      requestBody: {content: {application/json: {schema: {type: object}}}}
      responses: {"200": {description: ok}}
"#,
    )
    .unwrap();
    let policies = dir.path().join("p.cedar");
    std::fs::write(
        &policies,
        r#"permit (principal, action == App::Action::"getThing", resource == App::Route::"things");
           permit (principal, action == App::Action::"deleteThing", resource)
             when { context has query && context.query has confirm && context.query.confirm == "yes" };
           permit (principal, action == App::Action::"putThing", resource)
             when { context.body.owner == principal.sub && context.body.tags.contains("mine") };"#,
    )
    .unwrap();
    let config = format!(
        r#"upstreams:
  api: {{targets: ["{}"]}}
auth:
  issuers:
    local: {{issuer: "https://id.fitness.test", jwks_file: jwks.json, algorithms: [ES256], audiences: [fitness-api]}}
authorization:
  policies: [p.cedar]
  principal: {{type: App::User, attributes: {{sub: sub}}}}
routes:
  - name: things
    upstream: api
    policy:
      auth: {{}}
      validate: {{openapi: things.yaml}}
      authorize: {{context: {{query: [confirm], body: {{owner: /owner, tags: /tags}}}}}}
"#,
        api.addr
    );
    let p = Palisade::start_in(dir, &config, false).await;
    let t = mint("alice", &[], "", "fitness-api", &[]);
    assert_eq!(call(&p, "GET", "/things/1", &t, "").await.status, 200);
    assert_eq!(call(&p, "DELETE", "/things/1", &t, "").await.status, 403);
    // Query and body values in the context.
    assert_eq!(
        call(&p, "DELETE", "/things/1?confirm=yes", &t, "")
            .await
            .status,
        200
    );
    let put = |body: &'static str| {
        let (p, t) = (&p, &t);
        async move { call(p, "PUT", "/things/1", t, body).await.status }
    };
    assert_eq!(put(r#"{"owner":"alice","tags":["mine","x"]}"#).await, 200);
    assert_eq!(put(r#"{"owner":"bob","tags":["mine"]}"#).await, 403);
    assert_eq!(put(r#"{"owner":"alice","tags":["x"]}"#).await, 403);
    // A record where the policy expects a string: no permit.
    assert_eq!(
        put(r#"{"owner":{"__entity":{"type":"App::User","id":"alice"}},"tags":["mine"]}"#).await,
        403
    );
    // A policy change reloads with the config (file watch).
    std::fs::write(
        &policies,
        r#"permit (principal, action in [App::Action::"getThing", App::Action::"deleteThing"], resource);"#,
    )
    .unwrap();
    assert!(
        eventually(std::time::Duration::from_secs(10), || async {
            call(&p, "DELETE", "/things/1", &t, "").await.status == 200
        })
        .await,
        "the new policy applies after the reload"
    );
    // A broken policy file keeps the running policies.
    std::fs::write(&policies, "permit (principal, action, resource").unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(call(&p, "DELETE", "/things/1", &t, "").await.status, 200);
    assert!(
        p.log().contains("p.cedar"),
        "the failed reload names the file"
    );
}

#[tokio::test]
async fn an_mcp_server_never_sees_the_clients_token_in_a_cookie_either() {
    let mcp = McpServer::start().await;
    let dir = example_dir(&["jwks.json"]);
    let config = format!(
        r#"upstreams:
  mcp: {{targets: ["{}"]}}
auth:
  issuers:
    local: {{issuer: "https://id.fitness.test", jwks_file: jwks.json, algorithms: [ES256], audiences: [fitness-api]}}
routes:
  - name: mcp
    upstream: mcp
    policy:
      auth: {{token: "cookie:at"}}
      mcp: true
"#,
        mcp.addr
    );
    let p = Palisade::start_in(dir, &config, false).await;
    let t = mint("alice", &[], "", "fitness-api", &[]);
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let req = format!(
        "POST /mcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCookie: theme=dark; at={t}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = raw_request(p.addr, req.as_bytes()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body_string());
    let seen = mcp.seen();
    let cookie = seen
        .last()
        .unwrap()
        .header("cookie")
        .unwrap_or("")
        .to_string();
    assert_eq!(cookie, "theme=dark");
    assert!(!seen
        .last()
        .unwrap()
        .headers
        .iter()
        .any(|(_, v)| v.contains(&t)));
}

#[tokio::test]
async fn authorization_config_errors_name_file_and_line() {
    let dir = example_dir(&["jwks.json", "fitness.cedarschema", "palisade.yaml"]);
    let policies = std::fs::read_to_string(repo_path("examples/fitness/policies.cedar")).unwrap();
    // A typo in an attribute: the schema check finds it at its line.
    let broken = policies.replacen("principal.sub };", "principal.sbu };", 1);
    let line = broken
        .lines()
        .position(|l| l.contains("principal.sbu"))
        .unwrap()
        + 1;
    std::fs::write(dir.path().join("policies.cedar"), &broken).unwrap();
    let config = dir.path().join("palisade.yaml");
    let (code, out, err) = run_cli(&["check", "--config", config.to_str().unwrap()]);
    assert_ne!(code, 0);
    let all = format!("{out}{err}");
    assert!(
        all.contains(&format!("policies.cedar:{line}:")) && all.contains("sbu"),
        "{all}"
    );
    // A syntax error.
    std::fs::write(
        dir.path().join("policies.cedar"),
        format!("{policies}\npermit (principal, action, resource) when {{ 1 + }};\n"),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check", "--config", config.to_str().unwrap()]);
    assert_ne!(code, 0);
    let all = format!("{out}{err}");
    let syntax_line = policies.lines().count() + 2;
    assert!(
        all.contains(&format!("policies.cedar:{syntax_line}:")),
        "{all}"
    );
    // An operation whose action the schema does not declare: at its line in the config.
    std::fs::write(dir.path().join("policies.cedar"), &policies).unwrap();
    let yaml = std::fs::read_to_string(&config)
        .unwrap()
        .replace("path: /socials/feed", "path: /socials/fed");
    let op_line = yaml
        .lines()
        .position(|l| l.contains("path: /socials/fed"))
        .unwrap()
        + 1;
    std::fs::write(&config, yaml).unwrap();
    let (code, out, err) = run_cli(&["check", "--config", config.to_str().unwrap()]);
    assert_ne!(code, 0);
    let all = format!("{out}{err}");
    assert!(
        all.contains(&format!("palisade.yaml:{op_line}:"))
            && all.contains("action \"GET /socials/fed\" is not declared in the Cedar schema"),
        "{all}"
    );
}

/// A loopback MCP server (Streamable HTTP): `tools/list` lists two tools (as an event stream
/// when the request id is `"sse"`), `tools/call` answers with the arguments, anything else
/// with an empty result. Records what it receives.
struct McpServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
}

impl McpServer {
    async fn start() -> McpServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = Arc::clone(&seen2);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let seen = Arc::clone(&seen);
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            seen.lock()
                                .unwrap()
                                .push(SeenRequest::new(&parts, body.clone()));
                            let msg: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            let id = msg.get("id").cloned().unwrap_or(Value::Null);
                            let result = match msg["method"].as_str() {
                                Some("tools/list") => json!({"tools": [
                                    {"name": "get_activities", "description": "A user's activities",
                                     "inputSchema": {"type": "object", "properties": {"user": {"type": "string"}}}},
                                    {"name": "delete_route", "description": "Deletes a route",
                                     "inputSchema": {"type": "object"}},
                                    {"name": "log_workout", "description": "Logs a workout",
                                     "inputSchema": {"type": "object", "required": ["minutes"],
                                                     "properties": {"minutes": {"type": "integer"}}}},
                                ]}),
                                Some("tools/call") => {
                                    json!({"content": [{"type": "text", "text": msg["params"]["arguments"].to_string()}]})
                                }
                                _ => json!({}),
                            };
                            let answer = json!({"jsonrpc": "2.0", "id": id, "result": result});
                            let resp = if id == "sse" {
                                Response::builder()
                                    .header("content-type", "text/event-stream")
                                    .body(Full::new(Bytes::from(format!(
                                        "event: message\ndata: {answer}\n\n"
                                    ))))
                            } else {
                                Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(answer.to_string())))
                            };
                            Ok::<_, Infallible>(resp.unwrap())
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        McpServer { addr, seen }
    }

    fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }
}
