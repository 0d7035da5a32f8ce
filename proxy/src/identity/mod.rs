//! Client identity at the edge, resolved before the pipeline's stages: the client IP (behind
//! trusted proxies), IP sets, and country/ASN from MaxMind databases.

pub mod client_ip;
pub mod geo;
pub mod geo_build;
pub mod ipset;
