//! The shipped JSON Schema of `palisade.yaml` accepts every shipped config and rejects the
//! mistakes editors should flag.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(root().join("schemas/palisade-config.schema.json")).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

fn yaml(text: &str) -> serde_json::Value {
    serde_saphyr::from_str(text).unwrap()
}

#[test]
fn shipped_configs_are_valid() {
    let v = validator();
    let mut files = vec![
        root().join("proxy/src/config/default.yaml"),
        root().join("examples/fitness/palisade.yaml"),
    ];
    for e in std::fs::read_dir(root().join("examples")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            files.push(p);
        }
    }
    for f in files {
        let doc = yaml(&std::fs::read_to_string(&f).unwrap());
        let errors: Vec<String> = v.iter_errors(&doc).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", f.display());
    }
}

#[test]
fn schema_flags_typos_and_bad_values() {
    let v = validator();
    for bad in [
        "listners: []\n",
        "routes:\n  - name: a\n    upstream: b\n    polcy: {}\n",
        "timeouts:\n  upstream_read: 5\n",
        "body:\n  oversize: maybe\n",
        "routes:\n  - name: a\n    upstream: b\n    policy: {deny: {status: 99}}\n",
    ] {
        assert!(!v.is_valid(&yaml(bad)), "schema accepted: {bad}");
    }
}
