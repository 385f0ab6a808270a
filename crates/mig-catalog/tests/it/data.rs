//! The data file and look-ups.

use std::collections::BTreeSet;

use mig_catalog::{Catalog, CatalogError, Confidence};

use crate::{catalog, model};

#[test]
fn embedded_catalog_has_every_model_the_issue_names() {
    let keys = catalog().model_keys();
    for k in [
        "a30-24gb",
        "a100-40gb",
        "a100-80gb",
        "h100-80gb",
        "h100-94gb",
        "h200-141gb",
        "gh200-96gb",
        "gh200-144gb",
        "h20-96gb",
        "b200-180gb",
    ] {
        assert!(keys.contains(&k), "missing {k}");
    }
    // A100 40GB and 80GB in both SXM4 and PCIe form, H100 in SXM5 and PCIe, H200 and H200 NVL.
    for label in [
        "NVIDIA-A100-SXM4-40GB",
        "NVIDIA-A100-PCIE-40GB",
        "NVIDIA-A100-SXM4-80GB",
        "NVIDIA-A100-80GB-PCIe",
        "NVIDIA-H100-80GB-HBM3",
        "NVIDIA-H100-PCIe",
        "NVIDIA-H100-NVL",
        "NVIDIA-H200",
        "NVIDIA-H200-NVL",
        "NVIDIA-GH200-480GB",
        "NVIDIA-GH200-144G-HBM3e",
        "NVIDIA-H20",
        "NVIDIA-B200",
        "NVIDIA-A30",
    ] {
        catalog()
            .by_product_label(label)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
    }
}

#[test]
fn every_row_cites_known_sources_and_only_a100_40gb_placements_are_confirmed() {
    let c = catalog();
    for m in &c.models {
        for s in &m.skus {
            assert!(
                !s.sources.is_empty() && s.sources.iter().all(|k| c.sources.contains_key(k)),
                "{}",
                s.variant
            );
        }
        for p in &m.profiles {
            assert!(
                !p.sources.is_empty() && p.sources.iter().all(|k| c.sources.contains_key(k)),
                "{}",
                p.name
            );
            // mig-domain.md: only the A100-40GB placements are printed verbatim by NVIDIA.
            assert_eq!(
                p.confidence == Confidence::Confirmed,
                m.key == "a100-40gb",
                "{} {}",
                m.key,
                p.name
            );
        }
    }
}

#[test]
fn product_label_lookup_strips_mig_and_shared_suffixes() {
    let c = catalog();
    for (label, key) in [
        ("NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", "a100-40gb"),
        ("NVIDIA-H100-NVL-MIG-1g.12gb", "h100-94gb"),
        ("NVIDIA-H100-NVL-MIG-1g.12gb-SHARED", "h100-94gb"),
        ("NVIDIA-H100-80GB-HBM3-SHARED", "h100-80gb"),
        ("NVIDIA-A100-SXM4-80GB-MIG-INVALID", "a100-80gb"),
        ("A100-SXM4-40GB", "a100-40gb"),
        ("nvidia-h200", "h200-141gb"),
    ] {
        assert_eq!(
            c.by_product_label(label).map(|m| m.key.as_str()),
            Ok(key),
            "{label}"
        );
    }
}

#[test]
fn nvml_name_and_pci_id_lookups() {
    let c = catalog();
    assert_eq!(c.by_nvml_name("NVIDIA H100 80GB HBM3").unwrap().key, "h100-80gb");
    assert_eq!(c.by_nvml_name("NVIDIA A100 80GB PCIe").unwrap().key, "a100-80gb");
    assert_eq!(c.by_nvml_name("NVIDIA A100-SXM4-40GB").unwrap().key, "a100-40gb");
    assert_eq!(c.by_pci_device_id(0x2330_10DE).unwrap().key, "h100-80gb");
    assert_eq!(c.by_pci_device_id(0x20B7).unwrap().key, "a30-24gb");
    assert_eq!(c.lookup("0x2335").unwrap().key, "h200-141gb");
    assert_eq!(c.lookup("b200-180gb").unwrap().key, "b200-180gb");
    assert_eq!(c.lookup("NVIDIA H100 NVL").unwrap().key, "h100-94gb");
}

#[test]
fn unknown_model_is_a_typed_error_naming_the_known_ones() {
    let err = catalog().by_product_label("NVIDIA-L4").unwrap_err();
    let CatalogError::UnknownModel { query, known, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(query, "NVIDIA-L4");
    assert!(known.iter().any(|k| k == "NVIDIA-H100-80GB-HBM3"));
    assert!(err.to_string().contains("NVIDIA-A30"), "{err}");
    assert_eq!(err.reason(), "unknown-gpu-model");
    assert!(catalog().by_pci_device_id(0x1234_10DE).is_err());
    assert!(catalog().lookup("").is_err());
}

#[test]
fn profile_names_aliases_and_resource_names() {
    let m = model("a100-80gb");
    let seven = m.profile_by_name("7g.80gb").unwrap();
    assert_eq!(m.profile_by_name("7g.79gb"), Some(seven), "HAMi/nos alias");
    let me = m.profile_by_name("1g.10gb+me").unwrap();
    assert_eq!(m.profile_by_name("nvidia.com/mig-1g.10gb.me"), Some(me));
    assert_eq!(
        m.profile(me).unwrap().resource_name(),
        "nvidia.com/mig-1g.10gb.me"
    );
    assert_eq!(m.profile_by_name("mig-3g.40gb"), m.profile_by_name("3g.40gb"));
    assert_eq!(m.profile_by_name("3g.20gb"), None, "40GB name on an 80GB GPU");
}

#[test]
fn named_instances_resolve_by_name_alias_or_resource_and_name_canonically() {
    use mig_catalog::{Instance, NamedInstance};
    let m = model("a100-80gb");
    let three = m.profile_by_name("3g.40gb").unwrap();
    let i = Instance::new(three, 4);
    assert_eq!(m.name_instance(&i), NamedInstance::new("3g.40gb", 4));
    assert_eq!(m.name_instance(&i).to_string(), "3g.40gb@4");
    assert_eq!(m.format_instance(&i), "3g.40gb@4");
    for name in ["3g.40gb", "mig-3g.40gb", "nvidia.com/mig-3g.40gb"] {
        assert_eq!(
            m.resolve_instance(&NamedInstance::new(name, 4)),
            Some(i),
            "{name}"
        );
    }
    let seven = m.resolve_instance(&NamedInstance::new("7g.79gb", 0)).unwrap();
    assert_eq!(
        m.name_instance(&seven).profile,
        "7g.80gb",
        "aliases come back canonical"
    );
    assert_eq!(m.resolve_instance(&NamedInstance::new("3g.20gb", 0)), None);
}

#[test]
fn malformed_catalog_data_is_rejected_with_the_place() {
    let good = mig_catalog::model::EMBEDDED_CATALOG;
    for (from, to, expect) in [
        ("starts = [0, 4]", "starts = [0, 6]", "runs past the last slice"),
        (
            "sources = [\"UG-CONCEPTS\"]",
            "sources = [\"NOPE\"]",
            "unknown source NOPE",
        ),
        ("name = \"3g.40gb\"", "name = \"3g.40gb@\"", "reserved character"),
        ("schema_version = 1", "schema_version = \"x\"", "schema_version"),
    ] {
        let bad = good.replacen(from, to, 1);
        assert_ne!(bad, good, "{from} not found");
        let err = Catalog::from_toml_str(&bad).unwrap_err().to_string();
        assert!(err.contains(expect), "{err}");
    }
}

#[test]
fn nvidia_all_balanced_is_arrangeable_on_every_model() {
    for m in &catalog().models {
        let mut counts = mig_catalog::Counts::zero(m.profiles.len());
        for (name, n) in &m.all_balanced {
            counts.0[usize::from(m.profile_by_name(name).unwrap().0)] = *n;
        }
        let layout = m.arrange(&counts).unwrap_or_else(|e| panic!("{e}"));
        assert!(m.validate(&layout).is_ok());
        assert_eq!(m.counts(&layout), counts);
    }
}

/// mig-domain.md §1 counts the multisets by hand: 77 non-empty and 28 maximal without `+me` on the
/// 8-memory-slice pattern; 9 and 4 on the A30.
#[test]
fn count_vectors_without_media_extensions_match_the_research_notes() {
    for m in &catalog().models {
        let me: BTreeSet<usize> = m
            .profiles
            .iter()
            .enumerate()
            .filter(|(_, p)| p.media_extensions)
            .map(|(i, _)| i)
            .collect();
        let plain = |c: &mig_catalog::Counts| me.iter().all(|i| c.0[*i] == 0);
        let all: BTreeSet<_> = m.count_vectors().iter().filter(|c| plain(c)).collect();
        // A multiset is maximal when adding one more plain instance of any profile makes it unplaceable.
        let maximal: Vec<_> = all
            .iter()
            .filter(|c| {
                (0..m.profiles.len()).filter(|i| !me.contains(i)).all(|i| {
                    let mut more = (**c).clone();
                    more.0[i] += 1;
                    m.count_vectors().binary_search(&more).is_err()
                })
            })
            .collect();
        let expected = if m.memory_slices == 8 { (77, 28) } else { (9, 4) };
        assert_eq!((all.len(), maximal.len()), expected, "{}", m.key);
    }
}
