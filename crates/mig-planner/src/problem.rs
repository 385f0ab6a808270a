//! From a snapshot to the planning problem: which GPUs may change and how, which pods want what,
//! and where they may go. Bad input becomes a warning or a pod-level reason here, never a panic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use mig_catalog::{Catalog, Counts, GpuModel, Instance, Layout, ProfileIdx};

use crate::plan::Warning;
use crate::reserve::{self, Hold, ReleasedReservation};
use crate::snapshot::{
    Backend, DrainPolicy, GpuInstance, LabelExpression, Node, PendingPod, Policy, Snapshot,
};
use crate::weights;

/// Taints with this prefix are ours and temporary: they do not make a node ineligible.
pub const OWN_TAINT_PREFIX: &str = "mig-autoscaler.io/";
const RESOURCE_PREFIX: &str = "nvidia.com/mig-";

/// One way a GPU may end up.
#[derive(Clone, Debug, Default)]
pub(crate) struct GpuOption {
    /// Target profile counts (indexed by the GPU model's profiles).
    pub counts: Counts,
    /// Instances available to pods placed by this plan, per global profile name index.
    pub free: Vec<u16>,
    /// Whether the GPU is reconfigured.
    pub changed: bool,
    /// Whether its running pods are evicted first.
    pub drain: bool,
    /// Disruption cost of choosing this option.
    pub cost: f64,
}

/// What a GPU may become: `options[0]` is "keep" (its own layout); the change options after it are
/// shared by every GPU of the same model, busy instances and costs (one allocation for thousands of
/// identical GPUs).
#[derive(Clone, Debug, Default)]
pub(crate) struct Options {
    keep: GpuOption,
    changes: Arc<[GpuOption]>,
}

impl Options {
    pub fn len(&self) -> usize {
        1 + self.changes.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &GpuOption> {
        std::iter::once(&self.keep).chain(self.changes.iter())
    }

    /// `options[1..]`: the changes, shared with identical GPUs.
    pub fn changes(&self) -> &[GpuOption] {
        &self.changes
    }

    /// The most instances of global profile `q` any option offers (drain options counted only
    /// when `drains`).
    pub fn most_free(&self, q: usize, drains: bool) -> u16 {
        self.iter()
            .filter(|o| drains || !o.drain)
            .map(|o| o.free[q])
            .max()
            .unwrap_or(0)
    }
}

impl std::ops::Index<usize> for Options {
    type Output = GpuOption;

    fn index(&self, o: usize) -> &GpuOption {
        match o {
            0 => &self.keep,
            _ => &self.changes[o - 1],
        }
    }
}

/// A GPU the planner knows about.
#[derive(Clone, Debug)]
pub(crate) struct GpuState<'c> {
    pub node: usize,
    pub index: u32,
    pub model: &'c GpuModel,
    pub actual: Layout,
    /// Instances holding running pods.
    pub busy: Layout,
    /// Running pods on this GPU (keys), evicted if it is drained.
    pub pods: Vec<String>,
    /// options[0] is "keep".
    pub options: Options,
    /// Why its in-use instances may not be drained (when draining is allowed at all).
    pub drain_blocked: Option<String>,
    /// What draining it costs, when the policy allows it and nothing protects its pods (whether
    /// or not this problem gives it drain options).
    pub drain_cost: Option<f64>,
    pub group: usize,
}

/// Something that wants instances: a pending pod, or a pod evicted by this plan that must find a new home.
#[derive(Clone, Debug)]
pub(crate) struct Demand {
    pub key: String,
    /// Its priority: demands compete in strict tiers by it (highest first).
    pub tier: i32,
    /// The value of placing it within its tier (`weights::place`).
    pub weight: f64,
    /// (global profile index, count)
    pub req: Vec<(usize, u16)>,
    pub groups: Vec<usize>,
    /// For evicted pods: the GPU whose drain evicts it.
    pub evicted_from: Option<usize>,
    /// For evicted pods: whether the plan must place it again to drain its GPU (no pending pod has
    /// a higher priority: a pod is displaced without a place to go only for a more important one,
    /// as the scheduler's preemption does; otherwise drains would only move the waiting around).
    pub must_move: bool,
    pub created: String,
    /// Index into `Snapshot::pending_pods` for pending pods.
    pub pending: Option<usize>,
}

impl Demand {
    /// Total memory slices asked for (for ordering big-first).
    pub fn size(&self, p: &Problem<'_>) -> u32 {
        memory_slices(&self.req, &p.profile_size)
    }
}

/// The memory slices a request `(global profile, count)` asks for in all, with each profile's
/// size from `profile_size`.
fn memory_slices(req: &[(usize, u16)], profile_size: &[u32]) -> u32 {
    req.iter().map(|(q, n)| profile_size[*q] * u32::from(*n)).sum()
}

/// A capacity group: one node (exact model) or nodes with identical labels and taints (aggregated).
#[derive(Clone, Debug)]
pub(crate) struct Group {
    pub nodes: Vec<usize>,
}

/// GPUs in one group with the same model and pinned instances, so the same change options; each
/// member's "keep" option (its actual layout) may differ. The ILP decides how many take each option.
#[derive(Clone, Debug)]
pub(crate) struct Class {
    pub gpus: Vec<usize>,
}

/// The normalised problem.
pub(crate) struct Problem<'c> {
    pub policy: Policy,
    pub nodes: Vec<NodeInfo>,
    pub gpus: Vec<GpuState<'c>>,
    pub groups: Vec<Group>,
    pub classes: Vec<Class>,
    /// Global profile names (sorted); capacity vectors index this.
    pub profiles: Vec<String>,
    /// Memory slices of each global profile name (largest over models, for ordering only).
    pub profile_size: Vec<u32>,
    pub demands: Vec<Demand>,
    /// Pending pods that cannot be planned at all, with the reason.
    pub rejected: Vec<(usize, String)>,
    pub warnings: Vec<Warning>,
    /// PDB name → disruptions allowed.
    pub pdb_allowed: BTreeMap<String, u32>,
    /// Running pod key → PDB names.
    pub pod_pdbs: HashMap<String, Vec<String>>,
    /// Whether groups are single nodes.
    pub exact: bool,
    /// Recent demand: (global profile index, instances).
    pub recent_demand: Vec<(usize, u32)>,
    /// Reservations of the snapshot that still hold.
    pub holds: Vec<Hold>,
    /// Reservations of the snapshot that end, with why.
    pub released: Vec<ReleasedReservation>,
}

/// What the planner keeps of a node.
#[derive(Clone, Debug)]
pub(crate) struct NodeInfo {
    pub name: String,
    pub managed: bool,
    pub schedulable: bool,
    pub frozen: bool,
    pub gpus: Vec<usize>,
}

fn label_expression_holds(e: &LabelExpression, labels: &BTreeMap<String, String>) -> bool {
    let v = labels.get(&e.key);
    match e.operator.as_str() {
        "In" => v.is_some_and(|v| e.values.contains(v)),
        "NotIn" => v.is_none_or(|v| !e.values.contains(v)),
        "Exists" => v.is_some(),
        "DoesNotExist" => v.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                v.and_then(|v| v.parse::<i64>().ok()),
                e.values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if e.operator == "Gt" { v > bound } else { v < bound }
        }
        _ => false,
    }
}

/// The instances a running pod (`namespace/name`) holds on a node.
fn pod_instances<'a>(node: &'a Node, pod: &'a str) -> impl Iterator<Item = &'a GpuInstance> + 'a {
    node.gpus
        .iter()
        .flat_map(|g| &g.instances)
        .filter(move |i| i.pods.iter().any(|x| x == pod))
}

/// Why a pod may not run on a node, or `None` if it may (selectors, affinity, taints).
pub(crate) fn node_rejects(pod: &PendingPod, node: &Node) -> Option<&'static str> {
    rejects(&Constraints::of(pod), node)
}

/// [`node_rejects`] for a pod's constraints.
pub(crate) fn rejects(pod: &Constraints<'_>, node: &Node) -> Option<&'static str> {
    if !node.schedulable {
        return Some("cordoned");
    }
    if pod
        .node_selector
        .iter()
        .any(|(k, v)| node.labels.get(k) != Some(v))
    {
        return Some("node selector");
    }
    if !pod.node_affinity.is_empty()
        && !pod.node_affinity.iter().any(|t| {
            t.match_expressions
                .iter()
                .all(|e| label_expression_holds(e, &node.labels))
        })
    {
        return Some("node affinity");
    }
    let untolerated = node.taints.iter().any(|t| {
        (t.effect == "NoSchedule" || t.effect == "NoExecute")
            && !t.key.starts_with(OWN_TAINT_PREFIX)
            && !pod.tolerations.iter().any(|tol| {
                let key_ok = (tol.key.is_empty() && tol.operator == "Exists") || tol.key == t.key;
                let value_ok = tol.operator == "Exists" || tol.value == t.value;
                let effect_ok = tol.effect.is_empty() || tol.effect == t.effect;
                key_ok && value_ok && effect_ok
            })
    });
    if untolerated { Some("taints") } else { None }
}

/// The snapshot's running pods and PDBs, indexed.
struct Disruptions<'s> {
    running: HashMap<String, &'s crate::snapshot::RunningPod>,
    pdb_allowed: BTreeMap<String, u32>,
}

impl<'s> Disruptions<'s> {
    fn of(snapshot: &'s Snapshot) -> Disruptions<'s> {
        Disruptions {
            running: snapshot
                .running_pods
                .iter()
                .map(|r| (format!("{}/{}", r.namespace, r.name), r))
                .collect(),
            pdb_allowed: snapshot
                .pdbs
                .iter()
                .map(|p| (format!("{}/{}", p.namespace, p.name), p.disruptions_allowed))
                .collect(),
        }
    }
}

/// Stage 1: the nodes and the GPUs the planner can use (known model, MIG on, instances known and a
/// valid layout), each GPU's busy instances, and the GPUs each pod uses. Every GPU left alone gets
/// a warning.
fn read_gpus<'c>(
    catalog: &'c Catalog,
    snapshot: &Snapshot,
    policy: &Policy,
    warnings: &mut Vec<Warning>,
) -> (Vec<NodeInfo>, Vec<GpuState<'c>>, HashMap<String, BTreeSet<usize>>) {
    let mut nodes = Vec::new();
    let mut gpus: Vec<GpuState<'c>> = Vec::new();
    let mut pods_per_gpu: HashMap<String, BTreeSet<usize>> = HashMap::new();
    // A fleet has a handful of products: each is looked up once.
    let mut models: HashMap<&str, Result<&'c GpuModel, String>> = HashMap::new();
    for (ni, node) in snapshot.nodes.iter().enumerate() {
        let managed = policy
            .managed_node_selector
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v));
        let mut info = NodeInfo {
            name: node.name.clone(),
            managed,
            schedulable: node.schedulable,
            frozen: node.frozen,
            gpus: Vec::new(),
        };
        for (gi, gpu) in node.gpus.iter().enumerate() {
            let path = format!("$.nodes[{ni}].gpus[{gi}]");
            let model = models
                .entry(&gpu.product)
                .or_insert_with(|| catalog.lookup(&gpu.product).map_err(|e| e.to_string()))
                .clone();
            let Some((model, actual, busy, pods)) = read_gpu(model, gpu, &path, warnings) else {
                continue;
            };
            let gpu_id = gpus.len();
            for p in &pods {
                pods_per_gpu.entry(p.clone()).or_default().insert(gpu_id);
            }
            info.gpus.push(gpu_id);
            gpus.push(GpuState {
                node: ni,
                index: gpu.index,
                model,
                actual,
                busy,
                pods: pods.into_iter().collect(),
                options: Options::default(),
                drain_blocked: None,
                drain_cost: None,
                group: 0,
            });
        }
        nodes.push(info);
    }
    (nodes, gpus, pods_per_gpu)
}

/// One reported GPU as the planner uses it: model, actual layout, busy instances, pods using it;
/// `None` (with a warning at `path`) when it must be left alone.
fn read_gpu<'c>(
    model: Result<&'c GpuModel, String>,
    gpu: &crate::snapshot::Gpu,
    path: &str,
    warnings: &mut Vec<Warning>,
) -> Option<(&'c GpuModel, Layout, Layout, BTreeSet<String>)> {
    let mut warn = |path: String, message: String| warnings.push(Warning { path, message });
    let model = match model {
        Ok(m) => m,
        Err(e) => {
            warn(format!("{path}.product"), format!("GPU left alone: {e}"));
            return None;
        }
    };
    if !gpu.mig_enabled {
        warn(
            path.to_string(),
            "GPU left alone: MIG mode is off (the planner does not toggle MIG mode)".into(),
        );
        return None;
    }
    if let Some(why) = &gpu.unknown {
        // Unknown is never empty: nothing is placed on it and nothing changes it.
        warn(
            format!("{path}.unknown"),
            format!("GPU left alone: its instances are unknown ({why})"),
        );
        return None;
    }
    let mut actual = Vec::new();
    let mut busy = Vec::new();
    let mut pods = BTreeSet::new();
    let mut bad = false;
    for (ii, inst) in gpu.instances.iter().enumerate() {
        let Some(p) = model.profile_by_name(&inst.profile) else {
            warn(
                format!("{path}.instances[{ii}].profile"),
                format!("GPU left alone: {} has no profile {:?}", model.key, inst.profile),
            );
            bad = true;
            continue;
        };
        let i = Instance::new(p, inst.start);
        actual.push(i);
        if !inst.pods.is_empty() {
            busy.push(i);
            pods.extend(inst.pods.iter().cloned());
        }
    }
    let actual = Layout::new(actual);
    if let Err(e) = model.validate(&actual) {
        warn(format!("{path}.instances"), format!("GPU left alone: {e}"));
        bad = true;
    }
    (!bad).then(|| (model, actual, Layout::new(busy), pods))
}

/// Stage 2: the global profile universe (every profile of every model present, sorted by name) and
/// each profile's largest memory-slice count.
fn profile_universe(gpus: &[GpuState<'_>]) -> (Vec<String>, Vec<u32>) {
    let mut names: BTreeMap<String, u32> = BTreeMap::new();
    for g in gpus {
        for p in &g.model.profiles {
            let e = names.entry(p.name.clone()).or_insert(0);
            *e = (*e).max(u32::from(p.memory_slices));
        }
    }
    (names.keys().cloned().collect(), names.values().copied().collect())
}

/// What stage 3 needs to know besides the GPU.
struct OptionInputs<'a> {
    snapshot: &'a Snapshot,
    policy: &'a Policy,
    profiles: &'a [String],
    /// Profiles pending pods ask for (to skip `+me` options nobody asked for).
    wanted: BTreeSet<String>,
    disruptions: &'a Disruptions<'a>,
    pods_per_gpu: &'a HashMap<String, BTreeSet<usize>>,
    drains: &'a Drains,
}

/// Which drainable GPUs get drain options.
#[derive(Clone, Debug)]
pub(crate) enum Drains {
    /// None: a plan without evictions (what greedy plans anyway).
    None,
    /// These GPUs (ids as `Problem::gpus` numbers them; the same snapshot numbers them the same).
    Only(DrainCandidates),
}

/// The GPUs that get drain options, and the nodes chosen for requests that need several GPUs of
/// one node: each of those is a capacity group of its own, so that the aggregated model cannot
/// count drains spread over several nodes as room for them.
#[derive(Clone, Debug, Default)]
pub(crate) struct DrainCandidates {
    pub gpus: BTreeSet<usize>,
    pub gang_nodes: BTreeSet<usize>,
}

/// Maximal count vectors compatible with a pinned layout, per model and pinned layout.
type VectorCache = HashMap<(String, Layout), Vec<Counts>>;

/// A GPU's change options, per model, busy instances, whether it changes in place and what a
/// drain of it costs (`f64::to_bits`): identical GPUs share one list.
type ChangeCache = HashMap<(String, Layout, bool, Option<u64>), Arc<[GpuOption]>>;

/// Option lists already built, shared by the GPUs that have the same ones.
#[derive(Default)]
struct OptionCache {
    vectors: VectorCache,
    changes: ChangeCache,
}

/// Stage 3: each GPU's options: keep (always first), change in place around its busy instances, and
/// (when the drain policy allows and nothing protects its pods) drain and change.
fn set_options(
    gpus: &mut [GpuState<'_>],
    nodes: &[NodeInfo],
    held: &BTreeSet<usize>,
    input: &OptionInputs<'_>,
) {
    let mut cache = OptionCache::default();
    for (gi, gs) in gpus.iter_mut().enumerate() {
        let node = &nodes[gs.node];
        // A reserved GPU whose kept region is still in use waits for it: nothing changes it.
        let changeable = node.managed && node.schedulable && !node.frozen && !held.contains(&gi);
        // Why its pods may not be drained, asked only where a drain is an option at all.
        let may_drain = changeable && !gs.busy.is_empty() && input.policy.drain != DrainPolicy::Never;
        let blocked = may_drain.then(|| drain_blocked(gs, input)).flatten();
        gs.drain_cost = (may_drain && blocked.is_none()).then(|| drain_cost(gs, input));
        let drain = match input.drains {
            Drains::None => None,
            Drains::Only(c) => gs.drain_cost.filter(|_| c.gpus.contains(&gi)),
        };
        gs.options = gpu_options(gs, changeable, drain, input, &mut cache);
        gs.drain_blocked = blocked;
    }
}

/// Why `gs`'s pods may not be drained, or `None`.
fn drain_blocked(gs: &GpuState<'_>, input: &OptionInputs<'_>) -> Option<String> {
    let policy = input.policy;
    gs.pods.iter().find_map(|p| {
        let r = input.disruptions.running.get(p);
        if input.pods_per_gpu.get(p).is_none_or(|s| s.len() != 1) {
            return Some(format!("pod {p} uses instances on several GPUs"));
        }
        if r.is_some_and(|r| r.do_not_disrupt) {
            return Some(format!("pod {p} is marked mig-autoscaler.io/do-not-disrupt"));
        }
        if let Some(d) = r.and_then(|r| {
            r.pdbs
                .iter()
                .find(|d| input.disruptions.pdb_allowed.get(*d).copied().unwrap_or(u32::MAX) == 0)
        }) {
            return Some(format!("pod {p} is protected by PDB {d} (0 disruptions allowed)"));
        }
        if policy.drain == DrainPolicy::IdleOrLowPriority {
            let low = r.is_some_and(|r| r.priority < policy.low_priority_below);
            let idle = pod_instances(&input.snapshot.nodes[gs.node], p)
                .all(|i| i.utilization.is_some_and(|u| u <= policy.idle_utilization));
            if !low && !idle {
                return Some(format!(
                    "pod {p} is neither idle nor below priority {}",
                    policy.low_priority_below
                ));
            }
        }
        None
    })
}

/// What draining `gs` costs: the change, and per evicted pod a fixed cost plus its utilization.
fn drain_cost(gs: &GpuState<'_>, input: &OptionInputs<'_>) -> f64 {
    let util: f64 = gs
        .pods
        .iter()
        .map(|p| {
            pod_instances(&input.snapshot.nodes[gs.node], p)
                .filter_map(|i| i.utilization)
                .fold(0.0, f64::max)
        })
        .sum();
    weights::CHANGE_GPU + weights::EVICT * gs.pods.len() as f64 + weights::EVICT * util
}

/// The options of one GPU (`changeable`: its node is managed, schedulable and not frozen;
/// `drain_cost`: what draining it costs, when it gets drain options).
fn gpu_options(
    gs: &GpuState<'_>,
    changeable: bool,
    drain_cost: Option<f64>,
    input: &OptionInputs<'_>,
    cache: &mut OptionCache,
) -> Options {
    let model = gs.model;
    let policy = input.policy;
    let busy_counts = model.counts(&gs.busy);
    let actual_counts = model.counts(&gs.actual);
    let keep = GpuOption {
        free: free_instances(input.profiles, model, &actual_counts, &busy_counts),
        counts: actual_counts,
        changed: false,
        drain: false,
        cost: 0.0,
    };
    let in_place = changeable && (gs.busy.is_empty() || policy.backend == Backend::Nvml);
    let key = (
        model.key.clone(),
        gs.busy.clone(),
        in_place,
        drain_cost.map(f64::to_bits),
    );
    if let Some(changes) = cache.changes.get(&key) {
        return Options {
            keep,
            changes: changes.clone(),
        };
    }
    let mut changes = Vec::new();
    if in_place {
        // The GPU's own count vector stays in the list so that identical GPUs share one option
        // set; choosing it is turned back into "keep" when decisions are made.
        let cost = weights::CHANGE_GPU
            + if gs.busy.is_empty() {
                0.0
            } else {
                weights::TOUCH_BUSY_GPU
            };
        for c in maximal_vectors(model, &gs.busy, &input.wanted, &mut cache.vectors) {
            changes.push(GpuOption {
                free: free_instances(input.profiles, model, &c, &busy_counts),
                counts: c,
                changed: true,
                drain: false,
                cost,
            });
        }
    }
    if let Some(cost) = drain_cost {
        let none = Counts::zero(model.profiles.len());
        for c in maximal_vectors(model, &Layout::empty(), &input.wanted, &mut cache.vectors) {
            changes.push(GpuOption {
                free: free_instances(input.profiles, model, &c, &none),
                counts: c,
                changed: true,
                drain: true,
                cost,
            });
        }
    }
    let changes: Arc<[GpuOption]> = changes.into();
    cache.changes.insert(key, changes.clone());
    Options { keep, changes }
}

/// Instances of `counts` beyond `kept`, per global profile.
fn free_instances(profiles: &[String], model: &GpuModel, counts: &Counts, kept: &Counts) -> Vec<u16> {
    let mut free = vec![0u16; profiles.len()];
    for (idx, _) in model.profiles_indexed() {
        let n = counts.get(idx).saturating_sub(kept.get(idx));
        free[global_profile(profiles, model, idx)] += u16::from(n);
    }
    free
}

/// A model's profile `idx` in the global universe.
pub(crate) fn global_profile(profiles: &[String], model: &GpuModel, idx: ProfileIdx) -> usize {
    profiles
        .binary_search(&model.profiles[usize::from(idx.0)].name)
        .unwrap_or(0)
}

/// The maximal count vectors compatible with `pinned` (no vector another one covers). `+me`
/// instances nobody asked for are never worth creating (they serve only `+me` requests); pinned
/// ones stay, of course.
fn maximal_vectors(
    model: &GpuModel,
    pinned: &Layout,
    wanted: &BTreeSet<String>,
    cache: &mut VectorCache,
) -> Vec<Counts> {
    let key = (model.key.clone(), pinned.clone());
    if let Some(v) = cache.get(&key) {
        return v.clone();
    }
    let pinned_counts = model.counts(pinned);
    let adds_unwanted_me = |c: &Counts| {
        model
            .profiles_indexed()
            .any(|(i, p)| p.media_extensions && c.get(i) > pinned_counts.get(i) && !wanted.contains(&p.name))
    };
    let mut compatible: Vec<Counts> = model
        .compatible_layouts(pinned)
        .map(|l| model.counts(l))
        .collect();
    compatible.sort_unstable();
    compatible.dedup();
    compatible.retain(|c| !adds_unwanted_me(c));
    let maximal: Vec<Counts> = compatible
        .iter()
        .filter(|c| !compatible.iter().any(|d| d != *c && d.covers(c)))
        .cloned()
        .collect();
    cache.insert(key, maximal.clone());
    maximal
}

/// Per held node: its owners and their highest priority.
type Owners = BTreeMap<usize, (BTreeSet<String>, i32)>;

/// Stage 4: groups of nodes the model treats alike (one per node when `exact`; otherwise by the
/// labels some pending pod selects on, foreign taints, schedulable, frozen and reservations), and
/// each node's group.
fn group_nodes(
    snapshot: &Snapshot,
    exact: bool,
    drains: &Drains,
    owners: &Owners,
) -> (Vec<Group>, Vec<usize>) {
    // Nodes chosen for a gang's drains are groups of their own.
    let apart = |n: usize| matches!(drains, Drains::Only(c) if c.gang_nodes.contains(&n));
    // Only labels that some pod selects on tell nodes apart (not, say, the hostname): pending
    // pods, and running pods when a drain may send them elsewhere.
    let moving = matches!(drains, Drains::Only(c) if !c.gpus.is_empty());
    let pending = snapshot.pending_pods.iter().map(Constraints::of);
    let running = snapshot
        .running_pods
        .iter()
        .filter(|_| moving)
        .map(Constraints::of_running);
    let relevant: BTreeSet<&str> = pending
        .chain(running)
        .flat_map(|c| {
            c.node_selector.keys().map(String::as_str).chain(
                c.node_affinity
                    .iter()
                    .flat_map(|t| t.match_expressions.iter().map(|e| e.key.as_str())),
            )
        })
        .collect();
    let mut groups: Vec<Group> = Vec::new();
    let mut node_group = vec![0usize; snapshot.nodes.len()];
    let mut by_sig: BTreeMap<String, usize> = BTreeMap::new();
    for (ni, node) in snapshot.nodes.iter().enumerate() {
        let sig = if exact || apart(ni) {
            format!("node:{ni}")
        } else {
            let mut taints: Vec<_> = node
                .taints
                .iter()
                .filter(|t| !t.key.starts_with(OWN_TAINT_PREFIX))
                .cloned()
                .collect();
            taints.sort();
            let labels: Vec<(&String, &String)> = node
                .labels
                .iter()
                .filter(|(k, _)| relevant.contains(k.as_str()))
                .collect();
            let held = owners.get(&ni).map(|o| &o.0);
            format!(
                "{labels:?}|{taints:?}|{}|{}|{held:?}",
                node.schedulable, node.frozen
            )
        };
        let gi = *by_sig.entry(sig).or_insert_with(|| {
            groups.push(Group { nodes: Vec::new() });
            groups.len() - 1
        });
        groups[gi].nodes.push(ni);
        node_group[ni] = gi;
    }
    (groups, node_group)
}

/// What `node_rejects` reads of a pod.
#[derive(PartialEq, Eq, Hash)]
pub(crate) struct Constraints<'s> {
    node_selector: &'s BTreeMap<String, String>,
    node_affinity: &'s [crate::snapshot::NodeSelectorTerm],
    tolerations: &'s [crate::snapshot::Toleration],
}

impl<'s> Constraints<'s> {
    pub(crate) fn of(pod: &'s PendingPod) -> Self {
        Constraints {
            node_selector: &pod.node_selector,
            node_affinity: &pod.node_affinity,
            tolerations: &pod.tolerations,
        }
    }

    fn of_running(pod: &'s crate::snapshot::RunningPod) -> Self {
        Constraints {
            node_selector: &pod.node_selector,
            node_affinity: &pod.node_affinity,
            tolerations: &pod.tolerations,
        }
    }
}

/// Stage 5: demands, first the pending pods (or why one cannot be planned), then the pods a drain
/// would evict, to be placed again where their own constraints admit them.
#[allow(clippy::too_many_arguments)]
fn demands<'s>(
    snapshot: &'s Snapshot,
    profiles: &[String],
    profile_size: &[u32],
    groups: &[Group],
    gpus: &[GpuState<'_>],
    disruptions: &Disruptions<'s>,
    owners: &Owners,
) -> (Vec<Demand>, Vec<(usize, String)>) {
    let mut demands = Vec::new();
    let mut rejected = Vec::new();
    let longest = snapshot
        .pending_pods
        .iter()
        .filter_map(|p| p.waited_seconds)
        .max()
        .unwrap_or(0);
    // The nodes of a group agree on everything `node_rejects` reads (the labels pods select on,
    // foreign taints, schedulable) and on their reservation owners (`group_nodes`), so one node
    // speaks for its group, and pods with the same constraints share the answer.
    let mut admitted: HashMap<Constraints<'_>, Vec<usize>> = HashMap::new();
    let mut admitting = |c: Constraints<'s>| -> Vec<usize> {
        admitted
            .entry(c)
            .or_insert_with_key(|c| {
                (0..groups.len())
                    .filter(|g| rejects(c, &snapshot.nodes[groups[*g].nodes[0]]).is_none())
                    .collect()
            })
            .clone()
    };
    for (pi, pod) in snapshot.pending_pods.iter().enumerate() {
        let req = match pod_request(pod, profiles) {
            Ok(req) => req,
            Err(why) => {
                rejected.push((pi, why.to_string()));
                continue;
            }
        };
        let key = pod.key();
        // A node reserved for other pods of this priority or higher is not this pod's to take.
        let reserved_for_others = |g: &usize| {
            owners
                .get(&groups[*g].nodes[0])
                .is_some_and(|(who, top)| !who.contains(&key) && *top >= pod.priority)
        };
        let mut groups_ok = admitting(Constraints::of(pod));
        groups_ok.retain(|g| !reserved_for_others(g));
        demands.push(Demand {
            key,
            tier: pod.priority,
            weight: weights::place(
                memory_slices(&req, profile_size),
                pod.waited_seconds.unwrap_or(0),
                longest,
            ),
            req,
            groups: groups_ok,
            evicted_from: None,
            must_move: false,
            created: pod.created.clone().unwrap_or_default(),
            pending: Some(pi),
        });
    }
    let top_pending = demands
        .iter()
        .filter(|d| !d.groups.is_empty())
        .map(|d| d.tier)
        .max();
    for (gi, g) in gpus.iter().enumerate() {
        if !g.options.iter().any(|o| o.drain) {
            continue;
        }
        for p in &g.pods {
            let mut counts: BTreeMap<usize, u16> = BTreeMap::new();
            // A drainable GPU's pods hold instances on that GPU only, so the node's are its.
            for inst in pod_instances(&snapshot.nodes[g.node], p) {
                if let Ok(q) = profiles.binary_search(&inst.profile) {
                    *counts.entry(q).or_default() += 1;
                }
            }
            let req: Vec<(usize, u16)> = counts.into_iter().collect();
            let running = disruptions.running.get(p);
            let tier = running.map_or(0, |r| r.priority);
            // Where it may run again: wherever its own constraints admit it (the groups agree on
            // the labels it selects on); a pod the snapshot does not describe, only its own group.
            let groups_ok = match running {
                Some(r) => admitting(Constraints::of_running(r)),
                None => vec![g.group],
            };
            demands.push(Demand {
                key: p.clone(),
                tier,
                must_move: top_pending.is_none_or(|t| t <= tier),
                weight: weights::place(memory_slices(&req, profile_size), 0, longest),
                req,
                groups: groups_ok,
                evicted_from: Some(gi),
                created: String::new(),
                pending: None,
            });
        }
    }
    (demands, rejected)
}

/// Why a pending pod cannot be planned for at all (it waits with this as its reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Unplannable {
    /// A count outside 1..=64.
    #[error("request {resource}: {count} is not a count between 1 and 64")]
    Count {
        /// The resource.
        resource: String,
        /// The count asked for.
        count: i64,
    },
    /// A profile no GPU in the cluster has.
    #[error("no GPU in the cluster offers {profile} (resource {resource})")]
    NotOffered {
        /// The profile.
        profile: String,
        /// The resource.
        resource: String,
    },
    /// No MIG resource at all.
    #[error("requests no nvidia.com/mig-* resource")]
    NoMigRequest,
}

/// A pending pod's MIG requests as `(global profile, count)`, or why it cannot be planned.
fn pod_request(
    pod: &crate::snapshot::PendingPod,
    profiles: &[String],
) -> Result<Vec<(usize, u16)>, Unplannable> {
    let mut req = Vec::new();
    for (res, count) in &pod.requests {
        let Some(profile) = res.strip_prefix(RESOURCE_PREFIX) else {
            continue;
        };
        if *count <= 0 || *count > 64 {
            return Err(Unplannable::Count {
                resource: res.clone(),
                count: *count,
            });
        }
        match profiles.binary_search(&profile.to_string()) {
            Ok(q) => req.push((q, *count as u16)),
            Err(_) => {
                return Err(Unplannable::NotOffered {
                    profile: profile.to_string(),
                    resource: res.clone(),
                });
            }
        }
    }
    if req.is_empty() {
        return Err(Unplannable::NoMigRequest);
    }
    Ok(req)
}

/// Stage 6: classes, GPUs in one group with identical options and no drain option (GPUs with only
/// "keep" are constants and in none).
fn classes(gpus: &[GpuState<'_>], exact: bool) -> Vec<Class> {
    let mut classes: Vec<Class> = Vec::new();
    #[derive(PartialEq, Eq, Hash)]
    enum ClassKey {
        Drain(usize),
        Shared {
            group: usize,
            node: Option<usize>,
            changes: usize,
        },
    }
    let mut by_key: HashMap<ClassKey, usize> = HashMap::new();
    for (gi, g) in gpus.iter().enumerate() {
        if g.options.len() == 1 {
            continue;
        }
        let key = if g.options.iter().any(|o| o.drain) {
            ClassKey::Drain(gi)
        } else {
            // Members must share options[1..] exactly: sharing the very list makes that structural
            // (the list is per model and busy instances, so those agree too).
            ClassKey::Shared {
                group: g.group,
                node: exact.then_some(g.node),
                changes: Arc::as_ptr(&g.options.changes).cast::<()>() as usize,
            }
        };
        let ci = *by_key.entry(key).or_insert_with(|| {
            classes.push(Class { gpus: Vec::new() });
            classes.len() - 1
        });
        classes[ci].gpus.push(gi);
    }
    classes
}

/// Stage 7: recent demand by global profile (unknown profiles are warned about and ignored).
fn recent_demand(snapshot: &Snapshot, profiles: &[String], warnings: &mut Vec<Warning>) -> Vec<(usize, u32)> {
    let mut out = Vec::new();
    for (name, count) in &snapshot.recent_demand {
        match profiles.binary_search(name) {
            Ok(q) if *count > 0 => out.push((q, *count)),
            Ok(_) => {}
            Err(_) => warnings.push(Warning {
                path: format!("recentDemand.{name}"),
                message: format!("no GPU in the cluster offers profile {name}; ignored"),
            }),
        }
    }
    out
}

impl<'c> Problem<'c> {
    /// The planning problem of `snapshot` under `policy`, in named stages.
    pub fn build(catalog: &'c Catalog, snapshot: &Snapshot, policy: &Policy, drains: &Drains) -> Problem<'c> {
        let mut warnings = Vec::new();
        let disruptions = Disruptions::of(snapshot);
        let pod_pdbs: HashMap<String, Vec<String>> = disruptions
            .running
            .iter()
            .map(|(k, r)| (k.clone(), r.pdbs.clone()))
            .collect();
        let (nodes, mut gpus, pods_per_gpu) = read_gpus(catalog, snapshot, policy, &mut warnings);
        let (profiles, profile_size) = profile_universe(&gpus);
        let wanted: BTreeSet<String> = snapshot
            .pending_pods
            .iter()
            .flat_map(|p| p.requests.keys())
            .filter_map(|r| r.strip_prefix(RESOURCE_PREFIX))
            .map(str::to_string)
            .collect();
        let inputs = OptionInputs {
            snapshot,
            policy,
            profiles: &profiles,
            wanted,
            disruptions: &disruptions,
            pods_per_gpu: &pods_per_gpu,
            drains,
        };
        let (holds, released) = reserve::read_holds(snapshot, policy, &nodes, &gpus);
        let held = reserve::frozen_gpus(snapshot, policy.backend, &gpus, &holds);
        set_options(&mut gpus, &nodes, &held, &inputs);
        let exact = nodes.len() <= policy.solver.exact_node_limit;
        let owners = reserve::owners(&holds);
        let (groups, node_group) = group_nodes(snapshot, exact, drains, &owners);
        for g in &mut gpus {
            g.group = node_group[g.node];
        }
        let (demands, rejected) = demands(
            snapshot,
            &profiles,
            &profile_size,
            &groups,
            &gpus,
            &disruptions,
            &owners,
        );
        let classes = classes(&gpus, exact);
        let recent_demand = recent_demand(snapshot, &profiles, &mut warnings);
        Problem {
            policy: policy.clone(),
            nodes,
            gpus,
            groups,
            classes,
            profiles,
            profile_size,
            demands,
            rejected,
            warnings,
            pdb_allowed: disruptions.pdb_allowed,
            pod_pdbs,
            exact,
            recent_demand,
            holds,
            released,
        }
    }

    /// Per pending pod (its index in `Snapshot::pending_pods`), its demand.
    pub fn demand_of_pending(&self) -> HashMap<usize, usize> {
        self.demands
            .iter()
            .enumerate()
            .filter_map(|(d, dm)| Some((dm.pending?, d)))
            .collect()
    }

    /// The priorities with demand, highest first: the tiers plans are compared by, in order.
    pub fn tiers(&self) -> Vec<i32> {
        let tiers: BTreeSet<i32> = self.demands.iter().map(|d| d.tier).collect();
        tiers.into_iter().rev().collect()
    }

    /// Demands in the order greedy and assignment serve them: priority, value, then size (big
    /// first), age, key.
    pub fn demand_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.demands.len()).collect();
        order.sort_by(|a, b| {
            let (x, y) = (&self.demands[*a], &self.demands[*b]);
            y.tier
                .cmp(&x.tier)
                .then(y.weight.total_cmp(&x.weight))
                .then(y.evicted_from.is_some().cmp(&x.evicted_from.is_some()))
                .then(y.size(self).cmp(&x.size(self)))
                .then(x.created.cmp(&y.created))
                .then(x.key.cmp(&y.key))
        });
        order
    }
}
