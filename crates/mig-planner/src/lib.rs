//! The planner: `plan(snapshot, policy) -> Plan`. Pure: no I/O, no async, no Kubernetes client.
//!
//! 1. [`problem`](crate) normalises the snapshot: models from the catalog, pinned (in-use) instances,
//!    what each GPU may become (keep, change, drain and change), where each pod may go.
//! 2. A greedy first-fit builds a plan; HiGHS solves the class-level ILP warm-started from it; the
//!    better of the two, once placed on real instances, is the plan (the ILP falls back to greedy
//!    when it fails or times out without an answer).
//! 3. Every target layout is validated by the catalog again before it leaves the planner.
//!
//! ```
//! use mig_planner::{plan, Snapshot};
//! let snapshot = Snapshot::from_json(r#"{
//!   "nodes": [{"name": "n1", "gpus": [{"index": 0, "product": "NVIDIA-H100-80GB-HBM3",
//!     "instances": [{"profile": "1g.10gb", "start": 0}, {"profile": "1g.10gb", "start": 1}]}]}],
//!   "pendingPods": [{"namespace": "ml", "name": "train", "requests": {"nvidia.com/mig-3g.40gb": 1}}]
//! }"#).unwrap();
//! let p = plan(&snapshot, &snapshot.policy);
//! assert!(p.gpus[0].changed);
//! assert!(matches!(p.pods[0].outcome, mig_planner::PodOutcome::Fits { .. }));
//! ```

mod assign;
mod ilp;
mod plan;
mod problem;
mod reserve;
pub mod snapshot;
pub mod synthetic;

use std::time::Instant;

use mig_catalog::Catalog;

pub use plan::{
    Disruption, Eviction, GpuPlan, NodePlan, PlacedInstance, Plan, PlannedPhase, PodOutcome, PodPlan,
    PriorityScore, RECONFIGURING_TAINT, SolverReport, Spare, Warning,
};
pub use reserve::{PlannedReservation, ReleasedReservation};
pub use snapshot::{Backend, DrainPolicy, InputError, Policy, ReservationPolicy, Snapshot, SolverKind};

use crate::ilp::ClassSolver;
use crate::problem::Drains;

/// Objective weights. Pods compete in strict tiers by priority: a plan places as much of the
/// highest priority's demand as it can, then, never less of that, as much of the next priority's,
/// and so on (the ILP is solved once per priority, highest first; docs/planner.md "Objective"), so
/// no pod waits for capacity given to lower-priority pods. Within a tier, placing a pod is worth
/// [`PLACE`](weights::PLACE) per memory slice it asks for (a 7g is not a 1g), times an age factor
/// from 1 to 8 that grows with its wait relative to the longest wait (no size class starves).
/// Placing any pod outweighs any disruption a plan can cause for it; among plans that place the
/// same pods, fewer changed GPUs and nodes and fewer evictions win.
pub mod weights {
    /// Value of placing a pod per memory slice it asks for (1g.10gb: 1, 3g.40gb: 4, 7g.80gb: 8),
    /// before its age factor.
    pub const PLACE: f64 = 1000.0;
    /// The pod that has waited longest is worth `1 + AGE_GAIN` times as much per slice as one that
    /// just arrived: 8, the largest ratio of two profiles' sizes, so that a small pod that has
    /// waited longest is worth at least as much as any fresh large one (no size class starves).
    pub const AGE_GAIN: f64 = 7.0;
    /// Waits are measured against the longest wait among the pending pods, but never against less
    /// than this: pods that all waited minutes are valued by size alone.
    pub const AGE_HORIZON_SECONDS: u64 = 3600;
    /// The age factor grows in this many equal steps, so that identical pods of one step share
    /// the ILP's variables and coefficients stay few and small (at most 8 × 8 × 64 × [`PLACE`]).
    pub const AGE_STEPS: u64 = 8;
    /// Cost of reconfiguring a GPU.
    pub const CHANGE_GPU: f64 = 10.0;
    /// Extra cost of reconfiguring a GPU around in-use instances (nvml backend): idle GPUs go first.
    pub const TOUCH_BUSY_GPU: f64 = 2.0;
    /// Cost of touching a node at all (mig-manager pauses the node's GPU operands).
    pub const CHANGE_NODE: f64 = 5.0;
    /// Cost per evicted pod, plus this much times its instances' utilization.
    pub const EVICT: f64 = 50.0;
    /// Value of a spare instance of a profile in recent demand (up to that demand). A GPU holds at
    /// most 7 instances, so spare shape is worth at most 7 per GPU: less than [`CHANGE_GPU`], so it
    /// chooses between layouts of GPUs that change anyway and never changes one on its own.
    pub const SPARE: f64 = 1.0;

    /// The value of placing a pod that asks for `slices` memory slices in all and has waited
    /// `waited` seconds, when the longest wait among the pending pods is `longest`: [`PLACE`] ×
    /// slices × (1 + [`AGE_GAIN`] × step / [`AGE_STEPS`]), the step being how far the wait goes
    /// towards max(`longest`, [`AGE_HORIZON_SECONDS`]), rounded down.
    pub fn place(slices: u32, waited: u64, longest: u64) -> f64 {
        let horizon = longest.max(AGE_HORIZON_SECONDS);
        let step = waited.min(horizon) * AGE_STEPS / horizon;
        PLACE * f64::from(slices) * (1.0 + AGE_GAIN * step as f64 / AGE_STEPS as f64)
    }
}

/// Plan MIG layouts for a snapshot under a policy. Deterministic for the same input (apart from
/// `solver.millis`, and the solver's own time limit).
pub fn plan(snapshot: &Snapshot, policy: &Policy) -> Plan {
    plan_with(Catalog::embedded(), snapshot, policy)
}

/// [`plan`] with another catalog.
pub fn plan_with(catalog: &Catalog, snapshot: &Snapshot, policy: &Policy) -> Plan {
    let started = Instant::now();
    // First without drains; only when that leaves pods waiting do the cheapest drainable GPUs
    // where they may go get drain options (each would otherwise be a class of its own).
    let mut p = problem::Problem::build(catalog, snapshot, policy, &Drains::None);
    let mut greedy = assign::greedy(&p);
    let mut greedy_outcome = assign::realise(&p, &greedy);
    let candidates = assign::drain_candidates(&p, &greedy_outcome);
    let drain_candidates = candidates.gpus.len();
    if !candidates.gpus.is_empty() {
        p = problem::Problem::build(catalog, snapshot, policy, &Drains::Only(candidates));
        greedy = assign::greedy(&p);
        greedy_outcome = assign::realise(&p, &greedy);
    }
    let greedy_score = plan::score(&p, &greedy_outcome);
    let model = if p.exact { "per-node" } else { "per-node-group" };
    let mut report = SolverReport {
        used: "greedy".into(),
        status: "greedy".into(),
        fallback_reason: None,
        model: model.into(),
        score: greedy_score.total,
        greedy_score: greedy_score.total,
        by_priority: greedy_score
            .tiers
            .iter()
            .map(|(priority, value)| plan::PriorityScore {
                priority: *priority,
                score: *value,
                greedy_score: *value,
            })
            .collect(),
        mip_gap: policy.solver.mip_gap,
        variables: 0,
        constraints: 0,
        gpu_classes: p.classes.len(),
        drain_candidates,
        solver_millis: 0.0,
        millis: 0.0,
    };
    let mut outcome = greedy_outcome;
    let solver: Option<&dyn ClassSolver> = match policy.solver.kind {
        SolverKind::Highs => Some(&ilp::Highs),
        SolverKind::Microlp => Some(&ilp::Microlp),
        SolverKind::Greedy => None,
    };
    if let Some(solver) = solver {
        if p.classes.is_empty() && p.demands.iter().all(|d| d.evicted_from.is_none()) {
            report.status = "trivial".into();
        } else {
            match solver.solve(&p, &greedy, &policy.solver) {
                Ok((decision, info)) => {
                    report.variables = info.variables;
                    report.constraints = info.constraints;
                    report.solver_millis = info.millis;
                    let ilp_outcome = assign::realise(&p, &decision);
                    let ilp_score = plan::score(&p, &ilp_outcome);
                    // The per-node-group model pools capacity over identical nodes; what it could
                    // not place on a real node, greedy may still place by changing more GPUs.
                    let (ilp_outcome, ilp_score) = if ilp_outcome
                        .placed
                        .iter()
                        .zip(&p.demands)
                        .any(|(x, d)| x.is_none() && d.evicted_from.is_none())
                    {
                        let start = assign::Decision {
                            option: ilp_outcome.option.clone(),
                            prefer_node: ilp_outcome
                                .placed
                                .iter()
                                .map(|x| x.as_ref().map(|(n, _)| *n))
                                .collect(),
                            prefer_group: vec![Vec::new(); p.demands.len()],
                        };
                        let completed = assign::realise(&p, &assign::greedy_from(&p, &start));
                        let completed_score = plan::score(&p, &completed);
                        if completed_score.better(&ilp_score) {
                            (completed, completed_score)
                        } else {
                            (ilp_outcome, ilp_score)
                        }
                    } else {
                        (ilp_outcome, ilp_score)
                    };
                    if ilp_score.at_least(&greedy_score) {
                        report.used = solver.name().into();
                        report.status = info.status;
                        outcome = ilp_outcome;
                    } else {
                        report.fallback_reason = Some(format!(
                            "the ILP answer ({}, objective {:.1}) scored {:.1} once placed (by priority {:?}), below greedy ({:?})",
                            info.status, info.objective, ilp_score.total, ilp_score.tiers, greedy_score.tiers
                        ));
                    }
                }
                Err(e) => report.fallback_reason = Some(format!("{}: {e}", solver.name())),
            }
        }
    }
    let reservations = reserve::settle(&p, snapshot, &outcome);
    let mut plan = Plan::build(plan::Context {
        p: &p,
        snapshot,
        outcome: &outcome,
        report,
        reservations,
    });
    plan.solver.millis = started.elapsed().as_secs_f64() * 1000.0;
    plan
}
