//! Every invariant a plan must hold, checked from the snapshot and the plan alone.

use std::collections::{BTreeMap, BTreeSet};

use mig_catalog::{Catalog, Layout};
use mig_planner::{Backend, DrainPolicy, Plan, PodOutcome, Policy, Snapshot, weights};

fn busy_layout(snapshot: &Snapshot, node: &str, gpu: u32) -> (Layout, Vec<String>) {
    let catalog = Catalog::embedded();
    let n = snapshot.nodes.iter().find(|n| n.name == node).unwrap();
    let g = n.gpus.iter().find(|g| g.index == gpu).unwrap();
    let model = catalog.lookup(&g.product).unwrap();
    let mut pods = Vec::new();
    let busy = g
        .instances
        .iter()
        .filter(|i| !i.pods.is_empty())
        .map(|i| {
            pods.extend(i.pods.iter().cloned());
            mig_catalog::Instance::new(model.profile_by_name(&i.profile).unwrap(), i.start)
        })
        .collect();
    (busy, pods)
}

/// Panics with a message naming the broken invariant.
pub fn check_plan(snapshot: &Snapshot, policy: &Policy, plan: &Plan) {
    let catalog = Catalog::embedded();
    let mut targets: BTreeMap<(String, u32), Layout> = BTreeMap::new();
    let mut drained: BTreeSet<(String, u32)> = BTreeSet::new();
    for g in &plan.gpus {
        let model = catalog.model(&g.model).unwrap();
        let target = model.parse_layout(&g.target).unwrap();
        model
            .validate(&target)
            .unwrap_or_else(|e| panic!("invalid target emitted: {e}"));
        let (busy, _) = busy_layout(snapshot, &g.node, g.index);
        if g.drained {
            assert!(
                g.changed && policy.drain != DrainPolicy::Never,
                "drain under drain=never: {g:?}"
            );
            drained.insert((g.node.clone(), g.index));
        } else if policy.backend == Backend::MigManager {
            assert!(
                !g.changed || busy.is_empty(),
                "mig-manager rebuild of an in-use GPU without drain: {g:?}"
            );
        } else {
            assert!(
                target.contains_all(&busy),
                "nvml change moved an in-use instance: {g:?}"
            );
        }
        assert_eq!(
            g.changed,
            g.target != g.actual || g.drained,
            "changed flag: {g:?}"
        );
        targets.insert((g.node.clone(), g.index), target);
    }
    assert!(
        plan.warnings.iter().all(|w| !w.message.contains("internal")),
        "{:?}",
        plan.warnings
    );

    // Evictions: only from drained GPUs, never do-not-disrupt, within budgets and PDBs.
    let mut per_pdb: BTreeMap<&str, u32> = BTreeMap::new();
    for e in &plan.evictions {
        assert!(
            drained.contains(&(e.node.clone(), e.gpu)),
            "eviction from a GPU that is not drained: {e:?}"
        );
        let r = snapshot
            .running_pods
            .iter()
            .find(|r| format!("{}/{}", r.namespace, r.name) == e.pod);
        // Displaced with nowhere to go only for a pending pod of higher priority that the plan
        // places (preemption); otherwise an evicted pod is placed again.
        let priority = r.map_or(0, |r| r.priority);
        if e.replaced_on.is_none() {
            let for_higher = plan
                .pods
                .iter()
                .any(|p| p.priority > priority && matches!(p.outcome, mig_planner::PodOutcome::Fits { .. }));
            assert!(
                for_higher,
                "{e:?} evicted with nowhere to go, for no higher-priority pod"
            );
        }
        if let Some(r) = r {
            assert!(!r.do_not_disrupt, "do-not-disrupt pod evicted: {e:?}");
            for d in &r.pdbs {
                *per_pdb.entry(d.as_str()).or_default() += 1;
            }
        }
    }
    for (d, n) in per_pdb {
        let allowed = snapshot
            .pdbs
            .iter()
            .find(|p| format!("{}/{}", p.namespace, p.name) == d)
            .map_or(u32::MAX, |p| p.disruptions_allowed);
        assert!(n <= allowed, "PDB {d}: {n} evictions, {allowed} allowed");
    }
    for (node, gpu) in &drained {
        let (_, pods) = busy_layout(snapshot, node, *gpu);
        for p in pods {
            assert!(
                plan.evictions.iter().any(|e| e.pod == p),
                "drained GPU {node}/{gpu} keeps pod {p}"
            );
        }
    }
    if let Some(max) = policy.budgets.max_evictions {
        assert!(
            plan.evictions.len() <= max as usize,
            "{} evictions > {max}",
            plan.evictions.len()
        );
    }
    let changed_nodes: BTreeSet<&str> = plan
        .gpus
        .iter()
        .filter(|g| g.changed)
        .map(|g| g.node.as_str())
        .collect();
    if let Some(max) = policy.budgets.max_nodes_changed {
        assert!(
            changed_nodes.len() <= max as usize,
            "{} nodes change > {max}",
            changed_nodes.len()
        );
    }
    assert_eq!(plan.disruption.nodes_changed, changed_nodes.len());
    assert_eq!(plan.disruption.evictions, plan.evictions.len());

    // Placements: real free instances of the target, each used once, on a node the pod may use.
    let mut used: BTreeSet<(String, u32, u8)> = BTreeSet::new();
    let mut hosting: BTreeSet<(String, u32)> = BTreeSet::new();
    for (pp, pod) in plan.pods.iter().zip(&snapshot.pending_pods) {
        assert_eq!(
            (pp.namespace.as_str(), pp.name.as_str()),
            (pod.namespace.as_str(), pod.name.as_str())
        );
        let PodOutcome::Fits { node, instances, .. } = &pp.outcome else {
            continue;
        };
        let n = snapshot.nodes.iter().find(|n| &n.name == node).unwrap();
        for (k, v) in &pod.node_selector {
            assert_eq!(
                n.labels.get(k),
                Some(v),
                "{} placed against its selector",
                pp.name
            );
        }
        let mut got: BTreeMap<String, i64> = BTreeMap::new();
        for i in instances {
            let target = &targets[&(node.clone(), i.gpu)];
            let model = catalog
                .lookup(&n.gpus.iter().find(|g| g.index == i.gpu).unwrap().product)
                .unwrap();
            let inst = model.resolve_instance(&i.instance).unwrap();
            assert!(
                target.contains(&inst),
                "{} uses {} not in target",
                pp.name,
                i.instance
            );
            let (busy, _) = busy_layout(snapshot, node, i.gpu);
            assert!(
                drained.contains(&(node.clone(), i.gpu)) || !busy.contains(&inst),
                "{} takes an in-use instance",
                pp.name
            );
            assert!(
                used.insert((node.clone(), i.gpu, i.instance.start)),
                "instance {node}/{}@{} given twice",
                i.gpu,
                i.instance.start
            );
            *got.entry(format!("nvidia.com/mig-{}", i.instance.profile))
                .or_default() += 1;
            hosting.insert((node.clone(), i.gpu));
        }
        let wanted: BTreeMap<String, i64> = pod
            .requests
            .iter()
            .filter(|(k, _)| k.starts_with("nvidia.com/mig-"))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        assert_eq!(got, wanted, "{} gets other instances than it asked for", pp.name);
    }
    for e in &plan.evictions {
        if let Some(n) = &e.replaced_on {
            assert!(snapshot.nodes.iter().any(|x| &x.name == n));
        }
    }
    // Reservations: within the bounds, for pods that still wait, on GPUs nobody else is placed on,
    // and nothing placed on their nodes but their owners and pods of higher priority.
    let rp = &policy.reservations;
    let reserved: BTreeSet<(String, u32)> = plan
        .reservations
        .iter()
        .flat_map(|r| r.gpus.iter().map(|g| (r.node.clone(), g.gpu)))
        .collect();
    let held: usize = plan.reservations.iter().map(|r| r.gpus.len()).sum();
    assert_eq!(held, reserved.len(), "a GPU reserved twice");
    assert!(
        held <= rp.max_gpus as usize,
        "{held} reserved GPUs > {}",
        rp.max_gpus
    );
    let held_nodes: BTreeSet<&str> = plan.reservations.iter().map(|r| r.node.as_str()).collect();
    assert!(held_nodes.len() <= rp.max_nodes as usize);
    for r in &plan.reservations {
        let owner = plan
            .pods
            .iter()
            .find(|p| format!("{}/{}", p.namespace, p.name) == r.pod)
            .unwrap_or_else(|| panic!("reservation for {} which is not pending", r.pod));
        // Placed, it holds only on its node until the change that makes its instances.
        assert!(
            match &owner.outcome {
                PodOutcome::Waits { .. } => true,
                PodOutcome::Fits {
                    node,
                    needs_repartition,
                    ..
                } => node == &r.node && *needs_repartition,
            },
            "{} is placed and still holds a reservation",
            r.pod
        );
        for other in &plan.pods {
            if let PodOutcome::Fits { node, .. } = &other.outcome {
                assert!(
                    node != &r.node
                        || other.priority > r.priority
                        || format!("{}/{}", other.namespace, other.name) == r.pod,
                    "{}/{} placed on {} reserved for {}",
                    other.namespace,
                    other.name,
                    r.node,
                    r.pod
                );
            }
        }
    }
    // No gratuitous change: a changed GPU hosts a placed pending pod or an evicted pod placed again.
    for g in plan.gpus.iter().filter(|g| g.changed) {
        let hosts_pending = hosting.contains(&(g.node.clone(), g.index));
        assert!(
            hosts_pending || !plan.evictions.is_empty(),
            "GPU {}/{} changes for nothing",
            g.node,
            g.index
        );
    }
}

/// The value of placing `pod` (see `mig_planner::weights`): its memory slices (each profile's
/// largest count among the snapshot's GPU models) times its age factor (against the longest wait).
pub fn pod_value(snapshot: &Snapshot, pod: &mig_planner::snapshot::PendingPod) -> f64 {
    let catalog = Catalog::embedded();
    let slices_of = |profile: &str| -> u32 {
        snapshot
            .nodes
            .iter()
            .flat_map(|n| &n.gpus)
            .filter_map(|g| catalog.lookup(&g.product).ok())
            .flat_map(|m| &m.profiles)
            .filter(|p| p.name == profile)
            .map(|p| u32::from(p.memory_slices))
            .max()
            .unwrap_or(0)
    };
    let slices: u32 = pod
        .requests
        .iter()
        .filter_map(|(r, c)| {
            r.strip_prefix("nvidia.com/mig-")
                .map(|p| slices_of(p) * *c as u32)
        })
        .sum();
    let longest = snapshot
        .pending_pods
        .iter()
        .filter_map(|p| p.waited_seconds)
        .max()
        .unwrap_or(0);
    weights::place(slices, pod.waited_seconds.unwrap_or(0), longest)
}

/// Whether score key `a` is lexicographically better than `b` (beyond rounding).
pub fn lex_better(a: &[f64], b: &[f64]) -> bool {
    for (x, y) in a.iter().zip(b) {
        if (x - y).abs() > 1e-6 {
            return x > y;
        }
    }
    false
}

/// The distinct priorities of the pending pods, highest first.
pub fn tiers(snapshot: &Snapshot) -> Vec<i32> {
    let set: BTreeSet<i32> = snapshot.pending_pods.iter().map(|p| p.priority).collect();
    set.into_iter().rev().collect()
}

/// A plan's own score (`greedy` false) or its greedy plan's as a key like
/// [`score_without_drains`]'s: the value of each of `tiers` (0 for one the plan does not list),
/// then the total.
pub fn reported_key(plan: &Plan, tiers: &[i32], greedy: bool) -> Vec<f64> {
    let r = &plan.solver;
    let mut key: Vec<f64> = tiers
        .iter()
        .map(|t| {
            r.by_priority
                .iter()
                .find(|b| b.priority == *t)
                .map_or(0.0, |b| if greedy { b.greedy_score } else { b.score })
        })
        .collect();
    key.push(if greedy { r.greedy_score } else { r.score });
    key
}

/// Whether the plan is at least as good as its greedy plan: by priority first, then in all.
pub fn at_least_greedy(plan: &Plan) -> bool {
    let tiers: Vec<i32> = plan.solver.by_priority.iter().map(|b| b.priority).collect();
    !lex_better(
        &reported_key(plan, &tiers, true),
        &reported_key(plan, &tiers, false),
    )
}

/// Score of a plan under drain=never, recomputed from its output (see `mig_planner::weights`): the
/// placed value of each priority (highest first, as [`tiers`]), then the total (placed value
/// minus disruption). Plans compare lexicographically by it.
pub fn score_without_drains(snapshot: &Snapshot, plan: &Plan) -> Vec<f64> {
    let tiers = tiers(snapshot);
    let mut key = vec![0.0; tiers.len()];
    for p in plan
        .pods
        .iter()
        .filter(|p| matches!(p.outcome, PodOutcome::Fits { .. }))
    {
        let pod = snapshot
            .pending_pods
            .iter()
            .find(|q| q.namespace == p.namespace && q.name == p.name)
            .unwrap();
        let t = tiers.iter().position(|t| *t == pod.priority).unwrap();
        key[t] += pod_value(snapshot, pod);
    }
    let placed: f64 = key.iter().sum();
    let mut cost = 0.0;
    for g in plan.gpus.iter().filter(|g| g.changed) {
        let (busy, _) = busy_layout(snapshot, &g.node, g.index);
        cost += weights::CHANGE_GPU
            + if busy.is_empty() {
                0.0
            } else {
                weights::TOUCH_BUSY_GPU
            };
    }
    cost += weights::CHANGE_NODE * plan.disruption.nodes_changed as f64;
    key.push(placed - cost);
    key
}
