//! Documentation generated from code stays in sync with it.

use std::path::Path;

#[test]
fn docs_keys_md_matches_the_schema_table() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/keys.md");
    let generated = apm_compiler::render::key_reference();
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == generated,
        "docs/keys.md is stale: run `BLESS=1 cargo test --test it docs`"
    );
}

#[test]
fn docs_convert_md_matches_the_mapping_table() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/convert.md");
    let generated = apm_convert::mapping_reference();
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == generated,
        "docs/convert.md is stale: run `BLESS=1 cargo test --test it docs`"
    );
}

#[test]
fn docs_export_md_matches_the_export_table() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/export.md");
    let generated = apm_export::reference();
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == generated,
        "docs/export.md is stale: run `BLESS=1 cargo test --test it docs`"
    );
}
