//! `palisade geoip build`: writes MaxMind DB (`.mmdb`) files from CSV, in the same record
//! layout as MaxMind's GeoLite2 databases, so Palisade (and MaxMind's own readers) read them
//! exactly like the real ones. Used for the project's test databases and for private ranges.
//!
//! CSV formats (a header row is optional; `#` lines are comments):
//! - country: `network,country_iso_code` → `{"country": {"iso_code": "DE"}}`
//! - asn: `network,asn,org` → `{"autonomous_system_number": 64500, "autonomous_system_organization": "…"}`

use std::collections::BTreeMap;
use std::path::Path;

use ipnet::IpNet;
use mmdb_writer::Writer;
use serde::Serialize;

use super::geo::CountryCode;
use super::ipset::parse_cidr;

/// Which database to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GeoDbKind {
    /// `network,country_iso_code` → a GeoLite2-Country-shaped database.
    Country,
    /// `network,asn,org` → a GeoLite2-ASN-shaped database.
    Asn,
}

/// Why a database could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GeoBuildError {
    /// The CSV could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: csv::Error,
    },
    /// A row is malformed.
    #[error("{path}:{line}: {message}")]
    Row {
        /// The file.
        path: String,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// The writer rejected the data.
    #[error("{path}: cannot build the database: {message}")]
    Write {
        /// The output file.
        path: String,
        /// Why.
        message: String,
    },
}

#[derive(Serialize)]
struct IsoCode<'a> {
    iso_code: &'a str,
}

#[derive(Serialize)]
struct CountryRecord<'a> {
    country: IsoCode<'a>,
}

#[derive(Serialize)]
struct AsnRecord<'a> {
    autonomous_system_number: u32,
    autonomous_system_organization: &'a str,
}

/// Builds `out` from the CSV at `csv_path`. Returns the number of networks written.
pub fn build(kind: GeoDbKind, csv_path: &Path, out: &Path) -> Result<usize, GeoBuildError> {
    let name = csv_path.display().to_string();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_path(csv_path)
        .map_err(|source| GeoBuildError::Read {
            path: name.clone(),
            source,
        })?;
    let (db_type, description) = match kind {
        GeoDbKind::Country => ("GeoLite2-Country", "Palisade-built country database"),
        GeoDbKind::Asn => ("GeoLite2-ASN", "Palisade-built ASN database"),
    };
    let mut writer = Writer::builder(db_type)
        .description(&[("en", description)])
        .build();
    let mut count = 0;
    let mut seen: BTreeMap<IpNet, u64> = BTreeMap::new();
    for (i, row) in reader.records().enumerate() {
        let row = row.map_err(|source| GeoBuildError::Read {
            path: name.clone(),
            source,
        })?;
        let line = row.position().map(|p| p.line()).unwrap_or(i as u64 + 1);
        let err = |message: String| GeoBuildError::Row {
            path: name.clone(),
            line,
            message,
        };
        let network_text = row.get(0).unwrap_or("");
        let Some(network) = parse_cidr(network_text) else {
            if i == 0 {
                continue; // a header row such as `network,country_iso_code`
            }
            return Err(err(format!(
                "invalid network {network_text:?}: expected a CIDR such as 192.0.2.0/24"
            )));
        };
        if let Some(first) = seen.insert(network, line) {
            return Err(err(format!(
                "network {network} is listed twice (first on line {first})"
            )));
        }
        let result = match kind {
            GeoDbKind::Country => {
                let code = row.get(1).unwrap_or("");
                let cc = CountryCode::parse(code).ok_or_else(|| {
                    err(format!(
                        "invalid country code {code:?}: expected two letters such as DE"
                    ))
                })?;
                writer.insert(
                    network,
                    &CountryRecord {
                        country: IsoCode {
                            iso_code: cc.as_str(),
                        },
                    },
                )
            }
            GeoDbKind::Asn => {
                let asn_text = row.get(1).unwrap_or("");
                let asn: u32 = asn_text.trim_start_matches("AS").parse().map_err(|_| {
                    err(format!(
                        "invalid ASN {asn_text:?}: expected a number such as 64500"
                    ))
                })?;
                let org = row.get(2).unwrap_or("");
                writer.insert(
                    network,
                    &AsnRecord {
                        autonomous_system_number: asn,
                        autonomous_system_organization: org,
                    },
                )
            }
        };
        result.map_err(|e| err(format!("cannot insert {network}: {e}")))?;
        count += 1;
    }
    let write_err = |message: String| GeoBuildError::Write {
        path: out.display().to_string(),
        message,
    };
    let bytes = writer.to_bytes().map_err(|e| write_err(e.to_string()))?;
    std::fs::write(out, bytes).map_err(|e| write_err(e.to_string()))?;
    Ok(count)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use crate::identity::geo::GeoDb;

    #[test]
    fn built_databases_read_back_like_geolite2() {
        let dir = tempfile::tempdir().unwrap();
        let (c_csv, a_csv) = (dir.path().join("c.csv"), dir.path().join("a.csv"));
        std::fs::write(
            &c_csv,
            "network,country_iso_code\n192.0.2.0/24,de\n2001:db8:1::/48,JP\n",
        )
        .unwrap();
        std::fs::write(
            &a_csv,
            "# comment\n198.51.100.0/24,64500,\"Example, Inc.\"\n",
        )
        .unwrap();
        let (c_db, a_db) = (dir.path().join("c.mmdb"), dir.path().join("a.mmdb"));
        assert_eq!(build(GeoDbKind::Country, &c_csv, &c_db).unwrap(), 2);
        assert_eq!(build(GeoDbKind::Asn, &a_csv, &a_db).unwrap(), 1);
        let db = GeoDb::open(Some(&c_db), Some(&a_db)).unwrap();
        let g = db.lookup("192.0.2.77".parse().unwrap());
        assert_eq!(g.country.unwrap().as_str(), "DE");
        assert_eq!(g.asn, None);
        let g = db.lookup("2001:db8:1:2::3".parse().unwrap());
        assert_eq!(g.country.unwrap().as_str(), "JP");
        let g = db.lookup("198.51.100.1".parse().unwrap());
        assert_eq!((g.country, g.asn), (None, Some(64500)));
        // IPv4-mapped IPv6 reaches the IPv4 data through the aliases.
        let g = db.lookup("::ffff:192.0.2.1".parse().unwrap());
        assert_eq!(g.country.unwrap().as_str(), "DE");
    }

    #[test]
    fn bad_rows_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("c.csv");
        std::fs::write(&csv, "192.0.2.0/24,DE\n10.0.0.0/8,Germany\n").unwrap();
        let e = build(GeoDbKind::Country, &csv, &dir.path().join("x.mmdb"))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with(
                "c.csv:2: invalid country code \"Germany\": expected two letters such as DE"
            ),
            "{e}"
        );
        std::fs::write(&csv, "192.0.2.0/24,DE\nnope,DE\n").unwrap();
        let e = build(GeoDbKind::Country, &csv, &dir.path().join("x.mmdb"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.csv:2: invalid network \"nope\""), "{e}");
    }
}
