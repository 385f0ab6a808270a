//! Named scenarios: where greedy first-fit is wrong, what drains may and may not do, and the reasons
//! a pod is told when it keeps waiting.

use mig_planner::snapshot::{Pdb, Taint, Toleration};
use mig_planner::{Backend, DrainPolicy, Plan, PodOutcome, Policy, Snapshot, SolverKind, weights};

use crate::check::check_plan;
use crate::fixtures::{gpu, node, pending, running};

pub(crate) const A100: &str = "NVIDIA-A100-SXM4-80GB";
const H100: &str = "NVIDIA-H100-80GB-HBM3";
const H200: &str = "NVIDIA-H200";

pub(crate) fn run(s: &Snapshot, policy: &Policy) -> Plan {
    let plan = mig_planner::plan(s, policy);
    check_plan(s, policy, &plan);
    plan
}

pub(crate) fn outcome<'a>(plan: &'a Plan, name: &str) -> &'a PodOutcome {
    &plan.pods.iter().find(|p| p.name == name).unwrap().outcome
}

pub(crate) fn waits(plan: &Plan, name: &str) -> String {
    match outcome(plan, name) {
        PodOutcome::Waits { reason } => reason.clone(),
        other => panic!("{name} fits: {other:?}\n{}", plan.render_table()),
    }
}

pub(crate) fn fits_on(plan: &Plan, name: &str) -> String {
    match outcome(plan, name) {
        PodOutcome::Fits { node, .. } => node.clone(),
        other => panic!("{name} waits: {other:?}\n{}", plan.render_table()),
    }
}

#[test]
fn greedy_is_wrong_when_the_first_node_is_the_only_one_a_later_pod_may_use() {
    let s = Snapshot {
        nodes: vec![
            node("a", &[("zone", "a")], vec![gpu(0, A100, &[("7g.80gb", 0, None)])]),
            node("b", &[("zone", "b")], vec![gpu(0, A100, &[("7g.80gb", 0, None)])]),
        ],
        pending_pods: vec![pending("wide", 10, &[("4g.40gb", 1)]), {
            let mut p = pending("zone-a-7g", 0, &[("7g.80gb", 1)]);
            p.node_selector.insert("zone".into(), "a".into());
            p
        }],
        ..Default::default()
    };
    let greedy_only = Policy {
        solver: mig_planner::snapshot::SolverSettings {
            kind: SolverKind::Greedy,
            ..Default::default()
        },
        ..Default::default()
    };
    let g = run(&s, &greedy_only);
    assert_eq!(g.solver.used, "greedy");
    assert_eq!(fits_on(&g, "wide"), "a");
    assert!(waits(&g, "zone-a-7g").contains("taken by higher-priority or earlier pods"));

    let plan = run(&s, &Policy::default());
    assert_eq!(plan.solver.used, "highs");
    assert_eq!(fits_on(&plan, "wide"), "b");
    assert_eq!(fits_on(&plan, "zone-a-7g"), "a");
    assert!(plan.solver.greedy_score < plan.solver.score);
    assert_eq!(
        plan.disruption.gpus_changed, 1,
        "the 7g on node a is used as it is"
    );
}

#[test]
fn greedy_is_wrong_on_partly_used_gpus() {
    // nvml backend: in-use 1g instances stay; GPU 0 has slice 6 taken, GPU 1 slice 0.
    let s = Snapshot {
        nodes: vec![node(
            "n",
            &[],
            vec![
                gpu(0, H100, &[("1g.10gb", 6, Some("run/a"))]),
                gpu(1, H100, &[("1g.10gb", 0, Some("run/b"))]),
            ],
        )],
        pending_pods: vec![
            pending("three", 10, &[("3g.40gb", 1)]),
            pending("four", 0, &[("4g.40gb", 1)]),
        ],
        running_pods: vec![running("run/a", 0), running("run/b", 0)],
        ..Default::default()
    };
    let policy = Policy {
        backend: Backend::Nvml,
        ..Default::default()
    };
    let plan = run(&s, &policy);
    fits_on(&plan, "three");
    fits_on(&plan, "four");
    assert!(
        plan.solver.greedy_score < plan.solver.score,
        "greedy puts the 3g at slice 0 of GPU 0 and blocks the 4g"
    );
    let PodOutcome::Fits { instances, .. } = outcome(&plan, "four") else {
        unreachable!()
    };
    assert_eq!((instances[0].gpu, instances[0].instance.start), (0, 0));
}

fn one_busy_gpu(pdb_allowed: u32, do_not_disrupt: bool) -> Snapshot {
    let mut victim = running("batch/low", 0);
    victim.pdbs = vec!["batch/keep".into()];
    victim.do_not_disrupt = do_not_disrupt;
    Snapshot {
        nodes: vec![node(
            "n",
            &[],
            vec![gpu(0, H100, &[("7g.80gb", 0, Some("batch/low"))])],
        )],
        pending_pods: vec![pending("urgent", 100, &[("3g.40gb", 1)])],
        running_pods: vec![victim],
        pdbs: vec![Pdb {
            namespace: "batch".into(),
            name: "keep".into(),
            disruptions_allowed: pdb_allowed,
        }],
        ..Default::default()
    }
}

#[test]
fn a_pdb_with_no_disruptions_left_is_never_overridden() {
    let policy = Policy {
        drain: DrainPolicy::Allowed,
        ..Default::default()
    };
    let plan = run(&one_busy_gpu(0, false), &policy);
    assert!(plan.evictions.is_empty());
    let why = waits(&plan, "urgent");
    assert!(why.contains("protected by PDB batch/keep"), "{why}");

    let plan = run(&one_busy_gpu(1, false), &policy);
    assert_eq!(plan.evictions.len(), 1, "{}", plan.render_table());
    assert_eq!(plan.evictions[0].pod, "batch/low");
    fits_on(&plan, "urgent");
    let phases: Vec<&str> = plan.nodes[0].phases.iter().map(|p| p.name()).collect();
    assert_eq!(
        phases,
        [
            "Tainting",
            "Draining",
            "Relabeling",
            "AwaitingMigManager",
            "Verifying",
            "Untainting"
        ]
    );
    assert_eq!(
        plan.nodes[0].phases[1],
        mig_planner::PlannedPhase::Draining {
            evict: vec!["batch/low".into()]
        }
    );
}

#[test]
fn do_not_disrupt_and_drain_policies() {
    let allowed = Policy {
        drain: DrainPolicy::Allowed,
        ..Default::default()
    };
    let plan = run(&one_busy_gpu(5, true), &allowed);
    assert!(plan.evictions.is_empty());
    assert!(waits(&plan, "urgent").contains("do-not-disrupt"));

    let never = Policy::default();
    let plan = run(&one_busy_gpu(5, false), &never);
    assert!(plan.evictions.is_empty());
    assert!(waits(&plan, "urgent").contains("drain policy: never"));

    // idle-or-low-priority: the running pod (priority 0) is below 50, so it may go.
    let low = Policy {
        drain: DrainPolicy::IdleOrLowPriority,
        low_priority_below: 50,
        ..Default::default()
    };
    let plan = run(&one_busy_gpu(5, false), &low);
    assert_eq!(plan.evictions.len(), 1);
    // ...but not when the threshold is below its priority and it is busy.
    let strict = Policy {
        drain: DrainPolicy::IdleOrLowPriority,
        low_priority_below: 0,
        ..Default::default()
    };
    let plan = run(&one_busy_gpu(5, false), &strict);
    assert!(plan.evictions.is_empty());
    assert!(waits(&plan, "urgent").contains("neither idle nor below priority 0"));
    // An eviction budget of zero wins over everything.
    let mut capped = allowed.clone();
    capped.budgets.max_evictions = Some(0);
    assert!(run(&one_busy_gpu(5, false), &capped).evictions.is_empty());
}

/// Twenty nodes of four busy H100s: each GPU runs `pods(node, gpu)` 1g pods and has one free 1g.
fn busy_fleet(pods: impl Fn(usize, usize) -> usize) -> Snapshot {
    let mut s = Snapshot::default();
    for n in 0..20 {
        let gpus = (0..4)
            .map(|g| {
                let names: Vec<String> = (0..pods(n, g)).map(|k| format!("batch/p-{n}-{g}-{k}")).collect();
                let mut instances: Vec<(&str, u8, Option<&str>)> = names
                    .iter()
                    .enumerate()
                    .map(|(k, name)| ("1g.10gb", k as u8, Some(name.as_str())))
                    .collect();
                instances.push(("1g.10gb", 6, None));
                s.running_pods.extend(names.iter().map(|name| running(name, 0)));
                gpu(g as u32, H100, &instances)
            })
            .collect();
        s.nodes.push(node(&format!("n{n}"), &[], gpus));
    }
    s
}

#[test]
fn drains_are_weighed_only_for_the_cheapest_gpus_where_waiting_pods_may_go() {
    // Every GPU runs three or four 1g pods, except one that runs a single pod: the one to drain.
    let mut s = busy_fleet(|n, g| if (n, g) == (13, 2) { 1 } else { 3 + (n + g) % 2 });
    let allowed = Policy {
        drain: DrainPolicy::Allowed,
        ..Default::default()
    };
    // Nothing waits for a drain (the 1g takes a free instance): no GPU gets a drain option (80
    // busy GPUs would be 80 classes).
    s.pending_pods = vec![pending("small", 100, &[("1g.10gb", 1)])];
    let plan = run(&s, &allowed);
    assert_eq!(plan.solver.drain_candidates, 0);
    assert!(plan.evictions.is_empty());
    assert_eq!(plan.solver.gpu_classes, 0, "{}", plan.render_table());

    // A 7g waits: twice the instances it asks for, cheapest first.
    s.pending_pods = vec![pending("big", 100, &[("7g.80gb", 1)])];
    let plan = run(&s, &allowed);
    assert_eq!(plan.solver.drain_candidates, 2);
    assert_eq!(fits_on(&plan, "big"), "n13");
    assert_eq!(plan.evictions.len(), 1);
    assert_eq!(plan.evictions[0].pod, "batch/p-13-2-0");

    // The eviction budget bounds them too (one pod per drain at least), and 0 means none.
    let mut capped = allowed.clone();
    capped.budgets.max_evictions = Some(1);
    s.pending_pods = (0..5)
        .map(|i| pending(&format!("big-{i}"), 100, &[("7g.80gb", 1)]))
        .collect();
    let plan = run(&s, &capped);
    assert_eq!(plan.solver.drain_candidates, 1);
    assert_eq!(plan.evictions.len(), 1);
    capped.budgets.max_evictions = Some(0);
    let plan = run(&s, &capped);
    assert_eq!(plan.solver.drain_candidates, 0);
    assert!(plan.evictions.is_empty());

    // Without a budget: ten instances asked for, twenty candidates at most; the ILP picks the
    // cheapest drains among them (GPUs with three pods before those with four).
    let plan = run(&s, &allowed);
    assert_eq!(plan.solver.drain_candidates, 10);
    assert_eq!(plan.evictions.len(), 1 + 4 * 3, "{}", plan.render_table());
}

#[test]
fn a_drain_evicts_pods_of_equal_priority_only_when_they_have_somewhere_to_go() {
    // GPU 0 runs one small pod; GPU 1 runs a 7g. A 7g of the same priority waits.
    let snapshot = |spare: bool| {
        let mut second = gpu(1, H100, &[("7g.80gb", 0, Some("batch/big"))]);
        if spare {
            second = gpu(
                1,
                H100,
                &[("1g.10gb", 0, None), ("1g.10gb", 1, Some("batch/other"))],
            );
        }
        Snapshot {
            nodes: vec![node(
                "n",
                &[],
                vec![gpu(0, H100, &[("1g.10gb", 3, Some("batch/small"))]), second],
            )],
            pending_pods: vec![pending("large", 0, &[("7g.80gb", 1)])],
            running_pods: vec![
                running("batch/small", 0),
                running("batch/big", 0),
                running("batch/other", 0),
            ],
            ..Default::default()
        }
    };
    let allowed = Policy {
        drain: DrainPolicy::Allowed,
        ..Default::default()
    };
    // Nowhere for the small pod to go: it is not evicted for an equal-priority pod (that would
    // only move the waiting from one pod to another, and back on the next plan).
    let plan = run(&snapshot(false), &allowed);
    assert!(plan.evictions.is_empty(), "{}", plan.render_table());
    let why = waits(&plan, "large");
    assert!(
        why.contains("only a drain makes room for it, and no drain"),
        "{why}"
    );

    // A free 1g elsewhere: the small pod moves there and the 7g gets GPU 0.
    let plan = run(&snapshot(true), &allowed);
    assert_eq!(plan.evictions.len(), 1, "{}", plan.render_table());
    assert_eq!(plan.evictions[0].pod, "batch/small");
    assert_eq!(plan.evictions[0].replaced_on.as_deref(), Some("n"));
    assert_eq!(fits_on(&plan, "large"), "n");

    // A higher-priority pod may displace it with nowhere to go, as the scheduler's preemption does.
    let mut urgent = snapshot(false);
    urgent.pending_pods[0].priority = 100;
    let plan = run(&urgent, &allowed);
    assert_eq!(plan.evictions.len(), 1, "{}", plan.render_table());
    assert_eq!(plan.evictions[0].replaced_on, None);
    assert_eq!(fits_on(&plan, "large"), "n");
}

#[test]
fn drain_candidates_favour_gpus_whose_pods_have_somewhere_to_go() {
    // Three GPUs run one 3g each (cheapest to drain, but no 3g is free anywhere), one runs two 1g
    // that the free 1g instances of the last GPU can take. A 7g of the same priority waits.
    let three_g = |i: u32| {
        gpu(
            i,
            H100,
            &[("3g.40gb", 0, Some(["batch/a", "batch/b", "batch/c"][i as usize]))],
        )
    };
    let s = Snapshot {
        nodes: vec![node(
            "n",
            &[],
            vec![
                three_g(0),
                three_g(1),
                three_g(2),
                gpu(
                    3,
                    H100,
                    &[("1g.10gb", 0, Some("batch/d")), ("1g.10gb", 1, Some("batch/e"))],
                ),
                gpu(
                    4,
                    H100,
                    &[
                        ("1g.10gb", 0, Some("batch/f")),
                        ("1g.10gb", 1, None),
                        ("1g.10gb", 2, None),
                    ],
                ),
            ],
        )],
        pending_pods: vec![pending("large", 0, &[("7g.80gb", 1)])],
        running_pods: ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|p| running(&format!("batch/{p}"), 0))
            .collect(),
        ..Default::default()
    };
    let plan = run(
        &s,
        &Policy {
            drain: DrainPolicy::Allowed,
            ..Default::default()
        },
    );
    assert_eq!(plan.solver.drain_candidates, 2);
    assert_eq!(fits_on(&plan, "large"), "n", "{}", plan.render_table());
    let mut evicted: Vec<&str> = plan.evictions.iter().map(|e| e.pod.as_str()).collect();
    evicted.sort_unstable();
    assert_eq!(evicted, ["batch/d", "batch/e"]);
    assert!(
        plan.evictions
            .iter()
            .all(|e| e.replaced_on.as_deref() == Some("n"))
    );
}

#[test]
fn a_gang_gets_the_drain_candidates_of_one_node() {
    // Node a: eight GPUs, one busy 1g pod each (half busy, so dearer to drain than the rest).
    // Nodes b and c: a pod each GPU too, idle (cheaper), plus six free 1g where pods can move; one
    // pod on each is do-not-disrupt, so neither node can ever be emptied. An 8 x 7g gang waits,
    // and node a's pods may run on any node (evicted pods go where their constraints admit them,
    // not only back to their own node or group).
    let mut s = Snapshot::default();
    for (name, pinned) in [("a", None), ("b", Some(3)), ("c", Some(5))] {
        let gpus = (0..8u32)
            .map(|g| {
                let pod = format!("batch/{name}{g}");
                let mut r = running(&pod, 0);
                r.do_not_disrupt = pinned == Some(g);
                s.running_pods.push(r);
                let mut instances = vec![("1g.10gb", 0u8, Some(pod.as_str()))];
                if name != "a" {
                    instances.extend((1..7).map(|k| ("1g.10gb", k, None)));
                }
                let mut gpu = gpu(g, H100, &instances);
                gpu.instances[0].utilization = Some(if name == "a" { 0.5 } else { 0.0 });
                gpu
            })
            .collect();
        s.nodes.push(node(name, &[], gpus));
    }
    s.pending_pods = vec![pending("gang", 0, &[("7g.80gb", 8)])];
    let mut policy = Policy {
        drain: DrainPolicy::Allowed,
        ..Default::default()
    };
    policy.budgets.max_evictions = Some(10);
    let moves_node_a = |plan: &Plan| {
        assert_eq!(fits_on(plan, "gang"), "a", "{}", plan.render_table());
        assert_eq!(plan.evictions.len(), 8);
        assert!(
            plan.evictions
                .iter()
                .all(|e| e.node == "a" && e.replaced_on.is_some())
        );
    };
    // Per node (three nodes): a's pods move to b and c.
    let plan = run(&s, &policy);
    assert_eq!(plan.solver.model, "per-node");
    assert_eq!(plan.solver.drain_candidates, 8);
    moves_node_a(&plan);
    // One group for all three: the cheapest GPUs of the group (on b and c) would be drained
    // spread over two nodes, which the pooled model counts as room for the gang; the gang gets
    // node a's eight GPUs instead, and node a a capacity group of its own.
    policy.solver.exact_node_limit = 0;
    let plan = run(&s, &policy);
    assert_eq!(plan.solver.model, "per-node-group");
    assert_eq!(plan.solver.drain_candidates, 8, "{}", plan.render_table());
    moves_node_a(&plan);
}

#[test]
fn an_equal_priority_pod_is_not_evicted_for_another() {
    let mut s = one_busy_gpu(5, false);
    s.pending_pods[0].priority = 0;
    let plan = run(
        &s,
        &Policy {
            drain: DrainPolicy::Allowed,
            ..Default::default()
        },
    );
    assert!(plan.evictions.is_empty(), "{}", plan.render_table());
}

#[test]
fn reasons_name_the_obstacle() {
    let mut s = Snapshot {
        nodes: vec![
            node("h200", &[("pool", "big")], vec![gpu(0, H200, &[])]),
            node("h100-a", &[("pool", "small")], vec![gpu(0, H100, &[])]),
            node("h100-b", &[("pool", "small")], vec![gpu(0, H100, &[])]),
        ],
        pending_pods: vec![
            {
                let mut p = pending("wrong-model", 0, &[("3g.40gb", 1)]);
                p.node_selector.insert("pool".into(), "big".into());
                p
            },
            pending("two-4g", 0, &[("4g.40gb", 2)]),
            pending("negative", 0, &[("1g.10gb", -1)]),
            pending("unknown", 0, &[("9g.1tb", 1)]),
            {
                let mut p = pending("nowhere", 0, &[("1g.10gb", 1)]);
                p.node_selector.insert("pool".into(), "gone".into());
                p
            },
        ],
        ..Default::default()
    };
    let plan = run(&s, &Policy::default());
    assert!(
        waits(&plan, "wrong-model")
            .contains("needs 3g.40gb, which no GPU on the nodes it may use has (their models: h200-141gb)")
    );
    assert!(waits(&plan, "two-4g").contains("needs 2 x 4g.40gb on one node; at most 1"));
    assert!(waits(&plan, "negative").contains("-1 is not a count"));
    assert!(waits(&plan, "unknown").contains("no GPU in the cluster offers 9g.1tb"));
    assert!(waits(&plan, "nowhere").contains("no node admits it (3 nodes: 3 by node selector)"));

    // Taints: a tainted node is only for pods that tolerate it; our own taint does not count.
    s.nodes[1].taints.push(Taint {
        key: "dedicated".into(),
        value: "x".into(),
        effect: "NoSchedule".into(),
    });
    s.nodes[2].taints.push(Taint {
        key: "mig-autoscaler.io/reconfiguring".into(),
        value: String::new(),
        effect: "NoSchedule".into(),
    });
    s.pending_pods = vec![pending("plain", 0, &[("1g.10gb", 1)]), {
        let mut p = pending("tolerant", 0, &[("1g.10gb", 1)]);
        p.tolerations.push(Toleration {
            key: "dedicated".into(),
            operator: "Equal".into(),
            value: "x".into(),
            effect: String::new(),
        });
        p.node_selector.insert("pool".into(), "small".into());
        p
    }];
    let plan = run(&s, &Policy::default());
    assert_ne!(fits_on(&plan, "plain"), "h100-a");
    fits_on(&plan, "tolerant");
}

#[test]
fn the_node_budget_holds_and_is_named() {
    let s = Snapshot {
        nodes: vec![
            node("a", &[], vec![gpu(0, H100, &[])]),
            node("b", &[], vec![gpu(0, H100, &[])]),
        ],
        pending_pods: vec![
            pending("p1", 0, &[("7g.80gb", 1)]),
            pending("p2", 0, &[("7g.80gb", 1)]),
        ],
        ..Default::default()
    };
    let mut policy = Policy::default();
    policy.budgets.max_nodes_changed = Some(1);
    let plan = run(&s, &policy);
    assert_eq!(plan.disruption.nodes_changed, 1);
    let waiting: Vec<String> = ["p1", "p2"]
        .iter()
        .filter_map(|p| match outcome(&plan, p) {
            PodOutcome::Waits { reason } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(waiting.len(), 1);
    assert!(waiting[0].contains("disruption budget exhausted"), "{waiting:?}");
    // The same under the aggregated model, which enforces node budgets when assigning.
    policy.solver.exact_node_limit = 0;
    let plan = run(&s, &policy);
    assert_eq!(plan.disruption.nodes_changed, 1);
}

#[test]
fn multi_instance_pods_stay_on_one_node() {
    let s = Snapshot {
        nodes: vec![
            node("one-gpu", &[], vec![gpu(0, A100, &[])]),
            node("two-gpus", &[], vec![gpu(0, A100, &[]), gpu(1, A100, &[])]),
        ],
        pending_pods: vec![pending("pair", 0, &[("4g.40gb", 2)])],
        ..Default::default()
    };
    let plan = run(&s, &Policy::default());
    assert_eq!(fits_on(&plan, "pair"), "two-gpus");
    let PodOutcome::Fits { instances, .. } = outcome(&plan, "pair") else {
        unreachable!()
    };
    let gpus: Vec<u32> = instances.iter().map(|i| i.gpu).collect();
    assert_eq!(gpus, [0, 1]);
}

#[test]
fn bad_gpus_are_left_alone_with_a_warning() {
    let s = Snapshot {
        nodes: vec![node(
            "n",
            &[],
            vec![
                gpu(0, "NVIDIA-L4", &[]),
                gpu(1, H100, &[("7g.80gb", 0, None), ("1g.10gb", 0, None)]),
                gpu(2, H100, &[("3g.20gb", 0, None)]),
                gpu(3, H100, &[]),
            ],
        )],
        pending_pods: vec![pending("p", 0, &[("1g.10gb", 1)])],
        ..Default::default()
    };
    let plan = run(&s, &Policy::default());
    let paths: Vec<&str> = plan.warnings.iter().map(|w| w.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "$.nodes[0].gpus[0].product",
            "$.nodes[0].gpus[1].instances",
            "$.nodes[0].gpus[2].instances[0].profile"
        ]
    );
    assert!(plan.warnings[1].message.contains("overlap") || plan.warnings[1].message.contains("both occupy"));
    assert_eq!(plan.gpus.len(), 1, "only the good GPU is planned");
    fits_on(&plan, "p");
}

#[test]
fn malformed_snapshots_name_the_json_path() {
    let err = Snapshot::from_json(r#"{"nodes": [{"name": "n", "gpus": [{"index": 0, "product": "x", "instances": [{"profile": "1g.10gb", "start": -1}]}]}]}"#)
        .unwrap_err();
    assert_eq!(err.path, "$.nodes[0].gpus[0].instances[0].start", "{err}");
    let err = Snapshot::from_json(
        r#"{"pendingPods": [{"namespace": "a", "name": "b", "requests": {"x": "one"}}]}"#,
    )
    .unwrap_err();
    assert!(err.path.starts_with("$.pendingPods[0].requests"), "{err}");
    let err = Snapshot::from_json(r#"{"nodes": [], "surprise": 1}"#).unwrap_err();
    assert!(err.message.contains("unknown field `surprise`"), "{err}");
    let err = Policy::from_json(r#"{"drain": "sometimes"}"#).unwrap_err();
    assert_eq!(err.path, "$.drain");
    assert!(!err.message.contains("YAML"), "{err}");
    // YAML is not read, and the error says so rather than only "expected value at line 1".
    let err = Snapshot::from_json("nodes:\n  - name: n\n").unwrap_err();
    assert!(
        err.message.contains("YAML? convert it with `yq -o json`"),
        "{err}"
    );
}

#[test]
fn a_frozen_node_is_never_changed_but_takes_pods_on_its_target() {
    // Node `busy-change` is mid-reconfiguration to one 7g; node `idle` could be changed instead.
    let mut frozen = node("frozen", &[], vec![gpu(0, H100, &[("7g.80gb", 0, None)])]);
    frozen.frozen = true;
    let s = Snapshot {
        nodes: vec![
            frozen,
            node("idle", &[], vec![gpu(0, H100, &[("1g.10gb", 0, None)])]),
        ],
        pending_pods: vec![
            pending("big", 0, &[("7g.80gb", 1)]),
            pending("mid", 0, &[("3g.40gb", 1)]),
        ],
        ..Default::default()
    };
    let plan = run(&s, &Policy::default());
    assert_eq!(fits_on(&plan, "big"), "frozen");
    assert_eq!(fits_on(&plan, "mid"), "idle");
    let f = plan.gpus.iter().find(|g| g.node == "frozen").unwrap();
    assert!(!f.changed, "{}", plan.render_table());

    // A frozen node whose target does not serve the pod is still not changed for it.
    let mut frozen = node("frozen", &[], vec![gpu(0, H100, &[("1g.10gb", 0, None)])]);
    frozen.frozen = true;
    let s = Snapshot {
        nodes: vec![frozen],
        pending_pods: vec![pending("big", 0, &[("7g.80gb", 1)])],
        ..Default::default()
    };
    let plan = run(&s, &Policy::default());
    waits(&plan, "big");
    assert!(plan.nodes.is_empty());
}

#[test]
fn a_plan_reads_back_from_its_json() {
    let s = Snapshot::from_json(include_str!("../../../../docs/examples/snapshot-small.json")).unwrap();
    let plan = run(&s, &s.policy);
    assert!(!plan.nodes.is_empty(), "the example changes a node");
    let json = serde_json::to_string(&plan).unwrap();
    assert!(json.contains("\"needsRepartition\""), "fields are camelCase");
    let back: Plan = serde_json::from_str(&json).unwrap();
    assert_eq!(back, plan);
}

#[test]
fn spare_capacity_follows_recent_demand() {
    // An idle A100 cut in seven 1g must change for a 3g pod; what is left beside the 3g is a free
    // choice, and recent demand makes it.
    let s = Snapshot {
        nodes: vec![node(
            "n",
            &[],
            vec![gpu(
                0,
                A100,
                &(0..7).map(|i| ("1g.10gb", i, None)).collect::<Vec<_>>(),
            )],
        )],
        pending_pods: vec![pending("three", 0, &[("3g.40gb", 1)])],
        ..Default::default()
    };
    let plain = run(&s, &Policy::default());
    assert!(plain.spare.is_empty(), "no recent demand, no spare report");
    for (profile, expect_free) in [("4g.40gb", 1), ("2g.20gb", 2), ("1g.10gb", 4)] {
        let mut shaped = s.clone();
        shaped.recent_demand.insert(profile.into(), 5);
        let plan = run(&shaped, &Policy::default());
        assert_eq!(fits_on(&plan, "three"), "n");
        assert_eq!(plan.disruption.gpus_changed, 1);
        assert_eq!(
            plan.solver.score, plain.solver.score,
            "shape never costs placements or changes"
        );
        assert_eq!(
            plan.spare,
            vec![mig_planner::Spare {
                profile: profile.into(),
                free: expect_free,
                recent_demand: 5
            }],
            "{profile}:\n{}",
            plan.render_table()
        );
        assert!(
            plan.render_table()
                .contains(&format!("{profile}: {expect_free} / 5"))
        );
    }

    // Demand alone never changes a GPU, and an unknown profile is a warning, not an error.
    let mut idle = s.clone();
    idle.pending_pods.clear();
    idle.recent_demand.insert("7g.80gb".into(), 3);
    idle.recent_demand.insert("9g.1tb".into(), 1);
    let plan = run(&idle, &Policy::default());
    assert_eq!(plan.disruption.gpus_changed, 0);
    assert_eq!(plan.spare[0].free, 0);
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.path == "recentDemand.9g.1tb" && w.message.contains("no GPU")),
        "{:?}",
        plan.warnings
    );
}

#[test]
fn a_gpu_whose_instances_are_unknown_is_never_planned_nor_used() {
    // The agent could not read GPU 1 (nvidia-smi failed): it reports it with no instances but
    // `unknown` set. Read as empty it would be the best place for the 7g pod, and an nvml plan
    // would create instances over whatever really runs there.
    let mut unreadable = gpu(1, H100, &[]);
    unreadable.unknown = Some("nvidia-smi mig -lgi -i 1: exit status 255".into());
    let s = Snapshot {
        nodes: vec![node(
            "a",
            &[],
            vec![gpu(0, H100, &[("7g.80gb", 0, Some("ml/busy"))]), unreadable],
        )],
        pending_pods: vec![pending("big", 0, &[("7g.80gb", 1)])],
        running_pods: vec![running("ml/busy", 0)],
        ..Default::default()
    };
    for backend in [Backend::MigManager, Backend::Nvml] {
        let plan = run(
            &s,
            &Policy {
                backend,
                ..Default::default()
            },
        );
        assert!(
            plan.gpus.iter().all(|g| g.index != 1 && !g.changed),
            "{}",
            plan.render_table()
        );
        waits(&plan, "big");
        assert!(
            plan.warnings
                .iter()
                .any(|w| w.path == "$.nodes[0].gpus[1].unknown" && w.message.contains("exit status 255")),
            "{:?}",
            plan.warnings
        );
    }
}

#[test]
fn the_table_says_none_and_counts_in_words() {
    let idle = Snapshot {
        nodes: vec![node("a", &[], vec![gpu(0, H100, &[("7g.80gb", 0, None)])])],
        ..Default::default()
    };
    let table = run(&idle, &Policy::default()).render_table();
    assert!(
        table.contains("disruption: 0 GPUs on 0 nodes change, 0 evictions"),
        "{table}"
    );
    assert!(table.contains("GPU CHANGES\n  none\n"), "{table}");
    assert!(table.contains("PENDING PODS\n  none\n"), "{table}");
    let one = Snapshot {
        nodes: vec![node("a", &[], vec![gpu(0, H100, &[("7g.80gb", 0, None)])])],
        pending_pods: vec![pending("small", 0, &[("1g.10gb", 1)])],
        ..Default::default()
    };
    let table = run(&one, &Policy::default()).render_table();
    assert!(
        table.contains("disruption: 1 GPU on 1 node changes, 0 evictions"),
        "{table}"
    );
    assert!(!table.contains("  none"), "{table}");
}

/// Issue 17: priorities are strict tiers. One idle H100; a priority-100 pod wants all of it (7g),
/// three priority-0 pods want a 2g each (all three fit at once). The old objective, 1000 × (1 +
/// rank) a pod, placed the three small ones (3000 > 2000) and kept the important pod waiting; no
/// number of lower-priority pods outweighs a higher-priority one now, with either ILP back-end or
/// greedy, and the plan says what each priority got.
#[test]
fn a_higher_priority_pod_never_waits_for_capacity_given_to_lower_ones() {
    let s = Snapshot {
        nodes: vec![node("n", &[], vec![gpu(0, H100, &[])])],
        pending_pods: vec![
            pending("small-0", 0, &[("2g.20gb", 1)]),
            pending("small-1", 0, &[("2g.20gb", 1)]),
            pending("small-2", 0, &[("2g.20gb", 1)]),
            pending("important", 100, &[("7g.80gb", 1)]),
        ],
        ..Default::default()
    };
    for kind in [SolverKind::Highs, SolverKind::Microlp, SolverKind::Greedy] {
        let mut policy = Policy::default();
        policy.solver.kind = kind;
        let plan = run(&s, &policy);
        assert_eq!(fits_on(&plan, "important"), "n", "{kind:?}");
        for small in ["small-0", "small-1", "small-2"] {
            assert!(!waits(&plan, small).is_empty(), "{kind:?}");
        }
        let by: Vec<(i32, f64)> = plan
            .solver
            .by_priority
            .iter()
            .map(|b| (b.priority, b.score))
            .collect();
        assert_eq!(by, vec![(100, weights::place(8, 0, 0)), (0, 0.0)], "{kind:?}");
    }
}

/// Issue 17: within a priority a pod is worth its size (memory slices) and more the longer it has
/// waited, in eighths of the longest wait (at least an hour), up to 8 times. One idle H100; a 7g
/// (8 slices) competes with a 4g and a 2g (6 slices together, and they fit together). Fresh, the
/// 7g goes first; the old objective counted pods, so the pair always won. After 7 minutes the pair
/// is still worth 6 (less than an eighth of the hour); after 8 minutes 6 × 1.875 = 11.25, and the
/// pair goes first. A 7g that has waited 9 hours, as long as the pair, is worth 64 against their
/// 48 and goes first again; one that waited 4½ hours of the pair's 9 is worth 8 × 4.5 = 36.
#[test]
fn a_pod_is_worth_its_size_and_more_the_longer_it_has_waited() {
    let mut s = Snapshot {
        nodes: vec![node("n", &[], vec![gpu(0, H100, &[])])],
        pending_pods: vec![
            pending("seven", 0, &[("7g.80gb", 1)]),
            pending("four", 0, &[("4g.40gb", 1)]),
            pending("two", 0, &[("2g.20gb", 1)]),
        ],
        ..Default::default()
    };
    let plan = run(&s, &Policy::default());
    assert_eq!(fits_on(&plan, "seven"), "n");
    let hour = weights::AGE_HORIZON_SECONDS;
    for (seven, pair, pair_first) in [
        (0, 7 * 60, false),
        (0, 8 * 60, true),
        (9 * hour, 9 * hour, false),
        (9 * hour / 2, 9 * hour, true),
    ] {
        s.pending_pods[0].waited_seconds = Some(seven);
        for p in &mut s.pending_pods[1..] {
            p.waited_seconds = Some(pair);
        }
        let plan = run(&s, &Policy::default());
        if pair_first {
            assert_eq!(fits_on(&plan, "four"), "n", "seven {seven} s, pair {pair} s");
            assert_eq!(fits_on(&plan, "two"), "n", "seven {seven} s, pair {pair} s");
            assert!(!waits(&plan, "seven").is_empty());
        } else {
            assert_eq!(fits_on(&plan, "seven"), "n", "seven {seven} s, pair {pair} s");
        }
    }
}
