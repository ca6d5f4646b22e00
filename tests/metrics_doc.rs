//! The metrics table in `docs/operations.md` stays true to the code: every
//! metric the code records (`counter!`, `gauge!`, `histogram!` with a
//! literal name, or a `…_METRIC` constant) has a row, and every row names a
//! metric the code records. Labels are written in the table as `{label}`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const DOC: &str = "docs/operations.md";

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            found.push(path);
        }
    }
}

/// The string literal that starts right after `marker`, if any.
fn literal_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
    text.match_indices(marker)
        .filter_map(|(at, _)| {
            let rest = text[at + marker.len()..].trim_start();
            let rest = rest.strip_prefix('"')?;
            Some(&rest[..rest.find('"')?])
        })
        .collect()
}

fn metrics_in_code() -> BTreeSet<String> {
    let mut files = Vec::new();
    rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    let mut names = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for marker in ["counter!(", "gauge!(", "histogram!(", "_METRIC: &str ="] {
            names.extend(literal_after(&text, marker).into_iter().map(str::to_owned));
        }
    }
    names
}

fn metrics_in_doc() -> BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(DOC)).unwrap();
    let section = text
        .split("\n## Metrics\n")
        .nth(1)
        .expect("docs/operations.md has a ## Metrics section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .map(|rest| {
            let name = &rest[..rest.find('`').unwrap()];
            name.split('{').next().unwrap().to_owned()
        })
        .collect()
}

#[test]
fn every_recorded_metric_is_documented_and_every_documented_one_is_recorded() {
    let code = metrics_in_code();
    let doc = metrics_in_doc();
    assert!(code.len() > 20, "the scan found the code's metrics: {code:?}");
    let undocumented: Vec<_> = code.difference(&doc).collect();
    let stale: Vec<_> = doc.difference(&code).collect();
    assert!(
        undocumented.is_empty(),
        "metrics recorded in src/ without a row in {DOC} (## Metrics): {undocumented:?}"
    );
    assert!(
        stale.is_empty(),
        "rows in {DOC} (## Metrics) for metrics nothing records: {stale:?}"
    );
}
