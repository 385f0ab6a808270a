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
        drain: mig_planner::DrainPolicy::Never,
        max_evictions: None,
        backend: mig_planner::Backend::MigManager,
        reservations: Default::default(),
    }
}

fn pod(i: usize, at: f64, profile: &'static str, dur: f64) -> TracePod {
    TracePod {
        name: format!("p{i}"),
        arrival: at,
        duration: dur,
        profile,
        count: 1,
        gpu_milli: 1000,
    }
}

#[test]
fn repartitioning_serves_what_a_static_layout_never_can() {
    let pods: Vec<TracePod> = (0..4).map(|i| pod(i, i as f64 * 5.0, "3g.40gb", 500.0)).collect();
    let mut with_1g = pods.clone();
    with_1g.push(pod(4, 1.0, "1g.10gb", 100.0));
    let stat = simulate(&config(), &PolicyKind::Static(ALL_1G.into()), &with_1g).unwrap();
    assert_eq!(stat.started, 1, "only the 1g pod");
    assert_eq!(stat.reconfigurations, 0);
    // Waits by profile: the 3g pods wait to the end of the run (the 1g pod's departure at 101 s),
    // the 1g pod not at all.
    let by = stat.waits_by_profile();
    let one = by["1g.10gb"];
    assert_eq!((one.pods, one.mean, one.p95, one.p99), (1, 0.0, 0.0, 0.0));
    let three = by["3g.40gb"];
    assert_eq!(
        (three.pods, three.mean, three.p95, three.p99),
        (4, (101.0 + 96.0 + 91.0 + 86.0) / 4.0, 101.0, 101.0),
        "{by:?}"
    );
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

fn parva_set(i: usize) -> mig_sim::demand_sets::DemandSet {
    let path = format!(
        "{}/../../../shared/traces/parvagpu-sc24-a100-profiles/deployment/SLO{i}/SLO{i}_ParvaGPU_deploy.csv",
        env!("CARGO_MANIFEST_DIR")
    );
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e} (../shared/traces is needed)"));
    mig_sim::demand_sets::parse_parvagpu_deploy(&format!("SLO{i}"), &text).unwrap()
}

/// ParvaGPU's six deployments read as the trace README states them (GPUs and compute slices), every
/// one of its 46 GPUs is a valid A100 layout in our catalog, and the planner packs each demand set
/// on idle GPUs into no more GPUs than ParvaGPU did, never below the slice bound, placing every
/// instance; greedy first-fit needs at least as many.
#[test]
fn parvagpu_demand_sets_pack_as_tightly_as_parvagpu() {
    use mig_planner::SolverKind;
    use mig_sim::demand_sets::{fits_one_gpu, pack};
    let readme = [(2, 10), (3, 20), (5, 33), (7, 48), (13, 90), (16, 112)];
    let mut greedy_extra = 0;
    for (i, (gpus, slices)) in readme.into_iter().enumerate() {
        let set = parva_set(i + 1);
        assert_eq!(
            (set.parva_gpus.len(), set.compute_slices()),
            (gpus, slices),
            "SLO{}",
            i + 1
        );
        for layout in &set.parva_gpus {
            assert!(fits_one_gpu(A100, layout).unwrap(), "SLO{}: {layout:?}", i + 1);
        }
        let offered = (2 * gpus).div_ceil(8) * 8;
        let ilp = pack(&set, A100, offered, SolverKind::Highs).unwrap();
        let greedy = pack(&set, A100, offered, SolverKind::Greedy).unwrap();
        for r in [&ilp, &greedy] {
            assert_eq!(r.placed, set.instances.len(), "{r:?}");
            assert!(r.gpus_used >= set.lower_bound(), "{r:?}");
            let used: u32 = r.layouts.iter().flatten().map(|g| u32::from(*g)).sum();
            assert!(used >= slices, "{r:?}");
        }
        assert!(
            ilp.gpus_used <= gpus,
            "SLO{}: ILP {ilp:?} vs ParvaGPU {gpus}",
            i + 1
        );
        assert!(greedy.gpus_used >= ilp.gpus_used, "{greedy:?} vs {ilp:?}");
        greedy_extra += greedy.gpus_used - ilp.gpus_used;
    }
    assert!(
        greedy_extra > 0,
        "the demand sets never separate greedy from the ILP"
    );
}

#[test]
fn a_bad_parvagpu_deployment_names_its_line() {
    let text = "Num instance,Num GPU,Model,Placement,Instance size,Batch size,Num proc\n0,0,bert,0,3,8,1\n0,0,vgg,4,5,8,1\n";
    let e = mig_sim::demand_sets::parse_parvagpu_deploy("x.csv", text).unwrap_err();
    assert_eq!(e.line, 3, "{e}");
    assert!(e.to_string().contains("instance size 5"), "{e}");
    let e = mig_sim::demand_sets::parse_parvagpu_deploy("x.csv", "Model,Placement\n").unwrap_err();
    assert!(e.to_string().contains("Num instance"), "{e}");
}

fn synthetic_pods() -> Vec<TracePod> {
    mig_sim::parse_openb(
        "synthetic-openb.csv",
        include_str!("fixtures/synthetic-openb.csv"),
    )
    .unwrap()
}

#[test]
fn inflation_follows_fgds_tuning_and_is_deterministic_per_seed() {
    use mig_sim::inflation::inflate;
    let pods = synthetic_pods();
    let a = inflate(&pods, 12, 1.3, 42);
    let total: u32 = a.iter().map(|p| p.gpu_milli).sum();
    let largest = pods.iter().map(|p| p.gpu_milli).max().unwrap();
    assert!(
        f64::from(total) <= 1.3 * 12_000.0 && f64::from(total + largest) > 1.3 * 12_000.0,
        "total {total}"
    );
    assert_eq!(a, inflate(&pods, 12, 1.3, 42), "same seed, same workload");
    assert_ne!(a, inflate(&pods, 12, 1.3, 43), "another seed, another order");
    // Above the target, pods are removed.
    let few = inflate(&pods, 2, 1.3, 42);
    assert!(f64::from(few.iter().map(|p| p.gpu_milli).sum::<u32>()) <= 2_600.0);
}

#[test]
fn inflation_runs_compare_policies_on_the_same_workload() {
    use mig_planner::SolverKind;
    use mig_sim::inflation::{InflationPolicy, parse_openb_nodes, run_inflation};
    let nodes = parse_openb_nodes(
        "nodes.csv",
        "sn,cpu_milli,memory_mib,gpu,model\na,1,1,8,G2\nb,1,1,0,\nc,1,1,2,T4\nd,1,1,2,T4\n",
    )
    .unwrap();
    assert_eq!(nodes, vec![8, 2, 2], "CPU-only nodes are skipped");
    let workload = mig_sim::inflation::inflate(&synthetic_pods(), 12, 1.3, 7);
    let run = |p: InflationPolicy| run_inflation(A100, &nodes, &workload, &p, 7).unwrap();
    let balanced = run(InflationPolicy::Static(
        "1g.10gb@0,1g.10gb@1,2g.20gb@2,3g.40gb@4".into(),
    ));
    let first_fit = run(InflationPolicy::FirstFit);
    let planner = run(InflationPolicy::Planner {
        batch: 5,
        kind: SolverKind::Highs,
    });
    for r in [&balanced, &first_fit, &planner] {
        assert_eq!(r.offered, workload.len());
        assert_eq!(r.placed + r.failed.values().sum::<usize>(), r.offered, "{r:?}");
        // Allocation never exceeds what arrived, nor capacity.
        for (k, v) in r.requested.iter().enumerate() {
            if let Some(v) = v {
                assert!(*v <= k as f64 + 0.5 + 1e-9 && *v <= 100.0, "{r:?}");
            }
        }
        assert!(r.occupied.iter().flatten().all(|v| *v <= 100.0 + 1e-9));
    }
    // The balanced layout has no 4g or 7g: those pods fail there and are served by creating them.
    assert!(balanced.failed.get("7g.80gb").copied().unwrap_or(0) > 0);
    assert!(
        first_fit.placed > balanced.placed,
        "{first_fit:?} vs {balanced:?}"
    );
    assert!(planner.placed > balanced.placed, "{planner:?} vs {balanced:?}");
    assert!(planner.plans >= workload.len() / 5);
    // Bad input is an error, not a panic.
    assert!(run_inflation("NVIDIA-T4", &nodes, &workload, &InflationPolicy::FirstFit, 7).is_err());
    assert!(parse_openb_nodes("n.csv", "sn,gpu\na,x\n").is_err());
}

#[test]
fn fgd_results_average_over_seeds() {
    let text = "workload,sc_policy,tune,seed,total_gpus,0,1,2\nw,06-FGD,1.3,42,6212,0.5,1.0,2.0\nw,06-FGD,1.3,43,6212,0.7,1.0,\n";
    let r = mig_sim::inflation::parse_fgd_results(text);
    let curve = &r[&("w".to_string(), "06-FGD".to_string())];
    assert!((curve[0].unwrap() - 0.6).abs() < 1e-9);
    assert_eq!(curve[2], Some(2.0));
}

#[test]
fn the_ideal_reference_ignores_placement_rules_and_delays() {
    // Two 3g and a 1g on one A100: 7 compute slices, but 3g.40gb takes 4 of the 8 memory slices,
    // so no MIG layout holds all three; the ideal pool does, at once and without reconfiguring.
    let mut one_gpu = config();
    one_gpu.nodes = 1;
    one_gpu.gpus_per_node = 1;
    one_gpu.initial_layout = "3g.40gb@0,3g.40gb@4".into();
    let pods = vec![
        pod(0, 0.0, "3g.40gb", 5000.0),
        pod(1, 0.0, "3g.40gb", 5000.0),
        pod(2, 1.0, "1g.10gb", 100.0),
    ];
    let ideal = simulate(&one_gpu, &PolicyKind::Ideal, &pods).unwrap();
    assert_eq!(ideal.waits, vec![0.0, 0.0, 0.0]);
    assert_eq!(ideal.reconfigurations, 0);
    assert!(ideal.plan_millis.is_empty(), "the reference never plans");
    let ilp = simulate(&one_gpu, &PolicyKind::Ilp, &pods).unwrap();
    assert_eq!(&ilp.waits[..2], &[0.0, 0.0]);
    assert!(ilp.waits[2] >= 5000.0 - 1.0 - 1e-9, "{:?}", ilp.waits);
    assert!(ilp.mean_wait() > ideal.mean_wait());

    // An n-GPU pod needs n GPUs of one node with a whole GPU's slices free each: a 1g pod on
    // node 0 sends the 2×7g pod to node 1; with node 1 busy too, it waits for a departure.
    let mut multi = pod(1, 1.0, "7g.80gb", 100.0);
    multi.count = 2;
    let r = simulate(
        &config(),
        &PolicyKind::Ideal,
        &[pod(0, 0.0, "1g.10gb", 50.0), multi.clone()],
    )
    .unwrap();
    assert_eq!(r.waits, vec![0.0, 0.0]);
    let busy = vec![
        pod(0, 0.0, "1g.10gb", 50.0),
        pod(2, 0.0, "1g.10gb", 80.0),
        pod(3, 0.0, "1g.10gb", 80.0),
        pod(4, 0.0, "1g.10gb", 80.0),
        multi,
    ];
    // First-fit packs the four 1g pods on GPU 0 of node 0; the 2×7g takes node 1 at once.
    let r = simulate(&config(), &PolicyKind::Ideal, &busy).unwrap();
    assert_eq!(r.waits.iter().copied().fold(0.0, f64::max), 0.0, "{:?}", r.waits);
}

#[test]
fn a_report_from_observed_starts_measures_as_the_simulator_does() {
    // The slow path measures the system by its pods' start times; fed the simulator's own starts,
    // the same waits, allocation and demand come out.
    let pods: Vec<TracePod> = (0..12)
        .map(|i| {
            let profile = ["1g.10gb", "3g.40gb", "7g.80gb"][i % 3];
            pod(i, i as f64 * 40.0, profile, 300.0 + 50.0 * i as f64)
        })
        .collect();
    let r = simulate(&config(), &PolicyKind::Ilp, &pods).unwrap();
    assert_eq!(r.started, pods.len());
    let starts: Vec<Option<f64>> = pods
        .iter()
        .zip(&r.waits)
        .map(|(p, w)| Some(p.arrival + w))
        .collect();
    let end = pods
        .iter()
        .zip(&starts)
        .map(|(p, s)| s.unwrap() + p.duration)
        .fold(0.0, f64::max);
    let again =
        mig_sim::report_from_starts("again", &config(), &pods, &starts, end, r.reconfigurations).unwrap();
    assert_eq!(again.waits, r.waits);
    assert_eq!(again.wait_profiles, r.wait_profiles);
    assert_eq!(again.started, r.started);
    assert!(
        (again.allocation - r.allocation).abs() < 1e-9,
        "{} vs {}",
        again.allocation,
        r.allocation
    );
    assert!(
        (again.demand - r.demand).abs() < 1e-9,
        "{} vs {}",
        again.demand,
        r.demand
    );
    // A pod never seen running waits until the end.
    let mut missing = starts.clone();
    missing[11] = None;
    let cut = mig_sim::report_from_starts("cut", &config(), &pods, &missing, end, 0).unwrap();
    assert_eq!(cut.started, 11);
    assert_eq!(cut.waits[11], end - pods[11].arrival);
}

#[test]
fn draining_moves_a_small_pod_so_a_whole_gpu_pod_starts() {
    // One node, two all-1g GPUs, each left with one long 1g pod; then a 7g pod. Without drains it
    // waits for a departure; with drains one 1g pod is evicted, starts again on the other GPU, and
    // the 7g gets the emptied GPU after one batch and one reconfiguration.
    let mut c = config();
    c.nodes = 1;
    let mut pods: Vec<TracePod> = (0..7)
        .map(|i| pod(i, i as f64, "1g.10gb", if i == 0 { 5000.0 } else { 50.0 }))
        .collect();
    pods.push(pod(7, 7.0, "1g.10gb", 5000.0));
    pods.push(pod(8, 100.0, "7g.80gb", 100.0));
    let never = simulate(&c, &PolicyKind::Ilp, &pods).unwrap();
    assert_eq!(never.evictions, 0);
    assert!(never.waits[8] >= 4900.0 - 1e-9, "{:?}", never.waits);
    c.drain = mig_planner::DrainPolicy::Allowed;
    let drained = simulate(&c, &PolicyKind::Ilp, &pods).unwrap();
    assert_eq!(drained.evictions, 1, "{:?}", drained.waits);
    assert!(drained.waits[8] <= 10.0 + 30.0 + 1e-9, "{:?}", drained.waits);
    assert_eq!(drained.started, pods.len());
    // The evicted pod had run about 100 s on one slice when it was evicted.
    assert!(
        (0.02..0.04).contains(&drained.lost_slice_hours),
        "{}",
        drained.lost_slice_hours
    );
    // An eviction budget of 0 is the same as never.
    c.max_evictions = Some(0);
    let none = simulate(&c, &PolicyKind::Ilp, &pods).unwrap();
    assert_eq!((none.evictions, none.waits.clone()), (0, never.waits));
}

#[test]
fn the_nvml_backend_repartitions_around_a_running_pod_that_mig_manager_must_wait_for() {
    // One GPU of seven 1g; a long 1g pod holds one of them; then a 3g pod. mig-manager rebuilds a
    // GPU whole, so without draining the 3g waits until the 1g leaves (t = 10,000); nvml keeps the
    // busy 1g and rebuilds the free rest: the 3g starts after one batch and one reconfiguration.
    let pods = vec![pod(0, 0.0, "1g.10gb", 9_000.0), pod(1, 100.0, "3g.40gb", 500.0)];
    let one_gpu = |backend| SimConfig {
        nodes: 1,
        gpus_per_node: 1,
        backend,
        ..config()
    };
    let manager = simulate(
        &one_gpu(mig_planner::Backend::MigManager),
        &PolicyKind::Ilp,
        &pods,
    )
    .unwrap();
    let nvml = simulate(&one_gpu(mig_planner::Backend::Nvml), &PolicyKind::Ilp, &pods).unwrap();
    assert_eq!(manager.waits[0], 0.0);
    assert!(manager.waits[1] >= 8_900.0, "{:?}", manager.waits);
    assert_eq!(nvml.waits[0], 0.0);
    assert!(nvml.waits[1] <= 10.0 + 30.0 + 1e-6, "{:?}", nvml.waits);
    assert_eq!(nvml.evictions, 0);
    assert_eq!(nvml.reconfigurations, 1);
}

/// Reservations by attrition: node 0 is full of long 1g pods, node 1 runs one short 1g pod, and a
/// 7g pod arrives while a stream of short 1g pods keeps coming. Without a reservation the stream
/// keeps node 1 busy and the 7g pod waits until it ends; with one, node 1 takes no new pod (the
/// taint), empties when its pod ends, and the 7g pod starts soon after. The 1g pods it kept out
/// wait meanwhile, and start once the 7g pod ends.
#[test]
fn a_reservation_lets_a_large_pod_through_a_stream_of_small_ones() {
    let mut pods: Vec<TracePod> = (0..7).map(|i| pod(i, 0.0, "1g.10gb", 9_000.0)).collect();
    pods.push(pod(7, 1.0, "1g.10gb", 500.0));
    pods.push(pod(8, 10.0, "7g.80gb", 1_000.0));
    pods.extend((0..40).map(|k| pod(9 + k, 20.0 + 100.0 * k as f64, "1g.10gb", 400.0)));
    let one_gpu_nodes = SimConfig {
        nodes: 2,
        gpus_per_node: 1,
        ..config()
    };
    let with = simulate(&one_gpu_nodes, &PolicyKind::Ilp, &pods).unwrap();
    let mut off = one_gpu_nodes.clone();
    off.reservations.max_gpus = 0;
    let without = simulate(&off, &PolicyKind::Ilp, &pods).unwrap();
    assert!(
        without.waits[8] > 3_900.0,
        "the stream keeps node 1 busy: {}",
        without.waits[8]
    );
    assert!(with.waits[8] < 500.0 + 10.0 + 30.0 + 10.0, "{}", with.waits[8]);
    assert!(with.reservations >= 1 && without.reservations == 0);
    assert_eq!(with.started, pods.len());
}
