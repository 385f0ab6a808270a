//! The workspace's crate graph only goes down: each crate's normal dependencies on workspace crates
//! are on lower layers. In particular the controller and the agent are siblings on top of the
//! protocol (neither depends on the other), and no production crate depends on the emulator or the
//! testbed. docs/architecture.md draws this graph.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

/// Layer of every workspace crate, bottom first.
const LAYERS: [(&str, u8); 9] = [
    ("mig-catalog", 0),
    ("mig-planner", 1),
    ("mig-protocol", 2),
    ("mig-controller", 3),
    ("mig-agent", 3),
    ("kube-emulator", 3),
    ("mig-sim", 3),
    ("mig-testbed", 4),
    ("mig-autoscaler", 5),
];

/// Each workspace crate and its normal dependencies on workspace crates.
fn graph() -> BTreeMap<String, Vec<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(root.join("crates")).unwrap() {
        let manifest = entry.unwrap().path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let doc: toml::Table = text.parse().unwrap();
        let name = doc["package"]["name"].as_str().unwrap().to_string();
        layer(&name); // a new crate must be given its layer here
        let deps = doc
            .get("dependencies")
            .and_then(|d| d.as_table())
            .map(|d| {
                d.keys()
                    .filter(|k| LAYERS.iter().any(|(n, _)| n == k))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        out.insert(name, deps);
    }
    out
}

fn layer(name: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("crate {name} has no layer in tests/crate_graph.rs"))
        .1
}

#[test]
fn dependencies_only_go_down() {
    let g = graph();
    for (name, deps) in &g {
        for d in deps {
            assert!(
                layer(d) < layer(name),
                "{name} (layer {}) depends on {d} (layer {}): dependencies only go down",
                layer(name),
                layer(d)
            );
        }
    }
    // What the layers mean for the two production components.
    for component in ["mig-controller", "mig-agent"] {
        for banned in ["mig-controller", "mig-agent", "kube-emulator", "mig-testbed"] {
            assert!(
                !g[component].iter().any(|d| d == banned),
                "{component} depends on {banned}"
            );
        }
    }
    assert!(g["mig-agent"].iter().any(|d| d == "mig-protocol"));
    assert!(g["mig-controller"].iter().any(|d| d == "mig-protocol"));
}
