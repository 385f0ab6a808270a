//! The simulator on small synthetic workloads whose answers are known.

#![allow(clippy::unwrap_used)]

use mig_sim::{PolicyKind, SimConfig, TracePod, simulate, static_candidates};

const A100: &str = "NVIDIA-A100-SXM4-80GB";
const ALL_1G: &str = "1g.10gb@0,1g.10gb@1,1g.10gb@2,1g.10gb@3,1g.10gb@4,1g.10gb@5,1g.10gb@6";

fn config() -> SimConfig {
    SimConfig {
        nodes: 2,
        gpus_per_node: 2,
        product: A100.into(),
        initial_layout: ALL_1G.into(),
        batch: 10.0,
        reconfig_delay: 30.0,
        horizon: 10_000.0,
    }
}

fn pod(i: usize, at: f64, profile: &'static str, dur: f64) -> TracePod {
    TracePod {
        name: format!("p{i}"),
        arrival: at,
        duration: dur,
        profile,
        count: 1,
    }
}

#[test]
fn repartitioning_serves_what_a_static_layout_never_can() {
    let pods: Vec<TracePod> = (0..4).map(|i| pod(i, i as f64 * 5.0, "3g.40gb", 500.0)).collect();
    let stat = simulate(&config(), &PolicyKind::Static(ALL_1G.into()), &pods).unwrap();
    assert_eq!(stat.started, 0);
    assert_eq!(stat.reconfigurations, 0);
    for policy in [PolicyKind::Greedy, PolicyKind::Ilp] {
        let r = simulate(&config(), &policy, &pods).unwrap();
        assert_eq!(r.started, 4, "{policy:?}");
        assert!(r.reconfigurations >= 2, "{policy:?}: two 3g fit per GPU");
        // Wait = batch + reconfiguration delay at most, for the first wave.
        assert!(
            r.wait_quantile(1.0) <= 10.0 + 30.0 + 10.0 + 1e-9,
            "{policy:?}: {:?}",
            r.waits
        );
        assert!(r.allocation <= r.demand + 1e-9 && r.allocation <= 1.0);
        assert!(!r.plan_millis.is_empty());
    }
}

#[test]
fn pods_that_fit_start_at_once_and_static_layouts_do_serve_their_profiles() {
    let pods: Vec<TracePod> = (0..10).map(|i| pod(i, i as f64, "1g.10gb", 100.0)).collect();
    for policy in [PolicyKind::Static(ALL_1G.into()), PolicyKind::Ilp] {
        let r = simulate(&config(), &policy, &pods).unwrap();
        assert_eq!(r.started, 10);
        assert_eq!(r.wait_quantile(1.0), 0.0, "{policy:?}");
        assert_eq!(r.reconfigurations, 0, "{policy:?}: nothing to change");
    }
}

#[test]
fn runs_are_deterministic_and_departures_free_capacity() {
    // 5 whole-GPU pods on 4 GPUs: the fifth waits for the first departure.
    let pods: Vec<TracePod> = (0..5).map(|i| pod(i, i as f64, "7g.80gb", 1000.0)).collect();
    let a = simulate(&config(), &PolicyKind::Ilp, &pods).unwrap();
    let b = simulate(&config(), &PolicyKind::Ilp, &pods).unwrap();
    assert_eq!(a.waits, b.waits);
    assert_eq!(a.started, 5);
    let last = a.waits.last().copied().unwrap();
    assert!(
        last >= 1000.0 - 4.0 - 1e-9,
        "the fifth waited for a departure: {last}"
    );
}

/// ParvaGPU allows 11 A100 layouts of sizes {1,2,3,4,7} (trace README §4); the catalog also
/// allows 3g+3g, which ParvaGPU's list leaves out: 12.
#[test]
fn the_static_candidates_are_parvagpus_eleven_plus_3g_3g() {
    let c = static_candidates(A100, &["1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"]).unwrap();
    assert_eq!(c.len(), 12, "{c:?}");
    assert!(c.iter().any(|l| l == "7g.80gb@0"));
    assert!(c.iter().any(|l| l == "3g.40gb@0,3g.40gb@4"));
}

#[test]
fn bad_configurations_are_errors() {
    let mut c = config();
    c.product = "NVIDIA-T4".into();
    assert!(simulate(&c, &PolicyKind::Ilp, &[]).is_err());
    let bad = vec![pod(0, 0.0, "9g.99gb", 1.0)];
    assert!(simulate(&config(), &PolicyKind::Ilp, &bad).is_err());
}

/// The mapping applied to the real openb trace gives the profile counts the trace README states
/// (../shared/traces; CI has it).
#[test]
fn the_openb_mapping_matches_the_trace_readme() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/traces/alibaba-gpu-v2023/openb_pod_list_default.csv"
    );
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e} (../shared/traces is needed)"));
    let pods = mig_sim::parse_openb("openb_pod_list_default.csv", &text).unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for p in pods.iter().filter(|p| p.count == 1) {
        *counts.entry(p.profile).or_insert(0) += 1;
    }
    let want = [
        ("1g.10gb", 32),
        ("2g.20gb", 280),
        ("3g.40gb", 389),
        ("4g.40gb", 971),
        ("7g.80gb", 5317),
    ];
    assert_eq!(counts.into_iter().collect::<Vec<_>>(), want.to_vec());
    assert_eq!(pods.iter().filter(|p| p.count > 1).count(), 75);
}
