//! Drift check: the project's catalog against the research notes it was built from
//! (`../shared/mig-geometry.yaml` beside the repository; CI has it).

use std::path::PathBuf;

use serde_yaml::Value;

use crate::catalog;

fn shared_geometry() -> Option<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/mig-geometry.yaml");
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(serde_yaml::from_str(&text).expect("shared/mig-geometry.yaml parses")),
        Err(_) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "skipping: {} not found (it is always present in CI)",
                path.display()
            );
            None
        }
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

#[test]
fn catalog_matches_the_shared_geometry_notes() {
    let Some(doc) = shared_geometry() else { return };
    let models = doc["models"].as_sequence().unwrap();
    assert_eq!(models.len(), catalog().models.len());
    for sm in models {
        let key = sm["key"].as_str().unwrap();
        let m = catalog()
            .model(key)
            .unwrap_or_else(|| panic!("catalog lacks {key}"));
        assert_eq!(
            u64::from(m.memory_slices),
            sm["total_memory_slices"].as_u64().unwrap(),
            "{key}"
        );
        assert_eq!(
            u64::from(m.compute_slices),
            sm["total_compute_slices"].as_u64().unwrap(),
            "{key}"
        );
        let profiles = sm["profiles"].as_sequence().unwrap();
        assert_eq!(profiles.len(), m.profiles.len(), "{key}");
        for sp in profiles {
            let name = sp["name"].as_str().unwrap();
            let p = m
                .profile(
                    m.profile_by_name(name)
                        .unwrap_or_else(|| panic!("{key} lacks {name}")),
                )
                .unwrap();
            assert_eq!(
                u64::from(p.profile_id),
                sp["profile_id"].as_u64().unwrap(),
                "{key} {name}"
            );
            assert_eq!(
                u64::from(p.max_instances),
                sp["max_instances"].as_u64().unwrap(),
                "{key} {name}"
            );
            assert_eq!(
                u64::from(p.compute_slices),
                sp["compute_slices"].as_u64().unwrap(),
                "{key} {name}"
            );
            let starts: Vec<u64> = sp["placements"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|x| x["start"].as_u64().unwrap())
                .collect();
            let ours: Vec<u64> = p.starts.iter().map(|s| u64::from(*s)).collect();
            assert_eq!(ours, starts, "{key} {name}");
            for x in sp["placements"].as_sequence().unwrap() {
                assert_eq!(
                    x["size"].as_u64().unwrap(),
                    u64::from(p.memory_slices),
                    "{key} {name}"
                );
            }
        }
        let ids: Vec<u32> = sm["skus"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|s| mig_catalog::model::parse_pci_device_id(s["pci_device_id"].as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(m.pci_device_ids().collect::<Vec<_>>(), ids, "{key}");
    }
}
