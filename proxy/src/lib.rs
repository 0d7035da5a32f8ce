//! Palisade: an edge request-validation and WAF reverse proxy on pingora.
//!
//! Folder map (where a request can be blocked, from folder names alone):
//! - [`config`]: `palisade.yaml` → validated [`config::Config`]
//! - [`pipeline`]: the ordered inspection stages and the per-request context
//! - [`snapshot`]: the compiled, immutable runtime form of a config
//! - [`server`]: pingora glue (proxy phases, upstreams, admin, demo backend)
//! - [`metrics`]: every metric name

pub mod config;
pub mod identity;
pub mod metrics;
pub mod pipeline;
pub mod ratelimit;
pub mod rules;
pub mod schema;
pub mod server;
pub mod snapshot;
