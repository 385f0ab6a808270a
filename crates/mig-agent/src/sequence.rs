//! The node sequence as data: `step(observation, policy) -> Step { actions, next }`. Pure.
//!
//! The state lives on the Node (the grant and the agent's state annotation), so the observation
//! carries it, and a restarted agent resumes exactly where the Node says it was. The runtime
//! performs `actions` in order (each one idempotent), and only when all succeeded persists `next`:
//! so every phase is on the Node before the next one begins, and a crash anywhere repeats at most
//! an idempotent action.
//!
//! ```text
//! (grant) ─▶ Tainting ─▶ Draining ─▶ Relabeling ─▶ AwaitingMigManager ─▶ Verifying ─▶ Untainting ─▶ Done
//!               │            │              │               │                  │
//!               └────────────┴─ failure ────┴──────┬────────┴──────────────────┘
//!                  (nothing changed yet:           ▼
//!                   untaint ─▶ RolledBack)    RollingBack ─▶ RolledBack    (policy rollback)
//!                                                  └──────▶ Failed: stays tainted, Warning Event
//!
//! Draining, Relabeling: a pod the plan did not know on a GPU to change ─▶ untaint ─▶ Superseded
//! ```

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use mig_catalog::Catalog;
use mig_controller::protocol::{Grant, NodeState, Phase};
use mig_planner::snapshot::Gpu;

/// A pod on this node, as the sequence needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFact {
    /// `namespace/name`.
    pub key: String,
    /// Being deleted already (grace period running).
    pub terminating: bool,
    /// Annotated `mig-autoscaler.io/do-not-disrupt: "true"`.
    pub do_not_disrupt: bool,
}

/// What the agent sees now.
#[derive(Clone, Debug)]
pub struct Observation {
    /// The grant (`Err`: it does not parse).
    pub grant: Result<Option<Grant>, String>,
    /// Our state (`Err`: it does not parse).
    pub state: Result<Option<NodeState>, String>,
    /// Whether our taint is on the node.
    pub tainted: bool,
    /// `nvidia.com/mig.config`.
    pub mig_config: Option<String>,
    /// `nvidia.com/mig.config.state`.
    pub mig_state: Option<String>,
    /// Pods bound to this node.
    pub pods: Vec<PodFact>,
    /// The GPUs as the source reports them now.
    pub gpus: Vec<Gpu>,
    /// Now.
    pub now: Timestamp,
}

/// What to do when a phase fails or times out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Return to the previous config, then untaint (the default).
    #[default]
    Rollback,
    /// Leave the node tainted for a person, with a Warning Event.
    StayTainted,
}

/// Timeouts and the failure policy.
#[derive(Clone, Debug)]
pub struct SequencePolicy {
    /// How long draining may take (PDBs may block it).
    pub drain_timeout: SignedDuration,
    /// How long mig-manager may take.
    pub mig_manager_timeout: SignedDuration,
    /// Any other phase.
    pub phase_timeout: SignedDuration,
    /// On failure.
    pub on_failure: FailurePolicy,
}

impl Default for SequencePolicy {
    fn default() -> Self {
        SequencePolicy {
            drain_timeout: SignedDuration::from_mins(10),
            mig_manager_timeout: SignedDuration::from_mins(10),
            phase_timeout: SignedDuration::from_mins(2),
            on_failure: FailurePolicy::Rollback,
        }
    }
}

/// A side effect, idempotent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Add our NoSchedule taint (if absent).
    Taint,
    /// Remove our taint (if present).
    Untaint,
    /// Evict a pod through the Eviction API (429: wait; 404: gone).
    Evict(String),
    /// Set `nvidia.com/mig.config` (and mark `nvidia.com/mig.config.state` pending, so a success
    /// seen afterwards is mig-manager's answer to this change, not a stale one).
    Relabel(String),
    /// Publish an Event on the node.
    Event {
        /// Warning (else Normal).
        warning: bool,
        /// PascalCase reason.
        reason: &'static str,
        /// Message.
        note: String,
    },
}

/// One step's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Do these, in order.
    pub actions: Vec<Action>,
    /// Then persist this state (if all actions succeeded).
    pub next: Option<NodeState>,
}

impl Step {
    fn nothing() -> Step {
        Step {
            actions: Vec::new(),
            next: None,
        }
    }
    fn act(actions: Vec<Action>) -> Step {
        Step { actions, next: None }
    }
}

fn enter(now: Timestamp, from: &NodeState, phase: Phase, message: impl Into<String>) -> NodeState {
    NodeState {
        grant_id: from.grant_id.clone(),
        phase,
        since: now.to_string(),
        attempt: from.attempt,
        message: Some(message.into()),
        previous_config: from.previous_config.clone(),
    }
}

/// Whether the reported GPUs match the grant's targets (same instances per profile on each GPU; the
/// mig-manager backend cannot choose placements, mig-parted does).
pub fn verify(grant: &Grant, gpus: &[Gpu]) -> Result<(), String> {
    let catalog = Catalog::embedded();
    for (index, target) in &grant.targets {
        let gpu = gpus
            .iter()
            .find(|g| g.index == *index)
            .ok_or_else(|| format!("GPU {index} is not reported"))?;
        let model = catalog.lookup(&gpu.product).map_err(|e| e.to_string())?;
        let want = model
            .parse_layout(target)
            .map_err(|e| format!("GPU {index}: target {target:?}: {e}"))?;
        let mut have: BTreeMap<&str, usize> = BTreeMap::new();
        for i in &gpu.instances {
            *have.entry(i.profile.as_str()).or_default() += 1;
        }
        let mut wanted: BTreeMap<&str, usize> = BTreeMap::new();
        for i in want.instances() {
            if let Some(p) = model.profile(i.profile) {
                *wanted.entry(p.name.as_str()).or_default() += 1;
            }
        }
        if have != wanted {
            let actual: Vec<String> = gpu
                .instances
                .iter()
                .map(|i| format!("{}@{}", i.profile, i.start))
                .collect();
            return Err(format!(
                "GPU {index} has [{}], expected {target}",
                actual.join(",")
            ));
        }
    }
    Ok(())
}

fn timed_out(state: &NodeState, now: Timestamp, limit: SignedDuration) -> bool {
    state
        .since
        .parse::<Timestamp>()
        .is_ok_and(|since| now.duration_since(since) > limit)
}

/// The failure transition from `state` (the phase that failed) under `policy`.
fn fail(o: &Observation, state: &NodeState, policy: &SequencePolicy, why: String) -> Step {
    let changed_gpus = matches!(
        state.phase,
        Phase::AwaitingMigManager | Phase::Verifying | Phase::Untainting
    );
    let warn = |reason, note: String| Action::Event {
        warning: true,
        reason,
        note,
    };
    match policy.on_failure {
        FailurePolicy::StayTainted => Step {
            actions: vec![warn(
                "ReconfigurationFailed",
                format!(
                    "grant {}: {why}; the node stays tainted for a person to look at (failure policy stay-tainted)",
                    state.grant_id
                ),
            )],
            next: Some(enter(o.now, state, Phase::Failed, why)),
        },
        FailurePolicy::Rollback if !changed_gpus => Step {
            // Nothing was relabeled: the GPUs are as they were. Untaint and finish.
            actions: vec![
                Action::Untaint,
                warn(
                    "ReconfigurationRolledBack",
                    format!(
                        "grant {}: {why}; nothing was changed, the node is untainted",
                        state.grant_id
                    ),
                ),
            ],
            next: Some(enter(o.now, state, Phase::RolledBack, why)),
        },
        FailurePolicy::Rollback => match &state.previous_config {
            Some(prev) => Step {
                actions: vec![
                    warn(
                        "ReconfigurationRollingBack",
                        format!("grant {}: {why}; returning to config {prev}", state.grant_id),
                    ),
                    Action::Relabel(prev.clone()),
                ],
                next: Some(enter(o.now, state, Phase::RollingBack, why)),
            },
            None => Step {
                actions: vec![warn(
                    "ReconfigurationFailed",
                    format!(
                        "grant {}: {why}; there is no previous config to roll back to, so the node stays tainted",
                        state.grant_id
                    ),
                )],
                next: Some(enter(o.now, state, Phase::Failed, why)),
            },
        },
    }
}

/// Pods the source reports on GPUs this grant rebuilds, other than the grant's evictions: pods bound
/// after the plan was made, in the moment before our taint (or tolerating it). mig-parted rebuilds a
/// changed GPU whole, so relabeling over them fails (or would kill them): the plan is stale. A pod
/// still running ends the sequence as `Superseded` before anything changes, whatever the failure
/// policy (it is no failure; the next plan counts the pod, with no cooldown); a pod already
/// leaving (terminating, or no longer bound while the report lags) is waited for, up to `limit`.
/// `None`: nothing in the way.
fn unplanned_pods(
    o: &Observation,
    grant: &Grant,
    current: &NodeState,
    policy: &SequencePolicy,
    limit: SignedDuration,
) -> Option<Step> {
    let mut leaving = Vec::new();
    for gpu in o.gpus.iter().filter(|g| grant.targets.contains_key(&g.index)) {
        for key in gpu.instances.iter().flat_map(|i| &i.pods) {
            if grant.evictions.contains(key) {
                continue;
            }
            match o.pods.iter().find(|p| &p.key == key) {
                Some(p) if !p.terminating => {
                    let why = format!(
                        "pod {key} started on GPU {} after the plan was made (it is not among the grant's evictions); nothing was changed, the next plan counts it",
                        gpu.index
                    );
                    return Some(Step {
                        actions: vec![
                            Action::Untaint,
                            Action::Event {
                                warning: false,
                                reason: "ReconfigurationSuperseded",
                                note: format!("grant {}: {why}", current.grant_id),
                            },
                        ],
                        next: Some(enter(o.now, current, Phase::Superseded, why)),
                    });
                }
                _ => leaving.push(key.as_str()),
            }
        }
    }
    if leaving.is_empty() {
        None
    } else if timed_out(current, o.now, limit) {
        Some(fail(
            o,
            current,
            policy,
            format!("{} still on the GPUs to change", leaving.join(", ")),
        ))
    } else {
        Some(Step::nothing())
    }
}

/// One step of the node sequence.
pub fn step(o: &Observation, policy: &SequencePolicy) -> Step {
    let grant = match &o.grant {
        Ok(g) => g.as_ref(),
        Err(e) => {
            return Step::act(vec![Action::Event {
                warning: true,
                reason: "MalformedAnnotation",
                note: format!("{e}; the agent does nothing on this node until it is fixed"),
            }]);
        }
    };
    let state = match &o.state {
        Ok(s) => s.as_ref(),
        Err(e) => {
            return Step::act(vec![Action::Event {
                warning: true,
                reason: "MalformedAnnotation",
                note: format!("{e}; the agent does nothing on this node until it is fixed"),
            }]);
        }
    };
    let Some(grant) = grant else {
        return match state {
            // A sequence was running and its grant disappeared: treat it as a failure.
            Some(s) if !s.phase.is_terminal() => fail(
                o,
                s,
                policy,
                "the grant was removed while the sequence ran".into(),
            ),
            // Our taint with nothing in flight: remove it.
            _ if o.tainted => Step::act(vec![Action::Untaint]),
            _ => Step::nothing(),
        };
    };
    let current = match state {
        Some(s) if s.grant_id == grant.id => s,
        _ => {
            // A new grant: taint at once (every moment untainted lets the scheduler bind a pod the
            // plan did not see), remember the config to return to, and begin.
            return Step {
                actions: vec![
                    Action::Event {
                        warning: false,
                        reason: "ReconfigurationStarted",
                        note: format!(
                            "grant {}: {} GPU(s) to change, {} pod(s) to evict",
                            grant.plan_id,
                            grant.targets.len(),
                            grant.evictions.len()
                        ),
                    },
                    Action::Taint,
                ],
                next: Some(NodeState {
                    grant_id: grant.id.clone(),
                    phase: Phase::Tainting,
                    since: o.now.to_string(),
                    attempt: state.map_or(1, |s| if s.grant_id == grant.id { s.attempt + 1 } else { 1 }),
                    message: None,
                    previous_config: o.mig_config.clone(),
                }),
            };
        }
    };
    let next = |phase, msg: &str| Some(enter(o.now, current, phase, msg));
    match current.phase {
        Phase::Tainting => {
            if o.tainted {
                Step {
                    actions: vec![],
                    next: next(Phase::Draining, "tainted"),
                }
            } else {
                Step::act(vec![Action::Taint])
            }
        }
        Phase::Draining => {
            let remaining: Vec<&PodFact> = o
                .pods
                .iter()
                .filter(|p| grant.evictions.contains(&p.key))
                .collect();
            if let Some(p) = remaining.iter().find(|p| p.do_not_disrupt && !p.terminating) {
                return fail(
                    o,
                    current,
                    policy,
                    format!("pod {} is marked do-not-disrupt", p.key),
                );
            }
            if remaining.is_empty() {
                return unplanned_pods(o, grant, current, policy, policy.drain_timeout).unwrap_or(Step {
                    actions: vec![],
                    next: next(Phase::Relabeling, "drained"),
                });
            }
            if timed_out(current, o.now, policy.drain_timeout) {
                let left: Vec<&str> = remaining.iter().map(|p| p.key.as_str()).collect();
                return fail(
                    o,
                    current,
                    policy,
                    format!("draining timed out with {} still running", left.join(", ")),
                );
            }
            // Pods already terminating are waited for, never evicted again.
            Step::act(
                remaining
                    .iter()
                    .filter(|p| !p.terminating)
                    .map(|p| Action::Evict(p.key.clone()))
                    .collect(),
            )
        }
        Phase::Relabeling => match &grant.mig_config {
            None => fail(
                o,
                current,
                policy,
                "the grant has no mig-parted config (the nvml backend is not available in this agent)".into(),
            ),
            // Already relabeled (a crash after the action): on to mig-manager.
            Some(c) if o.mig_config.as_ref() == Some(c) => Step {
                actions: vec![],
                next: next(Phase::AwaitingMigManager, "relabeled"),
            },
            // The last look before the GPUs change.
            Some(c) => unplanned_pods(o, grant, current, policy, policy.phase_timeout).unwrap_or(Step {
                actions: vec![Action::Relabel(c.clone())],
                next: next(Phase::AwaitingMigManager, "relabeled"),
            }),
        },
        Phase::AwaitingMigManager => {
            let Some(c) = &grant.mig_config else {
                return fail(o, current, policy, "the grant has no mig-parted config".into());
            };
            if o.mig_config.as_ref() != Some(c) {
                return Step::act(vec![Action::Relabel(c.clone())]);
            }
            match o.mig_state.as_deref() {
                Some("success") => Step {
                    actions: vec![],
                    next: next(Phase::Verifying, "mig-manager applied the config"),
                },
                Some("failed") => fail(
                    o,
                    current,
                    policy,
                    format!("mig-manager reported failed for config {c}"),
                ),
                _ if timed_out(current, o.now, policy.mig_manager_timeout) => fail(
                    o,
                    current,
                    policy,
                    format!("mig-manager did not apply config {c} in time"),
                ),
                _ => Step::nothing(),
            }
        }
        Phase::Verifying => match verify(grant, &o.gpus) {
            Ok(()) => Step {
                actions: vec![],
                next: next(Phase::Untainting, "verified: actual layouts match the targets"),
            },
            Err(e) if timed_out(current, o.now, policy.phase_timeout) => {
                fail(o, current, policy, format!("verification failed: {e}"))
            }
            // The report may lag mig-manager's label by a moment.
            Err(_) => Step::nothing(),
        },
        Phase::Untainting => Step {
            actions: vec![
                Action::Untaint,
                Action::Event {
                    warning: false,
                    reason: "ReconfigurationSucceeded",
                    note: format!(
                        "grant {}: the GPUs match their targets; the node is schedulable again",
                        current.grant_id
                    ),
                },
            ],
            next: next(Phase::Done, "reconfigured"),
        },
        Phase::RollingBack => {
            let Some(prev) = &current.previous_config else {
                return Step {
                    actions: vec![],
                    next: next(Phase::Failed, "no previous config"),
                };
            };
            if o.mig_config.as_ref() != Some(prev) {
                return Step::act(vec![Action::Relabel(prev.clone())]);
            }
            let failed = |why: String| Step {
                actions: vec![Action::Event {
                    warning: true,
                    reason: "ReconfigurationFailed",
                    note: format!(
                        "grant {}: rollback to {prev} failed: {why}; the node stays tainted",
                        current.grant_id
                    ),
                }],
                next: next(Phase::Failed, &format!("rollback failed: {why}")),
            };
            match o.mig_state.as_deref() {
                Some("success") => Step {
                    actions: vec![Action::Untaint],
                    next: Some(enter(
                        o.now,
                        current,
                        Phase::RolledBack,
                        current.message.clone().unwrap_or_else(|| "rolled back".into()),
                    )),
                },
                Some("failed") => failed("mig-manager reported failed".into()),
                _ if timed_out(current, o.now, policy.mig_manager_timeout) => {
                    failed("mig-manager did not answer in time".into())
                }
                _ => Step::nothing(),
            }
        }
        Phase::Done | Phase::RolledBack | Phase::Superseded => {
            if o.tainted {
                Step::act(vec![Action::Untaint])
            } else {
                Step::nothing()
            }
        }
        Phase::Failed => Step::nothing(),
    }
}

#[cfg(test)]
mod tests {
    use mig_planner::snapshot::GpuInstance;

    use super::*;

    const H100: &str = "NVIDIA-H100-80GB-HBM3";

    fn gpu(layout: &[(&str, u8)]) -> Gpu {
        Gpu {
            index: 0,
            product: H100.into(),
            mig_enabled: true,
            instances: layout
                .iter()
                .map(|(p, s)| GpuInstance {
                    profile: p.to_string(),
                    start: *s,
                    pods: vec![],
                    utilization: None,
                })
                .collect(),
        }
    }

    fn grant() -> Grant {
        Grant {
            id: "p1".into(),
            plan_id: "p1".into(),
            mig_config: Some("mig-autoscaler-abc".into()),
            targets: [(0, "3g.40gb@0,3g.40gb@4".to_string())].into(),
            evictions: vec!["ml/old".into()],
            granted_at: "2026-06-01T12:00:00Z".into(),
            granted_by: "c".into(),
            recent_evictions: vec![],
        }
    }

    /// Our state for grant p1 in `phase` since `since`.
    fn at(phase: Phase, since: &str, previous: Option<&str>) -> NodeState {
        NodeState {
            grant_id: "p1".into(),
            phase,
            since: since.into(),
            attempt: 1,
            message: None,
            previous_config: previous.map(str::to_string),
        }
    }

    fn obs() -> Observation {
        Observation {
            grant: Ok(Some(grant())),
            state: Ok(None),
            tainted: false,
            mig_config: Some("all-1g.10gb".into()),
            mig_state: Some("success".into()),
            pods: vec![PodFact {
                key: "ml/old".into(),
                terminating: false,
                do_not_disrupt: false,
            }],
            gpus: vec![gpu(&[("1g.10gb", 0), ("1g.10gb", 1)])],
            now: "2026-06-01T12:00:10Z".parse().unwrap(),
        }
    }

    /// Apply a step to the observation as the runtime and the cluster would.
    fn apply(o: &mut Observation, s: &Step) {
        for a in &s.actions {
            match a {
                Action::Taint => o.tainted = true,
                Action::Untaint => o.tainted = false,
                Action::Evict(k) => o.pods.retain(|p| &p.key != k),
                Action::Relabel(c) => {
                    o.mig_config = Some(c.clone());
                    o.mig_state = Some("pending".into());
                }
                Action::Event { .. } => {}
            }
        }
        if let Some(n) = &s.next {
            o.state = Ok(Some(n.clone()));
        }
    }

    fn phase(o: &Observation) -> Option<Phase> {
        o.state.as_ref().ok().and_then(|s| s.as_ref()).map(|s| s.phase)
    }

    #[test]
    fn the_happy_path_walks_every_phase_in_order() {
        let mut o = obs();
        let p = SequencePolicy::default();
        let mut phases = vec![];
        for _ in 0..20 {
            let s = step(&o, &p);
            apply(&mut o, &s);
            if o.mig_state.as_deref() == Some("pending") {
                // mig-manager applies.
                o.mig_state = Some("success".into());
                o.gpus = vec![gpu(&[("3g.40gb", 0), ("3g.40gb", 4)])];
            }
            if phases.last() != phase(&o).as_ref() {
                phases.push(phase(&o).unwrap());
            }
        }
        use Phase::*;
        assert_eq!(
            phases,
            vec![
                Tainting,
                Draining,
                Relabeling,
                AwaitingMigManager,
                Verifying,
                Untainting,
                Done
            ]
        );
        assert!(!o.tainted);
        assert!(o.pods.is_empty());
        assert_eq!(
            o.state.unwrap().unwrap().previous_config.as_deref(),
            Some("all-1g.10gb")
        );
    }

    #[test]
    fn a_stale_success_does_not_pass_for_the_new_config() {
        // Relabel marks the state pending, so AwaitingMigManager waits for mig-manager's answer.
        let mut o = obs();
        o.state = Ok(Some(at(
            Phase::Relabeling,
            "2026-06-01T12:00:05Z",
            Some("all-1g.10gb"),
        )));
        o.tainted = true;
        o.pods.clear();
        let s = step(&o, &SequencePolicy::default());
        assert_eq!(s.actions, vec![Action::Relabel("mig-autoscaler-abc".into())]);
        apply(&mut o, &s);
        assert_eq!(phase(&o), Some(Phase::AwaitingMigManager));
        assert_eq!(step(&o, &SequencePolicy::default()), Step::nothing());
    }

    #[test]
    fn a_crash_at_any_point_repeats_only_idempotent_actions() {
        // Replaying the step without having persisted `next` (a crash after the actions) must give
        // the same actions or none, never a different destructive one.
        let mut o = obs();
        let p = SequencePolicy::default();
        for _ in 0..20 {
            let s = step(&o, &p);
            let mut crashed = o.clone();
            for a in &s.actions {
                // Actions done, state not persisted.
                apply(
                    &mut crashed,
                    &Step {
                        actions: vec![a.clone()],
                        next: None,
                    },
                );
            }
            let again = step(&crashed, &p);
            for a in &again.actions {
                assert!(
                    s.actions.contains(a) || matches!(a, Action::Event { .. }),
                    "after a crash the agent did {a:?}, not one of {:?}",
                    s.actions
                );
            }
            apply(&mut o, &s);
            if o.mig_state.as_deref() == Some("pending") {
                o.mig_state = Some("success".into());
                o.gpus = vec![gpu(&[("3g.40gb", 0), ("3g.40gb", 4)])];
            }
        }
        assert_eq!(phase(&o), Some(Phase::Done));
    }

    #[test]
    fn mig_manager_failure_rolls_back_or_stays_tainted() {
        for (policy, want) in [
            (FailurePolicy::Rollback, Phase::RolledBack),
            (FailurePolicy::StayTainted, Phase::Failed),
        ] {
            let p = SequencePolicy {
                on_failure: policy,
                ..Default::default()
            };
            let mut o = obs();
            let mut warned = false;
            for _ in 0..20 {
                let s = step(&o, &p);
                warned |= s
                    .actions
                    .iter()
                    .any(|a| matches!(a, Action::Event { warning: true, .. }));
                apply(&mut o, &s);
                if o.mig_state.as_deref() == Some("pending") {
                    // Fails the new config; succeeds going back.
                    let back = o.mig_config.as_deref() == Some("all-1g.10gb");
                    o.mig_state = Some(if back { "success" } else { "failed" }.into());
                }
            }
            assert_eq!(phase(&o), Some(want), "{policy:?}");
            assert!(warned, "{policy:?}: a Warning Event");
            assert_eq!(o.tainted, want == Phase::Failed, "{policy:?}");
            if want == Phase::RolledBack {
                assert_eq!(o.mig_config.as_deref(), Some("all-1g.10gb"));
            }
        }
    }

    #[test]
    fn draining_waits_for_terminating_pods_and_never_evicts_them_again() {
        let mut o = obs();
        o.tainted = true;
        o.state = Ok(Some(at(Phase::Draining, "2026-06-01T12:00:05Z", None)));
        o.pods[0].terminating = true;
        assert_eq!(step(&o, &SequencePolicy::default()), Step::nothing());
        o.pods.clear();
        assert_eq!(
            step(&o, &SequencePolicy::default()).next.unwrap().phase,
            Phase::Relabeling
        );
    }

    #[test]
    fn a_blocked_drain_times_out_and_rolls_back_without_touching_gpus() {
        let mut o = obs();
        o.tainted = true;
        o.state = Ok(Some(at(
            Phase::Draining,
            "2026-06-01T11:00:00Z",
            Some("all-1g.10gb"),
        )));
        let s = step(&o, &SequencePolicy::default());
        assert!(s.actions.contains(&Action::Untaint));
        assert!(!s.actions.iter().any(|a| matches!(a, Action::Relabel(_))));
        assert_eq!(s.next.unwrap().phase, Phase::RolledBack);
    }

    #[test]
    fn do_not_disrupt_stops_the_drain() {
        let mut o = obs();
        o.tainted = true;
        o.pods[0].do_not_disrupt = true;
        o.state = Ok(Some(at(Phase::Draining, "2026-06-01T12:00:05Z", None)));
        let s = step(&o, &SequencePolicy::default());
        assert!(!s.actions.iter().any(|a| matches!(a, Action::Evict(_))));
        assert_eq!(s.next.unwrap().phase, Phase::RolledBack);
    }

    #[test]
    fn a_pod_bound_after_the_plan_ends_the_sequence_before_the_gpus_change() {
        // `ml/new` landed on GPU 0 (which the grant rebuilds) between the plan and our taint.
        for phase in [Phase::Draining, Phase::Relabeling] {
            let mut o = obs();
            o.tainted = true;
            o.pods = vec![PodFact {
                key: "ml/new".into(),
                terminating: false,
                do_not_disrupt: false,
            }];
            o.gpus[0].instances[1].pods = vec!["ml/new".into()];
            o.state = Ok(Some(at(phase, "2026-06-01T12:00:05Z", Some("all-1g.10gb"))));
            let s = step(&o, &SequencePolicy::default());
            assert!(
                !s.actions
                    .iter()
                    .any(|a| matches!(a, Action::Relabel(_) | Action::Evict(_))),
                "{phase:?}: {s:?}"
            );
            assert!(s.actions.contains(&Action::Untaint), "{phase:?}: {s:?}");
            let next = s.next.unwrap();
            assert_eq!(next.phase, Phase::Superseded, "{phase:?}");
            assert!(next.message.unwrap().contains("ml/new started on GPU 0"));

            // Leaving already: waited for, then on.
            o.pods[0].terminating = true;
            assert_eq!(step(&o, &SequencePolicy::default()), Step::nothing());
            o.pods.clear();
            o.gpus[0].instances[1].pods.clear();
            assert!(step(&o, &SequencePolicy::default()).next.is_some());
        }
        // A pod on a GPU the grant leaves alone is no obstacle.
        let mut o = obs();
        o.tainted = true;
        o.pods.clear();
        let mut other = gpu(&[("7g.80gb", 0)]);
        other.index = 1;
        other.instances[0].pods = vec!["ml/elsewhere".into()];
        o.gpus.push(other);
        o.state = Ok(Some(at(Phase::Relabeling, "2026-06-01T12:00:05Z", None)));
        assert_eq!(
            step(&o, &SequencePolicy::default()).actions,
            vec![Action::Relabel("mig-autoscaler-abc".into())]
        );
    }

    #[test]
    fn our_taint_without_a_sequence_goes_and_garbage_stops_everything() {
        let mut o = obs();
        o.grant = Ok(None);
        o.tainted = true;
        assert_eq!(
            step(&o, &SequencePolicy::default()).actions,
            vec![Action::Untaint]
        );
        o.grant = Err("annotation mig-autoscaler.io/grant on node/n: expected value".into());
        let s = step(&o, &SequencePolicy::default());
        assert!(matches!(
            s.actions.as_slice(),
            [Action::Event {
                warning: true,
                reason: "MalformedAnnotation",
                ..
            }]
        ));
        assert!(s.next.is_none());
    }

    #[test]
    fn verify_compares_instances_per_profile() {
        let g = grant();
        assert!(verify(&g, &[gpu(&[("3g.40gb", 0), ("3g.40gb", 4)])]).is_ok());
        let e = verify(&g, &[gpu(&[("3g.40gb", 0)])]).unwrap_err();
        assert!(e.contains("expected 3g.40gb@0,3g.40gb@4"), "{e}");
        assert!(verify(&g, &[]).is_err());
    }
}
