//! Pipeline stage `geo` (header phase): country and ASN allow/deny, on the geo data looked up
//! for the client before the stages run (only for routes whose stages need it).

use super::{Block, Decision, Eval, Needs, Notes, Stage, StageKind};
use crate::identity::geo::CountryCode;
use crate::request::Request;

/// Whether a list admits only its members or blocks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListMode<T> {
    /// Only these are admitted.
    Allow(Vec<T>),
    /// These are blocked.
    Deny(Vec<T>),
}

/// A route's country policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeoPolicy {
    /// The list.
    pub countries: ListMode<CountryCode>,
    /// Whether an unknown country is blocked.
    pub block_unknown: bool,
}

/// A route's ASN policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsnPolicy {
    /// The list.
    pub asns: ListMode<u32>,
    /// Whether an unknown ASN is blocked.
    pub block_unknown: bool,
}

/// Country and ASN allow/deny.
pub struct GeoStage {
    geo: Option<GeoPolicy>,
    asn: Option<AsnPolicy>,
}

impl GeoStage {
    /// The stage of the policies, `None` without any.
    pub fn new(geo: Option<GeoPolicy>, asn: Option<AsnPolicy>) -> Option<GeoStage> {
        (geo.is_some() || asn.is_some()).then_some(GeoStage { geo, asn })
    }
}

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

    fn needs(&self) -> Needs {
        Needs {
            body: false,
            geo: true,
        }
    }

    fn evaluate<'s>(&'s self, req: &Request<'_>, _: &mut Notes) -> Eval<'s> {
        let country_ok = self
            .geo
            .as_ref()
            .is_none_or(|p| passes(&p.countries, req.country.as_ref(), p.block_unknown));
        let asn_ok = self
            .asn
            .as_ref()
            .is_none_or(|p| passes(&p.asns, req.asn.as_ref(), p.block_unknown));
        Eval::Done(if country_ok && asn_ok {
            Decision::Continue
        } else {
            Decision::Block(Block::new(403, "geo_denied"))
        })
    }
}
