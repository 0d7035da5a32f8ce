//! Rules step 1 (parse), for the shipped "managed" rule sets: the YAML files of `rulesets/`
//! compiled into the binary, so `rulesets: [builtin:managed]` (and the embedded default
//! config) work from any directory. `palisade test rulesets/` tests the same files on disk.

/// The reference that selects every managed rule set in a config's `rulesets` list.
pub const BUILTIN_MANAGED: &str = "builtin:managed";

/// (file name, YAML text) of every managed rule set, in priority order.
pub const MANAGED_RULESETS: &[(&str, &str)] = &[
    ("core.yaml", include_str!("../../../rulesets/core.yaml")),
    (
        "known-bad-inputs.yaml",
        include_str!("../../../rulesets/known-bad-inputs.yaml"),
    ),
    ("sqli.yaml", include_str!("../../../rulesets/sqli.yaml")),
    ("xss.yaml", include_str!("../../../rulesets/xss.yaml")),
    (
        "lfi-rfi.yaml",
        include_str!("../../../rulesets/lfi-rfi.yaml"),
    ),
    ("rce.yaml", include_str!("../../../rulesets/rce.yaml")),
    (
        "injection.yaml",
        include_str!("../../../rulesets/injection.yaml"),
    ),
];

/// Names of the managed rule sets (their `name:`), in priority order: what the embedded
/// default config attaches to its route.
pub const MANAGED_NAMES: &[&str] = &[
    "core",
    "known-bad-inputs",
    "sqli",
    "xss",
    "lfi-rfi",
    "rce",
    "injection",
];
