//! The planner's output: what would change, why, and in which order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use mig_catalog::migparted::{GpuTarget, render_node_config};
use mig_catalog::{Instance, Layout};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::assign::Outcome;
use crate::problem::{Constraints, Problem, node_rejects};
use crate::reserve::{PlannedReservation, ReleasedReservation, Reservations};
use crate::snapshot::{Backend, Snapshot};
use crate::weights;

/// Our NoSchedule taint on nodes being reconfigured.
pub const RECONFIGURING_TAINT: &str = "mig-autoscaler.io/reconfiguring";

/// A plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// Content hash of the decisions (targets, placements, evictions): equal plans, equal ids.
    pub id: String,
    /// How it was solved.
    pub solver: SolverReport,
    /// Every GPU the planner knows, actual and target layout.
    pub gpus: Vec<GpuPlan>,
    /// Every pending pod: where it is expected to fit, or why it cannot.
    pub pods: Vec<PodPlan>,
    /// Pods to evict.
    pub evictions: Vec<Eviction>,
    /// Per changed node, the phases its agent will run.
    pub nodes: Vec<NodePlan>,
    /// Totals.
    pub disruption: Disruption,
    /// Input problems that did not stop planning.
    pub warnings: Vec<Warning>,
    /// Per profile in the snapshot's `recentDemand`: instances left free by the plan, against that
    /// demand.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spare: Vec<Spare>,
    /// Reservations by attrition in force after this plan: GPUs earmarked for large pods that
    /// wait, until the pods running there finish (docs/planner.md "Reservations").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reservations: Vec<PlannedReservation>,
    /// Reservations of the snapshot that end with this plan, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<ReleasedReservation>,
}

/// Spare capacity of one profile after the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spare {
    /// Profile name (`3g.40gb`).
    pub profile: String,
    /// Instances of it free once the plan is applied and its pods are placed.
    pub free: u32,
    /// Instances of it asked for recently (`Snapshot::recent_demand`).
    pub recent_demand: u32,
}

/// A problem in the input, with its JSON path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    /// JSON path into the snapshot.
    pub path: String,
    /// What is wrong and what the planner did about it.
    pub message: String,
}

/// Solver facts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SolverReport {
    /// `highs` or `greedy`: whose decision the plan follows.
    pub used: String,
    /// `optimal`, `time-limit`, `gap-limit`, `greedy`, or `trivial` (nothing to decide).
    pub status: String,
    /// Why the ILP's answer was not used, if it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
    /// `per-node` (exact) or `per-node-group` (aggregated).
    pub model: String,
    /// Score of the plan: placed value minus disruption (see docs/planner.md). Plans are compared
    /// by `byPriority` first.
    pub score: f64,
    /// Score of the greedy plan.
    pub greedy_score: f64,
    /// Placed value per priority, highest first: what a plan maximises first, in this order (the
    /// plan's and the greedy plan's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_priority: Vec<PriorityScore>,
    /// Relative MIP gap the ILP stops at.
    pub mip_gap: f64,
    /// ILP size.
    pub variables: usize,
    /// ILP size.
    pub constraints: usize,
    /// GPU classes (decision units).
    pub gpu_classes: usize,
    /// GPUs given drain options in this plan: none when the plan places every pending pod without
    /// evicting; otherwise the cheapest drainable GPUs where waiting pods may go (docs/planner.md
    /// "Drain candidates").
    #[serde(default)]
    pub drain_candidates: usize,
    /// Wall time of the ILP (model building and solving), ms.
    pub solver_millis: f64,
    /// Wall time of planning, ms (not part of the plan id).
    pub millis: f64,
}

/// The placed value of one priority's pods (pending pods placed, minus evicted pods not placed
/// again).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PriorityScore {
    /// Pod priority.
    pub priority: i32,
    /// In the plan.
    pub score: f64,
    /// In the greedy plan.
    pub greedy_score: f64,
}

/// One GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuPlan {
    /// Node.
    pub node: String,
    /// GPU index.
    pub index: u32,
    /// Catalog model key.
    pub model: String,
    /// Actual layout, canonical form.
    pub actual: String,
    /// Target layout, canonical form.
    pub target: String,
    /// Whether it changes.
    pub changed: bool,
    /// Whether its pods are evicted first.
    pub drained: bool,
    /// Why it changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One pending pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodPlan {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Priority.
    pub priority: i32,
    /// Where it fits, or why not.
    pub outcome: PodOutcome,
}

/// A pod's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum PodOutcome {
    /// It fits.
    Fits {
        /// Node.
        node: String,
        /// The instances it is expected to get.
        instances: Vec<PlacedInstance>,
        /// Whether that needs a layout change first.
        needs_repartition: bool,
    },
    /// It keeps waiting.
    Waits {
        /// Why, in words.
        reason: String,
    },
}

/// A GPU instance a pod is expected to use: which GPU of its node, and which instance there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedInstance {
    /// GPU index on the node.
    pub gpu: u32,
    /// Profile and start slice.
    #[serde(flatten)]
    pub instance: mig_catalog::NamedInstance,
}

/// A pod to evict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Eviction {
    /// `namespace/name`.
    pub pod: String,
    /// Node.
    pub node: String,
    /// GPU index.
    pub gpu: u32,
    /// Where it is expected to run again, if anywhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaced_on: Option<String>,
    /// Why.
    pub reason: String,
}

/// What the node's agent will do for this node: the phases of its sequence, in order, as the
/// agent names them (mig-protocol's `Phase`; a test there keeps the names equal). The plan shows
/// exactly the sequence that runs; nothing else executes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePlan {
    /// Node.
    pub node: String,
    /// mig-parted config name to set as `nvidia.com/mig.config` (mig-manager backend).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mig_config: Option<String>,
    /// The agent's phases, in order.
    pub phases: Vec<PlannedPhase>,
}

/// One phase of a node's reconfiguration, with what it acts on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase")]
pub enum PlannedPhase {
    /// Our NoSchedule taint goes on (`taint` is its key).
    Tainting {
        /// Taint key.
        taint: String,
    },
    /// The controller evicts these pods through the Eviction API; the agent waits for them to go.
    Draining {
        /// `namespace/name`, possibly none.
        evict: Vec<String>,
    },
    /// `nvidia.com/mig.config` is set to `config` (mig-manager backend).
    Relabeling {
        /// mig-parted config name.
        config: String,
    },
    /// mig-manager applies it (`nvidia.com/mig.config.state=success`).
    AwaitingMigManager,
    /// The agent destroys and creates instances on these GPUs at exactly their target placements,
    /// then restarts the device plugin (nvml backend).
    Applying {
        /// GPU indices.
        gpus: Vec<u32>,
    },
    /// Actual layouts are checked against these targets.
    Verifying {
        /// GPU index → target layout.
        #[serde(deserialize_with = "u32_keys")]
        targets: BTreeMap<u32, String>,
    },
    /// Our taint comes off.
    Untainting {
        /// Taint key.
        taint: String,
    },
}

impl PlannedPhase {
    /// The phase's name, as the agent writes it on the Node.
    pub fn name(&self) -> &'static str {
        match self {
            PlannedPhase::Tainting { .. } => "Tainting",
            PlannedPhase::Draining { .. } => "Draining",
            PlannedPhase::Relabeling { .. } => "Relabeling",
            PlannedPhase::AwaitingMigManager => "AwaitingMigManager",
            PlannedPhase::Applying { .. } => "Applying",
            PlannedPhase::Verifying { .. } => "Verifying",
            PlannedPhase::Untainting { .. } => "Untainting",
        }
    }
}

/// A map with GPU-index keys. JSON keys are strings, and serde's internally tagged enums cannot turn
/// them back into integers by themselves.
fn u32_keys<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, String>, D::Error> {
    let raw = BTreeMap::<String, String>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            k.parse()
                .map(|k| (k, v))
                .map_err(|_| serde::de::Error::custom(format!("GPU index {k:?} is not a number")))
        })
        .collect()
}

/// Disruption totals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Disruption {
    /// GPUs reconfigured.
    pub gpus_changed: usize,
    /// Nodes with a reconfigured GPU.
    pub nodes_changed: usize,
    /// Pods evicted.
    pub evictions: usize,
    /// Disruption cost (weights in docs/planner.md).
    pub cost: f64,
}

/// How good an outcome is: the placed value of each priority, highest first, then the total
/// (placed value minus disruption; the ILP's objective on the per-node model). Compared in that
/// order: a plan that places more of a higher priority is better whatever it does below it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Score {
    /// `(priority, placed value)`, highest priority first (every priority with demand).
    pub tiers: Vec<(i32, f64)>,
    /// Placed value minus disruption.
    pub total: f64,
}

/// Values closer than this are equal (they are sums of multiples of 1 and 250).
const SCORE_EPS: f64 = 1e-6;

impl Score {
    /// Whether this is at least as good as `other` (both of the same problem).
    pub fn at_least(&self, other: &Score) -> bool {
        for ((_, a), (_, b)) in self.tiers.iter().zip(&other.tiers) {
            if (a - b).abs() > SCORE_EPS {
                return a > b;
            }
        }
        self.total + SCORE_EPS >= other.total
    }

    /// Whether this is strictly better than `other`.
    pub fn better(&self, other: &Score) -> bool {
        !other.at_least(self)
    }
}

/// The score of an outcome.
pub(crate) fn score(p: &Problem<'_>, o: &Outcome) -> Score {
    let mut tiers: Vec<(i32, f64)> = p.tiers().into_iter().map(|t| (t, 0.0)).collect();
    let mut total = 0.0;
    for (d, dm) in p.demands.iter().enumerate() {
        let value = match (dm.evicted_from, &o.placed[d]) {
            (None, Some(_)) => dm.weight,
            (Some(g), None) if p.gpus[g].options[o.option[g]].drain => -dm.weight,
            _ => continue,
        };
        total += value;
        if let Some(t) = tiers.iter_mut().find(|(t, _)| *t == dm.tier) {
            t.1 += value;
        }
    }
    Score {
        tiers,
        total: total - disruption(p, o).cost,
    }
}

fn disruption(p: &Problem<'_>, o: &Outcome) -> Disruption {
    let changed: Vec<usize> = (0..p.gpus.len())
        .filter(|g| p.gpus[*g].options[o.option[*g]].changed)
        .collect();
    let nodes: BTreeSet<usize> = changed.iter().map(|g| p.gpus[*g].node).collect();
    let evictions = (0..p.gpus.len())
        .filter(|g| p.gpus[*g].options[o.option[*g]].drain)
        .map(|g| p.gpus[g].pods.len())
        .sum();
    let cost = changed
        .iter()
        .map(|g| p.gpus[*g].options[o.option[*g]].cost)
        .sum::<f64>()
        + weights::CHANGE_NODE * nodes.len() as f64;
    Disruption {
        gpus_changed: changed.len(),
        nodes_changed: nodes.len(),
        evictions,
        cost,
    }
}

/// Target layout of each GPU under the outcome, placed.
fn targets(p: &Problem<'_>, o: &Outcome, warnings: &mut Vec<Warning>) -> Vec<Layout> {
    p.gpus
        .iter()
        .enumerate()
        .map(|(g, gs)| {
            let opt = &gs.options[o.option[g]];
            let layout = if !opt.changed {
                Ok(gs.actual.clone())
            } else if opt.drain {
                gs.model.arrange(&opt.counts)
            } else {
                gs.model.arrange_around(&gs.busy, &opt.counts)
            };
            // Every emitted layout is checked again; a failure here is a planner bug, never output.
            match layout
                .map_err(|e| e.to_string())
                .and_then(|l| gs.model.validate(&l).map(|()| l).map_err(|e| e.to_string()))
            {
                Ok(l) => l,
                Err(e) => {
                    warnings.push(Warning {
                        path: format!("gpu {}/{}", p.nodes[gs.node].name, gs.index),
                        message: format!("internal error, GPU kept as it is: {e}"),
                    });
                    gs.actual.clone()
                }
            }
        })
        .collect()
}

pub(crate) struct Context<'a, 'c> {
    pub p: &'a Problem<'c>,
    pub snapshot: &'a Snapshot,
    pub outcome: &'a Outcome,
    pub report: SolverReport,
    pub reservations: Reservations,
}

/// Where each placed demand goes: its node and the concrete instances it takes, handed out per GPU
/// from the target's instances not kept busy, by start.
type Placements = Vec<Option<(usize, Vec<PlacedInstance>)>>;

impl Plan {
    /// The plan of outcome `cx.outcome`, in named parts.
    pub(crate) fn build(cx: Context<'_, '_>) -> Plan {
        let Context {
            p,
            snapshot,
            outcome: o,
            mut report,
            reservations,
        } = cx;
        let mut warnings = p.warnings.clone();
        let targets = targets(p, o, &mut warnings);
        let placements = hand_out_instances(p, o, &targets);
        let gpus = gpu_plans(p, o, &targets, &placements);
        let evictions = evictions(p, o, &placements, &gpus);
        let dis = disruption(p, o);
        let mut pods = pod_plans(p, snapshot, o, &placements, &dis);
        note_reservations(&mut pods, &reservations.holding);
        let nodes = node_plans(p, o, &targets, &gpus, &evictions, &mut warnings);
        let scored = score(p, o);
        report.score = scored.total;
        for (by, (_, value)) in report.by_priority.iter_mut().zip(&scored.tiers) {
            by.score = *value;
        }
        let mut plan = Plan {
            id: String::new(),
            solver: report,
            gpus,
            pods,
            evictions,
            nodes,
            disruption: dis,
            warnings,
            spare: spare(p, o),
            reservations: reservations.holding,
            released: reservations.released,
        };
        let reserved: Vec<(&String, &String, &Vec<crate::snapshot::ReservedInstance>)> = plan
            .reservations
            .iter()
            .map(|r| (&r.pod, &r.node, &r.gpus))
            .collect();
        let decisions =
            serde_json::to_string(&(&plan.gpus, &plan.pods, &plan.evictions, reserved)).unwrap_or_default();
        let digest = Sha256::digest(decisions.as_bytes());
        plan.id = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        plan
    }
}

/// Whether GPU `g` changes under outcome `o`.
fn changes(p: &Problem<'_>, o: &Outcome, g: usize) -> bool {
    p.gpus[g].options[o.option[g]].changed
}

/// A waiting pod that holds a reservation is told where and what it waits for.
fn note_reservations(pods: &mut [PodPlan], holding: &[PlannedReservation]) {
    for r in holding {
        let Some(pod) = pods
            .iter_mut()
            .find(|p| format!("{}/{}", p.namespace, p.name) == r.pod)
        else {
            continue;
        };
        if let PodOutcome::Waits { reason } = &mut pod.outcome {
            let gpus: Vec<String> = r
                .gpus
                .iter()
                .map(|g| format!("{}/{} ({g})", r.node, g.gpu))
                .collect();
            let _ = write!(
                reason,
                "; reserved for it: {}, free once {} running pod(s) finish",
                gpus.join(", "),
                r.waiting_for.len()
            );
        }
    }
}

/// Hand out concrete instances: per GPU, the target's instances not kept busy, by start.
fn hand_out_instances(p: &Problem<'_>, o: &Outcome, targets: &[Layout]) -> Placements {
    let mut free: Vec<Vec<Instance>> = (0..p.gpus.len())
        .map(|g| {
            let drained = p.gpus[g].options[o.option[g]].drain;
            targets[g]
                .instances()
                .iter()
                .filter(|i| drained || !p.gpus[g].busy.contains(i))
                .copied()
                .collect()
        })
        .collect();
    let mut placements: Placements = vec![None; p.demands.len()];
    for (d, pl) in o.placed.iter().enumerate() {
        let Some((node, taken)) = pl else { continue };
        let mut got = Vec::new();
        for (g, q, n) in taken {
            let model = p.gpus[*g].model;
            for _ in 0..*n {
                if let Some(pos) = free[*g]
                    .iter()
                    .position(|i| model.profile_name(i.profile) == p.profiles[*q])
                {
                    let inst = free[*g].remove(pos);
                    got.push(PlacedInstance {
                        gpu: p.gpus[*g].index,
                        instance: model.name_instance(&inst),
                    });
                }
            }
        }
        placements[d] = Some((*node, got));
    }
    placements
}

/// Per GPU: actual and target, and for a changed one the pods it makes room for.
fn gpu_plans(p: &Problem<'_>, o: &Outcome, targets: &[Layout], placements: &Placements) -> Vec<GpuPlan> {
    let mut reasons: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for (d, pl) in placements.iter().enumerate() {
        let Some((node, got)) = pl else { continue };
        for i in got {
            let on_node = p.nodes[*node]
                .gpus
                .iter()
                .copied()
                .find(|g| p.gpus[*g].index == i.gpu);
            if let Some(g) = on_node
                && changes(p, o, g)
            {
                reasons.entry(g).or_default().insert(p.demands[d].key.clone());
            }
        }
    }
    p.gpus
        .iter()
        .enumerate()
        .map(|(g, gs)| {
            let opt = &gs.options[o.option[g]];
            GpuPlan {
                node: p.nodes[gs.node].name.clone(),
                index: gs.index,
                model: gs.model.key.clone(),
                actual: gs.model.format_layout(&gs.actual),
                target: gs.model.format_layout(&targets[g]),
                changed: opt.changed,
                drained: opt.drain,
                reason: opt.changed.then(|| {
                    let pods: Vec<String> = reasons
                        .get(&g)
                        .map(|s| s.iter().cloned().collect())
                        .unwrap_or_default();
                    format!(
                        "makes room for {}",
                        if pods.is_empty() {
                            "pending pods".to_string()
                        } else {
                            pods.join(", ")
                        }
                    )
                }),
            }
        })
        .collect()
}

/// The pods on drained GPUs, with where they go again.
fn evictions(p: &Problem<'_>, o: &Outcome, placements: &Placements, gpus: &[GpuPlan]) -> Vec<Eviction> {
    let mut evictions = Vec::new();
    for (d, dm) in p.demands.iter().enumerate() {
        if let Some(g) = dm.evicted_from
            && p.gpus[g].options[o.option[g]].drain
        {
            evictions.push(Eviction {
                pod: dm.key.clone(),
                node: p.nodes[p.gpus[g].node].name.clone(),
                gpu: p.gpus[g].index,
                replaced_on: placements[d].as_ref().map(|(n, _)| p.nodes[*n].name.clone()),
                reason: format!("GPU {} is rebuilt as {}", p.gpus[g].index, gpus[g].target),
            });
        }
    }
    evictions
}

/// What a waiting pod is told about nodes whose GPUs were not counted (no agent report, or a
/// stale one): `; 2 MIG node(s) not counted: a (no agent report), b (…)`, or nothing.
fn unobserved_note(snapshot: &Snapshot) -> String {
    const NAMED: usize = 3;
    let nodes: Vec<String> = snapshot
        .nodes
        .iter()
        .filter_map(|n| Some(format!("{} ({})", n.name, n.unobserved.as_ref()?)))
        .collect();
    if nodes.is_empty() {
        return String::new();
    }
    let more = match nodes.len().saturating_sub(NAMED) {
        0 => String::new(),
        k => format!(" and {k} more"),
    };
    format!(
        "; {} MIG node(s) not counted: {}{more}",
        nodes.len(),
        nodes[..nodes.len().min(NAMED)].join(", ")
    )
}

/// Per pending pod: where it fits (and whether a repartition comes first), or why it waits.
fn pod_plans(
    p: &Problem<'_>,
    snapshot: &Snapshot,
    o: &Outcome,
    placements: &Placements,
    dis: &Disruption,
) -> Vec<PodPlan> {
    let mut pods = Vec::new();
    let not_counted = unobserved_note(snapshot);
    let rejected: HashMap<usize, &String> = p.rejected.iter().map(|(i, why)| (*i, why)).collect();
    let demand_of = p.demand_of_pending();
    type Key<'k> = Option<(&'k [(usize, u16)], &'k [usize], Option<Constraints<'k>>)>;
    let mut reasons: HashMap<Key<'_>, String> = HashMap::new();
    for (pi, pod) in snapshot.pending_pods.iter().enumerate() {
        let outcome = if let Some(why) = rejected.get(&pi) {
            PodOutcome::Waits {
                reason: format!("{why}{not_counted}"),
            }
        } else {
            let d = demand_of.get(&pi).copied().unwrap_or(usize::MAX);
            match placements.get(d).cloned().flatten() {
                Some((node, instances)) => PodOutcome::Fits {
                    node: p.nodes[node].name.clone(),
                    needs_repartition: instances.iter().any(|i| {
                        p.nodes[node]
                            .gpus
                            .iter()
                            .any(|g| p.gpus[*g].index == i.gpu && changes(p, o, *g))
                    }),
                    instances,
                },
                None => {
                    // Pods that ask for the same on the same groups wait for the same reason
                    // (and, where no node admits them, when they have the same constraints).
                    let key = p.demands.get(d).map(|dm| {
                        let constraints = dm.groups.is_empty().then(|| Constraints::of(pod));
                        (dm.req.as_slice(), dm.groups.as_slice(), constraints)
                    });
                    let why = reasons
                        .entry(key)
                        .or_insert_with(|| explain(p, snapshot, d, dis, o));
                    PodOutcome::Waits {
                        reason: format!("{why}{not_counted}"),
                    }
                }
            }
        };
        pods.push(PodPlan {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            priority: pod.priority,
            outcome,
        });
    }
    pods
}

/// Per changed node, its agent's phases (and, with mig-manager, the mig-parted config to set).
fn node_plans(
    p: &Problem<'_>,
    o: &Outcome,
    targets: &[Layout],
    gpus: &[GpuPlan],
    evictions: &[Eviction],
    warnings: &mut Vec<Warning>,
) -> Vec<NodePlan> {
    let mut nodes = Vec::new();
    for info in &p.nodes {
        let changed: Vec<usize> = info.gpus.iter().copied().filter(|g| changes(p, o, *g)).collect();
        if changed.is_empty() {
            continue;
        }
        let mig_config = if p.policy.backend == Backend::MigManager {
            let gpus: Vec<(u32, GpuTarget<'_>)> = info
                .gpus
                .iter()
                .map(|g| {
                    (
                        p.gpus[*g].index,
                        GpuTarget::Mig {
                            model: p.gpus[*g].model,
                            layout: &targets[*g],
                        },
                    )
                })
                .collect();
            match render_node_config(&gpus) {
                Ok(c) => Some(c.name),
                Err(e) => {
                    warnings.push(Warning {
                        path: format!("node {}", info.name),
                        message: format!("internal error: {e}"),
                    });
                    None
                }
            }
        } else {
            None
        };
        let evict: Vec<String> = evictions
            .iter()
            .filter(|e| e.node == info.name)
            .map(|e| e.pod.clone())
            .collect();
        let verify: BTreeMap<u32, String> = changed
            .iter()
            .map(|g| (p.gpus[*g].index, gpus[*g].target.clone()))
            .collect();
        let change = match &mig_config {
            Some(c) => vec![
                PlannedPhase::Relabeling { config: c.clone() },
                PlannedPhase::AwaitingMigManager,
            ],
            None => vec![PlannedPhase::Applying {
                gpus: changed.iter().map(|g| p.gpus[*g].index).collect(),
            }],
        };
        let taint = || RECONFIGURING_TAINT.to_string();
        let phases = [
            PlannedPhase::Tainting { taint: taint() },
            PlannedPhase::Draining { evict },
        ]
        .into_iter()
        .chain(change)
        .chain([
            PlannedPhase::Verifying { targets: verify },
            PlannedPhase::Untainting { taint: taint() },
        ])
        .collect();
        nodes.push(NodePlan {
            node: info.name.clone(),
            mig_config,
            phases,
        });
    }
    nodes
}

/// Per profile in `recentDemand`: instances free after the plan, against that demand.
fn spare(p: &Problem<'_>, o: &Outcome) -> Vec<Spare> {
    p.recent_demand
        .iter()
        .map(|(q, demand)| {
            let supply: u32 = (0..p.gpus.len())
                .map(|g| u32::from(p.gpus[g].options[o.option[g]].free[*q]))
                .sum();
            let taken: u32 = o
                .placed
                .iter()
                .flatten()
                .flat_map(|(_, taken)| taken.iter())
                .filter(|(_, tq, _)| tq == q)
                .map(|(_, _, n)| u32::from(*n))
                .sum();
            Spare {
                profile: p.profiles[*q].clone(),
                free: supply.saturating_sub(taken),
                recent_demand: *demand,
            }
        })
        .collect()
}

/// Why a pending pod keeps waiting, most specific reason first.
fn explain(p: &Problem<'_>, snapshot: &Snapshot, d: usize, dis: &Disruption, o: &Outcome) -> String {
    let Some(dm) = p.demands.get(d) else {
        return "not planned".into();
    };
    let pod = dm.pending.and_then(|i| snapshot.pending_pods.get(i));
    let eligible: Vec<usize> = dm
        .groups
        .iter()
        .flat_map(|g| p.groups[*g].nodes.iter().copied())
        .filter(|n| p.nodes[*n].schedulable)
        .collect();
    if eligible.is_empty() {
        let mut why: BTreeMap<&str, usize> = BTreeMap::new();
        if let Some(pod) = pod {
            for n in &snapshot.nodes {
                if let Some(r) = node_rejects(pod, n) {
                    *why.entry(r).or_default() += 1;
                }
            }
        }
        let detail: Vec<String> = why.iter().map(|(r, k)| format!("{k} by {r}")).collect();
        return format!(
            "no node admits it ({} nodes: {})",
            snapshot.nodes.len(),
            detail.join(", ")
        );
    }
    let eligible_gpus: Vec<usize> = eligible
        .iter()
        .flat_map(|n| p.nodes[*n].gpus.iter().copied())
        .collect();
    // The most instances of profile `q` one node it may use could offer (by drains too, or not).
    let best_on_a_node = |q: usize, drains: bool| {
        eligible
            .iter()
            .map(|n| {
                p.nodes[*n]
                    .gpus
                    .iter()
                    .map(|g| p.gpus[*g].options.most_free(q, drains))
                    .sum::<u16>()
            })
            .max()
            .unwrap_or(0)
    };
    for (q, need) in &dm.req {
        let name = &p.profiles[*q];
        let models: BTreeSet<&str> = eligible_gpus
            .iter()
            .map(|g| p.gpus[*g].model.key.as_str())
            .collect();
        if !eligible_gpus
            .iter()
            .any(|g| p.gpus[*g].model.profile_by_name(name).is_some())
        {
            return format!(
                "needs {name}, which no GPU on the nodes it may use has (their models: {})",
                models.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        let best_node = best_on_a_node(*q, true);
        if best_node < *need {
            let pinned = eligible_gpus
                .iter()
                .all(|g| p.gpus[*g].options.len() == 1 || !p.gpus[*g].busy.is_empty());
            let blocked: Vec<&str> = eligible_gpus
                .iter()
                .filter_map(|g| p.gpus[*g].drain_blocked.as_deref())
                .collect();
            return if best_node == 0 && pinned {
                let why = match blocked.first() {
                    Some(b) => format!(" and cannot be drained: {b}"),
                    None if p.policy.drain == crate::snapshot::DrainPolicy::Never => {
                        " (drain policy: never)".to_string()
                    }
                    None => String::new(),
                };
                format!("needs {name} but every GPU it may use is pinned by running pods or not managed{why}")
            } else {
                format!(
                    "needs {need} x {name} on one node; at most {best_node} can exist on any node it may use without evicting protected pods"
                )
            };
        }
    }
    if let Some(b) = p.policy.budgets.max_nodes_changed
        && (dis.nodes_changed >= b as usize || !o.budget_reverted.is_empty())
    {
        return format!(
            "disruption budget exhausted: {} of at most {b} nodes already change in this plan",
            dis.nodes_changed
        );
    }
    if let Some(b) = p.policy.budgets.max_evictions
        && dis.evictions >= b as usize
        && b > 0
    {
        return format!("eviction budget exhausted ({b} per plan)");
    }
    // Room for it only by draining, and every drain it could use would strand pods that may not be
    // displaced for it (docs/planner.md: evicted pods must find a place unless a higher-priority
    // pod waits).
    let drainable = eligible_gpus.iter().any(|g| p.gpus[*g].drain_cost.is_some());
    if drainable && dm.req.iter().any(|(q, need)| best_on_a_node(*q, false) < *need) {
        return "only a drain makes room for it, and no drain this plan may make leaves the pods it \
                would evict a place to go (pods are displaced with nowhere to go only for a pod of \
                higher priority)"
            .into();
    }
    "the GPUs it may use are taken by higher-priority or earlier pods in this plan".into()
}

impl Plan {
    /// A readable summary: solver line, GPU changes, pods, evictions.
    pub fn render_table(&self) -> String {
        let mut s = String::new();
        let r = &self.solver;
        let _ = writeln!(
            s,
            "plan {}  solver {} ({}{}), {} model, score {:.1} (greedy {:.1}), {:.1} ms",
            self.id,
            r.used,
            r.status,
            r.fallback_reason
                .as_ref()
                .map(|f| format!(": {f}"))
                .unwrap_or_default(),
            r.model,
            r.score,
            r.greedy_score,
            r.millis
        );
        let d = &self.disruption;
        let _ = writeln!(
            s,
            "disruption: {} on {} {}, {}",
            counted(d.gpus_changed, "GPU", "GPUs"),
            counted(d.nodes_changed, "node", "nodes"),
            if d.gpus_changed == 1 { "changes" } else { "change" },
            counted(d.evictions, "eviction", "evictions")
        );
        let _ = writeln!(s, "\nGPU CHANGES");
        if d.gpus_changed == 0 {
            let _ = writeln!(s, "  none");
        }
        for g in self.gpus.iter().filter(|g| g.changed) {
            let _ = writeln!(
                s,
                "  {}/{} {}: {} -> {}{}",
                g.node,
                g.index,
                g.model,
                g.actual,
                g.target,
                if g.drained { " (drain)" } else { "" }
            );
            if let Some(why) = &g.reason {
                let _ = writeln!(s, "      {why}");
            }
        }
        let _ = writeln!(s, "\nPENDING PODS");
        if self.pods.is_empty() {
            let _ = writeln!(s, "  none");
        }
        for p in &self.pods {
            match &p.outcome {
                PodOutcome::Fits {
                    node,
                    instances,
                    needs_repartition,
                } => {
                    let inst: Vec<String> = instances
                        .iter()
                        .map(|i| format!("gpu{}:{}", i.gpu, i.instance))
                        .collect();
                    let _ = writeln!(
                        s,
                        "  {}/{}: fits on {node} [{}]{}",
                        p.namespace,
                        p.name,
                        inst.join(" "),
                        if *needs_repartition {
                            " after repartition"
                        } else {
                            ""
                        }
                    );
                }
                PodOutcome::Waits { reason } => {
                    let _ = writeln!(s, "  {}/{}: waits: {reason}", p.namespace, p.name);
                }
            }
        }
        if !self.evictions.is_empty() {
            let _ = writeln!(s, "\nEVICTIONS");
            for e in &self.evictions {
                let _ = writeln!(s, "  {} on {}/{}: {}", e.pod, e.node, e.gpu, e.reason);
            }
        }
        if !self.reservations.is_empty() || !self.released.is_empty() {
            let _ = writeln!(s, "\nRESERVATIONS");
            for r in &self.reservations {
                let gpus: Vec<String> = r.gpus.iter().map(|g| format!("gpu{}:{g}", g.gpu)).collect();
                let _ = writeln!(
                    s,
                    "  {} on {} [{}]{}: waits for {}",
                    r.pod,
                    r.node,
                    gpus.join(" "),
                    if r.new {
                        " (new)".to_string()
                    } else {
                        format!(" (held {} s)", r.age_seconds)
                    },
                    if r.waiting_for.is_empty() {
                        "its change".to_string()
                    } else {
                        r.waiting_for.join(", ")
                    }
                );
            }
            for r in &self.released {
                let _ = writeln!(s, "  released: {} on {}: {}", r.pod, r.node, r.reason);
            }
        }
        if !self.spare.is_empty() {
            let _ = writeln!(s, "\nSPARE AFTER PLAN (free / recent demand)");
            for sp in &self.spare {
                let _ = writeln!(s, "  {}: {} / {}", sp.profile, sp.free, sp.recent_demand);
            }
        }
        if !self.warnings.is_empty() {
            let _ = writeln!(s, "\nWARNINGS");
            for w in &self.warnings {
                let _ = writeln!(s, "  {}: {}", w.path, w.message);
            }
        }
        s
    }

    /// [`Plan::render_table`] and more: what each priority got (and greedy), every GPU with its
    /// layout whether it changes or not, and each changed node's mig-parted config and phases.
    pub fn render_wide(&self) -> String {
        let mut s = self.render_table();
        let _ = writeln!(s, "\nBY PRIORITY (placed value: plan / greedy)");
        if self.solver.by_priority.is_empty() {
            let _ = writeln!(s, "  none");
        }
        for b in &self.solver.by_priority {
            let _ = writeln!(s, "  {}: {:.1} / {:.1}", b.priority, b.score, b.greedy_score);
        }
        let _ = writeln!(s, "\nALL GPUS");
        if self.gpus.is_empty() {
            let _ = writeln!(s, "  none");
        }
        for g in &self.gpus {
            let layout = if g.changed {
                format!("{} -> {}", g.actual, g.target)
            } else {
                format!("{} (kept)", g.actual)
            };
            let _ = writeln!(s, "  {}/{} {}: {layout}", g.node, g.index, g.model);
        }
        let _ = writeln!(s, "\nNODE PHASES");
        if self.nodes.is_empty() {
            let _ = writeln!(s, "  none");
        }
        for n in &self.nodes {
            let phases: Vec<String> = n
                .phases
                .iter()
                .filter_map(|p| Some(serde_json::to_value(p).ok()?["phase"].as_str()?.to_string()))
                .collect();
            let config = n
                .mig_config
                .as_ref()
                .map(|c| format!(" (nvidia.com/mig.config={c})"))
                .unwrap_or_default();
            let _ = writeln!(s, "  {}{config}: {}", n.node, phases.join(" -> "));
        }
        s
    }
}

/// `1 GPU`, `2 GPUs`, `0 GPUs`.
fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
