//! mig-parted configs: rendering, parsing, realisability.

use mig_catalog::migparted::{Devices, GpuTarget, MigPartedConfig, Verdict, render_node_config};
use mig_catalog::{GpuModel, Instance, Layout};
use proptest::prelude::*;

use crate::{catalog, fixture, model};

fn verdict<'a>(report: &'a [mig_catalog::migparted::ConfigVerdict], name: &str) -> &'a Verdict {
    &report
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .verdict
}

#[test]
fn gpu_operator_default_config_realisability() {
    let config = MigPartedConfig::from_yaml(&fixture("default-mig-parted-config.yaml")).unwrap();
    for m in &catalog().models {
        let report = config.check_on(m);
        assert!(
            matches!(verdict(&report, "all-balanced"), Verdict::Realisable { .. }),
            "{}",
            m.key
        );
        assert!(
            matches!(verdict(&report, "all-disabled"), Verdict::Realisable { layouts } if layouts[0].1.is_none())
        );
        assert!(
            matches!(verdict(&report, "all-enabled"), Verdict::Realisable { layouts } if layouts[0].1 == Some(Layout::empty()))
        );
        assert!(
            matches!(verdict(&report, "shared-compute"), Verdict::Unrealisable { reasons } if reasons[0].contains("compute-instance"))
        );
        assert!(
            matches!(verdict(&report, "all-2g.48gb.gfx"), Verdict::Unrealisable { .. }),
            "RTX PRO profile on {}",
            m.key
        );
    }
    // all-1g.10gb: 7 one-slice instances on 80GB parts, 4 two-slice ones on the 40GB parts, nothing for H200.
    let r = config.check_on(model("a100-40gb"));
    let Verdict::Realisable { layouts } = verdict(&r, "all-1g.10gb") else {
        panic!()
    };
    assert_eq!(
        model("a100-40gb").format_layout(layouts[0].1.as_ref().unwrap()),
        "1g.10gb@0,1g.10gb@2,1g.10gb@4,1g.10gb@6"
    );
    let r = config.check_on(model("h100-80gb"));
    let Verdict::Realisable { layouts } = verdict(&r, "all-1g.10gb") else {
        panic!()
    };
    assert_eq!(layouts[0].1.as_ref().unwrap().len(), 7);
    assert_eq!(
        verdict(&config.check_on(model("h200-141gb")), "all-1g.10gb"),
        &Verdict::NotApplicable
    );
    assert!(
        matches!(verdict(&r, "all-1g.5gb"), Verdict::Unrealisable { reasons } if reasons[0].contains("does not exist on h100-80gb"))
    );
    assert!(
        matches!(verdict(&r, "custom-too-big"), Verdict::Unrealisable { reasons } if reasons[0].contains("9 memory slices"))
    );
    assert!(matches!(
        verdict(&r, "all-1g.10gb.me"),
        Verdict::Realisable { .. }
    ));
}

#[test]
fn malformed_configs_are_clear_errors() {
    for (text, expect) in [
        ("version: v2\nmig-configs: {}\n", "version"),
        (
            "version: v1\nmig-configs:\n  x:\n    - devices: some\n      mig-enabled: true\n",
            "not a mig-parted config",
        ),
        ("[1, 2", "not a mig-parted config"),
        (
            "kind: ConfigMap\ndata: {a: x, b: y}\n",
            "ConfigMap has no mig-parted config",
        ),
    ] {
        let err = MigPartedConfig::from_yaml(text).unwrap_err().to_string();
        assert!(err.contains(expect), "{text:?}: {err}");
    }
}

#[test]
fn rendering_refuses_invalid_layouts_and_groups_equal_gpus() {
    let m = model("h100-80gb");
    let bad = m.parse_layout("7g.80gb@0,1g.10gb@0").unwrap();
    assert!(
        render_node_config(&[(
            0,
            GpuTarget::Mig {
                model: m,
                layout: &bad
            }
        )])
        .is_err()
    );
    let a = m.parse_layout("3g.40gb@0,3g.40gb@4").unwrap();
    let b = m.parse_layout("7g.80gb@0").unwrap();
    let gpus = [
        (2, GpuTarget::Mig { model: m, layout: &a }),
        (0, GpuTarget::Mig { model: m, layout: &a }),
        (1, GpuTarget::Mig { model: m, layout: &b }),
        (3, GpuTarget::MigDisabled),
    ];
    let node = render_node_config(&gpus).unwrap();
    assert_eq!(node.entries.len(), 3);
    assert_eq!(node.entries[0].devices, Devices::List(vec![0, 2]));
    assert!(node.name.starts_with("mig-autoscaler-") && node.name.len() == "mig-autoscaler-".len() + 12);
    // Deterministic: order of input does not matter; different content gives a different name.
    let mut reversed = gpus;
    reversed.reverse();
    assert_eq!(render_node_config(&reversed).unwrap(), node);
    let other = render_node_config(&gpus[..2]).unwrap();
    assert_ne!(other.name, node.name);
    let mut cfg = MigPartedConfig::new();
    cfg.insert(node.clone());
    let yaml = cfg.to_yaml();
    assert!(
        yaml.contains("mig-configs:") && yaml.contains("mig-enabled: false") && yaml.contains("3g.40gb: 2"),
        "{yaml}"
    );
}

fn random_node() -> impl Strategy<Value = Vec<(usize, Vec<usize>, bool)>> {
    prop::collection::vec(
        (
            0..catalog().models.len(),
            prop::collection::vec(0usize..64, 0..10),
            prop::bool::weighted(0.1),
        ),
        1..8,
    )
}

fn valid_layout(m: &GpuModel, picks: &[usize]) -> Layout {
    let c: Vec<Instance> = m
        .profiles_indexed()
        .flat_map(|(i, p)| p.starts.iter().map(move |s| Instance::new(i, *s)))
        .collect();
    picks.iter().fold(Layout::empty(), |l, p| {
        let i = c[p % c.len()];
        if m.can_add(&l, &i) { l.with(i) } else { l }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Render a node's config, write it as YAML, read it back: every GPU gets its count vector, and the
    /// counts arrange to a valid layout again.
    #[test]
    fn mig_parted_rendering_round_trips(gpus in random_node()) {
        let models: Vec<&GpuModel> = gpus.iter().map(|(mi, _, _)| &catalog().models[*mi]).collect();
        let layouts: Vec<Layout> = gpus.iter().zip(&models).map(|((_, picks, _), m)| valid_layout(m, picks)).collect();
        let targets: Vec<(u32, GpuTarget<'_>)> = gpus
            .iter()
            .enumerate()
            .map(|(i, (_, _, off))| {
                let t = if *off { GpuTarget::MigDisabled } else { GpuTarget::Mig { model: models[i], layout: &layouts[i] } };
                (i as u32, t)
            })
            .collect();
        let node = render_node_config(&targets).unwrap();
        let mut cfg = MigPartedConfig::new();
        cfg.insert(node.clone());
        let back = MigPartedConfig::from_yaml(&cfg.to_yaml()).unwrap();
        prop_assert_eq!(&back, &cfg);
        for (i, (_, _, off)) in gpus.iter().enumerate() {
            let got = back.counts_for_gpu(&node.name, models[i], i as u32).unwrap();
            if *off {
                prop_assert_eq!(got, None);
            } else {
                let c = got.unwrap();
                prop_assert_eq!(&c, &models[i].counts(&layouts[i]));
                let again = models[i].arrange(&c).unwrap();
                prop_assert_eq!(models[i].counts(&again), c);
            }
        }
    }
}
