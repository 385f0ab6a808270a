//! Invariants on random clusters with drains, PDBs, do-not-disrupt and budgets.

use crate::check::{at_least_greedy, check_plan};
use crate::fixtures::{Rng, random_policy, random_snapshot};

#[test]
fn invariants_hold_on_random_clusters_with_drains() {
    let mut evicting = 0;
    for seed in 1000..1300 {
        let mut rng = Rng::new(seed);
        let snapshot = random_snapshot(&mut rng, 6, 10, true);
        let policy = random_policy(&mut rng, true);
        let plan = mig_planner::plan(&snapshot, &policy);
        check_plan(&snapshot, &policy, &plan);
        if !plan.evictions.is_empty() {
            evicting += 1;
        }
        // Deterministic: the same input gives the same plan (timings aside).
        let mut again = mig_planner::plan(&snapshot, &policy);
        again.solver.millis = plan.solver.millis;
        again.solver.solver_millis = plan.solver.solver_millis;
        assert_eq!(again, plan, "seed {seed}");
    }
    assert!(
        evicting > 0,
        "no random instance evicted anything: the drain paths went untested"
    );
}

#[test]
fn aggregated_model_keeps_the_invariants() {
    for seed in 2000..2100 {
        let mut rng = Rng::new(seed);
        let snapshot = random_snapshot(&mut rng, 6, 10, true);
        let mut policy = random_policy(&mut rng, true);
        policy.solver.exact_node_limit = 0;
        let plan = mig_planner::plan(&snapshot, &policy);
        assert_eq!(plan.solver.model, "per-node-group");
        check_plan(&snapshot, &policy, &plan);
    }
}

#[test]
fn synthetic_fleets_match_their_description_and_plan_cleanly() {
    use mig_planner::synthetic::{FleetSpec, fleet, used_share};
    for (gpus, pending, exact) in [(96, 150, true), (1_000, 600, false)] {
        let s = fleet(&FleetSpec {
            gpus,
            pending,
            busy_gpu_share: 0.6,
            seed: 7,
        });
        assert_eq!(s.nodes.len(), gpus / 8);
        assert_eq!(s.pending_pods.len(), pending);
        let share = used_share(&s);
        assert!((0.25..=0.6).contains(&share), "{share}");
        let plan = mig_planner::plan(&s, &s.policy);
        assert_eq!(
            plan.solver.model,
            if exact { "per-node" } else { "per-node-group" }
        );
        check_plan(&s, &s.policy, &plan);
        assert!(at_least_greedy(&plan), "{:?}", plan.solver);
    }
}
