//! From cached cluster objects to the planner's [`Snapshot`], and every input problem found on the way.
//!
//! Pure: takes the objects, returns values. Malformed input never stops planning: the pod or node
//! concerned is left out (or left alone) and reported as an [`InputProblem`] (an Event and a metric).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::{Selector, SelectorExt};
use mig_catalog::Catalog;
use mig_planner::Snapshot;
use mig_planner::snapshot::{
    self, Gpu, GpuInstance, LabelExpression, NodeSelectorTerm, Pdb, PendingPod, RunningPod, Taint, Toleration,
};

use crate::budget::{self, NodeFacts};
use crate::settings::DisruptionBudgets;
use mig_protocol::{
    DO_NOT_DISRUPT, EXPECTED_END, Flight, GRANT_ANNOTATION, Grant, MIG_CONFIG_LABEL, MIG_RESOURCE_PREFIX,
    NodeReport, NodeState, REPORT_ANNOTATION, Reason, STATE_ANNOTATION, TAINT_KEY, flight, mig_requests,
    parse_annotation,
};

/// Input the controller could not use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputProblem {
    /// The object: `Pod` or `Node`.
    pub kind: &'static str,
    /// Its namespace (empty for nodes).
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Event reason and metric label: `InvalidMigRequest`, `MalformedAnnotation`, `UnknownGpuModel`,
    /// `GpuStateUnknown`, `AgentBackendMismatch`.
    pub reason: Reason,
    /// What is wrong and what was done about it.
    pub message: String,
}

/// What the controller knows about one node beyond the snapshot.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// Its agent report, as written (to detect change before acting).
    pub report_raw: Option<String>,
    /// The grant on it, if readable.
    pub grant: Option<Grant>,
    /// The agent's state, if readable.
    pub state: Option<NodeState>,
    /// Whether a sequence is in flight.
    pub flight: Flight,
    /// Whether our taint is on it.
    pub tainted: bool,
    /// Current `nvidia.com/mig.config`.
    pub mig_config: Option<String>,
    /// Whether our annotations could not be read (the node is left alone).
    pub malformed: bool,
    /// Whether it carries MIG GPUs with an agent report.
    pub reported: bool,
    /// It has MIG GPUs but its agent report is missing or stale: not counted, not changed.
    pub unreported: Option<Unreported>,
    /// Recent eviction grants (eviction budget).
    pub recent_evictions: Vec<Timestamp>,
}

/// The cluster as the planner and the budgets see it.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// The planner's input (policy included).
    pub snapshot: Snapshot,
    /// Per node.
    pub nodes: BTreeMap<String, NodeView>,
    /// Input problems.
    pub problems: Vec<InputProblem>,
    /// Nodes the planner may change (reported, managed, readable).
    pub managed: usize,
}

impl ClusterView {
    /// Budget facts per node.
    pub fn facts(&self) -> Vec<NodeFacts> {
        self.nodes
            .iter()
            .map(|(name, v)| NodeFacts {
                name: name.clone(),
                flight: v.flight.clone(),
                recent_evictions: v.recent_evictions.clone(),
            })
            .collect()
    }
}

/// Why a node with MIG GPUs has no usable agent report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreported {
    /// No report at all.
    Missing,
    /// A report the controller has not seen change for this long (agents rewrite theirs every
    /// `--report-refresh-seconds`, 5 minutes by default): the agent stopped.
    Stale(std::time::Duration),
}

impl Unreported {
    /// The metric label: `missing` or `stale`.
    pub fn label(self) -> &'static str {
        match self {
            Unreported::Missing => "missing",
            Unreported::Stale(_) => "stale",
        }
    }
}

impl std::fmt::Display for Unreported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreported::Missing => f.write_str("no agent report"),
            Unreported::Stale(age) => write!(
                f,
                "agent report unchanged for {}",
                crate::settings::Dur(std::time::Duration::from_secs(age.as_secs()))
            ),
        }
    }
}

/// Which sign says the node has MIG GPUs, if any: GPU feature discovery's `mig.capable`, a
/// mig-parted config label, or MIG resources the device plugin advertises.
fn mig_sign(node: &Node) -> Option<&'static str> {
    let labels = node.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    if label("nvidia.com/mig.capable") == Some("true") {
        return Some("label nvidia.com/mig.capable=true");
    }
    if label(MIG_CONFIG_LABEL).is_some() {
        return Some("label nvidia.com/mig.config");
    }
    let advertises = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .is_some_and(|a| a.keys().any(|k| k.starts_with(MIG_RESOURCE_PREFIX)));
    advertises.then_some("allocatable nvidia.com/mig-* resources")
}

/// A node with MIG GPUs and no agent report: `Missing`, and a `NoAgentReport` problem.
fn missing_report(node: &Node, name: &str, problems: &mut Vec<InputProblem>) -> Option<Unreported> {
    let sign = mig_sign(node)?;
    node_problem(
        problems,
        name,
        Reason::NoAgentReport,
        format!(
            "the node has MIG GPUs ({sign}) but no agent report: its GPUs are not counted and not changed. Is the mig-autoscaler agent running on it?"
        ),
    );
    Some(Unreported::Missing)
}

/// When each node's agent report last changed, on the controller's own clock (a node's clock may
/// be off). A report first seen, or changed, is new now; so after a restart of the controller a
/// stopped agent is found `reportTimeout` later.
#[derive(Debug, Default)]
pub struct ReportClock {
    seen: std::collections::HashMap<String, (u64, std::time::Instant)>,
}

impl ReportClock {
    /// Note the reports in `view` at `now`, forget nodes without one, and leave alone the nodes
    /// whose report has not changed for longer than `timeout`: their GPUs become unknown (the
    /// planner places nothing on them and changes nothing there), the node is marked unobserved
    /// for explanations, and each is a `NoAgentReport` problem.
    pub fn apply(&mut self, view: &mut ClusterView, now: std::time::Instant, timeout: std::time::Duration) {
        use std::hash::{Hash, Hasher};
        self.seen
            .retain(|n, _| view.nodes.get(n).is_some_and(|v| v.report_raw.is_some()));
        for (name, v) in &mut view.nodes {
            let Some(raw) = &v.report_raw else { continue };
            let mut h = std::collections::hash_map::DefaultHasher::new();
            raw.hash(&mut h);
            let hash = h.finish();
            let since = match self.seen.get(name) {
                Some((seen, since)) if *seen == hash => *since,
                _ => {
                    self.seen.insert(name.clone(), (hash, now));
                    now
                }
            };
            let age = now.saturating_duration_since(since);
            if age <= timeout || v.unreported.is_some() {
                continue;
            }
            let stale = Unreported::Stale(age);
            v.unreported = Some(stale);
            if let Some(node) = view.snapshot.nodes.iter_mut().find(|n| n.name == *name) {
                node.unobserved = Some(stale.to_string());
                node.frozen = true;
                for gpu in &mut node.gpus {
                    gpu.unknown.get_or_insert_with(|| stale.to_string());
                }
            }
            node_problem(
                &mut view.problems,
                name,
                Reason::NoAgentReport,
                format!(
                    "{stale} (reportTimeout {}; agents rewrite it every 5 minutes): the agent may have stopped; its GPUs are not counted and not changed until it reports again",
                    crate::settings::Dur(timeout)
                ),
            );
        }
    }
}

fn key(pod: &Pod) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// Whether a pod waits for the scheduler (not bound, not ending).
pub fn is_pending(pod: &Pod) -> bool {
    let bound = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    !bound && phase == "Pending" && pod.metadata.deletion_timestamp.is_none()
}

/// Where a pod may run: `spec.nodeSelector`, its required node affinity and its tolerations.
type Constraints = (BTreeMap<String, String>, Vec<NodeSelectorTerm>, Vec<Toleration>);

fn constraints(spec: &k8s_openapi::api::core::v1::PodSpec) -> Constraints {
    let node_affinity = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref())
        .map(|r| {
            r.node_selector_terms
                .iter()
                .map(|t| NodeSelectorTerm {
                    match_expressions: t
                        .match_expressions
                        .iter()
                        .flatten()
                        .map(|e| LabelExpression {
                            key: e.key.clone(),
                            operator: e.operator.clone(),
                            values: e.values.clone().unwrap_or_default(),
                        })
                        .collect(),
                })
                .collect()
        })
        .unwrap_or_default();
    let tolerations = spec
        .tolerations
        .iter()
        .flatten()
        .map(|t| Toleration {
            key: t.key.clone().unwrap_or_default(),
            operator: t.operator.clone().unwrap_or_else(|| "Equal".into()),
            value: t.value.clone().unwrap_or_default(),
            effect: t.effect.clone().unwrap_or_default(),
        })
        .collect();
    (
        spec.node_selector.clone().unwrap_or_default(),
        node_affinity,
        tolerations,
    )
}

fn pending_pod(pod: &Pod, requests: BTreeMap<String, i64>, now: Timestamp) -> PendingPod {
    let (namespace, name) = key(pod);
    let spec = pod.spec.clone().unwrap_or_default();
    let (node_selector, node_affinity, tolerations) = constraints(&spec);
    PendingPod {
        namespace,
        name,
        priority: spec.priority.unwrap_or(0),
        requests,
        node_selector,
        node_affinity,
        tolerations,
        created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        waited_seconds: pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| now.duration_since(t.0).as_secs().max(0) as u64),
    }
}

/// Build the observation. `now` decides cooldowns and windows (nodes that may not change now are
/// frozen for the planner, so it plans around them).
pub fn observe(
    nodes: &[Arc<Node>],
    pods: &[Arc<Pod>],
    pdbs: &[Arc<PodDisruptionBudget>],
    policy: &mig_planner::Policy,
    budgets: &DisruptionBudgets,
    demand_window: std::time::Duration,
    now: Timestamp,
) -> ClusterView {
    let mut obs = ClusterView::default();
    let demand_since = (!demand_window.is_zero()).then(|| {
        jiff::SignedDuration::try_from(demand_window)
            .ok()
            .and_then(|w| now.checked_sub(w).ok())
            .unwrap_or(Timestamp::MIN)
    });
    let pods = observe_pods(pods, pdbs, demand_since, now, &mut obs.problems);
    let mut snap_nodes = Vec::new();
    for node in nodes {
        let (view, snap, managed) = observe_node(node, policy, budgets, now, &mut obs.problems);
        if managed {
            obs.managed += 1;
        }
        obs.nodes.insert(snap.name.clone(), view);
        snap_nodes.push(snap);
    }
    obs.snapshot = Snapshot {
        nodes: snap_nodes,
        pending_pods: pods.pending,
        running_pods: pods.running,
        pdbs: pdbs
            .iter()
            .map(|p| Pdb {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                name: p.metadata.name.clone().unwrap_or_default(),
                disruptions_allowed: p
                    .status
                    .as_ref()
                    .map(|s| s.disruptions_allowed.unwrap_or(0).max(0) as u32)
                    .unwrap_or(0),
            })
            .collect(),
        policy: policy.clone(),
        recent_demand: pods.recent_demand,
        reservations: Vec::new(),
    };
    obs
}

/// Record a problem with an object.
fn problem(
    problems: &mut Vec<InputProblem>,
    kind: &'static str,
    (namespace, name): (String, String),
    reason: Reason,
    message: String,
) {
    problems.push(InputProblem {
        kind,
        namespace,
        name,
        reason,
        message,
    })
}

/// Record a problem with Node `name`.
fn node_problem(problems: &mut Vec<InputProblem>, name: &str, reason: Reason, message: String) {
    problem(
        problems,
        "Node",
        (String::new(), name.to_string()),
        reason,
        message,
    )
}

/// The pods as the planner sees them.
struct ObservedPods {
    pending: Vec<PendingPod>,
    running: Vec<RunningPod>,
    recent_demand: BTreeMap<String, u32>,
}

/// Pending and running pods with MIG requests (pending ones with how long they have waited by
/// `now`), and MIG demand since `demand_since` (`None`: not counted). A pending pod whose requests
/// cannot be read is a problem, never planned.
fn observe_pods(
    pods: &[Arc<Pod>],
    pdbs: &[Arc<PodDisruptionBudget>],
    demand_since: Option<Timestamp>,
    now: Timestamp,
    problems: &mut Vec<InputProblem>,
) -> ObservedPods {
    let mut out = ObservedPods {
        pending: Vec::new(),
        running: Vec::new(),
        recent_demand: BTreeMap::new(),
    };
    for pod in pods {
        let Some(spec) = &pod.spec else { continue };
        let requests = match mig_requests(spec) {
            Ok(r) => r,
            Err(e) => {
                if is_pending(pod) {
                    let why = format!("{e}; the pod is not planned for");
                    problem(problems, "Pod", key(pod), Reason::InvalidMigRequest, why);
                }
                continue;
            }
        };
        if requests.is_empty() {
            continue;
        }
        if let Some(since) = demand_since
            && pod
                .metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| t.0 >= since)
        {
            for (resource, count) in &requests {
                if let Some(profile) = resource.strip_prefix(MIG_RESOURCE_PREFIX) {
                    let e = out.recent_demand.entry(profile.to_string()).or_default();
                    *e = e.saturating_add(u32::try_from(*count).unwrap_or(u32::MAX));
                }
            }
        }
        if is_pending(pod) {
            out.pending.push(pending_pod(pod, requests, now));
        } else if spec.node_name.is_some() {
            out.running.push(running_pod(pod, spec, pdbs, now, problems));
        }
    }
    out
}

/// A running pod with the PDBs of its namespace that select it, how long it has run and when it
/// declares it will end (a malformed declaration is a problem and ignored).
fn running_pod(
    pod: &Pod,
    spec: &k8s_openapi::api::core::v1::PodSpec,
    pdbs: &[Arc<PodDisruptionBudget>],
    now: Timestamp,
    problems: &mut Vec<InputProblem>,
) -> RunningPod {
    let (ns, name) = key(pod);
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let member_of = pdbs
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns.as_str()))
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.selector.clone())
                .and_then(|s| Selector::try_from(s).ok())
                .is_some_and(|s| !s.selects_all() && s.matches(&labels))
        })
        .map(|p| format!("{ns}/{}", p.metadata.name.clone().unwrap_or_default()))
        .collect();
    let annotations = pod.metadata.annotations.as_ref();
    let expected_end_seconds =
        annotations
            .and_then(|a| a.get(EXPECTED_END))
            .and_then(|v| match v.parse::<Timestamp>() {
                Ok(end) => Some(end.duration_since(now).as_secs().max(0) as u64),
                Err(e) => {
                    let why =
                        format!("annotation {EXPECTED_END}={v:?} is not an RFC 3339 time ({e}); ignored");
                    problem(
                        problems,
                        "Pod",
                        (ns.clone(), name.clone()),
                        Reason::MalformedAnnotation,
                        why,
                    );
                    None
                }
            });
    let (node_selector, node_affinity, tolerations) = constraints(spec);
    RunningPod {
        node_selector,
        node_affinity,
        tolerations,
        priority: spec.priority.unwrap_or(0),
        do_not_disrupt: annotations
            .and_then(|a| a.get(DO_NOT_DISRUPT))
            .is_some_and(|v| v == "true"),
        pdbs: member_of,
        running_seconds: pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| now.duration_since(t.0).as_secs().max(0) as u64),
        expected_end_seconds,
        namespace: ns,
        name,
    }
}

/// Our three annotations on a node, typed; `malformed` when any does not parse (each a problem).
struct NodeAnnotations {
    report: Option<NodeReport>,
    grant: Option<Grant>,
    state: Option<NodeState>,
    malformed: bool,
}

fn read_annotations(node: &Node, name: &str, problems: &mut Vec<InputProblem>) -> NodeAnnotations {
    let object = format!("node/{name}");
    let annotations = node.metadata.annotations.as_ref();
    let mut messages = Vec::new();
    let mut read = |k: &'static str| -> Option<serde_json::Value> {
        match parse_annotation::<serde_json::Value>(annotations, k, &object) {
            Ok(v) => v,
            Err(e) => {
                messages.push(format!("{e}; the node is left alone"));
                None
            }
        }
    };
    let [report, grant, state] = [
        read(REPORT_ANNOTATION),
        read(GRANT_ANNOTATION),
        read(STATE_ANNOTATION),
    ];
    let report: Option<NodeReport> = typed(report, REPORT_ANNOTATION, &object, &mut messages);
    let grant: Option<Grant> = typed(grant, GRANT_ANNOTATION, &object, &mut messages);
    let state: Option<NodeState> = typed(state, STATE_ANNOTATION, &object, &mut messages);
    let malformed = !messages.is_empty();
    for message in messages {
        node_problem(problems, name, Reason::MalformedAnnotation, message);
    }
    NodeAnnotations {
        report,
        grant,
        state,
        malformed,
    }
}

/// One node: the controller's view of it, the planner's, and whether it counts as managed (an
/// agent reports, the managed selector selects it, its annotations parse).
fn observe_node(
    node: &Node,
    policy: &mig_planner::Policy,
    budgets: &DisruptionBudgets,
    now: Timestamp,
    problems: &mut Vec<InputProblem>,
) -> (NodeView, snapshot::Node, bool) {
    let name = node.metadata.name.clone().unwrap_or_default();
    let NodeAnnotations {
        report,
        grant,
        state,
        malformed,
    } = read_annotations(node, &name, problems);
    let spec = node.spec.clone().unwrap_or_default();
    let taints: Vec<Taint> = spec
        .taints
        .unwrap_or_default()
        .into_iter()
        .map(|t| Taint {
            key: t.key,
            value: t.value.unwrap_or_default(),
            effect: t.effect,
        })
        .collect();
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let fl = match (&grant, &state) {
        // No readable grant while the agent reports a phase in progress: count it in flight.
        (None, Some(s)) if !s.phase.is_terminal() => Flight::InFlight { phase: Some(s.phase) },
        _ => flight(grant.as_ref(), state.as_ref()),
    };
    let recent_evictions = grant
        .as_ref()
        .map(|g| g.recent_evictions.iter().filter_map(|t| t.parse().ok()).collect())
        .unwrap_or_default();
    let mut view = NodeView {
        report_raw: node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REPORT_ANNOTATION))
            .cloned(),
        grant: grant.clone(),
        state,
        flight: fl,
        tainted: taints.iter().any(|t| t.key == TAINT_KEY),
        mig_config: labels.get(MIG_CONFIG_LABEL).cloned(),
        malformed,
        reported: report.is_some(),
        unreported: None,
        recent_evictions,
    };
    let managed = policy
        .managed_node_selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v));
    let facts = NodeFacts {
        name: name.clone(),
        flight: view.flight.clone(),
        recent_evictions: view.recent_evictions.clone(),
    };
    let blocked = budget::node_blocked(budgets, now, &facts, budget::window_open(budgets, now)).is_some();
    let unreported = (report.is_none() && !malformed && managed)
        .then(|| missing_report(node, &name, problems))
        .flatten();
    view.unreported = unreported;
    let agent_backend = report.as_ref().and_then(|r| r.backend);
    let wrong_backend = agent_backend.filter(|b| *b != policy.backend);
    if let Some(b) = wrong_backend {
        node_problem(
            problems,
            &name,
            Reason::AgentBackendMismatch,
            format!(
                "the agent runs --backend {}, the planner plans for {}: the node is left alone until they agree (settings.planner.backend)",
                mig_protocol::backend_name(b),
                mig_protocol::backend_name(policy.backend)
            ),
        );
    }
    let mut gpus = report.map(|r| r.gpus).unwrap_or_default();
    if let (Some(g), Flight::InFlight { .. } | Flight::Stuck) = (&grant, &view.flight) {
        // Plan around the target the node is moving to.
        for gpu in &mut gpus {
            if let Some(target) = g.targets.get(&gpu.index) {
                match target_instances(Catalog::embedded(), gpu, target) {
                    Ok(instances) => gpu.instances = instances,
                    Err(e) => node_problem(
                        problems,
                        &name,
                        Reason::MalformedAnnotation,
                        format!(
                            "annotation {GRANT_ANNOTATION} on node/{name}: GPU {}: {e}",
                            gpu.index
                        ),
                    ),
                }
            }
        }
    }
    let unknown = gpu_problems(&gpus, policy, &name, problems);
    let unknown_freezes = unknown && policy.backend == mig_planner::snapshot::Backend::MigManager;
    let counts = view.reported && managed && !malformed;
    let snap = snapshot::Node {
        name,
        labels,
        taints,
        schedulable: !spec.unschedulable.unwrap_or(false),
        frozen: malformed || blocked || wrong_backend.is_some() || unknown_freezes,
        unobserved: unreported.map(|u| u.to_string()),
        gpus: if malformed { Vec::new() } else { gpus },
    };
    (view, snap, counts)
}

/// Problems with Node `name`'s reported GPUs (unknown models, instances that cannot be read);
/// `true` when some GPU's instances are unknown.
fn gpu_problems(
    gpus: &[mig_planner::snapshot::Gpu],
    policy: &mig_planner::Policy,
    name: &str,
    problems: &mut Vec<InputProblem>,
) -> bool {
    for gpu in gpus {
        if let Err(e) = Catalog::embedded().lookup(&gpu.product) {
            node_problem(
                problems,
                name,
                Reason::UnknownGpuModel,
                format!("GPU {}: {e}; the GPU is left alone", gpu.index),
            );
        }
    }
    let unknown: Vec<String> = gpus
        .iter()
        .filter_map(|g| Some(format!("GPU {}: {}", g.index, g.unknown.as_ref()?)))
        .collect();
    if !unknown.is_empty() {
        node_problem(
            problems,
            name,
            Reason::GpuStateUnknown,
            format!(
                "the agent cannot read {}; {}",
                unknown.join("; "),
                match policy.backend {
                    // mig-manager applies a config to the whole node.
                    mig_planner::snapshot::Backend::MigManager => "the node is left alone until it can",
                    mig_planner::snapshot::Backend::Nvml => "those GPUs are left alone until it can",
                }
            ),
        );
    }
    !unknown.is_empty()
}

/// A JSON value as one of our annotation types; a mismatch is recorded, never a panic.
fn typed<T: serde::de::DeserializeOwned>(
    value: Option<serde_json::Value>,
    key: &str,
    object: &str,
    errors: &mut Vec<String>,
) -> Option<T> {
    serde_json::from_value(value?)
        .map_err(|e| {
            errors.push(format!(
                "annotation {key} on {object}: {e}; the node is left alone"
            ))
        })
        .ok()
}

/// A grant's target that cannot be read for a reported GPU: the annotation is malformed, and the
/// node is reported (`MalformedAnnotation`) and planned as reported.
#[derive(Debug, thiserror::Error)]
enum TargetError {
    /// The GPU's model is unknown.
    #[error(transparent)]
    Model(#[from] mig_catalog::CatalogError),
    /// The target does not parse.
    #[error(transparent)]
    Layout(#[from] mig_catalog::ParseLayoutError),
}

/// A GPU's instances once `target` is applied: in-use instances at the same placement keep their pods.
fn target_instances(catalog: &Catalog, gpu: &Gpu, target: &str) -> Result<Vec<GpuInstance>, TargetError> {
    let model = catalog.lookup(&gpu.product)?;
    let layout = model.parse_layout(target)?;
    let kept: BTreeMap<(String, u8), &GpuInstance> = gpu
        .instances
        .iter()
        .map(|i| ((i.profile.clone(), i.start), i))
        .collect();
    let mut seen = BTreeSet::new();
    Ok(layout
        .instances()
        .iter()
        .filter_map(|i| {
            let profile = model.profile(i.profile)?.name.clone();
            seen.insert((profile.clone(), i.start));
            let old = kept.get(&(profile.clone(), i.start));
            Some(GpuInstance {
                profile,
                start: i.start,
                pods: old.map(|o| o.pods.clone()).unwrap_or_default(),
                utilization: old.and_then(|o| o.utilization),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, created: &str, phase: &str, node: Option<&str>, profile: &str, n: u32) -> Arc<Pod> {
        let mut spec = serde_json::json!({"containers": [{"name": "c", "resources": {
            "limits": {format!("nvidia.com/mig-{profile}"): n.to_string()}}}]});
        if let Some(node) = node {
            spec["nodeName"] = node.into();
        }
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "ml", "name": name, "creationTimestamp": created},
                "spec": spec,
                "status": {"phase": phase},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn recent_demand_counts_pods_created_in_the_window() {
        let now: Timestamp = "2026-11-22T12:00:00Z".parse().unwrap();
        let pods = [
            pod("old", "2026-11-22T10:00:00Z", "Running", Some("n1"), "3g.40gb", 1),
            pod(
                "running",
                "2026-11-22T11:30:00Z",
                "Running",
                Some("n1"),
                "1g.10gb",
                2,
            ),
            pod("waiting", "2026-11-22T11:59:00Z", "Pending", None, "1g.10gb", 1),
            pod("big", "2026-11-22T11:10:00Z", "Pending", None, "7g.80gb", 1),
        ];
        let run = |window: u64| {
            observe(
                &[],
                &pods,
                &[],
                &mig_planner::Policy::default(),
                &DisruptionBudgets::default(),
                std::time::Duration::from_secs(window),
                now,
            )
            .snapshot
        };
        let s = run(3600);
        assert_eq!(
            s.recent_demand,
            BTreeMap::from([("1g.10gb".to_string(), 3), ("7g.80gb".to_string(), 1)])
        );
        assert_eq!(s.pending_pods.len(), 2, "pending pods are planned as before");
        // How long each has waited by `now` (the planner values a pod more the longer it waited).
        let waited: BTreeMap<&str, Option<u64>> = s
            .pending_pods
            .iter()
            .map(|p| (p.name.as_str(), p.waited_seconds))
            .collect();
        assert_eq!(
            waited,
            BTreeMap::from([("waiting", Some(60)), ("big", Some(50 * 60))])
        );
        assert_eq!(run(4 * 3600).recent_demand.get("3g.40gb"), Some(&1));
        assert!(run(0).recent_demand.is_empty(), "0s turns it off");
    }

    #[test]
    fn running_and_pending_pods_carry_where_they_may_run() {
        // A drain may send a running pod elsewhere: the planner must know where it may go.
        let constrained = |name: &str, phase: &str, node: Option<&str>| {
            let p = pod(name, "2026-11-22T11:00:00Z", phase, node, "1g.10gb", 1);
            let mut p = (*p).clone();
            let spec = p.spec.as_mut().unwrap();
            spec.node_selector = Some(BTreeMap::from([("pool".to_string(), "a".to_string())]));
            spec.tolerations = Some(vec![k8s_openapi::api::core::v1::Toleration {
                key: Some("dedicated".into()),
                operator: Some("Exists".into()),
                ..Default::default()
            }]);
            spec.affinity = serde_json::from_value(serde_json::json!({"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["x"]}]}]}}}))
            .unwrap();
            Arc::new(p)
        };
        let pods = [
            constrained("running", "Running", Some("n1")),
            constrained("waiting", "Pending", None),
        ];
        let s = observe(
            &[],
            &pods,
            &[],
            &mig_planner::Policy::default(),
            &DisruptionBudgets::default(),
            std::time::Duration::from_secs(60),
            "2026-11-22T12:00:00Z".parse().unwrap(),
        )
        .snapshot;
        let r = &s.running_pods[0];
        let p = &s.pending_pods[0];
        assert_eq!(r.node_selector.get("pool").map(String::as_str), Some("a"));
        assert_eq!(r.node_selector, p.node_selector);
        assert_eq!(r.tolerations.len(), 1);
        assert_eq!(r.tolerations[0].key, "dedicated");
        assert_eq!(r.tolerations, p.tolerations);
        assert_eq!(r.node_affinity.len(), 1);
        assert_eq!(r.node_affinity[0].match_expressions[0].values, ["x"]);
        assert_eq!(r.node_affinity, p.node_affinity);
    }

    /// One node observed under a planner for `backend`.
    fn observe_one(n: Arc<Node>, backend: mig_planner::snapshot::Backend) -> ClusterView {
        let policy = mig_planner::Policy {
            backend,
            ..Default::default()
        };
        observe(
            &[n],
            &[],
            &[],
            &policy,
            &DisruptionBudgets::default(),
            std::time::Duration::from_secs(60),
            "2026-11-22T12:00:00Z".parse().unwrap(),
        )
    }

    #[test]
    fn a_node_whose_agent_runs_another_backend_is_left_alone_and_said_so() {
        let node = |backend: Option<&str>| {
            let mut report = serde_json::json!({"observedAt": "", "gpus": []});
            if let Some(b) = backend {
                report["backend"] = b.into();
            }
            Arc::new(
                serde_json::from_value::<Node>(serde_json::json!({
                    "metadata": {"name": "n1", "annotations": {REPORT_ANNOTATION: report.to_string()}},
                }))
                .unwrap(),
            )
        };
        let run = observe_one;
        use mig_planner::snapshot::Backend::{MigManager, Nvml};
        let o = run(node(Some("nvml")), MigManager);
        assert!(o.snapshot.nodes[0].frozen);
        let p = &o.problems[0];
        assert_eq!(p.reason, Reason::AgentBackendMismatch);
        assert!(p.message.contains("--backend nvml"), "{}", p.message);
        assert!(p.message.contains("plans for mig-manager"), "{}", p.message);
        for (agent, planner) in [
            (Some("nvml"), Nvml),
            (Some("mig-manager"), MigManager),
            (None, Nvml),
        ] {
            let o = run(node(agent), planner);
            assert!(!o.snapshot.nodes[0].frozen, "{agent:?} {planner:?}");
            assert!(o.problems.is_empty(), "{agent:?}: {:?}", o.problems);
        }
    }

    #[test]
    fn a_gpu_the_agent_cannot_read_is_reported_and_freezes_a_mig_manager_node() {
        let report = serde_json::json!({"observedAt": "", "gpus": [
            {"index": 0, "product": "NVIDIA-H100-80GB-HBM3", "instances": [{"profile": "7g.80gb", "start": 0}]},
            {"index": 1, "product": "NVIDIA-H100-80GB-HBM3", "unknown": "nvidia-smi mig -lgi -i 1: timed out"},
        ]});
        let node = Arc::new(
            serde_json::from_value::<Node>(serde_json::json!({
                "metadata": {"name": "n1", "annotations": {REPORT_ANNOTATION: report.to_string()}},
            }))
            .unwrap(),
        );
        use mig_planner::snapshot::Backend::{MigManager, Nvml};
        for (backend, frozen) in [(MigManager, true), (Nvml, false)] {
            let o = observe_one(node.clone(), backend);
            assert_eq!(o.snapshot.nodes[0].frozen, frozen, "{backend:?}");
            let p = &o.problems[0];
            assert_eq!(p.reason, Reason::GpuStateUnknown);
            assert!(
                p.message.contains("GPU 1: nvidia-smi mig -lgi -i 1: timed out"),
                "{}",
                p.message
            );
            // The planner leaves the GPU alone either way.
            let plan = mig_planner::plan(&o.snapshot, &o.snapshot.policy);
            assert!(plan.gpus.iter().all(|g| g.index == 0), "{:?}", plan.gpus);
        }
    }

    #[test]
    fn only_a_node_with_mig_gpus_and_no_report_is_missing_its_agent() {
        use mig_planner::snapshot::Backend::MigManager;
        let node = |meta: serde_json::Value, allocatable: serde_json::Value| {
            Arc::new(
                serde_json::from_value::<Node>(serde_json::json!({
                    "metadata": meta, "status": {"allocatable": allocatable},
                }))
                .unwrap(),
            )
        };
        let missing = |n: Arc<Node>| {
            let o = observe_one(n, MigManager);
            let problems: Vec<&InputProblem> = o
                .problems
                .iter()
                .filter(|p| p.reason == Reason::NoAgentReport)
                .collect();
            let view = o.nodes["n1"].unreported;
            assert_eq!(problems.len(), usize::from(view.is_some()), "{problems:?}");
            assert_eq!(o.snapshot.nodes[0].unobserved.is_some(), view.is_some());
            view
        };
        // No sign of MIG: a CPU node, or a GPU node with MIG off, is none of our business.
        let plain =
            serde_json::json!({"name": "n1", "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}});
        assert_eq!(
            missing(node(plain, serde_json::json!({"nvidia.com/gpu": "8"}))),
            None
        );
        for (labels, allocatable) in [
            (
                serde_json::json!({"nvidia.com/mig.capable": "true"}),
                serde_json::json!({}),
            ),
            (
                serde_json::json!({MIG_CONFIG_LABEL: "all-1g.10gb"}),
                serde_json::json!({}),
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"nvidia.com/mig-1g.10gb": "7"}),
            ),
        ] {
            let meta = serde_json::json!({"name": "n1", "labels": labels});
            assert_eq!(
                missing(node(meta, allocatable.clone())),
                Some(Unreported::Missing),
                "{labels} {allocatable}"
            );
        }
        // With a report it is the agent's node, even with no GPUs in it.
        let meta = serde_json::json!({"name": "n1", "labels": {"nvidia.com/mig.capable": "true"},
            "annotations": {REPORT_ANNOTATION: r#"{"observedAt": "", "gpus": []}"#}});
        assert_eq!(missing(node(meta, serde_json::json!({}))), None);
    }
}
