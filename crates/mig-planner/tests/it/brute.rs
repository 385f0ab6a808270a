//! Optimality: on random small clusters (≤ 4 GPUs, ≤ 8 pods), the plan's score equals the best score
//! found by enumerating every combination of target count vectors and every pod packing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use mig_catalog::{Catalog, Instance, Layout};
use mig_planner::{Backend, Snapshot, SolverKind, weights};

use crate::check::{check_plan, lex_better, pod_value, reported_key, score_without_drains, tiers};
use crate::fixtures::{Rng, random_policy, random_snapshot};

struct Pod {
    weight: f64,
    /// Index of its priority among the tiers, highest first.
    tier: usize,
    req: Vec<(usize, i64)>,
    nodes: Vec<usize>,
}

/// The best packing of `pods[i..]` into `supply`: placed value per tier, lexicographically best.
fn pack(
    pods: &[Pod],
    tiers: usize,
    i: usize,
    supply: &mut Vec<Vec<i64>>,
    memo: &mut HashMap<(usize, Vec<Vec<i64>>), Vec<f64>>,
) -> Vec<f64> {
    if i == pods.len() {
        return vec![0.0; tiers];
    }
    if let Some(v) = memo.get(&(i, supply.clone())) {
        return v.clone();
    }
    let mut best = pack(pods, tiers, i + 1, supply, memo);
    for &n in &pods[i].nodes {
        if pods[i].req.iter().all(|(q, c)| supply[n][*q] >= *c) {
            for (q, c) in &pods[i].req {
                supply[n][*q] -= c;
            }
            let mut with = pack(pods, tiers, i + 1, supply, memo);
            with[pods[i].tier] += pods[i].weight;
            if lex_better(&with, &best) {
                best = with;
            }
            for (q, c) in &pods[i].req {
                supply[n][*q] += c;
            }
        }
    }
    memo.insert((i, supply.clone()), best.clone());
    best
}

/// Best achievable score key without drains (placed value per priority, highest first, then the
/// total; as `score_without_drains`), or `None` when the instance is too large to enumerate.
fn brute_force_best(
    s: &Snapshot,
    backend: Backend,
    max_nodes: Option<u32>,
    limit: usize,
) -> Option<Vec<f64>> {
    let catalog = Catalog::embedded();
    let names: Vec<String> = {
        let set: BTreeSet<String> = s
            .pending_pods
            .iter()
            .flat_map(|p| p.requests.keys())
            .filter_map(|r| r.strip_prefix("nvidia.com/mig-"))
            .map(str::to_string)
            .collect();
        set.into_iter().collect()
    };
    // Per GPU: (node, options as (free per name, cost, changed)).
    type Choice = (Vec<i64>, f64, bool);
    let mut gpus: Vec<(usize, Vec<Choice>)> = Vec::new();
    for (ni, node) in s.nodes.iter().enumerate() {
        for g in &node.gpus {
            let model = catalog.lookup(&g.product).unwrap();
            let inst = |i: &mig_planner::snapshot::GpuInstance| {
                Instance::new(model.profile_by_name(&i.profile).unwrap(), i.start)
            };
            let actual = Layout::new(g.instances.iter().map(inst));
            let busy = Layout::new(g.instances.iter().filter(|i| !i.pods.is_empty()).map(inst));
            let by_name = |c: &mig_catalog::Counts| -> Vec<i64> {
                let b = model.counts(&busy);
                names
                    .iter()
                    .map(|n| {
                        model
                            .profile_by_name(n)
                            .map_or(0, |p| i64::from(c.get(p)) - i64::from(b.get(p)))
                    })
                    .collect()
            };
            let actual_counts = model.counts(&actual);
            let mut options = vec![(by_name(&actual_counts), 0.0, false)];
            if busy.is_empty() || backend == Backend::Nvml {
                let cost = weights::CHANGE_GPU
                    + if busy.is_empty() {
                        0.0
                    } else {
                        weights::TOUCH_BUSY_GPU
                    };
                let mut seen = BTreeSet::new();
                for c in model.count_vectors() {
                    if *c != actual_counts
                        && model.arrange_around(&busy, c).is_ok()
                        && seen.insert(by_name(c))
                    {
                        options.push((by_name(c), cost, true));
                    }
                }
            }
            gpus.push((ni, options));
        }
    }
    let combos: usize = gpus.iter().map(|(_, o)| o.len()).product();
    if combos > limit {
        return None;
    }
    let tiers = tiers(s);
    let pods: Vec<Pod> = s
        .pending_pods
        .iter()
        .map(|p| Pod {
            weight: pod_value(s, p),
            tier: tiers.iter().position(|t| *t == p.priority).unwrap(),
            req: p
                .requests
                .iter()
                .filter_map(|(r, c)| {
                    r.strip_prefix("nvidia.com/mig-")
                        .map(|n| (names.binary_search(&n.to_string()).unwrap(), *c))
                })
                .collect(),
            nodes: (0..s.nodes.len())
                .filter(|n| {
                    p.node_selector
                        .iter()
                        .all(|(k, v)| s.nodes[*n].labels.get(k) == Some(v))
                })
                .collect(),
        })
        .collect();
    let mut memo = HashMap::new();
    let mut best = vec![f64::MIN; tiers.len() + 1];
    let mut pick = vec![0usize; gpus.len()];
    loop {
        let changed_nodes: BTreeSet<usize> = gpus
            .iter()
            .zip(&pick)
            .filter(|((_, o), k)| o[**k].2)
            .map(|((n, _), _)| *n)
            .collect();
        if max_nodes.is_none_or(|m| changed_nodes.len() <= m as usize) {
            let mut supply = vec![vec![0i64; names.len()]; s.nodes.len()];
            let mut cost = weights::CHANGE_NODE * changed_nodes.len() as f64;
            for ((n, o), k) in gpus.iter().zip(&pick) {
                for (q, v) in o[*k].0.iter().enumerate() {
                    supply[*n][q] += v;
                }
                cost += o[*k].1;
            }
            let mut key = pack(&pods, tiers.len(), 0, &mut supply, &mut memo);
            let total = key.iter().sum::<f64>() - cost;
            key.push(total);
            if lex_better(&key, &best) {
                best = key;
            }
        }
        // Odometer.
        let mut i = 0;
        loop {
            if i == pick.len() {
                return Some(best);
            }
            pick[i] += 1;
            if pick[i] < gpus[i].1.len() {
                break;
            }
            pick[i] = 0;
            i += 1;
        }
    }
}

/// The random small clusters of seeds 0..400 that the brute force can enumerate, with their policy
/// (changed by `tweak`) and the optimum. Reservations are off: they are made after the plan is
/// chosen and are not part of how plans compare (the oracle knows nothing of them; the invariant
/// checks cover them).
fn enumerable(
    tweak: impl Fn(&mut mig_planner::Policy),
) -> impl Iterator<Item = (u64, Snapshot, mig_planner::Policy, Vec<f64>)> {
    (0..400).filter_map(move |seed| {
        let mut rng = Rng::new(seed);
        let snapshot = random_snapshot(&mut rng, 4, 8, false);
        let mut policy = random_policy(&mut rng, false);
        policy.reservations.max_gpus = 0;
        tweak(&mut policy);
        let best = brute_force_best(
            &snapshot,
            policy.backend,
            policy.budgets.max_nodes_changed,
            200_000,
        )?;
        Some((seed, snapshot, policy, best))
    })
}

#[test]
fn plans_are_optimal_on_small_random_clusters() {
    let mut checked = 0;
    let mut greedy_short = 0;
    let mut microlp_used = 0;
    let mut by_backend: BTreeMap<String, usize> = BTreeMap::new();
    for (seed, snapshot, policy, best) in enumerable(|_| ()) {
        let plan = mig_planner::plan(&snapshot, &policy);
        check_plan(&snapshot, &policy, &plan);
        let got = score_without_drains(&snapshot, &plan);
        let same =
            |a: &[f64], b: &[f64]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(
            (got[got.len() - 1] - plan.solver.score).abs() < 1e-6,
            "seed {seed}: reported score {} vs recomputed {got:?}",
            plan.solver.score
        );
        assert!(
            same(&got, &best),
            "seed {seed}: plan scores {got:?}, brute force {best:?} (greedy {:?}, solver {} {})\n{}",
            reported_key(&plan, &tiers(&snapshot), true),
            plan.solver.used,
            plan.solver.status,
            plan.render_table()
        );
        if lex_better(&best, &reported_key(&plan, &tiers(&snapshot), true)) {
            greedy_short += 1;
        }
        // The second back-end on the same model reaches the same optimum.
        let mut with_microlp = policy.clone();
        with_microlp.solver.kind = SolverKind::Microlp;
        let other = mig_planner::plan(&snapshot, &with_microlp);
        check_plan(&snapshot, &with_microlp, &other);
        let other_score = score_without_drains(&snapshot, &other);
        assert!(
            same(&other_score, &best),
            "seed {seed}: microlp plan scores {other_score:?}, brute force {best:?} (solver {} {}, {:?})",
            other.solver.used,
            other.solver.status,
            other.solver.fallback_reason
        );
        if other.solver.used == "microlp" {
            microlp_used += 1;
        }
        *by_backend.entry(format!("{:?}", policy.backend)).or_default() += 1;
        checked += 1;
    }
    eprintln!(
        "optimality: {checked} instances checked, greedy short of optimal on {greedy_short}, \
         microlp's answer used on {microlp_used}; {by_backend:?}"
    );
    assert!(
        microlp_used * 2 > checked,
        "microlp's answer was used on only {microlp_used} of {checked} instances"
    );
    assert!(
        checked >= 200,
        "only {checked} instances were small enough to enumerate"
    );
    assert!(
        greedy_short > 0,
        "the random instances never separate greedy from optimal: they test too little"
    );
}

/// The aggregated model (per node group; forced here on clusters of 1–3 nodes, where the per-node
/// model is the default) against the same brute force. It pools each group's capacity, so a pod
/// that needs two instances on one node may be counted into room spread over two, and pods of a
/// class may be split over groups; the plan then follows its realised answer completed by greedy,
/// or greedy's, whichever scores better. Stated and held: it never claims more than the optimum,
/// never less than greedy, and equals the optimum on at least 97 % of the clusters (389 of 394
/// on 2026-12-08; the rest lose a GPU or node change, or one pod).
#[test]
fn aggregated_model_against_brute_force() {
    let (mut checked, mut equal) = (0, 0);
    let mut gaps: Vec<(u64, Vec<f64>, Vec<f64>)> = Vec::new();
    for (seed, snapshot, policy, best) in enumerable(|p| p.solver.exact_node_limit = 0) {
        let plan = mig_planner::plan(&snapshot, &policy);
        assert_eq!(plan.solver.model, "per-node-group");
        check_plan(&snapshot, &policy, &plan);
        let got = score_without_drains(&snapshot, &plan);
        let greedy = reported_key(&plan, &tiers(&snapshot), true);
        assert!(
            !lex_better(&got, &best),
            "seed {seed}: {got:?} beats brute force {best:?}"
        );
        assert!(
            !lex_better(&greedy, &got),
            "seed {seed}: {got:?} below greedy {greedy:?}"
        );
        checked += 1;
        if got.iter().zip(&best).all(|(x, y)| (x - y).abs() < 1e-6) {
            equal += 1;
        } else {
            gaps.push((seed, got, best));
        }
    }
    eprintln!("aggregated model: {equal} of {checked} at the optimum; short: {gaps:?}");
    assert!(
        checked >= 200,
        "only {checked} instances were small enough to enumerate"
    );
    assert!(
        equal * 100 >= checked * 97,
        "aggregated model at the optimum on {equal} of {checked}: {gaps:?}"
    );
}
