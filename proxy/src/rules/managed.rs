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

/// (path relative to `rulesets/`, text) of the data files the managed rule sets read with
/// `phrases_file` or `{{list:FILE}}` in a regex (word lists: class names, commands, file
/// paths), embedded with them.
pub const MANAGED_DATA: &[(&str, &str)] = &[
    (
        "data/java-classes.txt",
        include_str!("../../../rulesets/data/java-classes.txt"),
    ),
    (
        "data/java-classes-common.txt",
        include_str!("../../../rulesets/data/java-classes-common.txt"),
    ),
    (
        "data/unix-commands.txt",
        include_str!("../../../rulesets/data/unix-commands.txt"),
    ),
    (
        "data/unix-commands-common.txt",
        include_str!("../../../rulesets/data/unix-commands-common.txt"),
    ),
    (
        "data/php-functions.txt",
        include_str!("../../../rulesets/data/php-functions.txt"),
    ),
    (
        "data/php-functions-common.txt",
        include_str!("../../../rulesets/data/php-functions-common.txt"),
    ),
    (
        "data/sql-functions.txt",
        include_str!("../../../rulesets/data/sql-functions.txt"),
    ),
    (
        "data/windows-commands.txt",
        include_str!("../../../rulesets/data/windows-commands.txt"),
    ),
    (
        "data/sensitive-files.txt",
        include_str!("../../../rulesets/data/sensitive-files.txt"),
    ),
    (
        "data/sensitive-web-files.txt",
        include_str!("../../../rulesets/data/sensitive-web-files.txt"),
    ),
    (
        "data/session-cookie-names.txt",
        include_str!("../../../rulesets/data/session-cookie-names.txt"),
    ),
];

/// The embedded data file at `path` (as a managed rule set names it), if any.
pub fn data_file(path: &str) -> Option<&'static str> {
    MANAGED_DATA
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, text)| *text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// Every data file under `rulesets/data/` is embedded (a file added on disk but not
    /// here would make the built-in sets fail to load).
    #[test]
    fn every_data_file_is_embedded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rulesets/data");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| format!("data/{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = MANAGED_DATA.iter().map(|(p, _)| p.to_string()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded);
        for (p, text) in MANAGED_DATA {
            assert_eq!(
                std::fs::read_to_string(dir.join(p.trim_start_matches("data/"))).unwrap(),
                *text
            );
        }
    }
}
