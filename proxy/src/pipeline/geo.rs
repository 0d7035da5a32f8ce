//! Pipeline stage `geo` (header phase): country and ASN allow/deny, on the geo data resolved
//! for the client before the stages run.

use super::{Block, Decision, RequestView, Stage, StageKind};
use crate::config::{AsnPolicy, GeoPolicy, ListMode};

/// A route's country and ASN lists, compiled.
pub struct GeoStage {
    geo: Option<GeoPolicy>,
    asn: Option<AsnPolicy>,
}

impl GeoStage {
    /// The stage for a route; `None` when the route has neither policy.
    pub fn new(geo: Option<GeoPolicy>, asn: Option<AsnPolicy>) -> Option<GeoStage> {
        (geo.is_some() || asn.is_some()).then_some(GeoStage { geo, asn })
    }
}

/// Whether a (possibly unknown) value passes a list: lists are short, a scan is cheapest.
fn passes<T: PartialEq>(list: &ListMode<T>, value: Option<&T>, block_unknown: bool) -> bool {
    match (list, value) {
        (_, None) => !block_unknown,
        (ListMode::Allow(a), Some(v)) => a.contains(v),
        (ListMode::Deny(d), Some(v)) => !d.contains(v),
    }
}

impl Stage for GeoStage {
    fn kind(&self) -> StageKind {
        StageKind::Geo
    }

    fn evaluate(&self, req: &RequestView<'_>) -> Decision {
        let country_ok = self
            .geo
            .as_ref()
            .is_none_or(|p| passes(&p.countries, req.geo.country.as_ref(), p.block_unknown));
        let asn_ok = self
            .asn
            .as_ref()
            .is_none_or(|p| passes(&p.asns, req.geo.asn.as_ref(), p.block_unknown));
        if country_ok && asn_ok {
            Decision::Continue
        } else {
            Decision::Block(Block {
                status: 403,
                reason: "geo_denied".into(),
                headers: vec![],
                details: None,
            })
        }
    }
}
