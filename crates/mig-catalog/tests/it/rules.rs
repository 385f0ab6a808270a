//! Every invalid combination listed in mig-domain.md is rejected, with the right reason.

use mig_catalog::{GpuModel, Instance, Layout, ProfileIdx};

use crate::model;

fn idx(m: &GpuModel, name: &str) -> ProfileIdx {
    m.profile_by_name(name)
        .unwrap_or_else(|| panic!("{} has no {name}", m.key))
}

/// Every way of placing these profiles (one start per instance, any combination), for exhaustive checks.
fn all_placements(m: &GpuModel, names: &[&str]) -> Vec<Layout> {
    let mut out = vec![Vec::new()];
    for n in names {
        let p = idx(m, n);
        let starts = &m.profile(p).unwrap().starts;
        out = out
            .into_iter()
            .flat_map(|v: Vec<Instance>| {
                starts.iter().map(move |s| {
                    let mut w = v.clone();
                    w.push(Instance::new(p, *s));
                    w
                })
            })
            .collect();
    }
    out.into_iter().map(Layout::new).collect()
}

/// Every placement of `names` is invalid, each for one of `rules`, and the counts have no arrangement.
fn assert_never_valid(m: &GpuModel, names: &[&str], rules: &[&str]) {
    let layouts = all_placements(m, names);
    assert!(!layouts.is_empty());
    for l in &layouts {
        let err = m.validate(l).expect_err(&m.format_layout(l));
        assert!(
            err.violations.iter().all(|v| rules.contains(&v.rule())),
            "{}: {:?} not among {rules:?}",
            m.format_layout(l),
            err.violations
        );
    }
    let counts = m.counts(&layouts[0]);
    assert!(m.arrange(&counts).is_err(), "{names:?} arranged on {}", m.key);
}

#[test]
fn three_g_twice_plus_one_g_overlaps() {
    for key in ["a100-80gb", "h100-80gb", "h200-141gb", "b200-180gb"] {
        let m = model(key);
        let g3 = &m.profiles.iter().find(|p| p.compute_slices == 3).unwrap().name;
        for g1 in m.profiles.iter().filter(|p| p.compute_slices == 1) {
            assert_never_valid(m, &[g3, g3, &g1.name], &["overlap"]);
        }
    }
}

#[test]
fn named_invalid_combinations_on_a100_40gb() {
    let m = model("a100-40gb");
    assert_never_valid(m, &["4g.20gb", "4g.20gb"], &["overlap", "max-instances"]);
    assert_never_valid(m, &["4g.20gb", "2g.10gb", "2g.10gb"], &["overlap"]);
    for other in [
        "1g.5gb",
        "1g.10gb",
        "2g.10gb",
        "3g.20gb",
        "4g.20gb",
        "7g.40gb",
        "1g.5gb+me",
    ] {
        assert_never_valid(m, &["7g.40gb", other], &["overlap", "max-instances"]);
    }
    for other in ["1g.5gb", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "1g.5gb+me"] {
        assert_never_valid(
            m,
            &["1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb", other],
            &["overlap", "max-instances"],
        );
    }
    assert_never_valid(
        m,
        &["1g.5gb+me", "1g.5gb+me"],
        &["overlap", "max-instances", "media-extensions"],
    );
}

#[test]
fn the_overlap_reason_names_the_instances_and_slices() {
    let m = model("h100-80gb");
    let l = m.parse_layout("4g.40gb@0,2g.20gb@2,2g.20gb@4").unwrap();
    let msg = m.validate(&l).unwrap_err().to_string();
    assert!(
        msg.contains("4g.40gb@0 and 2g.20gb@2 both occupy memory slice(s) [2, 3]"),
        "{msg}"
    );
    let l = m.parse_layout("1g.10gb@7").unwrap();
    let err = m.validate(&l).unwrap_err();
    assert_eq!(err.violations[0].rule(), "placement");
    assert!(
        err.to_string().contains("allowed starts: [0, 1, 2, 3, 4, 5, 6]"),
        "{err}"
    );
    let l = m.parse_layout("1g.10gb+me@0,1g.10gb+me@1").unwrap();
    let rules: Vec<_> = m
        .validate(&l)
        .unwrap_err()
        .violations
        .iter()
        .map(|v| v.rule())
        .collect();
    assert_eq!(rules, ["max-instances", "media-extensions"]);
}

#[test]
fn a30_combinations() {
    let m = model("a30-24gb");
    for other in ["1g.6gb", "1g.6gb+me", "2g.12gb", "2g.12gb+me"] {
        assert_never_valid(m, &["4g.24gb", other], &["overlap"]);
    }
    assert_never_valid(m, &["2g.12gb", "2g.12gb", "1g.6gb"], &["overlap"]);
    // One set of media engines: a 1g+me and a 2g+me may not coexist (inferred, mig-domain.md §1).
    assert_never_valid(m, &["1g.6gb+me", "2g.12gb+me"], &["media-extensions", "overlap"]);
    let apart = m.parse_layout("1g.6gb+me@3,2g.12gb+me@0").unwrap();
    assert_eq!(
        m.violations(&apart).iter().map(|v| v.rule()).collect::<Vec<_>>(),
        ["media-extensions"]
    );
    assert!(
        m.validate(&m.parse_layout("2g.12gb+me@0,1g.6gb@2,1g.6gb@3").unwrap())
            .is_ok()
    );
}

#[test]
fn four_g_plus_three_g_is_valid_but_needs_r510() {
    let m = model("a100-40gb");
    let l = m.parse_layout("4g.20gb@0,3g.20gb@4").unwrap();
    assert!(m.validate(&l).is_ok());
    assert!(m.validate_with_driver(&l, Some(510)).is_ok());
    let err = m.validate_with_driver(&l, Some(470)).unwrap_err();
    assert_eq!(err.violations.len(), 1);
    assert!(err.to_string().contains("R510"), "{err}");
    // 1g.10gb on the A100-40GB needs R525; MIG itself needs R450.
    let l = m.parse_layout("1g.10gb@0").unwrap();
    assert!(m.validate_with_driver(&l, Some(520)).is_err());
    assert!(m.validate_with_driver(&l, Some(525)).is_ok());
    assert_eq!(
        m.validate_with_driver(&Layout::empty(), Some(440))
            .unwrap_err()
            .violations
            .len(),
        1
    );
}

#[test]
fn arrange_explains_why_not() {
    let m = model("h100-80gb");
    let counts = |text: &str| m.counts(&m.parse_layout(text).unwrap());
    let e = m.arrange(&counts("4g.40gb@0,3g.40gb@4,1g.10gb@0")).unwrap_err();
    assert!(e.reason.contains("9 memory slices"), "{e}");
    let e = m.arrange(&counts("1g.10gb+me@0,1g.10gb+me@1")).unwrap_err();
    assert!(e.reason.contains("at most 1"), "{e}");
    // 4x1g.20gb + 1x1g.10gb: 9 memory slices.
    let e = m
        .arrange(&counts("1g.20gb@0,1g.20gb@2,1g.20gb@4,1g.20gb@6,1g.10gb@0"))
        .unwrap_err();
    assert!(e.to_string().contains("no valid placement arrangement"), "{e}");
    // 3g + 2x2g fits only with the 3g at 4: keeping a 3g pinned at 0 makes it impossible.
    let pinned = m.parse_layout("3g.40gb@0").unwrap();
    let c = counts("3g.40gb@4,2g.20gb@0,2g.20gb@2");
    assert!(m.arrange(&c).is_ok());
    let e = m.arrange_around(&pinned, &c).unwrap_err();
    assert!(e.reason.contains("keeps 3g.40gb@0 in place"), "{e}");
}

#[test]
fn free_slots_and_fragmentation() {
    let m = model("a100-80gb");
    let empty = Layout::empty();
    assert_eq!(m.free_slices(&empty), (0..8).collect::<Vec<u8>>());
    assert_eq!(m.fragmentation(&empty), 0.0);
    let one = m.parse_layout("1g.10gb@0").unwrap();
    assert!((m.fragmentation(&one) - (1.0 - 4.0 / 7.0)).abs() < 1e-9);
    let addable: Vec<String> = m.addable(&one).iter().map(|i| m.format_instance(i)).collect();
    assert!(addable.contains(&"3g.40gb@4".to_string()) && !addable.contains(&"4g.40gb@0".to_string()));
    // 7 x 1g: slice 7 free but nothing can use it.
    let seven = m
        .parse_layout("1g.10gb@0,1g.10gb@1,1g.10gb@2,1g.10gb@3,1g.10gb@4,1g.10gb@5,1g.10gb@6")
        .unwrap();
    assert_eq!(m.free_slices(&seven), vec![7]);
    assert!(m.is_maximal(&seven));
    assert_eq!(m.fragmentation(&seven), 1.0);
    let full = m.parse_layout("7g.80gb@0").unwrap();
    assert_eq!(m.fragmentation(&full), 0.0);
}
