//! Reservations by attrition: which GPUs are earmarked for a large waiting pod, what they keep
//! from other pods, and when they end.

use mig_planner::snapshot::{Reservation, ReservedInstance, RunningPod};
use mig_planner::{Backend, Plan, Policy, Snapshot};

use crate::cases::{A100, fits_on, run, waits};
use crate::fixtures::{gpu, node, pending, running};

fn aged(key: &str, running_seconds: u64) -> RunningPod {
    RunningPod {
        running_seconds: Some(running_seconds),
        ..running(key, 0)
    }
}

/// Node `n`: GPU 0 with two young pods, GPU 1 with one old pod and free 1g instances beside it;
/// node `m`: one GPU full of busy 1g instances. A 7g pod waits.
fn busy_cluster() -> Snapshot {
    Snapshot {
        nodes: vec![
            node(
                "n",
                &[],
                vec![
                    gpu(
                        0,
                        A100,
                        &[
                            ("3g.40gb", 0, Some("ml/young-a")),
                            ("3g.40gb", 4, Some("ml/young-b")),
                        ],
                    ),
                    gpu(
                        1,
                        A100,
                        &[
                            ("1g.10gb", 0, Some("ml/old")),
                            ("1g.10gb", 1, None),
                            ("1g.10gb", 2, None),
                            ("3g.40gb", 4, None),
                        ],
                    ),
                ],
            ),
            node(
                "m",
                &[],
                vec![gpu(
                    0,
                    A100,
                    &(0..7)
                        .map(|s| {
                            (
                                "1g.10gb",
                                s as u8,
                                Some(["ml/m0", "ml/m1", "ml/m2", "ml/m3", "ml/m4", "ml/m5", "ml/m6"][s]),
                            )
                        })
                        .collect::<Vec<_>>(),
                )],
            ),
        ],
        pending_pods: vec![pending("big", 0, &[("7g.80gb", 1)])],
        running_pods: ["ml/young-a", "ml/young-b"]
            .iter()
            .map(|k| aged(k, 60))
            .chain([aged("ml/old", 7200)])
            .chain((0..7).map(|i| aged(&format!("ml/m{i}"), 9000)))
            .collect(),
        ..Default::default()
    }
}

fn nvml() -> Policy {
    Policy {
        backend: Backend::Nvml,
        ..Default::default()
    }
}

fn carried(plan: &Plan, age: u64) -> Vec<Reservation> {
    plan.reservations.iter().map(|r| r.carried(age)).collect()
}

#[test]
fn a_large_pod_that_cannot_be_placed_gets_the_gpu_that_empties_soonest() {
    let s = busy_cluster();
    let plan = run(&s, &nvml());
    assert_eq!(plan.reservations.len(), 1, "{}", plan.render_table());
    let r = &plan.reservations[0];
    assert_eq!((r.pod.as_str(), r.node.as_str(), r.new), ("ml/big", "n", true));
    assert_eq!(
        r.gpus,
        [ReservedInstance {
            gpu: 1,
            profile: "7g.80gb".into(),
            start: 0
        }],
        "one pod that ran two hours, not two that ran a minute nor seven"
    );
    assert_eq!(r.waiting_for, ["ml/old"]);
    // Nothing changes and nobody is evicted: the caller keeps new pods off the node (a taint).
    assert!(plan.gpus.iter().all(|g| !g.changed), "{}", plan.render_table());
    assert!(plan.evictions.is_empty());
    let why = waits(&plan, "big");
    assert!(why.contains("reserved for it: n/1 (7g.80gb@0)"), "{why}");

    // mig-manager: the same GPU (its every pod blocks the region there).
    let plan = run(&s, &Policy::default());
    assert_eq!(plan.reservations.len(), 1);
    assert_eq!(plan.reservations[0].gpus[0].gpu, 1);
    assert!(plan.gpus.iter().all(|g| !g.changed), "{}", plan.render_table());

    // Small pods get none, and none is made when reservations are off.
    let mut small = s.clone();
    small.pending_pods = vec![pending("small", 0, &[("1g.10gb", 1)])];
    small.nodes[0].gpus[1].instances.clear();
    small.nodes[0].gpus[1]
        .instances
        .push(mig_planner::snapshot::GpuInstance {
            profile: "7g.80gb".into(),
            start: 0,
            pods: vec!["ml/old".into()],
            utilization: None,
        });
    assert!(run(&small, &nvml()).reservations.is_empty());
    let mut off = nvml();
    off.reservations.max_gpus = 0;
    assert!(run(&s, &off).reservations.is_empty());
}

#[test]
fn a_declared_end_outranks_running_time() {
    let mut s = busy_cluster();
    for r in &mut s.running_pods {
        if r.name.starts_with("young") {
            r.expected_end_seconds = Some(300);
        }
    }
    let plan = run(&s, &nvml());
    assert_eq!(plan.reservations[0].gpus[0].gpu, 0, "{}", plan.render_table());
}

#[test]
fn a_reserved_node_is_kept_from_other_pods_of_the_same_priority_until_its_region_frees() {
    let mut s = busy_cluster();
    let first = run(&s, &nvml());
    // A 1g pod of equal priority arrives; GPU 1 of the node still has free 1g instances.
    s.reservations = carried(&first, 120);
    s.pending_pods.push(pending("small", 0, &[("1g.10gb", 1)]));
    let plan = run(&s, &nvml());
    assert_eq!(plan.reservations.len(), 1);
    assert!(!plan.reservations[0].new);
    assert_eq!(plan.reservations[0].age_seconds, 120);
    let why = waits(&plan, "small");
    assert!(!why.is_empty());
    assert!(plan.gpus.iter().all(|g| !g.changed), "{}", plan.render_table());

    // A higher-priority pod ends it: reservations never block one.
    s.pending_pods[1].priority = 10;
    let plan = run(&s, &nvml());
    assert!(
        plan.reservations.iter().all(|r| r.node != "n" || r.new),
        "{}",
        plan.render_table()
    );
    let released = plan.released.iter().find(|r| r.pod == "ml/big").unwrap();
    assert!(
        released.reason.contains("ml/small of higher priority"),
        "{}",
        released.reason
    );
    assert_eq!(fits_on(&plan, "small"), "n");

    // The old pod ends: the region is free and the pod is placed there after a change; the
    // reservation holds until the change is made (nothing else lands there meanwhile), then ends.
    s.pending_pods.truncate(1);
    s.nodes[0].gpus[1].instances.clear();
    let plan = run(&s, &nvml());
    assert_eq!(fits_on(&plan, "big"), "n");
    assert_eq!(plan.reservations.len(), 1, "{}", plan.render_table());
    assert!(plan.reservations[0].waiting_for.is_empty());
    s.reservations = carried(&plan, 240);
    s.nodes[0].gpus[1] = gpu(1, A100, &[("7g.80gb", 0, None)]);
    let plan = run(&s, &nvml());
    assert_eq!(fits_on(&plan, "big"), "n");
    assert!(plan.reservations.is_empty());
    assert_eq!(plan.released.len(), 1);
    assert_eq!(plan.released[0].reason, "its instances are ready on n");

    // Placed elsewhere (another node's GPU empties first): released at once.
    s.nodes[0].gpus[1] = gpu(1, A100, &[("1g.10gb", 0, Some("ml/old"))]);
    s.nodes[1].gpus[0] = gpu(0, A100, &[("7g.80gb", 0, None)]);
    let plan = run(&s, &nvml());
    assert_eq!(fits_on(&plan, "big"), "m");
    assert_eq!(plan.released[0].reason, "its pod is placed on m");
}

#[test]
fn reservations_end_with_their_pod_node_or_age_and_stay_within_bounds() {
    let s = busy_cluster();
    let held = carried(&run(&s, &nvml()), 60);
    let released = |s: &Snapshot| -> String {
        let plan = run(s, &nvml());
        let r = plan.released.iter().find(|r| r.pod == "ml/big");
        r.unwrap_or_else(|| panic!("not released\n{}", plan.render_table()))
            .reason
            .clone()
    };

    let mut gone = s.clone();
    gone.reservations = held.clone();
    gone.pending_pods.clear();
    assert!(released(&gone).contains("no longer pending"));

    let mut lost = s.clone();
    lost.reservations = held.clone();
    lost.nodes.remove(0);
    assert!(released(&lost).contains("node is gone"));

    let mut unknown = s.clone();
    unknown.reservations = held.clone();
    unknown.nodes[0].gpus[1].unknown = Some("nvidia-smi failed".into());
    assert!(released(&unknown).contains("GPU 1 is no longer reported"));

    let mut old = s.clone();
    old.reservations = held.clone();
    old.reservations[0].age_seconds = Policy::default().reservations.max_age_seconds;
    let why = released(&old);
    assert!(why.contains("expired"), "{why}");

    let mut hostile = s.clone();
    hostile.reservations = vec![Reservation {
        pod: "ml/big".into(),
        node: "n".into(),
        gpus: vec![ReservedInstance {
            gpu: 1,
            profile: "7g.80gb".into(),
            start: 3,
        }],
        age_seconds: 0,
    }];
    assert!(released(&hostile).contains("not a placement"));
    hostile.reservations[0].gpus = vec![
        ReservedInstance {
            gpu: 1,
            profile: "7g.80gb".into(),
            start: 0,
        };
        2
    ];
    assert!(released(&hostile).contains("already reserved"));
    // A flood: each is looked at only within the bounds, and all of them end.
    hostile.reservations = (0..20_000)
        .map(|i| Reservation {
            pod: "ml/big".into(),
            node: format!("n{i}"),
            gpus: vec![ReservedInstance::default()],
            age_seconds: 0,
        })
        .collect();
    let plan = run(&hostile, &nvml());
    assert_eq!(plan.released.len(), 20_000);
    assert!(plan.released.iter().all(|r| !r.reason.is_empty()));

    // Bounds: one GPU at most, two big pods: one reservation.
    let mut two = s.clone();
    two.pending_pods.push(pending("big2", 0, &[("7g.80gb", 1)]));
    let mut one_gpu = nvml();
    one_gpu.reservations.max_gpus = 1;
    assert_eq!(run(&two, &one_gpu).reservations.len(), 1);
    assert_eq!(run(&two, &nvml()).reservations.len(), 2);
}

#[test]
fn the_table_lists_reservations_and_releases() {
    let s = busy_cluster();
    let plan = run(&s, &nvml());
    let table = plan.render_table();
    assert!(
        table.contains("RESERVATIONS\n  ml/big on n [gpu1:7g.80gb@0] (new): waits for ml/old"),
        "{table}"
    );
    let mut gone = s.clone();
    gone.reservations = carried(&plan, 60);
    gone.pending_pods.clear();
    let table = run(&gone, &nvml()).render_table();
    assert!(
        table.contains("released: ml/big on n: its pod is no longer pending"),
        "{table}"
    );
}

/// A gang (8 × 7g, one node) is planned as a unit and, when it cannot be placed, reserves a whole
/// node: the one whose last busy GPU should empty soonest, its idle GPUs included (they are kept
/// idle for it), within the GPU bound.
#[test]
fn a_gang_reserves_a_whole_node() {
    let node_of = |name: &str, busy: &[(u32, &'static str, u64)]| {
        let gpus = (0..8)
            .map(|i| match busy.iter().find(|(g, _, _)| *g == i) {
                Some((_, pod, _)) => gpu(i, A100, &[("1g.10gb", 0, Some(pod))]),
                None => gpu(i, A100, &[]),
            })
            .collect();
        node(name, &[], gpus)
    };
    let a_pods: Vec<(u32, &str, u64)> = vec![
        (0, "ml/a0", 60),
        (1, "ml/a1", 60),
        (2, "ml/a2", 60),
        (3, "ml/a3", 60),
        (4, "ml/a4", 60),
        (5, "ml/a5", 60),
        (6, "ml/a6", 60),
        (7, "ml/a7", 60),
    ];
    let b_pods: Vec<(u32, &str, u64)> = vec![(3, "ml/b3", 60)];
    let s = Snapshot {
        nodes: vec![node_of("a", &a_pods), node_of("b", &b_pods)],
        pending_pods: vec![pending("gang", 0, &[("7g.80gb", 8)])],
        running_pods: a_pods
            .iter()
            .chain(&b_pods)
            .map(|(_, p, t)| aged(p, *t))
            .collect(),
        ..Default::default()
    };
    let plan = run(&s, &Policy::default());
    assert_eq!(plan.reservations.len(), 1, "{}", plan.render_table());
    let r = &plan.reservations[0];
    assert_eq!(r.node, "b");
    assert_eq!(r.gpus.len(), 8);
    assert_eq!(r.waiting_for, ["ml/b3"]);
    // Seven GPUs are too few.
    let mut small = Policy::default();
    small.reservations.max_gpus = 7;
    assert!(run(&s, &small).reservations.is_empty());
}
