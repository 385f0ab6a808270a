//! The planner's input: a snapshot of the cluster and the policy to plan under.
//!
//! The JSON form is documented by `docs/snapshot.schema.json`, generated from these types
//! (`mig-autoscaler plan --print-schema`); a test keeps the two in sync.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Everything the planner needs to know, read from the cluster (or written by hand for a what-if).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Snapshot {
    /// Nodes with their GPUs.
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// Pods waiting for MIG resources.
    #[serde(default)]
    pub pending_pods: Vec<PendingPod>,
    /// Pods holding GPU instances (referenced by `namespace/name` from `GpuInstance::pods`).
    #[serde(default)]
    pub running_pods: Vec<RunningPod>,
    /// PodDisruptionBudgets that cover running pods.
    #[serde(default)]
    pub pdbs: Vec<Pdb>,
    /// Policy; `mig-autoscaler plan --policy FILE` replaces it.
    #[serde(default)]
    pub policy: Policy,
    /// MIG instances asked for recently, by profile name (`"1g.10gb": 12`): the controller sums
    /// the requests of pods created within its `demandWindow`. Among plans that place the same pods
    /// with the same disruption, the one whose spare instances look most like this wins; it never
    /// makes a GPU change on its own (see docs/planner.md).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub recent_demand: BTreeMap<String, u32>,
    /// Reservations by attrition that earlier plans made and are still in force (the controller
    /// reads them back from its node annotations): while one holds, no pod of its owner's priority
    /// or lower other than the owner is planned onto its node (see docs/planner.md "Reservations").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reservations: Vec<Reservation>,
}

/// GPUs earmarked for a large pending pod until the pods running there finish.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Reservation {
    /// The pending pod it is for, `namespace/name`.
    pub pod: String,
    /// Node.
    pub node: String,
    /// The instance each earmarked GPU is to hold for the pod once its region is free.
    pub gpus: Vec<ReservedInstance>,
    /// How long it has held, in seconds.
    #[serde(default)]
    pub age_seconds: u64,
}

/// One earmarked GPU and the instance (profile and placement) kept for the pod there.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReservedInstance {
    /// GPU index on the node.
    pub gpu: u32,
    /// Profile name (`7g.80gb`).
    pub profile: String,
    /// First memory slice of the placement.
    pub start: u8,
}

impl std::fmt::Display for ReservedInstance {
    /// `7g.80gb@0`: the kept instance (its GPU is said by whoever prints it).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.profile, self.start)
    }
}

/// A Kubernetes node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Node {
    /// Node name.
    pub name: String,
    /// Node labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Node taints.
    #[serde(default)]
    pub taints: Vec<Taint>,
    /// False when cordoned (`spec.unschedulable`).
    #[serde(default = "yes")]
    pub schedulable: bool,
    /// True while a reconfiguration is in flight: the GPUs are given at their target layouts, pods
    /// may be placed on them, but the planner changes nothing on this node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub frozen: bool,
    /// Why its MIG GPUs are not known, when they are not: no agent report, or one its agent
    /// stopped refreshing. Such a node's GPUs are left out or unknown (nothing is placed on or
    /// changed there), and a pod that waits is told that this node was not counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unobserved: Option<String>,
    /// The node's GPUs.
    #[serde(default)]
    pub gpus: Vec<Gpu>,
}

fn yes() -> bool {
    true
}

/// A taint on a node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Taint {
    /// Taint key.
    pub key: String,
    /// Taint value.
    #[serde(default)]
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

/// One physical GPU.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Gpu {
    /// GPU index on the node (as NVML and mig-parted count).
    pub index: u32,
    /// `nvidia.com/gpu.product` label value (or NVML name, PCI id, catalog key).
    pub product: String,
    /// Whether MIG mode is on. The planner does not toggle MIG mode.
    #[serde(default = "yes")]
    pub mig_enabled: bool,
    /// Existing GPU instances at their placements.
    #[serde(default)]
    pub instances: Vec<GpuInstance>,
    /// Why this GPU's instances are not known (a failed, partial or inconsistent read by the
    /// node agent); `None` when they were read in full. Unknown is never empty: the planner
    /// leaves such a GPU alone and places nothing on it, and the agent runs no sequence on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
}

/// An existing GPU instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GpuInstance {
    /// Profile name (`3g.40gb`).
    pub profile: String,
    /// First memory slice.
    pub start: u8,
    /// Pods using it, as `namespace/name`.
    #[serde(default)]
    pub pods: Vec<String>,
    /// Utilization in `[0, 1]` (DCGM `GR_ENGINE_ACTIVE` or NVML GPM), when known; anything else
    /// is refused.
    #[serde(default, deserialize_with = "unit_interval")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub utilization: Option<f64>,
}

impl GpuInstance {
    /// Which instance it is: profile (as reported) and placement.
    pub fn named(&self) -> mig_catalog::NamedInstance {
        mig_catalog::NamedInstance::new(self.profile.clone(), self.start)
    }
}

impl Gpu {
    /// A GPU in MIG mode as `layout` of `model` has it, called `product`, each instance used by
    /// the pods (`namespace/name`) `pods_of` names: how the emulator and the simulator report
    /// their GPUs.
    pub fn from_layout(
        model: &mig_catalog::GpuModel,
        product: &str,
        index: u32,
        layout: &mig_catalog::Layout,
        mut pods_of: impl FnMut(&mig_catalog::Instance) -> Vec<String>,
    ) -> Gpu {
        Gpu {
            index,
            product: product.to_string(),
            mig_enabled: true,
            unknown: None,
            instances: layout
                .instances()
                .iter()
                .map(|i| GpuInstance {
                    profile: model
                        .profile(i.profile)
                        .map(|p| p.name.clone())
                        .unwrap_or_default(),
                    start: i.start,
                    pods: pods_of(i),
                    utilization: None,
                })
                .collect(),
        }
    }
}

/// A pod waiting for MIG resources.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PendingPod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Pod priority (from its PriorityClass).
    #[serde(default)]
    pub priority: i32,
    /// Extended-resource requests, e.g. `{"nvidia.com/mig-3g.40gb": 1}`; other resources are ignored.
    #[serde(default)]
    pub requests: BTreeMap<String, i64>,
    /// `spec.nodeSelector`.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Required node affinity: the pod fits a node matching any one term.
    #[serde(default)]
    pub node_affinity: Vec<NodeSelectorTerm>,
    /// Tolerations.
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// Creation time (RFC 3339); older pods are served first among equals.
    #[serde(default)]
    pub created: Option<String>,
    /// How long the pod has waited so far, in seconds (the controller: since its creation). Within
    /// its priority, placing a pod is worth more the longer it has waited compared with the
    /// longest wait ([`crate::weights::place`]; docs/planner.md "Objective").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_seconds: Option<u64>,
}

impl PendingPod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A required node-affinity term: every expression must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeSelectorTerm {
    /// Label expressions.
    #[serde(default)]
    pub match_expressions: Vec<LabelExpression>,
}

/// One label expression (`In`, `NotIn`, `Exists`, `DoesNotExist`, `Gt`, `Lt`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelExpression {
    /// Label key.
    pub key: String,
    /// Operator.
    pub operator: String,
    /// Values.
    #[serde(default)]
    pub values: Vec<String>,
}

/// A toleration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Toleration {
    /// Taint key; empty with `Exists` tolerates everything.
    #[serde(default)]
    pub key: String,
    /// `Equal` (default) or `Exists`.
    #[serde(default)]
    pub operator: String,
    /// Value for `Equal`.
    #[serde(default)]
    pub value: String,
    /// Effect; empty matches all effects.
    #[serde(default)]
    pub effect: String,
}

/// A pod holding GPU instances.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RunningPod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Pod priority.
    #[serde(default)]
    pub priority: i32,
    /// `mig-autoscaler.io/do-not-disrupt: "true"`.
    #[serde(default)]
    pub do_not_disrupt: bool,
    /// Names (`namespace/name`) of the PDBs that select it.
    #[serde(default)]
    pub pdbs: Vec<String>,
    /// How long it has run, in seconds, when known: among GPUs to earmark for a waiting pod, those
    /// whose pods have run longest go first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_seconds: Option<u64>,
    /// Seconds until it declared it will end (annotation `mig-autoscaler.io/expected-end`), when
    /// declared: GPUs whose pods all declare an end are earmarked by the latest of those ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_end_seconds: Option<u64>,
    /// `spec.nodeSelector`: where the pod may run again if a drain evicts it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Required node affinity (any one term).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_affinity: Vec<NodeSelectorTerm>,
    /// Tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

/// A PodDisruptionBudget.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pdb {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `status.disruptionsAllowed`.
    pub disruptions_allowed: u32,
}

/// How the planner may act.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Policy {
    /// How layouts are applied.
    pub backend: Backend,
    /// Which in-use instances may be drained.
    pub drain: DrainPolicy,
    /// Under `idle-or-low-priority`: pods below this priority may be evicted.
    pub low_priority_below: i32,
    /// Under `idle-or-low-priority`: instances at or below this utilization count as idle.
    pub idle_utilization: f64,
    /// Disruption budgets for one plan.
    pub budgets: Budgets,
    /// Only nodes with all these labels are planned (empty: every node with known MIG GPUs).
    pub managed_node_selector: BTreeMap<String, String>,
    /// Solver settings.
    pub solver: SolverSettings,
    /// Reservations by attrition: bounds and which pods get them.
    pub reservations: ReservationPolicy,
}

/// When and how much the planner earmarks GPUs for large pods that cannot be placed without
/// evicting (docs/planner.md "Reservations").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ReservationPolicy {
    /// Most GPUs earmarked at once, over all reservations (0: no reservations).
    pub max_gpus: u32,
    /// Most nodes holding a reservation at once.
    pub max_nodes: u32,
    /// A reservation is released after this long and chosen again from scratch.
    pub max_age_seconds: u64,
    /// Only pods asking for at least this many memory slices in all get one (4: a 3g.40gb or
    /// larger on 80 GB GPUs); smaller pods find room as instances free.
    pub min_memory_slices: u32,
}

impl Default for ReservationPolicy {
    fn default() -> Self {
        ReservationPolicy {
            max_gpus: 8,
            max_nodes: 4,
            max_age_seconds: 6 * 3600,
            min_memory_slices: 4,
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            backend: Backend::MigManager,
            drain: DrainPolicy::Never,
            low_priority_below: 0,
            idle_utilization: 0.05,
            budgets: Budgets::default(),
            managed_node_selector: BTreeMap::new(),
            solver: SolverSettings::default(),
            reservations: ReservationPolicy::default(),
        }
    }
}

/// How target layouts reach the GPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// NVIDIA mig-manager applies a generated mig-parted config; a changed GPU is rebuilt whole, so
    /// every in-use instance on it must be drained first.
    MigManager,
    /// The agent creates and destroys instances with NVML at explicit placements; in-use instances stay.
    Nvml,
}

/// Which in-use instances the planner may drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DrainPolicy {
    /// Never evict: only free capacity changes.
    Never,
    /// Evict pods that are idle or below `lowPriorityBelow`.
    IdleOrLowPriority,
    /// Evict any pod not marked do-not-disrupt, within PDBs.
    Allowed,
}

/// Limits on one plan's disruption.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Budgets {
    /// Most nodes whose layout changes (unbounded when absent).
    pub max_nodes_changed: Option<u32>,
    /// Most pods evicted (unbounded when absent).
    pub max_evictions: Option<u32>,
}

/// Solver settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SolverSettings {
    /// `highs` (ILP, greedy fallback), `microlp` (the same ILP, pure-Rust solver) or `greedy` only.
    pub kind: SolverKind,
    /// Wall-clock limit for the ILP, in milliseconds.
    pub time_limit_ms: u64,
    /// Relative MIP gap at which the ILP stops.
    pub mip_gap: f64,
    /// Up to this many nodes, capacity is modelled per node (exact); above, per group of identical
    /// nodes (labels and taints), with node budgets and co-location enforced when assigning.
    pub exact_node_limit: usize,
}

impl Default for SolverSettings {
    fn default() -> Self {
        SolverSettings {
            kind: SolverKind::Highs,
            time_limit_ms: 5_000,
            mip_gap: 1e-4,
            exact_node_limit: 16,
        }
    }
}

/// Which solver plans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SolverKind {
    /// HiGHS through good_lp, warm-started from the greedy plan, which is also the fallback.
    Highs,
    /// microlp (good_lp's pure-Rust solver) on the same model: slower than HiGHS, kept to compare
    /// back-ends and as a second opinion; greedy is its fallback too.
    Microlp,
    /// The greedy heuristic alone.
    Greedy,
}

/// A snapshot or policy that could not be read, with the JSON path of the problem.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct InputError {
    /// JSON path (`nodes[2].gpus[0].instances[1].start`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// An optional number in `[0, 1]` (NaN and infinities refused).
fn unit_interval<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let v = Option::<f64>::deserialize(d)?;
    match v {
        Some(x) if !(0.0..=1.0).contains(&x) => Err(serde::de::Error::custom(format!(
            "utilization {x} is outside [0, 1]"
        ))),
        other => Ok(other),
    }
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, InputError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = match e.path().to_string().as_str() {
            "." => "$".to_string(),
            p => format!("$.{p}"),
        };
        let mut message = e.into_inner().to_string();
        if !text.trim_start().starts_with('{') {
            message.push_str(
                "; a snapshot or policy is one JSON object, and this does not start with '{' (YAML? convert it with `yq -o json`)",
            );
        }
        InputError { path, message }
    })
}

impl Snapshot {
    /// Parse a snapshot from JSON; errors carry the JSON path.
    pub fn from_json(text: &str) -> Result<Snapshot, InputError> {
        from_json(text)
    }

    /// The JSON Schema of the snapshot.
    pub fn json_schema() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(Snapshot)).unwrap_or_default()
    }
}

impl Policy {
    /// Parse a policy from JSON; errors carry the JSON path.
    pub fn from_json(text: &str) -> Result<Policy, InputError> {
        from_json(text)
    }
}
