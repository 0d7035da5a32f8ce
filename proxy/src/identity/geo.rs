//! Geo resolution (before the `geo` stage): country and ASN of the client address from MaxMind
//! databases (GeoLite2/GeoIP2 Country or City, and ASN), read with the `maxminddb` crate.
//! Databases are loaded into memory once at start; a lookup walks the search tree (a few
//! hundred nanoseconds) and decodes only the one field needed.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use maxminddb::{path, Reader};

/// An ISO 3166-1 alpha-2 country code, upper case (`US`, `DE`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountryCode([u8; 2]);

impl CountryCode {
    /// Parses two ASCII letters (any case).
    pub fn parse(s: &str) -> Option<CountryCode> {
        match s.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => Some(CountryCode([
                a.to_ascii_uppercase(),
                b.to_ascii_uppercase(),
            ])),
            _ => None,
        }
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        // Always two ASCII letters by construction.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is known of a client's location.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientGeo {
    /// Country, if the database knows the address.
    pub country: Option<CountryCode>,
    /// Autonomous system number, if known.
    pub asn: Option<u32>,
}

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot open MaxMind database: {source}")]
pub struct GeoDbError {
    /// The file.
    pub path: String,
    /// Why.
    pub source: maxminddb::MaxMindDbError,
}

/// Country and ASN databases.
pub struct GeoDb {
    country: Option<Reader<Vec<u8>>>,
    asn: Option<Reader<Vec<u8>>>,
}

impl fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind =
            |r: &Option<Reader<Vec<u8>>>| r.as_ref().map(|r| r.metadata().database_type.clone());
        f.debug_struct("GeoDb")
            .field("country", &kind(&self.country))
            .field("asn", &kind(&self.asn))
            .finish()
    }
}

fn open(path: &Path) -> Result<Reader<Vec<u8>>, GeoDbError> {
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return Err(GeoDbError {
            path: path.display().to_string(),
            source: maxminddb::MaxMindDbError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            )),
        });
    }
    Reader::open_readfile(path).map_err(|source| GeoDbError {
        path: path.display().to_string(),
        source,
    })
}

impl GeoDb {
    /// Opens the databases (either may be absent).
    pub fn open(country: Option<&Path>, asn: Option<&Path>) -> Result<GeoDb, GeoDbError> {
        Ok(GeoDb {
            country: country.map(open).transpose()?,
            asn: asn.map(open).transpose()?,
        })
    }

    /// Whether a country database is loaded.
    pub fn has_country(&self) -> bool {
        self.country.is_some()
    }

    /// Whether an ASN database is loaded.
    pub fn has_asn(&self) -> bool {
        self.asn.is_some()
    }

    /// Looks `ip` up in both databases. Lookup errors (a corrupt record) read as "unknown".
    pub fn lookup(&self, ip: IpAddr) -> ClientGeo {
        let country = self.country.as_ref().and_then(|r| {
            let found = r.lookup(ip).ok()?;
            let code: Option<&str> = found
                .decode_path(&path!["country", "iso_code"])
                .ok()
                .flatten()
                .or_else(|| {
                    found
                        .decode_path(&path!["registered_country", "iso_code"])
                        .ok()
                        .flatten()
                });
            code.and_then(CountryCode::parse)
        });
        let asn = self.asn.as_ref().and_then(|r| {
            r.lookup(ip)
                .ok()?
                .decode_path::<u32>(&path!["autonomous_system_number"])
                .ok()
                .flatten()
        });
        ClientGeo { country, asn }
    }
}
