//! Reservations by attrition: GPUs earmarked for a large pending pod that cannot be placed without
//! evicting, chosen where the running pods should finish soonest, so that the pod gets the room
//! they leave instead of new small pods taking it piece by piece (docs/planner.md "Reservations").
//!
//! A reservation (a *hold* here) lives across plans: the caller passes the ones in force back in
//! `Snapshot::reservations`. While it holds,
//! - no pod of its owner's priority or lower, other than the owner, is planned onto its node (the
//!   node is its own capacity group, left out of those pods' groups);
//! - its GPUs are not changed for anyone while the region kept for the owner is still in use;
//! - the caller keeps new pods off the node (the controller's NoSchedule taint), on both backends:
//!   on nvml, withdrawing the free instances of a reserved GPU was tried and lost the race: an
//!   instance freed when a pod ends is offered at once, and a waiting pod took it before the next
//!   plan could withdraw it (e2e `on_nvml_a_reserved_node_takes_no_new_pods_until_its_large_pod_runs`, before the taint).
//!
//! It ends when the owner is placed elsewhere or its instances exist, it is no longer pending, its
//! node or GPUs go, a pending pod of higher priority may use the node, or it reaches the policy's
//! maximum age.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use mig_catalog::{Instance, Layout};
use serde::{Deserialize, Serialize};

use crate::assign::Outcome;
use crate::problem::{GpuState, NodeInfo, Problem, node_rejects};
use crate::snapshot::{Backend, Policy, ReservedInstance, RunningPod, Snapshot};

/// A reservation in force while planning: its owner, node and GPUs (with the region kept on each).
#[derive(Clone, Debug)]
pub(crate) struct Hold {
    /// Owner, `namespace/name`.
    pub pod: String,
    /// The owner's index in `Snapshot::pending_pods`.
    pub pending: usize,
    pub priority: i32,
    pub node: usize,
    /// (GPU, instance kept for the owner there).
    pub gpus: Regions,
    pub age_seconds: u64,
}

/// A reservation in a plan: made now (`new`) or still holding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedReservation {
    /// The pending pod it is for, `namespace/name`.
    pub pod: String,
    /// Its priority.
    pub priority: i32,
    /// Node.
    pub node: String,
    /// The earmarked GPUs, each with the instance kept for the pod.
    pub gpus: Vec<ReservedInstance>,
    /// How long it has held, in seconds (0 when new).
    pub age_seconds: u64,
    /// Made by this plan.
    pub new: bool,
    /// The running pods whose end frees the kept regions.
    pub waiting_for: Vec<String>,
}

impl PlannedReservation {
    /// As the next snapshot gives it back, `age_seconds` later.
    pub fn carried(&self, age_seconds: u64) -> crate::snapshot::Reservation {
        crate::snapshot::Reservation {
            pod: self.pod.clone(),
            node: self.node.clone(),
            gpus: self.gpus.clone(),
            age_seconds,
        }
    }
}

/// A reservation that ends with this plan, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleasedReservation {
    /// The pod it was for.
    pub pod: String,
    /// Node.
    pub node: String,
    /// Why it ends.
    pub reason: String,
}

/// The pods using instances of `gs` that overlap `region` (the mig-manager backend rebuilds a GPU
/// whole, so there every pod on it blocks the region).
pub(crate) fn blocking(
    snapshot: &Snapshot,
    gs: &GpuState<'_>,
    region: &Instance,
    backend: Backend,
) -> Vec<String> {
    let model = gs.model;
    let mask = model.instance_mask(region);
    let Some(gpu) = snapshot.nodes[gs.node].gpus.iter().find(|g| g.index == gs.index) else {
        return Vec::new();
    };
    let mut pods = BTreeSet::new();
    for inst in &gpu.instances {
        let overlaps = backend == Backend::MigManager
            || model
                .profile_by_name(&inst.profile)
                .is_some_and(|q| model.instance_mask(&Instance::new(q, inst.start)) & mask != 0);
        if overlaps {
            pods.extend(inst.pods.iter().cloned());
        }
    }
    pods.into_iter().collect()
}

/// The reservations of the snapshot that still hold, and those released (with why).
pub(crate) fn read_holds(
    snapshot: &Snapshot,
    policy: &Policy,
    nodes: &[NodeInfo],
    gpus: &[GpuState<'_>],
) -> (Vec<Hold>, Vec<ReleasedReservation>) {
    let rp = &policy.reservations;
    let mut holds: Vec<Hold> = Vec::new();
    let mut released = Vec::new();
    let pending: HashMap<String, usize> = snapshot
        .pending_pods
        .iter()
        .enumerate()
        .map(|(i, p)| (p.key(), i))
        .collect();
    let node_index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut taken: BTreeSet<usize> = BTreeSet::new();
    let mut held_nodes: BTreeSet<usize> = BTreeSet::new();
    for r in &snapshot.reservations {
        let hold = (|| -> Result<Hold, String> {
            if rp.max_gpus == 0 {
                return Err("reservations are off (policy reservations.maxGpus is 0)".into());
            }
            if r.gpus.is_empty() {
                return Err("it names no GPU".into());
            }
            // The bounds first: however many reservations a snapshot carries, at most `maxGpus`
            // GPUs' worth are looked at further.
            if taken.len() + r.gpus.len() > rp.max_gpus as usize {
                return Err(format!(
                    "over the reservation bounds (reservations.maxGpus {}, maxNodes {})",
                    rp.max_gpus, rp.max_nodes
                ));
            }
            let pi = *pending
                .get(&r.pod)
                .ok_or("its pod is no longer pending (bound, deleted or evicted)")?;
            if holds.iter().any(|h| h.pod == r.pod) {
                return Err("the pod already holds another reservation".into());
            }
            let ni = *node_index.get(r.node.as_str()).ok_or("the node is gone")?;
            let node = &nodes[ni];
            if let Some(why) = &snapshot.nodes[ni].unobserved {
                return Err(format!("the node's GPUs are not observed ({why})"));
            }
            if !node.managed || !node.schedulable {
                return Err("the node is cordoned or no longer managed".into());
            }
            if r.age_seconds >= rp.max_age_seconds {
                return Err(format!(
                    "it expired after {} s (reservations.maxAgeSeconds {})",
                    r.age_seconds, rp.max_age_seconds
                ));
            }
            let owner = &snapshot.pending_pods[pi];
            if let Some(why) = node_rejects(owner, &snapshot.nodes[ni]) {
                return Err(format!("its pod may no longer run on the node ({why})"));
            }
            if let Some(higher) = snapshot
                .pending_pods
                .iter()
                .find(|p| p.priority > owner.priority && node_rejects(p, &snapshot.nodes[ni]).is_none())
            {
                return Err(format!(
                    "pod {} of higher priority ({} > {}) may use the node",
                    higher.key(),
                    higher.priority,
                    owner.priority
                ));
            }
            let mut held = Vec::new();
            for ri in &r.gpus {
                let g = node
                    .gpus
                    .iter()
                    .copied()
                    .find(|g| gpus[*g].index == ri.gpu)
                    .ok_or_else(|| {
                        format!(
                            "GPU {} is no longer reported, or its instances are unknown",
                            ri.gpu
                        )
                    })?;
                let model = gpus[g].model;
                let region = model
                    .profile_by_name(&ri.profile)
                    .map(|q| Instance::new(q, ri.start))
                    .filter(|i| model.can_add(&Layout::empty(), i))
                    .ok_or_else(|| {
                        format!("{}@{} is not a placement on {}", ri.profile, ri.start, model.key)
                    })?;
                if taken.contains(&g) || held.iter().any(|(h, _)| *h == g) {
                    return Err(format!("GPU {} is already reserved", ri.gpu));
                }
                held.push((g, region));
            }
            if !held_nodes.contains(&ni) && held_nodes.len() >= rp.max_nodes as usize {
                return Err(format!(
                    "over the reservation bounds (reservations.maxGpus {}, maxNodes {})",
                    rp.max_gpus, rp.max_nodes
                ));
            }
            taken.extend(held.iter().map(|(g, _)| *g));
            held_nodes.insert(ni);
            Ok(Hold {
                pod: r.pod.clone(),
                pending: pi,
                priority: owner.priority,
                node: ni,
                gpus: held,
                age_seconds: r.age_seconds,
            })
        })();
        match hold {
            Ok(h) => holds.push(h),
            Err(reason) => released.push(ReleasedReservation {
                pod: r.pod.clone(),
                node: r.node.clone(),
                reason,
            }),
        }
    }
    (holds, released)
}

/// Per held node, its owners (`namespace/name`) and the highest owner priority.
pub(crate) fn owners(holds: &[Hold]) -> BTreeMap<usize, (BTreeSet<String>, i32)> {
    let mut out: BTreeMap<usize, (BTreeSet<String>, i32)> = BTreeMap::new();
    for h in holds {
        let e = out.entry(h.node).or_insert_with(|| (BTreeSet::new(), i32::MIN));
        e.0.insert(h.pod.clone());
        e.1 = e.1.max(h.priority);
    }
    out
}

/// The GPUs of holds whose kept region is still in use: nothing changes them for anyone.
pub(crate) fn frozen_gpus(
    snapshot: &Snapshot,
    backend: Backend,
    gpus: &[GpuState<'_>],
    holds: &[Hold],
) -> BTreeSet<usize> {
    holds
        .iter()
        .flat_map(|h| h.gpus.iter())
        .filter(|(g, region)| !blocking(snapshot, &gpus[*g], region, backend).is_empty())
        .map(|(g, _)| *g)
        .collect()
}

/// How soon a GPU's kept region should be free, smaller first: pods without a declared end (fewer
/// first), then the latest declared end, then the youngest pod's running time (longer first).
type Soonness = (usize, u64, std::cmp::Reverse<u64>);

/// How soon a node's reserved regions should all be free: the latest GPU's soonness, then how many
/// GPUs still have to empty (fewer first).
type NodeSoonness = (Soonness, usize);

/// The soonness of a region no pod uses.
const FREE: Soonness = (0, 0, std::cmp::Reverse(u64::MAX));

fn soonness(pods: &[String], running: &HashMap<String, &RunningPod>) -> Soonness {
    if pods.is_empty() {
        return FREE;
    }
    let undeclared = pods
        .iter()
        .filter(|p| running.get(*p).is_none_or(|r| r.expected_end_seconds.is_none()))
        .count();
    let latest_end = pods
        .iter()
        .filter_map(|p| running.get(p)?.expected_end_seconds)
        .max()
        .unwrap_or(0);
    let youngest = pods
        .iter()
        .map(|p| running.get(p).and_then(|r| r.running_seconds).unwrap_or(0))
        .min()
        .unwrap_or(0);
    (undeclared, latest_end, std::cmp::Reverse(youngest))
}

/// GPUs with the region kept on each.
type Regions = Vec<(usize, Instance)>;

/// What a plan does about reservations.
#[derive(Clone, Debug, Default)]
pub(crate) struct Reservations {
    pub holding: Vec<PlannedReservation>,
    pub released: Vec<ReleasedReservation>,
}

/// After the outcome is final: which holds end (their owner is placed or gone), and which new
/// ones are made for large pods that still wait.
pub(crate) fn settle(p: &Problem<'_>, snapshot: &Snapshot, o: &Outcome) -> Reservations {
    let rp = &p.policy.reservations;
    let backend = p.policy.backend;
    let running: HashMap<String, &RunningPod> = snapshot
        .running_pods
        .iter()
        .map(|r| (format!("{}/{}", r.namespace, r.name), r))
        .collect();
    let demand_of = p.demand_of_pending();
    let mut out = Reservations {
        released: p.released.clone(),
        ..Default::default()
    };
    // The reservations the plan ends with, and whether each is new.
    let mut kept: Vec<(Hold, bool)> = Vec::new();
    for h in &p.holds {
        let placed = demand_of.get(&h.pending).and_then(|d| o.placed[*d].as_ref());
        // Placed on its node after a change there: it holds until the instances exist (so that
        // nothing else lands on the node in between), and ends with the plan that finds them.
        let changes_first = |taken: &crate::assign::Taken| {
            taken
                .iter()
                .any(|(g, _, _)| p.gpus[*g].options[o.option[*g]].changed)
        };
        match placed {
            Some((n, taken)) if *n == h.node && changes_first(taken) => kept.push((h.clone(), false)),
            Some((n, _)) => out.released.push(ReleasedReservation {
                pod: h.pod.clone(),
                node: p.nodes[h.node].name.clone(),
                reason: if *n == h.node {
                    format!("its instances are ready on {}", p.nodes[*n].name)
                } else {
                    format!("its pod is placed on {}", p.nodes[*n].name)
                },
            }),
            None => kept.push((h.clone(), false)),
        }
    }
    // New holds go only where this plan neither changes nor places anything.
    let mut touched: BTreeSet<usize> = (0..p.gpus.len())
        .filter(|g| p.gpus[*g].options[o.option[*g]].changed)
        .map(|g| p.gpus[g].node)
        .collect();
    touched.extend(o.placed.iter().flatten().map(|(n, _)| *n));
    let mut reserved: BTreeSet<usize> = kept
        .iter()
        .flat_map(|(h, _)| h.gpus.iter().map(|(g, _)| *g))
        .collect();
    let mut nodes: BTreeSet<usize> = kept.iter().map(|(h, _)| h.node).collect();
    let holders: BTreeSet<usize> = p.holds.iter().map(|h| h.pending).collect();
    // Each try looks at every GPU of the pod's nodes: the first few candidates in the plan's order
    // are tried, not every waiting pod of a large fleet.
    let mut tries = 2 * rp.max_gpus as usize;
    for d in p.demand_order() {
        let dm = &p.demands[d];
        let Some(pi) = dm.pending else { continue };
        if o.placed[d].is_some() || holders.contains(&pi) || dm.size(p) < rp.min_memory_slices {
            continue;
        }
        if tries == 0 {
            break;
        }
        tries -= 1;
        let regions: usize = dm.req.iter().map(|(_, n)| usize::from(*n)).sum();
        if reserved.len() + regions > rp.max_gpus as usize {
            continue;
        }
        let mut best: Option<(NodeSoonness, usize, Regions)> = None;
        for g in &dm.groups {
            for &n in &p.groups[*g].nodes {
                let info = &p.nodes[n];
                if touched.contains(&n) && !nodes.contains(&n)
                    || !info.managed
                    || !info.schedulable
                    || info.frozen
                    || (!nodes.contains(&n) && nodes.len() >= rp.max_nodes as usize)
                {
                    continue;
                }
                if let Some((key, picked)) = pick_on_node(p, snapshot, &running, n, &dm.req, &reserved)
                    && best.as_ref().is_none_or(|b| key < b.0)
                {
                    best = Some((key, n, picked));
                }
            }
        }
        if let Some((_, n, picked)) = best {
            reserved.extend(picked.iter().map(|(g, _)| *g));
            nodes.insert(n);
            let hold = Hold {
                pod: dm.key.clone(),
                pending: pi,
                priority: dm.tier,
                node: n,
                gpus: picked,
                age_seconds: 0,
            };
            kept.push((hold, true));
        }
    }
    for (h, new) in kept {
        let mut waiting: BTreeSet<String> = BTreeSet::new();
        for (g, region) in &h.gpus {
            waiting.extend(blocking(snapshot, &p.gpus[*g], region, backend));
        }
        out.holding.push(PlannedReservation {
            node: p.nodes[h.node].name.clone(),
            gpus: h
                .gpus
                .iter()
                .map(|(g, region)| ReservedInstance {
                    gpu: p.gpus[*g].index,
                    profile: p.gpus[*g].model.profile_name(region.profile),
                    start: region.start,
                })
                .collect(),
            pod: h.pod,
            priority: h.priority,
            age_seconds: h.age_seconds,
            new,
            waiting_for: waiting.into_iter().collect(),
        });
    }
    out
}

/// The GPUs of node `n` to earmark for `req` (one region per instance asked for, each on its own
/// GPU not yet reserved), and how soon the last of them should be free; `None` if the node cannot
/// hold the request, or if every region is free already (then the pod waits for something else).
fn pick_on_node(
    p: &Problem<'_>,
    snapshot: &Snapshot,
    running: &HashMap<String, &RunningPod>,
    n: usize,
    req: &[(usize, u16)],
    reserved: &BTreeSet<usize>,
) -> Option<(NodeSoonness, Regions)> {
    let backend = p.policy.backend;
    let mut free: Vec<usize> = p.nodes[n]
        .gpus
        .iter()
        .copied()
        .filter(|g| !reserved.contains(g))
        .collect();
    let mut picked = Vec::new();
    let mut worst: Option<Soonness> = None;
    let mut free_already = 0;
    // A region already free is the best there is; but a request whose regions are all free has
    // nothing to wait for (it waits for another reason: a budget, say).
    let mut waits_for_some = false;
    for (q, count) in req {
        for _ in 0..*count {
            // The GPU and placement of profile q whose blocking pods should finish soonest.
            let mut best: Option<(Soonness, usize, Instance)> = None;
            for &g in &free {
                let gs = &p.gpus[g];
                let Some(qi) = gs.model.profile_by_name(&p.profiles[*q]) else {
                    continue;
                };
                let Some(profile) = gs.model.profile(qi) else {
                    continue;
                };
                for s in &profile.starts {
                    let region = Instance::new(qi, *s);
                    let pods = blocking(snapshot, gs, &region, backend);
                    let key = soonness(&pods, running);
                    if best.as_ref().is_none_or(|b| key < b.0) {
                        best = Some((key, g, region));
                    }
                }
            }
            let (key, g, region) = best?;
            waits_for_some |= key != FREE;
            free_already += usize::from(key == FREE);
            free.retain(|x| *x != g);
            picked.push((g, region));
            worst = Some(worst.map_or(key, |w| w.max(key)));
        }
    }
    waits_for_some.then_some(())?;
    let to_empty = picked.len() - free_already;
    Some(((worst?, to_empty), picked))
}
