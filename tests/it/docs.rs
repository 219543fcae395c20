//! The documentation stays true: every configuration variable the code
//! reads is in the README's table and the config module's docs, and no table
//! lists one the code does not read.

use std::collections::BTreeSet;

fn table_vars(text: &str, line_prefix: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(line_prefix))
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|v| v.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(str::to_owned)
        .collect()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn configuration_tables_match_the_code() {
    let source = read("src/config.rs");
    let in_docs = table_vars(&source, "//! ");
    let readme = read("README.md");
    let section = readme
        .split("## Configuration")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a Configuration section");
    let in_readme = table_vars(section, "");
    // Variables the code reads: upper-case string literals outside the tests.
    let code = source.split("#[cfg(test)]").next().unwrap();
    let read_by_code: BTreeSet<String> = code
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.contains('_')
                && s.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_owned)
        .collect();
    assert_eq!(in_docs, in_readme, "config.rs docs vs README");
    assert_eq!(read_by_code, in_docs, "read by the code vs documented");
    assert!(
        in_docs.contains("DATABASE_URL") && in_docs.len() >= 8,
        "{in_docs:?}"
    );
}
