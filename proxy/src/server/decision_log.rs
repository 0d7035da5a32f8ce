//! Decision-log lines: one JSON object per blocked or counted request (and per sampled
//! allowed one), built at the end of the request from its context, in the spirit of AWS
//! WAF's logs. Redacted headers and query parameters are never written in clear.

use std::cell::Cell;
use std::time::SystemTime;

use pingora::proxy::Session;
use serde_json::{Map, Value};

use super::ctx::{Outcome, RequestCtx};
use crate::config::DecisionLog;

/// What the log line says was done.
pub(crate) fn action(ctx: &RequestCtx, sample: f64) -> Option<&'static str> {
    match &ctx.outcome {
        Outcome::Blocked { .. } => Some("block"),
        Outcome::Forwarded if !ctx.notes.counted.is_empty() => Some("count"),
        Outcome::Forwarded if sample > 0.0 && sampled(sample) => Some("allow"),
        _ => None,
    }
}

/// A cheap per-thread random draw (xorshift): sampling needs no cryptographic randomness.
fn sampled(p: f64) -> bool {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 | 1)
                .unwrap_or(0x9e37_79b9_7f4a_7c15),
        );
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        ((x >> 11) as f64 / (1u64 << 53) as f64) < p
    })
}

const REDACTED: &str = "[redacted]";

/// The query string with the values of redacted parameters replaced.
fn redact_query(query: &str, names: &[String]) -> String {
    if names.is_empty() {
        return query.to_string();
    }
    query
        .split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decoded = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
            if names.iter().any(|n| *n == decoded) && !v.is_empty() {
                format!("{k}={REDACTED}")
            } else {
                pair.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The JSON line for a request.
pub(crate) fn line(
    session: &Session,
    ctx: &RequestCtx,
    log: &DecisionLog,
    action: &str,
    status: u16,
) -> String {
    let req = session.req_header();
    let snapshot = &ctx.snapshot;
    let route = ctx
        .route
        .and_then(|i| snapshot.routes.get(i))
        .map(|r| r.name.as_str());
    let mut o = Map::new();
    o.insert(
        "timestamp".into(),
        humantime::format_rfc3339_millis(SystemTime::now())
            .to_string()
            .into(),
    );
    o.insert("request_id".into(), ctx.request_id.to_string().into());
    o.insert("generation".into(), snapshot.generation.into());
    o.insert("action".into(), action.into());
    o.insert("status".into(), status.into());
    o.insert(
        "client_ip".into(),
        ctx.client_ip.map(|i| i.to_string()).into(),
    );
    if let Some(c) = &ctx.geo.country {
        o.insert("country".into(), c.to_string().into());
    }
    if let Some(a) = ctx.geo.asn {
        o.insert("asn".into(), a.into());
    }
    o.insert("method".into(), req.method.as_str().into());
    o.insert("host".into(), ctx.authority.host.clone().into());
    o.insert("path".into(), req.uri.path().into());
    if let Some(q) = req.uri.query() {
        o.insert("query".into(), redact_query(q, &log.redact_query).into());
    }
    o.insert("route".into(), route.into());
    // The token's subject and client, never the token (it is in `headers`, redacted).
    let view = crate::request::Request::of_head(req, &ctx.cache);
    for claim in ["sub", "client_id"] {
        if let Some(v) = view.claim(claim) {
            o.insert(format!("token_{claim}"), v.into_owned().into());
        }
    }
    if let Outcome::Blocked {
        stage,
        reason,
        details,
        ..
    } = &ctx.outcome
    {
        let mut t = Map::new();
        t.insert("stage".into(), stage.name().into());
        t.insert("reason".into(), reason.to_string().into());
        // The match that decided: the blocking rule (or the limit) of that stage.
        let kind = match stage {
            crate::pipeline::StageKind::Rules => Some("rule"),
            crate::pipeline::StageKind::RateLimit => Some("rate_limit"),
            _ => None,
        };
        if let Some(m) = kind.and_then(|k| {
            ctx.notes
                .matches
                .iter()
                .rev()
                .find(|m| m.kind == k && m.action == "block")
        }) {
            if !m.set.is_empty() {
                t.insert("rule_set".into(), m.set.clone().into());
            }
            t.insert("rule".into(), m.rule.clone().into());
        }
        if let Some(d) = details {
            let key = if *stage == crate::pipeline::StageKind::Validate {
                "validation"
            } else {
                "details"
            };
            t.insert(key.into(), Value::Object(d.fields.clone()));
        }
        o.insert("terminating".into(), Value::Object(t));
    }
    if !ctx.notes.matches.is_empty() {
        o.insert(
            "matches".into(),
            serde_json::to_value(&ctx.notes.matches).unwrap_or(Value::Null),
        );
    }
    if !ctx.notes.counted.is_empty() {
        o.insert(
            "labels".into(),
            ctx.notes
                .counted
                .iter()
                .map(|l| Value::from(l.as_ref()))
                .collect(),
        );
    }
    let declared = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let inspected = ctx.body.as_ref().map_or(0, |b| b.len());
    o.insert(
        "body_bytes".into(),
        declared.unwrap_or(inspected as u64).into(),
    );
    o.insert("inspected_bytes".into(), inspected.into());
    if let Some(d) = ctx.inspection {
        o.insert(
            "inspection_us".into(),
            (d.as_micros().min(u128::from(u64::MAX)) as u64).into(),
        );
    }
    let mut headers = Map::new();
    for (name, value) in req.headers.iter() {
        let n = name.as_str();
        let v = if log.redact_headers.iter().any(|r| r == n) {
            REDACTED.to_string()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        match headers.get_mut(n) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&v);
            }
            _ => {
                headers.insert(n.to_string(), v.into());
            }
        }
    }
    o.insert("headers".into(), Value::Object(headers));
    if let Some(t) = ctx.tls() {
        let mut tls = Map::new();
        tls.insert("version".into(), t.version.clone().into());
        tls.insert("ja3".into(), t.ja3.clone().into());
        tls.insert("ja4".into(), t.ja4.clone().into());
        if let Some(s) = &t.sni {
            tls.insert("sni".into(), s.clone().into());
        }
        if let Some(s) = &t.client_subject {
            tls.insert("client_subject".into(), s.clone().into());
        }
        o.insert("tls".into(), Value::Object(tls));
    }
    // serde_json escapes control characters and quotes: a snippet cannot break the line.
    Value::Object(o).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacted_query_parameters_keep_their_names() {
        let names = vec!["token".to_string()];
        assert_eq!(
            super::redact_query("a=1&token=s3cr3t&b=&tok%65n=x", &names),
            "a=1&token=[redacted]&b=&tok%65n=[redacted]"
        );
        assert_eq!(super::redact_query("a=1", &[]), "a=1");
    }

    #[test]
    fn sampling_follows_the_fraction() {
        let n = (0..20_000).filter(|_| super::sampled(0.1)).count();
        assert!((1_500..2_500).contains(&n), "{n}");
        assert_eq!((0..1000).filter(|_| super::sampled(0.0)).count(), 0);
    }
}
