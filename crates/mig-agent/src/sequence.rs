//! The node sequence as data: `step(observation, policy) -> Step { effects, next }`. Pure.
//!
//! The state lives on the Node (the grant and the agent's state annotation), so the observation
//! carries it, and a restarted agent resumes exactly where the Node says it was. The runtime
//! performs `effects` in order (each one idempotent), and only when all succeeded persists `next`:
//! so every phase is on the Node before the next one begins, and a crash anywhere repeats at most
//! an idempotent effect.
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
//!
//! With the nvml backend, `Relabeling ─▶ AwaitingMigManager` is one phase, `Applying`: destroy the
//! instances the target drops, create the ones it adds at their placements (in-use instances the
//! target keeps are never touched), restart the device plugin; `Verifying` then checks placements
//! exactly and what the device plugin advertises; a rollback returns the GPUs to the layouts
//! recorded when the sequence began.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use mig_catalog::{Catalog, GpuModel, Instance, Layout, NamedInstance};
use mig_planner::snapshot::{Backend, Gpu, GpuInstance};
use mig_protocol::{DEVICE_PLUGIN_PAUSED, Grant, MalformedAnnotation, NodeState, Phase, Reason};

use crate::error::LayoutError;

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
    pub grant: Result<Option<Grant>, MalformedAnnotation>,
    /// Our state (`Err`: it does not parse).
    pub state: Result<Option<NodeState>, MalformedAnnotation>,
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
    /// What the device plugin advertises on the Node: allocatable `nvidia.com/mig-*` by resource.
    pub advertised: BTreeMap<String, u64>,
    /// `nvidia.com/gpu.deploy.device-plugin` on the Node.
    pub device_plugin_label: Option<String>,
    /// Device-plugin pods on the node (terminating ones included).
    pub device_plugin_pods: usize,
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
    /// How target layouts reach the GPUs (must match the controller's `planner.backend`).
    pub backend: Backend,
    /// A grant older than this when the agent first sees it is refused (never started): the plan
    /// it came from is stale, or it was replayed.
    pub max_grant_age: SignedDuration,
}

impl Default for SequencePolicy {
    fn default() -> Self {
        SequencePolicy {
            drain_timeout: SignedDuration::from_mins(10),
            mig_manager_timeout: SignedDuration::from_mins(10),
            phase_timeout: SignedDuration::from_mins(2),
            on_failure: FailurePolicy::Rollback,
            backend: Backend::MigManager,
            max_grant_age: SignedDuration::from_mins(10),
        }
    }
}

/// A side effect, idempotent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Add our NoSchedule taint (if absent).
    Taint,
    /// Remove our taint (if present).
    Untaint,
    /// Set `nvidia.com/mig.config` (and mark `nvidia.com/mig.config.state` pending, so a success
    /// seen afterwards is mig-manager's answer to this change, not a stale one).
    Relabel(String),
    /// nvml backend: destroy, then create, GPU instances on one GPU.
    Apply(InstanceChange),
    /// nvml backend: stop the device plugin on this node (`nvidia.com/gpu.deploy.device-plugin=
    /// paused-for-mig-change`, as mig-manager does): it does not notice instances created or
    /// destroyed under it, and advertises them only once started again.
    PauseDevicePlugin,
    /// Start it again (`nvidia.com/gpu.deploy.device-plugin=true`).
    ResumeDevicePlugin,
    /// Publish an Event on the node (its type is the reason's).
    Event {
        /// Reason.
        reason: Reason,
        /// Message.
        note: String,
    },
}

/// What the nvml backend changes on one GPU to reach a layout: instances to destroy (there, not in
/// the layout) and to create (in the layout, not there), by the catalog's names. Instances in both
/// are not touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceChange {
    /// GPU index.
    pub gpu: u32,
    /// Destroy these first.
    pub destroy: Vec<NamedInstance>,
    /// Then create these, at exactly these placements.
    pub create: Vec<NamedInstance>,
}

/// A reported GPU as the catalog reads it: its model and layout.
#[derive(Clone, Debug)]
struct Resolved {
    model: &'static GpuModel,
    layout: Layout,
}

/// A reported GPU's model and layout (its profile names resolved by the catalog).
fn resolve(gpu: &Gpu) -> Result<Resolved, LayoutError> {
    let model = Catalog::embedded().lookup(&gpu.product)?;
    let instances = gpu
        .instances
        .iter()
        .map(|i| {
            model
                .resolve_instance(&i.named())
                .ok_or_else(|| LayoutError::UnknownProfile {
                    gpu: gpu.index,
                    profile: i.profile.clone(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Resolved {
        model,
        layout: Layout::new(instances),
    })
}

/// The node's GPUs as one step reads them: each reported GPU resolved by the catalog once.
struct Reading<'a> {
    gpus: Vec<(&'a Gpu, Result<Resolved, LayoutError>)>,
}

impl<'a> Reading<'a> {
    fn new(gpus: &'a [Gpu]) -> Self {
        Reading {
            gpus: gpus.iter().map(|g| (g, resolve(g))).collect(),
        }
    }

    /// GPU `index` to act on: reported, its instances read, its model and profiles known.
    fn gpu(&self, index: u32) -> Result<(&'a Gpu, &Resolved), LayoutError> {
        let (gpu, resolved) = self
            .gpus
            .iter()
            .find(|(g, _)| g.index == index)
            .ok_or(LayoutError::NotReported { gpu: index })?;
        if let Some(why) = &gpu.unknown {
            return Err(LayoutError::Unknown {
                gpu: index,
                why: why.clone(),
            });
        }
        resolved.as_ref().map(|r| (*gpu, r)).map_err(Clone::clone)
    }

    /// The first of `indices` that is not reported or whose instances could not be read, with
    /// why. Unknown is never empty: no step acts on such a GPU.
    fn unreadable<'i>(&self, indices: impl IntoIterator<Item = &'i u32>) -> Option<LayoutError> {
        indices.into_iter().find_map(|index| match self.gpu(*index) {
            Err(e @ (LayoutError::NotReported { .. } | LayoutError::Unknown { .. })) => Some(e),
            _ => None,
        })
    }

    /// Each GPU of `layouts` (GPU index → layout text: a grant's targets, or the layouts a
    /// sequence began with) with the layout to reach, parsed and validated here, once.
    fn toward(&self, layouts: &BTreeMap<u32, String>) -> Goals<'a> {
        Goals(
            layouts
                .iter()
                .map(|(index, text)| {
                    let goal = self.gpu(*index).and_then(|(gpu, r)| {
                        Ok(Goal {
                            gpu,
                            model: r.model,
                            have: r.layout.clone(),
                            want: target_layout(r.model, *index, text)?,
                            text: text.clone(),
                        })
                    });
                    (*index, goal)
                })
                .collect(),
        )
    }

    /// What the device plugin should advertise for these GPUs: instances per resource name.
    fn expected_advertising(&self) -> Result<BTreeMap<String, u64>, LayoutError> {
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        for (_, resolved) in &self.gpus {
            let Resolved { model, layout } = resolved.as_ref().map_err(Clone::clone)?;
            for p in &model.profiles {
                out.entry(p.resource_name()).or_default();
            }
            for p in layout.instances().iter().filter_map(|i| model.profile(i.profile)) {
                *out.entry(p.resource_name()).or_default() += 1;
            }
        }
        Ok(out)
    }

    /// Whether the device plugin advertises exactly the instances the GPUs have.
    fn advertising_matches(&self, advertised: &BTreeMap<String, u64>) -> Result<(), LayoutError> {
        for (resource, n) in &self.expected_advertising()? {
            let have = advertised.get(resource).copied().unwrap_or(0);
            if have != *n {
                return Err(LayoutError::Advertising {
                    resource: resource.clone(),
                    have,
                    want: *n,
                });
            }
        }
        Ok(())
    }
}

/// One GPU and the layout it is to reach.
#[derive(Clone, Debug)]
struct Goal<'a> {
    gpu: &'a Gpu,
    model: &'static GpuModel,
    /// What it has now.
    have: Layout,
    /// What it is to have.
    want: Layout,
    /// `want` as written in the grant or the node's state.
    text: String,
}

impl Goal<'_> {
    /// What the nvml backend changes to reach the goal.
    fn change(&self) -> InstanceChange {
        let named = |i: &Instance| self.model.name_instance(i);
        InstanceChange {
            gpu: self.gpu.index,
            destroy: self.have.difference(&self.want).map(named).collect(),
            create: self.want.difference(&self.have).map(named).collect(),
        }
    }

    /// Whether reaching the goal destroys the reported instance `i` (the nvml backend keeps the
    /// instances the goal keeps).
    fn drops(&self, i: &GpuInstance) -> bool {
        self.model
            .resolve_instance(&i.named())
            .is_some_and(|x| !self.want.contains(&x))
    }

    /// Whether the GPU has the goal's instances per profile (mig-manager cannot choose
    /// placements: mig-parted does).
    fn same_counts(&self) -> bool {
        self.model.counts(&self.have) == self.model.counts(&self.want)
    }
}

/// Layouts to reach, by GPU index, each resolved against its GPU as reported (or why it cannot be).
struct Goals<'a>(BTreeMap<u32, Result<Goal<'a>, LayoutError>>);

impl Goals<'_> {
    /// What must change on each GPU to reach its goal; GPUs already there are left out, so an
    /// empty answer means every GPU is at its goal, placements included. The first GPU that cannot
    /// be resolved is the error.
    fn changes(&self) -> Result<Vec<InstanceChange>, LayoutError> {
        let mut out = Vec::new();
        for goal in self.0.values() {
            let change = goal.as_ref().map_err(Clone::clone)?.change();
            if !change.destroy.is_empty() || !change.create.is_empty() {
                out.push(change);
            }
        }
        Ok(out)
    }

    /// Whether every GPU is at its goal, placements included.
    fn reached(&self) -> bool {
        self.changes().is_ok_and(|c| c.is_empty())
    }

    /// The goal's text for GPU `index`.
    fn text(&self, index: u32) -> String {
        match self.0.get(&index) {
            Some(Ok(goal)) => goal.text.clone(),
            _ => String::new(),
        }
    }
}

/// A grant's target for GPU `index` as a valid layout of `model`.
fn target_layout(model: &GpuModel, index: u32, target: &str) -> Result<Layout, LayoutError> {
    let bad = |why: String| LayoutError::BadTarget {
        gpu: index,
        target: target.to_string(),
        why,
    };
    let want = model.parse_layout(target).map_err(|e| bad(e.to_string()))?;
    model
        .validate(&want)
        .map_err(|e| bad(format!("not a valid layout: {e}")))?;
    Ok(want)
}

/// An instance `changes` would destroy that the report shows in use, as words: such a change is
/// never made (the driver refuses one a process holds, but a pod between processes holds it too).
fn destroys_in_use(changes: &[InstanceChange], gpus: &[Gpu]) -> Option<String> {
    changes.iter().find_map(|c| {
        let gpu = gpus.iter().find(|g| g.index == c.gpu)?;
        c.destroy.iter().find_map(|d| {
            let i = gpu
                .instances
                .iter()
                .find(|i| i.start == d.start && !i.pods.is_empty())?;
            Some(format!("{d} on GPU {} is in use by {}", c.gpu, i.pods.join(", ")))
        })
    })
}

/// Why a new grant is not started at all (it is not ours, or too old), or `None`.
fn refused(grant: &Grant, o: &Observation, policy: &SequencePolicy) -> Option<String> {
    if let Some(c) = &grant.mig_config
        && !c.starts_with(mig_catalog::migparted::CONFIG_NAME_PREFIX)
    {
        return Some(format!(
            "its mig-parted config {c:?} is not one the controller renders ({}…)",
            mig_catalog::migparted::CONFIG_NAME_PREFIX
        ));
    }
    match grant.granted_at.parse::<Timestamp>() {
        Err(_) => Some(format!("its grant time {:?} is not a time", grant.granted_at)),
        Ok(at) if o.now.duration_since(at) > policy.max_grant_age => Some(format!(
            "it was granted at {at}, more than {} ago",
            policy.max_grant_age
        )),
        Ok(_) => None,
    }
}

/// The reported instances reaching `targets` destroys: with mig-manager every instance of a GPU
/// that changes (mig-parted rebuilds it whole); with nvml only those its target drops (all of
/// them where the target cannot be resolved).
fn doomed<'g>(gpus: &'g [Gpu], targets: &Goals<'_>, backend: Backend) -> Vec<(u32, &'g GpuInstance)> {
    let mut out = Vec::new();
    for gpu in gpus {
        let Some(goal) = targets.0.get(&gpu.index) else {
            continue;
        };
        let goal = match backend {
            Backend::MigManager => None,
            Backend::Nvml => goal.as_ref().ok(),
        };
        for i in &gpu.instances {
            if goal.is_none_or(|g| g.drops(i)) {
                out.push((gpu.index, i));
            }
        }
    }
    out
}

/// mig-manager backend: whether the GPUs have their targets' instances per profile.
fn verify(targets: &Goals<'_>) -> Result<(), LayoutError> {
    for goal in targets.0.values() {
        let goal = goal.as_ref().map_err(Clone::clone)?;
        if !goal.same_counts() {
            return Err(LayoutError::Counts {
                gpu: goal.gpu.index,
                actual: goal.model.format_layout(&goal.have),
                target: goal.text.clone(),
            });
        }
    }
    Ok(())
}

/// nvml backend: the GPUs at their exact target placements, and the device plugin advertising
/// what the GPUs have.
fn verify_exact(
    targets: &Goals<'_>,
    reading: &Reading<'_>,
    advertised: &BTreeMap<String, u64>,
) -> Result<(), LayoutError> {
    if let Some(c) = targets.changes()?.first() {
        return Err(LayoutError::Differs {
            gpu: c.gpu,
            target: targets.text(c.gpu),
            destroy: c.destroy.len(),
            create: c.create.len(),
        });
    }
    reading.advertising_matches(advertised)
}

fn plugin_paused(o: &Observation) -> bool {
    o.device_plugin_label.as_deref() == Some(DEVICE_PLUGIN_PAUSED)
}

/// nvml backend, at the end of any sequence: a device plugin we paused is started again.
fn resume_plugin(o: &Observation, policy: &SequencePolicy) -> Option<Effect> {
    (policy.backend == Backend::Nvml && plugin_paused(o)).then_some(Effect::ResumeDevicePlugin)
}

/// One step's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Do these, in order.
    pub effects: Vec<Effect>,
    /// Then persist this state (if all effects succeeded).
    pub next: Option<NodeState>,
}

impl Step {
    fn nothing() -> Step {
        Step {
            effects: Vec::new(),
            next: None,
        }
    }
    fn effect(effects: Vec<Effect>) -> Step {
        Step { effects, next: None }
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
        previous_layouts: from.previous_layouts.clone(),
        restarting_device_plugin: false,
        heartbeat: None,
    }
}

/// `GPU 0 → 1g.10gb@0,…; GPU 1 → …`.
fn describe(layouts: &BTreeMap<u32, String>) -> String {
    layouts
        .iter()
        .map(|(i, l)| format!("GPU {i} → {l}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// One step of the node sequence.
pub fn step(o: &Observation, policy: &SequencePolicy) -> Step {
    // Our annotations unreadable: nothing is done on this node until they are fixed (the
    // controller reports them as `MalformedAnnotation`; the runtime counts and logs them).
    let (Ok(grant), Ok(state)) = (&o.grant, &o.state) else {
        return Step::nothing();
    };
    let (grant, state) = (grant.as_ref(), state.as_ref());
    // The edge: the GPUs are read, and every layout text parsed, here and only here.
    let reading = Reading::new(&o.gpus);
    let Some(grant) = grant else {
        return match state {
            // A sequence was running and its grant disappeared: treat it as a failure.
            Some(s) if !s.phase.is_terminal() => {
                InFlight::new(o, policy, s, reading).fail("the grant was removed while the sequence ran")
            }
            // Our taint (or our pause of the device plugin) with nothing in flight: undo it.
            _ => Step::effect(
                o.tainted
                    .then_some(Effect::Untaint)
                    .into_iter()
                    .chain(resume_plugin(o, policy))
                    .collect(),
            ),
        };
    };
    let current = match state {
        Some(s) if s.grant_id == grant.id => s,
        _ => return begin(o, grant, state, policy, &reading),
    };
    let targets = reading.toward(&grant.targets);
    let s = Granted {
        run: InFlight::new(o, policy, current, reading),
        grant,
        targets,
    };
    // A GPU to change that cannot be read now: nothing is done on the node until it can, and the
    // phase's timeout applies as ever (a rollback, too, acts only on GPUs it can read).
    let acting = matches!(
        current.phase,
        Phase::Draining | Phase::Relabeling | Phase::Applying | Phase::AwaitingMigManager | Phase::Verifying
    );
    if acting && let Some(why) = s.run.reading.unreadable(grant.targets.keys()) {
        let limit = match current.phase {
            Phase::Draining => policy.drain_timeout,
            Phase::AwaitingMigManager => policy.mig_manager_timeout,
            _ => policy.phase_timeout,
        };
        return if s.run.timed_out(limit) {
            s.run.fail(why)
        } else {
            Step::nothing()
        };
    }
    match current.phase {
        Phase::Tainting => s.run.tainting(),
        Phase::Draining => s.draining(),
        Phase::Relabeling => s.relabeling(),
        Phase::Applying => s.applying(),
        Phase::AwaitingMigManager => s.awaiting_mig_manager(),
        Phase::Verifying => s.verifying(),
        Phase::Untainting => s.run.untainting(),
        Phase::RollingBack if policy.backend == Backend::Nvml => s.run.rolling_back_nvml(),
        Phase::RollingBack => s.run.rolling_back_mig_manager(),
        Phase::Done | Phase::RolledBack | Phase::Superseded => Step::effect(
            o.tainted
                .then_some(Effect::Untaint)
                .into_iter()
                .chain(resume_plugin(o, policy))
                .collect(),
        ),
        // The taint stays for a person; the device plugin runs whatever happened.
        Phase::Failed => Step::effect(resume_plugin(o, policy).into_iter().collect()),
    }
}

/// A grant this node has not started: refused (not ours, or too old), ended at once (a GPU to change
/// cannot be read), or begun (taint at once, remember what to return to).
fn begin(
    o: &Observation,
    grant: &Grant,
    state: Option<&NodeState>,
    policy: &SequencePolicy,
    reading: &Reading<'_>,
) -> Step {
    if let Some(why) = refused(grant, o, policy) {
        return Step::effect(vec![Effect::Event {
            reason: Reason::GrantRefused,
            note: format!("grant {}: not started: {why}", grant.id),
        }]);
    }
    if let Some(why) = reading.unreadable(grant.targets.keys()) {
        // Changed nothing: ends like a stale plan (no cooldown), the next plan sees it.
        let why = format!("{why}; nothing was changed");
        return Step {
            effects: vec![Effect::Event {
                reason: Reason::ReconfigurationSuperseded,
                note: format!("grant {}: {why}", grant.id),
            }],
            next: Some(NodeState {
                grant_id: grant.id.clone(),
                phase: Phase::Superseded,
                since: o.now.to_string(),
                attempt: 1,
                message: Some(why),
                previous_config: o.mig_config.clone(),
                previous_layouts: BTreeMap::new(),
                restarting_device_plugin: false,
                heartbeat: None,
            }),
        };
    }
    // A new grant: taint at once (every moment untainted lets the scheduler bind a pod the
    // plan did not see), remember the config to return to, and begin.
    Step {
        effects: vec![
            Effect::Event {
                reason: Reason::ReconfigurationStarted,
                note: format!(
                    "grant {}: {} GPU(s) to change, {} pod(s) to evict",
                    grant.plan_id,
                    grant.targets.len(),
                    grant.evictions.len()
                ),
            },
            Effect::Taint,
        ],
        next: Some(NodeState {
            grant_id: grant.id.clone(),
            phase: Phase::Tainting,
            since: o.now.to_string(),
            attempt: state.map_or(1, |s| if s.grant_id == grant.id { s.attempt + 1 } else { 1 }),
            message: None,
            previous_config: o.mig_config.clone(),
            previous_layouts: grant
                .targets
                .keys()
                .filter_map(|i| {
                    let (_, r) = reading.gpu(*i).ok()?;
                    Some((*i, r.model.format_layout(&r.layout)))
                })
                .collect(),
            restarting_device_plugin: false,
            heartbeat: None,
        }),
    }
}

/// A sequence in flight, as one step sees it: the observation, the policy, the node's state, the
/// GPUs as read, and the layouts the sequence began with (where a rollback returns them).
struct InFlight<'a> {
    o: &'a Observation,
    policy: &'a SequencePolicy,
    current: &'a NodeState,
    reading: Reading<'a>,
    previous: Goals<'a>,
}

impl<'a> InFlight<'a> {
    fn new(
        o: &'a Observation,
        policy: &'a SequencePolicy,
        current: &'a NodeState,
        reading: Reading<'a>,
    ) -> Self {
        let previous = reading.toward(&current.previous_layouts);
        InFlight {
            o,
            policy,
            current,
            reading,
            previous,
        }
    }

    /// The state after entering `phase`, saying `message`.
    fn next(&self, phase: Phase, message: impl Into<String>) -> Option<NodeState> {
        Some(enter(self.o.now, self.current, phase, message))
    }

    /// Whether the current phase has lasted longer than `limit`.
    fn timed_out(&self, limit: SignedDuration) -> bool {
        self.current
            .since
            .parse::<Timestamp>()
            .is_ok_and(|since| self.o.now.duration_since(since) > limit)
    }

    /// The failure transition from the current phase under the policy.
    fn fail(&self, why: impl std::fmt::Display) -> Step {
        let (state, policy) = (self.current, self.policy);
        let why = why.to_string();
        let changed_gpus = match state.phase {
            Phase::AwaitingMigManager | Phase::Verifying | Phase::Untainting => true,
            // The nvml backend may have destroyed or created some instances already.
            Phase::Applying => !self.previous.reached(),
            _ => false,
        };
        let warn = |reason, note: String| Effect::Event { reason, note };
        match policy.on_failure {
            FailurePolicy::StayTainted => Step {
                effects: vec![warn(
                    Reason::ReconfigurationFailed,
                    format!(
                        "grant {}: {why}; the node stays tainted for a person to look at (failure policy stay-tainted)",
                        state.grant_id
                    ),
                )],
                next: self.next(Phase::Failed, why),
            },
            FailurePolicy::Rollback if !changed_gpus => Step {
                // Nothing was relabeled: the GPUs are as they were. Untaint and finish.
                effects: vec![
                    Effect::Untaint,
                    warn(
                        Reason::ReconfigurationRolledBack,
                        format!(
                            "grant {}: {why}; nothing was changed, the node is untainted",
                            state.grant_id
                        ),
                    ),
                ],
                next: self.next(Phase::RolledBack, why),
            },
            FailurePolicy::Rollback
                if policy.backend == Backend::Nvml && !state.previous_layouts.is_empty() =>
            {
                Step {
                    effects: vec![warn(
                        Reason::ReconfigurationRollingBack,
                        format!(
                            "grant {}: {why}; returning the GPUs to {}",
                            state.grant_id,
                            describe(&state.previous_layouts)
                        ),
                    )],
                    next: self.next(Phase::RollingBack, why),
                }
            }
            FailurePolicy::Rollback => match &state.previous_config {
                Some(prev) if policy.backend == Backend::MigManager => Step {
                    effects: vec![
                        warn(
                            Reason::ReconfigurationRollingBack,
                            format!("grant {}: {why}; returning to config {prev}", state.grant_id),
                        ),
                        Effect::Relabel(prev.clone()),
                    ],
                    next: self.next(Phase::RollingBack, why),
                },
                _ => Step {
                    effects: vec![warn(
                        Reason::ReconfigurationFailed,
                        format!(
                            "grant {}: {why}; there is no previous config to roll back to, so the node stays tainted",
                            state.grant_id
                        ),
                    )],
                    next: self.next(Phase::Failed, why),
                },
            },
        }
    }

    /// A rollback that reached the GPUs' previous layouts: untaint, announce, `RolledBack`.
    fn rolled_back(&self) -> Step {
        let current = self.current;
        let why = current.message.clone().unwrap_or_else(|| "rolled back".into());
        Step {
            effects: vec![
                Effect::Untaint,
                Effect::Event {
                    reason: Reason::ReconfigurationRolledBack,
                    note: format!(
                        "grant {}: {why}; the GPUs are back as they were, the node is untainted",
                        current.grant_id
                    ),
                },
            ],
            next: self.next(Phase::RolledBack, why),
        }
    }

    /// Our taint on, then on to draining.
    fn tainting(&self) -> Step {
        if self.o.tainted {
            Step {
                effects: vec![],
                next: self.next(Phase::Draining, "tainted"),
            }
        } else {
            Step::effect(vec![Effect::Taint])
        }
    }

    /// Our taint off, success announced, `Done`.
    fn untainting(&self) -> Step {
        Step {
            effects: vec![
                Effect::Untaint,
                Effect::Event {
                    reason: Reason::ReconfigurationSucceeded,
                    note: format!(
                        "grant {}: the GPUs match their targets; the node is schedulable again",
                        self.current.grant_id
                    ),
                },
            ],
            next: self.next(Phase::Done, "reconfigured"),
        }
    }

    /// nvml backend: return the GPUs to the layouts recorded when the sequence began (never
    /// destroying an instance in use), restart the device plugin, then `RolledBack`.
    fn rolling_back_nvml(&self) -> Step {
        let (o, current) = (self.o, self.current);
        let timed_out = || self.timed_out(self.policy.phase_timeout);
        let failed = |why: String| Step {
            effects: vec![Effect::Event {
                reason: Reason::ReconfigurationFailed,
                note: format!(
                    "grant {}: rollback to {} failed: {why}; the node stays tainted",
                    current.grant_id,
                    describe(&current.previous_layouts)
                ),
            }],
            next: self.next(Phase::Failed, format!("rollback failed: {why}")),
        };
        if let Some(why) = self.reading.unreadable(current.previous_layouts.keys()) {
            return if timed_out() {
                failed(why.to_string())
            } else {
                Step::nothing()
            };
        }
        match self.previous.changes() {
            Err(e) => failed(e.to_string()),
            // Back. Recreated instances have new device IDs, so the device plugin is
            // restarted whatever the counts: paused (once), gone, started again, advertising.
            Ok(c) if c.is_empty() && plugin_paused(o) => {
                if o.device_plugin_pods == 0 {
                    Step::effect(vec![Effect::ResumeDevicePlugin])
                } else if timed_out() {
                    failed("the device plugin did not stop".into())
                } else {
                    Step::nothing()
                }
            }
            Ok(c) if c.is_empty() && !current.restarting_device_plugin => Step {
                effects: vec![Effect::PauseDevicePlugin],
                next: Some(NodeState {
                    restarting_device_plugin: true,
                    ..current.clone()
                }),
            },
            Ok(c) if c.is_empty() => match self.reading.advertising_matches(&o.advertised) {
                Ok(()) => self.rolled_back(),
                Err(e) if timed_out() => failed(e.to_string()),
                Err(_) => Step::nothing(),
            },
            Ok(c) => match destroys_in_use(&c, &o.gpus) {
                // A rollback checks pods per instance as a forward change does.
                Some(busy) if timed_out() => failed(format!("{busy}; an instance in use is never destroyed")),
                Some(_) => Step::nothing(),
                None if timed_out() => failed("the GPUs did not return to their layouts in time".into()),
                None => Step::effect(c.into_iter().map(Effect::Apply).collect()),
            },
        }
    }

    /// mig-manager backend: relabel to the previous config and wait for mig-manager, then
    /// `RolledBack`.
    fn rolling_back_mig_manager(&self) -> Step {
        let (o, current) = (self.o, self.current);
        let Some(prev) = &current.previous_config else {
            return Step {
                effects: vec![Effect::Event {
                    reason: Reason::ReconfigurationFailed,
                    note: format!(
                        "grant {}: no previous config to roll back to; the node stays tainted",
                        current.grant_id
                    ),
                }],
                next: self.next(Phase::Failed, "no previous config"),
            };
        };
        if o.mig_config.as_ref() != Some(prev) {
            return Step::effect(vec![Effect::Relabel(prev.clone())]);
        }
        let failed = |why: String| Step {
            effects: vec![Effect::Event {
                reason: Reason::ReconfigurationFailed,
                note: format!(
                    "grant {}: rollback to {prev} failed: {why}; the node stays tainted",
                    current.grant_id
                ),
            }],
            next: self.next(Phase::Failed, format!("rollback failed: {why}")),
        };
        match o.mig_state.as_deref() {
            Some("success") => self.rolled_back(),
            Some("failed") => failed("mig-manager reported failed".into()),
            _ if self.timed_out(self.policy.mig_manager_timeout) => {
                failed("mig-manager did not answer in time".into())
            }
            _ => Step::nothing(),
        }
    }
}

/// A sequence in flight for the grant on the node, with the grant's targets resolved once.
struct Granted<'a> {
    run: InFlight<'a>,
    grant: &'a Grant,
    targets: Goals<'a>,
}

impl Granted<'_> {
    /// Pods the source reports on GPUs this grant rebuilds, other than the grant's evictions:
    /// pods bound after the plan was made, in the moment before our taint (or tolerating it).
    /// mig-parted rebuilds a changed GPU whole, so relabeling over them fails (or would kill them):
    /// the plan is stale. A pod still running ends the sequence as `Superseded` before anything
    /// changes, whatever the failure policy (it is no failure; the next plan counts the pod, with
    /// no cooldown); a pod already leaving (terminating, or no longer bound while the report lags)
    /// is waited for, up to `limit`. `None`: nothing in the way.
    ///
    /// With the nvml backend only instances the target drops count (a pod on an instance the
    /// target keeps is no obstacle), and once some instance has changed a running pod is waited
    /// for (up to `limit`, then the failure policy) instead: `Superseded` is only for sequences
    /// that changed nothing.
    fn unplanned_pods(&self, limit: SignedDuration) -> Option<Step> {
        let run = &self.run;
        let (o, current, policy) = (run.o, run.current, run.policy);
        let mut leaving = Vec::new();
        let may_supersede = policy.backend == Backend::MigManager || run.previous.reached();
        for (gpu, instance) in doomed(&o.gpus, &self.targets, policy.backend) {
            for key in &instance.pods {
                if self.grant.evictions.contains(key) {
                    continue;
                }
                match o.pods.iter().find(|p| &p.key == key) {
                    Some(p) if !p.terminating && may_supersede => {
                        let why = format!(
                            "pod {key} started on GPU {gpu} after the plan was made (it is not among the grant's evictions); nothing was changed, the next plan counts it"
                        );
                        return Some(Step {
                            effects: vec![
                                Effect::Untaint,
                                Effect::Event {
                                    reason: Reason::ReconfigurationSuperseded,
                                    note: format!("grant {}: {why}", current.grant_id),
                                },
                            ],
                            next: run.next(Phase::Superseded, why),
                        });
                    }
                    _ => leaving.push(key.as_str()),
                }
            }
        }
        if leaving.is_empty() {
            None
        } else if run.timed_out(limit) {
            Some(run.fail(format!("{} still on the instances to change", leaving.join(", "))))
        } else {
            Some(Step::nothing())
        }
    }

    /// The controller evicts the grant's pods; the agent waits for them to go (or for its
    /// timeout, or a pod marked do-not-disrupt).
    fn draining(&self) -> Step {
        let run = &self.run;
        let (o, policy) = (run.o, run.policy);
        let remaining: Vec<&PodFact> = o
            .pods
            .iter()
            .filter(|p| self.grant.evictions.contains(&p.key))
            .collect();
        if let Some(p) = remaining.iter().find(|p| p.do_not_disrupt && !p.terminating) {
            return run.fail(format!("pod {} is marked do-not-disrupt", p.key));
        }
        if remaining.is_empty() {
            let phase = match policy.backend {
                Backend::MigManager => Phase::Relabeling,
                Backend::Nvml => Phase::Applying,
            };
            return self.unplanned_pods(policy.drain_timeout).unwrap_or(Step {
                effects: vec![],
                next: run.next(phase, "drained"),
            });
        }
        if run.timed_out(policy.drain_timeout) {
            let left: Vec<&str> = remaining.iter().map(|p| p.key.as_str()).collect();
            return run.fail(format!(
                "draining timed out with {} still running (the controller evicts them: see its EvictionBlockedByPDB Events, and that a replica leads in auto mode)",
                left.join(", ")
            ));
        }
        // The controller posts the evictions (agents hold no eviction permission): wait.
        Step::nothing()
    }

    /// mig-manager backend: set `nvidia.com/mig.config` (an agent switched to nvml mid-sequence
    /// goes to `Applying` instead: nothing was relabeled yet).
    fn relabeling(&self) -> Step {
        let run = &self.run;
        if run.policy.backend == Backend::Nvml {
            return Step {
                effects: vec![],
                next: run.next(Phase::Applying, "drained"),
            };
        }
        match &self.grant.mig_config {
            None => run.fail(
                "the grant has no mig-parted config: the controller plans for the nvml backend (planner.backend: nvml) but this agent runs --backend mig-manager",
            ),
            // Already relabeled (a crash after the effect): on to mig-manager.
            Some(c) if run.o.mig_config.as_ref() == Some(c) => Step {
                effects: vec![],
                next: run.next(Phase::AwaitingMigManager, "relabeled"),
            },
            // The last look before the GPUs change.
            Some(c) => self.unplanned_pods(run.policy.phase_timeout).unwrap_or(Step {
                effects: vec![Effect::Relabel(c.clone())],
                next: run.next(Phase::AwaitingMigManager, "relabeled"),
            }),
        }
    }

    /// nvml backend: destroy and create instances at their target placements, never one in use;
    /// then pause the device plugin so it advertises them once started again.
    fn applying(&self) -> Step {
        let run = &self.run;
        let timed_out = || run.timed_out(run.policy.phase_timeout);
        if run.policy.backend != Backend::Nvml {
            return run.fail(
                "the sequence was applying GPU instances with NVML, but this agent now runs --backend mig-manager",
            );
        }
        if let Some(s) = self.unplanned_pods(run.policy.phase_timeout) {
            return s;
        }
        match self.targets.changes() {
            Err(e) => run.fail(e),
            Ok(c) if c.is_empty() => Step {
                effects: vec![Effect::PauseDevicePlugin],
                next: run.next(
                    Phase::Verifying,
                    "instances at their target placements; restarting the device plugin",
                ),
            },
            Ok(c) if timed_out() => run.fail(format!(
                "GPU {} did not reach its target in time ({} instance(s) to destroy, {} to create; the agent's log has NVML's answers)",
                c[0].gpu,
                c[0].destroy.len(),
                c[0].create.len()
            )),
            Ok(c) => match destroys_in_use(&c, &run.o.gpus) {
                Some(busy) if timed_out() => run.fail(format!("{busy}; an instance in use is never destroyed")),
                Some(_) => Step::nothing(),
                None => Step::effect(c.into_iter().map(Effect::Apply).collect()),
            },
        }
    }

    /// mig-manager backend: wait for `nvidia.com/mig.config.state` to say success (or failed).
    fn awaiting_mig_manager(&self) -> Step {
        let run = &self.run;
        let o = run.o;
        let Some(c) = &self.grant.mig_config else {
            return run.fail("the grant has no mig-parted config");
        };
        if o.mig_config.as_ref() != Some(c) {
            return Step::effect(vec![Effect::Relabel(c.clone())]);
        }
        match o.mig_state.as_deref() {
            Some("success") => Step {
                effects: vec![],
                next: run.next(Phase::Verifying, "mig-manager applied the config"),
            },
            Some("failed") => run.fail(format!("mig-manager reported failed for config {c}")),
            _ if run.timed_out(run.policy.mig_manager_timeout) => {
                run.fail(format!("mig-manager did not apply config {c} in time"))
            }
            _ => Step::nothing(),
        }
    }

    /// Actual layouts against the targets (nvml: placements exactly, and what the device plugin
    /// advertises, once the device plugin we paused has started again).
    fn verifying(&self) -> Step {
        let run = &self.run;
        let (o, policy) = (run.o, run.policy);
        if policy.backend == Backend::Nvml && plugin_paused(o) && o.device_plugin_pods == 0 {
            return Step::effect(vec![Effect::ResumeDevicePlugin]);
        }
        let verified = match policy.backend {
            Backend::MigManager => verify(&self.targets),
            Backend::Nvml if plugin_paused(o) => Err(LayoutError::PluginStopping),
            Backend::Nvml => verify_exact(&self.targets, &run.reading, &o.advertised),
        };
        match verified {
            Ok(()) => Step {
                effects: vec![],
                next: run.next(Phase::Untainting, "verified: actual layouts match the targets"),
            },
            Err(e) if run.timed_out(policy.phase_timeout) => run.fail(format!("verification failed: {e}")),
            // The report may lag mig-manager's label by a moment.
            Err(_) => Step::nothing(),
        }
    }
}

#[cfg(test)]
mod tests {
    use mig_planner::snapshot::GpuInstance;

    use super::*;

    /// The canonical layout text of a reported GPU.
    fn layout_text(gpu: &Gpu) -> String {
        let r = resolve(gpu).unwrap();
        r.model.format_layout(&r.layout)
    }

    fn gpu(layout: &[(&str, u8)]) -> Gpu {
        crate::test_support::gpu(0, layout)
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
            previous_layouts: BTreeMap::new(),
            restarting_device_plugin: false,
            heartbeat: None,
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
            advertised: BTreeMap::new(),
            device_plugin_label: Some("true".into()),
            device_plugin_pods: 1,
            now: "2026-06-01T12:00:10Z".parse().unwrap(),
        }
    }

    /// Apply a step to the observation as the runtime and the cluster would.
    fn apply(o: &mut Observation, s: &Step) {
        // Every end of a sequence is announced on the node with the reason of its outcome.
        if let Some(n) = &s.next
            && phase(o) != Some(n.phase)
        {
            let reason = match n.phase {
                Phase::Done => Some(Reason::ReconfigurationSucceeded),
                Phase::RolledBack => Some(Reason::ReconfigurationRolledBack),
                Phase::Failed => Some(Reason::ReconfigurationFailed),
                Phase::Superseded => Some(Reason::ReconfigurationSuperseded),
                Phase::RollingBack => Some(Reason::ReconfigurationRollingBack),
                _ => None,
            };
            if let Some(want) = reason {
                assert!(
                    s.effects
                        .iter()
                        .any(|a| matches!(a, Effect::Event { reason, .. } if *reason == want)),
                    "entering {:?} without {want}: {s:?}",
                    n.phase
                );
            }
        }
        for a in &s.effects {
            match a {
                Effect::Taint => o.tainted = true,
                Effect::Untaint => o.tainted = false,
                Effect::Relabel(c) => {
                    o.mig_config = Some(c.clone());
                    o.mig_state = Some("pending".into());
                }
                Effect::Apply(c) => {
                    let g = o.gpus.iter_mut().find(|g| g.index == c.gpu).unwrap();
                    g.instances.retain(|i| !c.destroy.contains(&i.named()));
                    for n in &c.create {
                        g.instances.push(GpuInstance {
                            profile: n.profile.clone(),
                            start: n.start,
                            pods: vec![],
                            utilization: None,
                        });
                    }
                }
                // The plugin stops at once here; started again, it advertises what the GPUs have.
                Effect::PauseDevicePlugin => {
                    o.device_plugin_label = Some(DEVICE_PLUGIN_PAUSED.into());
                    o.device_plugin_pods = 0;
                }
                Effect::ResumeDevicePlugin => {
                    o.device_plugin_label = Some("true".into());
                    o.device_plugin_pods = 1;
                    o.advertised = Reading::new(&o.gpus).expected_advertising().unwrap();
                }
                Effect::Event { .. } => {}
            }
        }
        if let Some(n) = &s.next {
            o.state = Ok(Some(n.clone()));
        }
        // The controller's part: it evicts the grant's pods once the agent drains the node.
        if o.tainted
            && phase(o) == Some(Phase::Draining)
            && let Ok(Some(g)) = &o.grant
        {
            o.pods.retain(|p| !g.evictions.contains(&p.key));
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
        assert_eq!(s.effects, vec![Effect::Relabel("mig-autoscaler-abc".into())]);
        apply(&mut o, &s);
        assert_eq!(phase(&o), Some(Phase::AwaitingMigManager));
        assert_eq!(step(&o, &SequencePolicy::default()), Step::nothing());
    }

    #[test]
    fn a_crash_at_any_point_repeats_only_idempotent_effects() {
        // Replaying the step without having persisted `next` (a crash after the effects) must give
        // the same effects or none, never a different destructive one.
        let mut o = obs();
        let p = SequencePolicy::default();
        for _ in 0..20 {
            let s = step(&o, &p);
            let mut crashed = o.clone();
            for a in &s.effects {
                // Actions done, state not persisted.
                apply(
                    &mut crashed,
                    &Step {
                        effects: vec![a.clone()],
                        next: None,
                    },
                );
            }
            let again = step(&crashed, &p);
            for a in &again.effects {
                assert!(
                    s.effects.contains(a) || matches!(a, Effect::Event { .. }),
                    "after a crash the agent did {a:?}, not one of {:?}",
                    s.effects
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
                    .effects
                    .iter()
                    .any(|a| matches!(a, Effect::Event { reason, .. } if reason.is_warning()));
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
        assert!(s.effects.contains(&Effect::Untaint));
        assert!(!s.effects.iter().any(|a| matches!(a, Effect::Relabel(_))));
        assert_eq!(s.next.unwrap().phase, Phase::RolledBack);
    }

    #[test]
    fn do_not_disrupt_stops_the_drain() {
        let mut o = obs();
        o.tainted = true;
        o.pods[0].do_not_disrupt = true;
        o.state = Ok(Some(at(Phase::Draining, "2026-06-01T12:00:05Z", None)));
        let s = step(&o, &SequencePolicy::default());
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
                !s.effects.iter().any(|a| matches!(a, Effect::Relabel(_))),
                "{phase:?}: {s:?}"
            );
            assert!(s.effects.contains(&Effect::Untaint), "{phase:?}: {s:?}");
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
            step(&o, &SequencePolicy::default()).effects,
            vec![Effect::Relabel("mig-autoscaler-abc".into())]
        );
    }

    #[test]
    fn our_taint_without_a_sequence_goes_and_garbage_stops_everything() {
        let mut o = obs();
        o.grant = Ok(None);
        o.tainted = true;
        assert_eq!(
            step(&o, &SequencePolicy::default()).effects,
            vec![Effect::Untaint]
        );
        let malformed = |key| MalformedAnnotation {
            key,
            object: "node/n".into(),
            message: "expected value".into(),
        };
        o.grant = Err(malformed(mig_protocol::GRANT_ANNOTATION));
        assert_eq!(step(&o, &SequencePolicy::default()), Step::nothing());
        o.grant = Ok(None);
        o.state = Err(malformed(mig_protocol::STATE_ANNOTATION));
        assert_eq!(step(&o, &SequencePolicy::default()), Step::nothing());
    }

    fn nvml() -> SequencePolicy {
        SequencePolicy {
            backend: Backend::Nvml,
            ..Default::default()
        }
    }

    /// nvml backend: GPU 0 has `ml/keep` on 1g.10gb@0 (the target keeps it), a free 1g.10gb@1 and a
    /// free 2g.20gb@2; the target replaces the free ones with a 3g.40gb@4. Nothing to evict.
    fn nvml_obs() -> Observation {
        let mut o = obs();
        let mut g = grant();
        g.mig_config = None;
        g.evictions.clear();
        g.targets = [(0, "1g.10gb@0,3g.40gb@4".to_string())].into();
        o.grant = Ok(Some(g));
        o.pods = vec![PodFact {
            key: "ml/keep".into(),
            terminating: false,
            do_not_disrupt: false,
        }];
        o.gpus = vec![gpu(&[("1g.10gb", 0), ("1g.10gb", 1), ("2g.20gb", 2)])];
        o.gpus[0].instances[0].pods = vec!["ml/keep".into()];
        o.advertised = Reading::new(&o.gpus).expected_advertising().unwrap();
        o
    }

    #[test]
    fn nvml_changes_only_what_the_target_drops_and_never_the_kept_busy_instance() {
        let mut o = nvml_obs();
        let p = nvml();
        let mut phases = vec![];
        let mut applied = vec![];
        for _ in 0..20 {
            let s = step(&o, &p);
            for a in &s.effects {
                match a {
                    Effect::Apply(c) => applied.push(c.clone()),
                    Effect::Relabel(_) => panic!("nvml backend did {a:?}"),
                    _ => {}
                }
            }
            apply(&mut o, &s);
            if phases.last() != phase(&o).as_ref() {
                phases.push(phase(&o).unwrap());
            }
        }
        use Phase::*;
        assert_eq!(
            phases,
            vec![Tainting, Draining, Applying, Verifying, Untainting, Done]
        );
        assert_eq!(
            applied,
            vec![InstanceChange {
                gpu: 0,
                destroy: vec![NamedInstance::new("1g.10gb", 1), NamedInstance::new("2g.20gb", 2)],
                create: vec![NamedInstance::new("3g.40gb", 4)],
            }]
        );
        assert_eq!(layout_text(&o.gpus[0]), "1g.10gb@0,3g.40gb@4");
        assert_eq!(o.gpus[0].instances[0].pods, vec!["ml/keep".to_string()]);
        assert!(!o.tainted);
        let done = o.state.unwrap().unwrap();
        assert_eq!(
            done.previous_layouts,
            [(0, "1g.10gb@0,1g.10gb@1,2g.20gb@2".to_string())].into()
        );
    }

    #[test]
    fn nvml_verification_waits_for_the_device_plugin_to_advertise() {
        let mut o = nvml_obs();
        o.tainted = true;
        o.gpus = vec![gpu(&[("1g.10gb", 0), ("3g.40gb", 4)])];
        o.state = Ok(Some(at(Phase::Verifying, "2026-06-01T12:00:05Z", None)));
        // The plugin still advertises the old instances: not verified, and after the phase
        // timeout a failure.
        assert_eq!(step(&o, &nvml()), Step::nothing());
        let reading = Reading::new(&o.gpus);
        let targets = reading.toward(&o.grant.as_ref().unwrap().as_ref().unwrap().targets);
        let e = verify_exact(&targets, &reading, &o.advertised).unwrap_err();
        assert!(matches!(e, LayoutError::Advertising { .. }), "{e}");
        o.advertised = Reading::new(&o.gpus).expected_advertising().unwrap();
        assert_eq!(step(&o, &nvml()).next.unwrap().phase, Phase::Untainting);
        // A wrong placement is not the target, even with the right counts.
        o.gpus = vec![gpu(&[("1g.10gb", 1), ("3g.40gb", 4)])];
        o.advertised = Reading::new(&o.gpus).expected_advertising().unwrap();
        assert_eq!(step(&o, &nvml()), Step::nothing());
    }

    #[test]
    fn nvml_supersedes_only_for_pods_on_instances_it_would_destroy_before_any_change() {
        // A pod on the free 1g.10gb@1 (to be destroyed) since the plan: Superseded, nothing applied.
        let mut o = nvml_obs();
        o.tainted = true;
        o.pods.push(PodFact {
            key: "ml/new".into(),
            terminating: false,
            do_not_disrupt: false,
        });
        o.gpus[0].instances[1].pods = vec!["ml/new".into()];
        let mut state = at(Phase::Applying, "2026-06-01T12:00:05Z", None);
        state.previous_layouts = [(0, "1g.10gb@0,1g.10gb@1,2g.20gb@2".to_string())].into();
        o.state = Ok(Some(state.clone()));
        let s = step(&o, &nvml());
        assert!(!s.effects.iter().any(|a| matches!(a, Effect::Apply(_))), "{s:?}");
        assert_eq!(s.next.unwrap().phase, Phase::Superseded);
        // Once something changed, the same pod is waited for instead (then the failure policy
        // returns the GPU to its layout), never destroyed under it.
        o.gpus[0].instances.retain(|i| i.start != 2);
        let s = step(&o, &nvml());
        assert_eq!(s, Step::nothing());
        o.now = "2026-06-01T12:10:00Z".parse().unwrap();
        let s = step(&o, &nvml());
        assert_eq!(s.next.unwrap().phase, Phase::RollingBack);
        // The busy instance the target keeps is no obstacle.
        let mut o = nvml_obs();
        o.tainted = true;
        o.state = Ok(Some(state));
        assert!(matches!(step(&o, &nvml()).effects.as_slice(), [Effect::Apply(_)]));
    }

    #[test]
    fn nvml_failure_returns_the_gpus_to_their_recorded_layouts() {
        // The creation never succeeds (NVML refuses it): after the phase timeout the instances
        // destroyed so far are created again, the device plugin restarted, the node untainted.
        let mut o = nvml_obs();
        let p = nvml();
        let mut t: Timestamp = "2026-06-01T12:00:10Z".parse().unwrap();
        let mut warned = false;
        let mut paused = false;
        for _ in 0..40 {
            o.now = t;
            let mut s = step(&o, &p);
            warned |= s
                .effects
                .iter()
                .any(|a| matches!(a, Effect::Event { reason, .. } if reason.is_warning()));
            paused |= s.effects.contains(&Effect::PauseDevicePlugin);
            if phase(&o) == Some(Phase::Applying) {
                for a in &mut s.effects {
                    if let Effect::Apply(c) = a {
                        c.create.clear(); // destroys happen, creates fail
                    }
                }
            }
            apply(&mut o, &s);
            t += SignedDuration::from_secs(30);
        }
        assert_eq!(phase(&o), Some(Phase::RolledBack));
        assert!(warned);
        assert!(!o.tainted);
        // Recreated instances have new device IDs: the plugin was restarted and runs.
        assert!(paused, "the device plugin was not restarted");
        assert_eq!(o.device_plugin_label.as_deref(), Some("true"));
        assert_eq!(layout_text(&o.gpus[0]), "1g.10gb@0,1g.10gb@1,2g.20gb@2");
        assert_eq!(
            o.advertised,
            Reading::new(&o.gpus).expected_advertising().unwrap()
        );
    }

    #[test]
    fn an_agent_on_the_wrong_backend_changes_nothing_and_says_why() {
        // A grant planned for nvml (no mig-parted config) reaching a mig-manager agent.
        let mut o = nvml_obs();
        o.tainted = true;
        o.state = Ok(Some(at(
            Phase::Relabeling,
            "2026-06-01T12:00:05Z",
            Some("all-1g.10gb"),
        )));
        let s = step(&o, &SequencePolicy::default());
        assert!(s.effects.contains(&Effect::Untaint));
        let next = s.next.unwrap();
        assert_eq!(next.phase, Phase::RolledBack);
        assert!(next.message.unwrap().contains("--backend"));
    }

    #[test]
    fn nvml_crash_at_any_point_repeats_only_idempotent_effects() {
        let mut o = nvml_obs();
        let p = nvml();
        for _ in 0..20 {
            let s = step(&o, &p);
            let mut crashed = o.clone();
            for a in &s.effects {
                apply(
                    &mut crashed,
                    &Step {
                        effects: vec![a.clone()],
                        next: None,
                    },
                );
            }
            // After its effects and before the persist: the same step again may only repeat a
            // harmless effect (the instance changes are recomputed from the GPUs, so none is left).
            for a in &step(&crashed, &p).effects {
                assert!(
                    matches!(
                        a,
                        Effect::Event { .. }
                            | Effect::PauseDevicePlugin
                            | Effect::ResumeDevicePlugin
                            | Effect::Taint
                            | Effect::Untaint
                    ),
                    "after a crash the agent did {a:?}"
                );
            }
            apply(&mut o, &s);
        }
        assert_eq!(phase(&o), Some(Phase::Done));
    }

    #[test]
    fn verify_compares_instances_per_profile() {
        let g = grant();
        let verify = |gpus: &[Gpu]| verify(&Reading::new(gpus).toward(&g.targets));
        assert!(verify(&[gpu(&[("3g.40gb", 0), ("3g.40gb", 4)])]).is_ok());
        let e = verify(&[gpu(&[("3g.40gb", 0)])]).unwrap_err();
        assert!(
            matches!(&e, LayoutError::Counts { target, .. } if target == "3g.40gb@0,3g.40gb@4"),
            "{e}"
        );
        assert_eq!(verify(&[]), Err(LayoutError::NotReported { gpu: 0 }));
    }

    fn unreadable(o: &mut Observation) {
        o.gpus[0].instances.clear();
        o.gpus[0].unknown = Some("nvidia-smi mig -lgi -i 0: timed out after 20 s and was killed".into());
    }

    fn applies(s: &Step) -> Vec<&InstanceChange> {
        s.effects
            .iter()
            .filter_map(|a| match a {
                Effect::Apply(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_gpu_that_cannot_be_read_is_never_started_on_nor_changed() {
        // A new grant on it: not started (no taint), ended as superseded with why.
        let mut o = nvml_obs();
        unreadable(&mut o);
        let s = step(&o, &nvml());
        assert!(!s.effects.contains(&Effect::Taint), "{s:?}");
        let next = s.next.unwrap();
        assert_eq!(next.phase, Phase::Superseded);
        assert!(next.message.unwrap().contains("GPU 0's instances are unknown"));
        assert!(
            next.previous_layouts.is_empty(),
            "an unknown GPU is never recorded as empty"
        );

        // Mid-sequence: nothing is done until it can be read; after the phase timeout, a failure,
        // and the rollback does nothing to it either until it times out too.
        let mut o = nvml_obs();
        o.tainted = true;
        let mut st = at(Phase::Applying, "2026-06-01T12:00:05Z", None);
        st.previous_layouts = [(0, "1g.10gb@0,1g.10gb@1,2g.20gb@2".to_string())].into();
        o.state = Ok(Some(st));
        unreadable(&mut o);
        assert_eq!(step(&o, &nvml()), Step::nothing());
        o.now = "2026-06-01T12:03:00Z".parse().unwrap();
        let s = step(&o, &nvml());
        assert_eq!(s.next.as_ref().unwrap().phase, Phase::RollingBack, "{s:?}");
        apply(&mut o, &s);
        assert_eq!(step(&o, &nvml()), Step::nothing());
        o.now = "2026-06-01T12:06:00Z".parse().unwrap();
        let s = step(&o, &nvml());
        assert!(applies(&s).is_empty(), "{s:?}");
        assert_eq!(s.next.unwrap().phase, Phase::Failed);
    }

    #[test]
    fn a_rollback_never_destroys_an_instance_in_use() {
        // What the probe saw: a failed read recorded the GPU as `empty` when the sequence began;
        // the GPU is read again, with a running pod on its one instance. Returning to `empty`
        // would destroy it: never done, the sequence fails visibly instead.
        let mut o = nvml_obs();
        o.tainted = true;
        o.gpus = vec![gpu(&[("3g.40gb", 4)])];
        o.gpus[0].instances[0].pods = vec!["ml/keep".into()];
        let mut st = at(Phase::RollingBack, "2026-06-01T12:00:05Z", None);
        st.previous_layouts = [(0, "empty".to_string())].into();
        o.state = Ok(Some(st));
        let s = step(&o, &nvml());
        assert!(applies(&s).is_empty(), "{s:?}");
        o.now = "2026-06-01T12:03:00Z".parse().unwrap();
        let s = step(&o, &nvml());
        assert!(applies(&s).is_empty(), "{s:?}");
        let failed = s.next.unwrap();
        assert_eq!(failed.phase, Phase::Failed);
        assert!(
            failed
                .message
                .unwrap()
                .contains("3g.40gb@4 on GPU 0 is in use by ml/keep"),
            "says which instance and pod"
        );
        // Forward, too: an instance the report shows in use is not destroyed.
        let mut o = nvml_obs();
        o.tainted = true;
        o.gpus[0].instances[1].pods = vec!["ml/late".into()];
        o.grant.as_mut().unwrap().as_mut().unwrap().evictions = vec!["ml/late".into()];
        o.state = Ok(Some(at(Phase::Applying, "2026-06-01T12:00:05Z", None)));
        assert!(applies(&step(&o, &nvml())).is_empty());
    }

    #[test]
    fn grants_not_ours_or_too_old_are_refused_before_anything_happens() {
        let refused = |o: &Observation| {
            let s = step(o, &SequencePolicy::default());
            assert!(s.next.is_none(), "{s:?}");
            match s.effects.as_slice() {
                [
                    Effect::Event {
                        reason: Reason::GrantRefused,
                        note,
                    },
                ] => note.clone(),
                other => panic!("{other:?}"),
            }
        };
        let mut o = obs();
        o.grant.as_mut().unwrap().as_mut().unwrap().mig_config = Some("all-1g.10gb".into());
        assert!(refused(&o).contains("\"all-1g.10gb\" is not one the controller renders"));
        let mut o = obs();
        o.now = "2026-06-01T12:30:00Z".parse().unwrap();
        assert!(refused(&o).contains("more than"));
        let mut o = obs();
        o.grant.as_mut().unwrap().as_mut().unwrap().granted_at = "yesterday".into();
        assert!(refused(&o).contains("not a time"));
        // Ours and fresh: started.
        assert!(
            step(&obs(), &SequencePolicy::default())
                .effects
                .contains(&Effect::Taint)
        );
    }
}
