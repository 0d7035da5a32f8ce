//! IP set cost with a large list: load time of a 1,000,000-line CIDR file (parse, sort,
//! merge) and the per-request lookup for IPv4/IPv6, hit and miss.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use palisade::identity::ipset::{IpSet, IpSetBuilder};

/// xorshift64*: deterministic, dependency-free pseudo-random numbers for fixtures.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One million lines: 90% IPv4 (/16–/32), 10% IPv6 (/32–/128), some comments and blanks.
fn write_list(path: &std::path::Path) {
    let mut rng = Rng(0x5eed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "# generated block list").unwrap();
    for i in 0..1_000_000u32 {
        let r = rng.next();
        if i % 10 == 9 {
            let a = Ipv6Addr::from(((r as u128) << 64) | rng.next() as u128);
            writeln!(f, "{a}/{}", 32 + (r % 97)).unwrap();
        } else {
            let a = Ipv4Addr::from((r >> 32) as u32);
            writeln!(f, "{a}/{}", 16 + (r % 17)).unwrap();
        }
    }
}

fn load(path: &std::path::Path) -> IpSet {
    let mut b = IpSetBuilder::new();
    b.add_file(path).unwrap();
    b.build()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("list.txt");
    write_list(&path);

    let mut g = c.benchmark_group("ipset_load");
    g.sample_size(10);
    g.bench_function("1m_lines_file", |b| b.iter(|| black_box(load(&path))));
    g.finish();

    let set = load(&path);
    let (v4, v6) = set.range_counts();
    eprintln!("1M lines -> {v4} IPv4 ranges, {v6} IPv6 ranges after merging");
    let mut rng = Rng(42);
    let probes_v4: Vec<IpAddr> = (0..4096)
        .map(|_| IpAddr::V4(Ipv4Addr::from(rng.next() as u32)))
        .collect();
    let probes_v6: Vec<IpAddr> = (0..4096)
        .map(|_| {
            IpAddr::V6(Ipv6Addr::from(
                ((rng.next() as u128) << 64) | rng.next() as u128,
            ))
        })
        .collect();
    let hits = probes_v4.iter().filter(|ip| set.contains(**ip)).count();
    eprintln!("random IPv4 probes hitting the set: {hits}/4096");
    let mut i = 0;
    c.bench_function("ipset_lookup_v4_random_1m", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(set.contains(black_box(probes_v4[i])))
        })
    });
    c.bench_function("ipset_lookup_v6_random_1m", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(set.contains(black_box(probes_v6[i])))
        })
    });
}

fn bench_geo(c: &mut Criterion) {
    use palisade::identity::geo::GeoDb;
    use palisade::identity::geo_build::{build, GeoDbKind};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let (c_db, a_db) = (dir.path().join("c.mmdb"), dir.path().join("a.mmdb"));
    build(
        GeoDbKind::Country,
        &root.join("geoip/test-country.csv"),
        &c_db,
    )
    .unwrap();
    build(GeoDbKind::Asn, &root.join("geoip/test-asn.csv"), &a_db).unwrap();
    let db = GeoDb::open(Some(&c_db), Some(&a_db)).unwrap();
    let hit: IpAddr = "192.0.2.10".parse().unwrap();
    let miss: IpAddr = "10.1.2.3".parse().unwrap();
    c.bench_function("geo_lookup_country_asn_hit", |b| {
        b.iter(|| black_box(db.lookup(black_box(hit))))
    });
    c.bench_function("geo_lookup_country_asn_miss", |b| {
        b.iter(|| black_box(db.lookup(black_box(miss))))
    });
}

criterion_group!(benches, bench, bench_geo);
criterion_main!(benches);
