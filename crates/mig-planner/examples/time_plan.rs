//! Times one plan on a synthetic fleet: `cargo run --release -p mig-planner --example time_plan -- GPUS PODS`.
//! Environment: `SOLVER` (highs, microlp, greedy), `MIP_GAP`, `EXACT_NODE_LIMIT`, `SEED` (default 7),
//! `RESERVE_MAX_GPUS` (reservations by attrition; 0: none), `DRAIN` (never, idle-or-low-priority,
//! allowed), `MAX_EVICTIONS`, `BACKEND` (mig-manager, nvml).

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (gpus, pending) = (
        args.first().copied().unwrap_or(1000),
        args.get(1).copied().unwrap_or(1000),
    );
    let spec = mig_planner::synthetic::FleetSpec {
        gpus,
        pending,
        busy_gpu_share: 0.6,
        seed: std::env::var("SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(7),
    };
    let mut s = mig_planner::synthetic::fleet(&spec);
    if let Ok(g) = std::env::var("MIP_GAP") {
        s.policy.solver.mip_gap = g.parse().unwrap_or(s.policy.solver.mip_gap);
    }
    if let Ok(k) = std::env::var("SOLVER") {
        s.policy.solver.kind =
            serde_json::from_value(serde_json::Value::String(k)).expect("highs, microlp or greedy");
    }
    if let Ok(l) = std::env::var("EXACT_NODE_LIMIT") {
        s.policy.solver.exact_node_limit = l.parse().unwrap_or(s.policy.solver.exact_node_limit);
    }
    if let Ok(d) = std::env::var("DRAIN") {
        s.policy.drain = serde_json::from_value(serde_json::Value::String(d))
            .expect("never, idle-or-low-priority or allowed");
    }
    if let Ok(m) = std::env::var("MAX_EVICTIONS") {
        s.policy.budgets.max_evictions = m.parse().ok();
    }
    if let Ok(b) = std::env::var("BACKEND") {
        s.policy.backend = serde_json::from_value(serde_json::Value::String(b)).expect("mig-manager or nvml");
    }
    if let Ok(r) = std::env::var("RESERVE_MAX_GPUS") {
        s.policy.reservations.max_gpus = r.parse().unwrap_or(s.policy.reservations.max_gpus);
    }
    println!(
        "{} GPUs, {} pending, {:.0}% of slices in use",
        gpus,
        pending,
        100.0 * mig_planner::synthetic::used_share(&s)
    );
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let p = mig_planner::plan(&s, &s.policy);
        let placed = p
            .pods
            .iter()
            .filter(|x| matches!(x.outcome, mig_planner::PodOutcome::Fits { .. }))
            .count();
        println!(
            "{:>8.1} ms  solver {} {} ({} vars, {} classes, ilp {:.1} ms)  placed {placed}  gpus changed {}  score {:.0} greedy {:.0}  reserved {}  evictions {}",
            t.elapsed().as_secs_f64() * 1000.0,
            p.solver.used,
            p.solver.status,
            p.solver.variables,
            p.solver.gpu_classes,
            p.solver.solver_millis,
            p.disruption.gpus_changed,
            p.solver.score,
            p.solver.greedy_score,
            p.reservations.len(),
            p.evictions.len()
        );
        if let Some(why) = &p.solver.fallback_reason {
            println!("          fallback: {why}");
        }
    }
}
