//! The NVML cross-check, on recorded nvidia-smi output.

use mig_catalog::nvml::{Mismatch, ObservedGpu, ObservedPlacement, compare, cross_check};

use crate::{catalog, fixture, model};

fn recorded(key: &str, name: &str) -> ObservedGpu {
    ObservedGpu::from_nvidia_smi(
        name,
        0,
        &fixture(&format!("{key}.lgip.txt")),
        &fixture(&format!("{key}.lgipp.txt")),
    )
    .unwrap()
}

#[test]
fn recorded_gpus_agree_with_the_catalog() {
    for (key, name) in [
        ("a100-40gb", "NVIDIA A100-SXM4-40GB"),
        ("h100-80gb", "NVIDIA H100 80GB HBM3"),
        ("a30-24gb", "NVIDIA A30"),
    ] {
        let gpu = recorded(key, name);
        assert_eq!(gpu.profiles.len(), model(key).profiles.len());
        assert!(gpu.profiles.iter().all(|p| !p.placements.is_empty()));
        let report = cross_check(catalog(), &gpu).unwrap();
        assert_eq!(report.model, key);
        assert_eq!(report.mismatches, vec![], "{key}");
        assert!(report.is_consistent());
    }
}

#[test]
fn mismatches_are_reported_precisely() {
    let m = model("h100-80gb");
    let mut gpu = recorded("h100-80gb", "NVIDIA H100 80GB HBM3");
    // go-nvml's wrong H100 mock: 3g with size 3.
    let g3 = gpu.profiles.iter_mut().find(|p| p.profile_id == 9).unwrap();
    g3.placements = vec![
        ObservedPlacement { start: 0, size: 3 },
        ObservedPlacement { start: 4, size: 3 },
    ];
    gpu.profiles.iter_mut().find(|p| p.profile_id == 0).unwrap().name = Some("7g.79gb".into());
    gpu.profiles.retain(|p| p.profile_id != 20);
    gpu.profiles
        .iter_mut()
        .find(|p| p.profile_id == 14)
        .unwrap()
        .instance_count = 2;
    let mut extra = gpu.profiles[0].clone();
    extra.profile_id = 47;
    extra.name = Some("1g.10gb-me".into());
    gpu.profiles.push(extra);
    let found = compare(m, &gpu);
    assert_eq!(
        found,
        vec![
            Mismatch::MissingInNvml {
                profile: "1g.10gb+me".into(),
                profile_id: 20
            },
            Mismatch::MaxInstances {
                profile: "2g.20gb".into(),
                catalog: 3,
                nvml: 2
            },
            Mismatch::Placements {
                profile: "3g.40gb".into(),
                catalog: vec![(0, 4), (4, 4)],
                nvml: vec![(0, 3), (4, 3)]
            },
            Mismatch::OtherName {
                profile_id: 0,
                catalog: "7g.80gb".into(),
                nvml: "7g.79gb".into()
            },
            Mismatch::UnknownToCatalog {
                profile_id: 47,
                name: Some("1g.10gb-me".into())
            },
        ]
    );
    let blocking: Vec<bool> = found.iter().map(Mismatch::is_blocking).collect();
    assert_eq!(blocking, [true, true, true, true, false]);
    assert!(found[2].to_string().contains("NVML placements [(0, 3), (4, 3)]"));
}

#[test]
fn another_gpus_profile_names_are_blocking_an_alias_is_not() {
    // The A100 80GB has the H100 80GB's profile ids, names and placements; its catalog entry
    // knows NVML's other name for 7g.80gb, 7g.79gb.
    let m = model("a100-80gb");
    let mut gpu = recorded("h100-80gb", "NVIDIA A100-SXM4-80GB");
    assert_eq!(compare(m, &gpu), vec![]);
    // A 40GB GPU's name for profile 19 (same id and placements, half the memory), and the alias.
    gpu.profiles.iter_mut().find(|p| p.profile_id == 19).unwrap().name = Some("MIG 1g.5gb".into());
    gpu.profiles.iter_mut().find(|p| p.profile_id == 0).unwrap().name = Some("MIG 7g.79gb".into());
    let found = compare(m, &gpu);
    assert_eq!(found.len(), 2, "{found:?}");
    let other = found
        .iter()
        .find(|x| matches!(x, Mismatch::OtherName { .. }))
        .unwrap();
    assert!(other.is_blocking());
    assert!(other.to_string().contains("nvidia.com/mig-1g.5gb"), "{other}");
    let alias = found.iter().find(|x| matches!(x, Mismatch::Name { .. })).unwrap();
    assert!(!alias.is_blocking(), "7g.79gb is an alias of 7g.80gb");
}

#[test]
fn a30_instance_counts_from_nvml_are_not_trusted_but_no_profiles_is_blocking() {
    let mut gpu = recorded("a30-24gb", "NVIDIA A30");
    gpu.profiles[0].instance_count = 1;
    assert_eq!(compare(model("a30-24gb"), &gpu), vec![]);
    gpu.profiles.clear();
    assert_eq!(compare(model("a30-24gb"), &gpu), vec![Mismatch::NoProfiles]);
}

#[test]
fn unknown_gpu_and_garbage_are_errors() {
    let mut gpu = recorded("a100-40gb", "NVIDIA L4");
    assert!(
        cross_check(catalog(), &gpu)
            .unwrap_err()
            .to_string()
            .contains("unknown")
    );
    gpu.pci_device_id = Some(0x20B0_10DE);
    assert_eq!(
        cross_check(catalog(), &gpu).unwrap().model,
        "a100-40gb",
        "falls back to the PCI id"
    );
    assert!(
        ObservedGpu::from_nvidia_smi(
            "x",
            0,
            &fixture("a100-40gb.lgip.txt"),
            "GPU  0 Profile ID 99 Placements: {0}:1"
        )
        .is_err()
    );
    assert!(
        ObservedGpu::from_nvidia_smi(
            "x",
            0,
            &fixture("a100-40gb.lgip.txt"),
            "GPU  0 Profile ID 19 Placements: {0,a}:1"
        )
        .is_err()
    );
    // Rows of another GPU index are ignored.
    let other = ObservedGpu::from_nvidia_smi(
        "x",
        1,
        &fixture("a100-40gb.lgip.txt"),
        &fixture("a100-40gb.lgipp.txt"),
    )
    .unwrap();
    assert!(other.profiles.is_empty());
}

#[test]
fn json_recordings_round_trip() {
    let gpu = recorded("a100-40gb", "NVIDIA A100-SXM4-40GB");
    let text = serde_json::to_string(&gpu).unwrap();
    assert_eq!(serde_json::from_str::<ObservedGpu>(&text).unwrap(), gpu);
}
