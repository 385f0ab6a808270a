//! Integration tests of the catalog, linked into one binary.

#![allow(clippy::unwrap_used)] // Tests fail loudly on unexpected input.

mod data;
mod migparted;
mod nvml;
mod props;
mod rules;
mod shared_notes;

use mig_catalog::{Catalog, GpuModel};

/// The embedded catalog.
pub fn catalog() -> &'static Catalog {
    Catalog::embedded()
}

/// A model by key.
pub fn model(key: &str) -> &'static GpuModel {
    catalog().model(key).unwrap_or_else(|| panic!("no model {key}"))
}

/// A file under tests/fixtures.
pub fn fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
