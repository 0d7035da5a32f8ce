//! Palisade: an edge request-validation and WAF reverse proxy on pingora.
//!
//! Data flows one way: parse → check ([`config`]) → compile ([`compile`]) → snapshot
//! ([`snapshot`]) → swap ([`server::reload`]). Folder map (where a request can be blocked,
//! from folder names alone):
//! - [`config`]: `palisade.yaml` → checked, plain [`config::Config`]; the located error type
//! - [`compile`]: `Config` → [`snapshot::Snapshot`] (files read, everything compiled)
//! - [`request`]: the one request model, parsed lazily and at most once per request
//! - [`pipeline`]: the stage abstraction, the stage order, and the access/ip/geo stages
//! - [`ratelimit`], [`rules`], [`schema`]: the rate-limit, rules and validate stages
//! - [`upstream`]: upstream groups, health
//! - [`server`]: pingora glue (proxy phases, admin, reload, demo backend)
//! - [`metrics`]: every metric name
//!
//! Module dependencies point one way: `config` ← `request`/`identity` ← `pipeline` ← stages ←
//! `snapshot` ← `compile` ← `server`.

pub mod auth;
pub mod authz;
pub mod compile;
pub mod config;
pub mod decisions;
pub mod files;
pub mod identity;
pub mod mcp;
pub mod metrics;
pub mod pipeline;
pub mod ratelimit;
pub mod request;
pub mod rules;
pub mod schema;
pub mod server;
pub mod snapshot;
pub mod tls;
pub mod upstream;
