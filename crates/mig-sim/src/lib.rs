//! Trace-driven simulation of MIG repartitioning policies. Discrete events (arrivals, departures,
//! reconfigurations finishing, planning ticks) over a simulated cluster of identical MIG GPUs; the
//! planner is called directly (the fast path: no HTTP, no Kubernetes).
//!
//! A simple scheduler binds pending pods first-fit, in arrival order, to free instances of their
//! profile (all instances of a pod on one node), as kube-scheduler with the device plugin would.
//! Policies differ only in how layouts change:
//! - `static`: never (what admins do today; NVIDIA's all-balanced, or any fixed layout);
//! - `greedy`: the planner's greedy first-fit repartitioning (in the spirit of nos);
//! - `ilp`: the planner's ILP;
//! - `ideal`: a reference, not a policy: slices pooled per GPU without placement rules,
//!   repartitioning free and instant.
//!
//! Dynamic policies plan at most every `batch` seconds while pods are pending; a changed GPU is
//! unusable for `reconfig_delay` seconds, then has its target layout. Only idle GPUs change (drain
//! policy `never`), so nothing is evicted.
//!
//! Reservations by attrition are modelled as the system runs them: the planner's reservations are
//! carried from plan to plan (with their age), and the scheduler binds nothing on a reserved node
//! (the controller's NoSchedule taint, on both backends) until the plan that finds the reserved
//! pod's instances releases it.

pub mod demand_sets;
pub mod inflation;
pub mod trace;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::Instant as Clock;

use mig_catalog::{Catalog, Counts, GpuModel, Instance, Layout};
use mig_planner::snapshot::{Gpu, Node, PendingPod, Reservation, RunningPod};
use mig_planner::{Backend, DrainPolicy, Policy, ReservationPolicy, Snapshot, SolverKind};

pub use trace::{TracePod, parse_dlrm, parse_openb};

/// How layouts change.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicyKind {
    /// Never: every GPU keeps this layout (canonical text).
    Static(String),
    /// The planner's greedy heuristic.
    Greedy,
    /// The planner's ILP (HiGHS).
    Ilp,
    /// A reference no MIG policy reaches: every GPU is a pool of compute slices that any pod may
    /// take without placement rules, and repartitioning is free and instant (a pod of size s starts
    /// on any GPU with s free slices; n×7g needs n empty GPUs on one node). Same scheduler order.
    Ideal,
}

impl PolicyKind {
    /// Short name for reports.
    pub fn name(&self) -> String {
        match self {
            PolicyKind::Static(l) => format!("static[{}]", l.replace(',', "+")),
            PolicyKind::Greedy => "greedy".into(),
            PolicyKind::Ilp => "ilp".into(),
            PolicyKind::Ideal => "ideal".into(),
        }
    }
}

/// The simulated cluster and timing.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Nodes.
    pub nodes: usize,
    /// GPUs per node.
    pub gpus_per_node: usize,
    /// GPU product (catalog lookup).
    pub product: String,
    /// Initial layout of every GPU (canonical text).
    pub initial_layout: String,
    /// Plan at most this often while pods wait (seconds of simulated time).
    pub batch: f64,
    /// A changed GPU is unusable this long (seconds).
    pub reconfig_delay: f64,
    /// Stop at this time (seconds); pods still waiting then count as waiting until it.
    pub horizon: f64,
    /// What the planner may evict to change a GPU (`Never`: only idle GPUs change). An evicted pod
    /// goes back to the queue in its arrival order and starts over (its work so far is lost).
    pub drain: DrainPolicy,
    /// Most evictions per plan (the controller's eviction budget; unbounded when absent).
    pub max_evictions: Option<u32>,
    /// How layouts reach the GPUs: `MigManager` rebuilds a changed GPU whole (its instances must
    /// all be free, or drained); `Nvml` keeps the instances in use and changes only the rest.
    pub backend: Backend,
    /// Reservations by attrition (the planner's policy; `max_gpus` 0: none).
    pub reservations: ReservationPolicy,
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Policy name.
    pub policy: String,
    /// Pods in the workload.
    pub pods: usize,
    /// Pods that started before the horizon.
    pub started: usize,
    /// Waits (start − arrival; horizon − arrival for pods that never started), seconds.
    pub waits: Vec<f64>,
    /// The profile each wait's pod asked for (`3g.40gb`, `8×7g.80gb`), in the order of `waits`.
    pub wait_profiles: Vec<String>,
    /// GPUs reconfigured.
    pub reconfigurations: usize,
    /// Planner calls and their wall times (ms).
    pub plan_millis: Vec<f64>,
    /// Time-average of allocated compute slices / cluster compute slices.
    pub allocation: f64,
    /// Time-average of demanded compute slices (running + waiting pods) / cluster compute slices.
    pub demand: f64,
    /// Pods evicted to change GPUs.
    pub evictions: usize,
    /// Work lost to evictions: compute-slice hours the evicted pods had run.
    pub lost_slice_hours: f64,
    /// Reservations made.
    pub reservations: usize,
    /// Time-average of GPUs earmarked by reservations (a reserved node takes no new pods at all).
    pub reserved_gpus: f64,
}

impl Report {
    /// The q-quantile (0–1) of the waits.
    pub fn wait_quantile(&self, q: f64) -> f64 {
        quantile(&self.waits, q)
    }
    /// Per profile: pods, mean, p95 and p99 wait (seconds).
    pub fn waits_by_profile(&self) -> BTreeMap<String, ProfileWaits> {
        let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (w, p) in self.waits.iter().zip(&self.wait_profiles) {
            by.entry(p.clone()).or_default().push(*w);
        }
        by.into_iter()
            .map(|(p, w)| {
                let waits = ProfileWaits {
                    pods: w.len(),
                    mean: w.iter().sum::<f64>() / w.len() as f64,
                    p95: quantile(&w, 0.95),
                    p99: quantile(&w, 0.99),
                };
                (p, waits)
            })
            .collect()
    }

    /// Mean wait.
    pub fn mean_wait(&self) -> f64 {
        if self.waits.is_empty() {
            0.0
        } else {
            self.waits.iter().sum::<f64>() / self.waits.len() as f64
        }
    }
}

/// The waits of one profile's pods (seconds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProfileWaits {
    /// Pods of the profile.
    pub pods: usize,
    /// Mean wait.
    pub mean: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// The q-quantile (nearest rank) of `values`.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Arrival(usize),
    /// Pod, and which of its runs (an evicted pod's old departure is void).
    Departure(usize, u32),
    ReconfigDone(usize),
    PlanTick,
}

#[derive(Debug)]
struct Event {
    at: f64,
    seq: u64,
    kind: Kind,
}
impl PartialEq for Event {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Event {
    fn cmp(&self, o: &Self) -> Ordering {
        // Earliest first (BinaryHeap is a max-heap).
        o.at.total_cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

struct SimGpu {
    node: usize,
    index: u32,
    layout: Layout,
    used: BTreeMap<Instance, usize>,
    /// Reconfiguring into this layout until the ReconfigDone event.
    target: Option<Layout>,
}

/// A simulation error (bad configuration).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Unknown GPU or bad layout.
    #[error("{0}")]
    Config(String),
}

/// Run one policy over a workload.
pub fn simulate(config: &SimConfig, policy: &PolicyKind, pods: &[TracePod]) -> Result<Report, SimError> {
    let model = Catalog::embedded()
        .lookup(&config.product)
        .map_err(|e| SimError::Config(e.to_string()))?;
    let mut gpus = initial_gpus(config, policy, model, pods)?;
    let total_slices = (gpus.len() as f64) * f64::from(model.compute_slices);
    let slices_of = |p: &TracePod| slices(model, p);

    let mut report = Report {
        policy: policy.name(),
        pods: pods.len(),
        ..Default::default()
    };
    let mut heap = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |heap: &mut BinaryHeap<Event>, at: f64, kind: Kind| {
        seq += 1;
        heap.push(Event { at, seq, kind });
    };
    for (i, p) in pods.iter().enumerate() {
        push(&mut heap, p.arrival, Kind::Arrival(i));
    }
    let mut pending: VecDeque<usize> = VecDeque::new();
    let mut started: Vec<Option<f64>> = vec![None; pods.len()];
    // The current run of each pod (evictions start a new one) and when it began.
    let mut run: Vec<u32> = vec![0; pods.len()];
    let mut run_start: Vec<f64> = vec![0.0; pods.len()];
    let mut holding: BTreeMap<usize, Vec<(usize, Instance)>> = BTreeMap::new();
    // Reservations in force, with the time each was made.
    let mut reserved: Vec<(Reservation, f64)> = Vec::new();
    let mut reserved_area = 0.0;
    let mut tick_scheduled = false;
    // Whether anything the planner sees changed since its last call; an unchanged state gives the
    // same plan (the planner is deterministic), so the tick is skipped.
    let mut dirty = true;
    let (mut last_t, mut alloc_area, mut demand_area) = (pods.first().map_or(0.0, |p| p.arrival), 0.0, 0.0);
    let (mut allocated, mut demanded) = (0.0f64, 0.0f64);
    let start_t = last_t;

    while let Some(ev) = heap.pop() {
        let t = ev.at.min(config.horizon);
        alloc_area += allocated * (t - last_t);
        demand_area += demanded * (t - last_t);
        reserved_area += reserved.iter().map(|(r, _)| r.gpus.len()).sum::<usize>() as f64 * (t - last_t);
        last_t = t;
        if ev.at > config.horizon {
            break;
        }
        let void = matches!(ev.kind, Kind::Departure(i, r) if r != run[i]);
        dirty |= !matches!(ev.kind, Kind::PlanTick) && !void;
        match ev.kind {
            Kind::Departure(..) if void => {}
            Kind::Arrival(i) => {
                pending.push_back(i);
                demanded += slices_of(&pods[i]);
            }
            Kind::Departure(i, _) => {
                for (g, inst) in holding.remove(&i).unwrap_or_default() {
                    gpus[g].used.remove(&inst);
                }
                allocated -= slices_of(&pods[i]);
                demanded -= slices_of(&pods[i]);
            }
            Kind::ReconfigDone(g) => {
                if let Some(l) = gpus[g].target.take() {
                    gpus[g].layout = l;
                }
            }
            Kind::PlanTick => {
                tick_scheduled = false;
                if !pending.is_empty() && dirty {
                    let world = World {
                        now: t,
                        pending: &pending,
                        holding: &holding,
                        run_start: &run_start,
                    };
                    let (changed, evicted) = plan_round(
                        model,
                        &mut gpus,
                        pods,
                        &world,
                        &mut reserved,
                        policy,
                        config,
                        &mut report,
                    );
                    for i in evicted {
                        holding.remove(&i);
                        allocated -= slices_of(&pods[i]);
                        report.evictions += 1;
                        report.lost_slice_hours += slices_of(&pods[i]) * (t - run_start[i]) / 3600.0;
                        run[i] += 1;
                        // Back in the queue in arrival order (the queue is in arrival order).
                        let at = pending.partition_point(|q| pods[*q].arrival <= pods[i].arrival);
                        pending.insert(at, i);
                    }
                    // Its own changes are new state: plan once more on the next tick.
                    dirty = !changed.is_empty();
                    for g in changed {
                        push(&mut heap, t + config.reconfig_delay, Kind::ReconfigDone(g));
                    }
                }
            }
        }
        // Schedule: first-fit, arrival order; nothing lands on a reserved node.
        let tainted: Vec<usize> = reserved
            .iter()
            .filter_map(|(r, _)| r.node.strip_prefix("node-")?.parse().ok())
            .collect();
        for (i, taken) in first_fit(model, policy, &mut gpus, pods, &mut pending, &tainted) {
            holding.insert(i, taken);
            started[i].get_or_insert(t);
            run_start[i] = t;
            allocated += slices_of(&pods[i]);
            push(&mut heap, t + pods[i].duration, Kind::Departure(i, run[i]));
        }
        let plans = matches!(policy, PolicyKind::Greedy | PolicyKind::Ilp);
        if !pending.is_empty() && !tick_scheduled && plans {
            push(&mut heap, t + config.batch, Kind::PlanTick);
            tick_scheduled = true;
        }
    }
    let span = (last_t - start_t).max(1e-9);
    report.allocation = alloc_area / span / total_slices;
    report.demand = demand_area / span / total_slices;
    report.reserved_gpus = reserved_area / span;
    record_waits(&mut report, pods, &started, config.horizon, last_t);
    Ok(report)
}

/// The cluster's GPUs at the start: every GPU at the policy's layout (the static layout, the
/// `ideal` slice pool, or the configured initial layout), checked, and every pod's profile known.
fn initial_gpus(
    config: &SimConfig,
    policy: &PolicyKind,
    model: &GpuModel,
    pods: &[TracePod],
) -> Result<Vec<SimGpu>, SimError> {
    let ideal_text;
    let layout_text = match policy {
        PolicyKind::Static(l) => l.as_str(),
        PolicyKind::Ideal => {
            // One-slice instances at every placement: a pod of size s takes any s of them.
            ideal_text = slice_pool(model)?;
            ideal_text.as_str()
        }
        _ => config.initial_layout.as_str(),
    };
    let initial = model
        .parse_layout(layout_text)
        .map_err(|e| SimError::Config(e.to_string()))?;
    model
        .validate(&initial)
        .map_err(|e| SimError::Config(e.to_string()))?;
    for p in pods {
        if model.profile_by_name(p.profile).is_none() {
            return Err(SimError::Config(format!(
                "{}: profile {} is not on {}",
                p.name, p.profile, model.key
            )));
        }
    }
    let gpus: Vec<SimGpu> = (0..config.nodes * config.gpus_per_node)
        .map(|g| SimGpu {
            node: g / config.gpus_per_node,
            index: (g % config.gpus_per_node) as u32,
            layout: initial.clone(),
            used: BTreeMap::new(),
            target: None,
        })
        .collect();
    Ok(gpus)
}

/// Bind pending pods first-fit in arrival order (taking their instances on `gpus`); the pods bound
/// with what they took, the rest left in `pending`. Once a pod of a profile does not fit, no later
/// pod of that profile asking as many or more instances fits in this round either (binding only
/// takes instances away).
fn first_fit(
    model: &GpuModel,
    policy: &PolicyKind,
    gpus: &mut [SimGpu],
    pods: &[TracePod],
    pending: &mut VecDeque<usize>,
    tainted: &[usize],
) -> Vec<(usize, Vec<(usize, Instance)>)> {
    let mut bound = Vec::new();
    let mut still = VecDeque::new();
    let mut blocked: BTreeMap<&str, u32> = BTreeMap::new();
    while let Some(i) = pending.pop_front() {
        if blocked.get(pods[i].profile).is_some_and(|c| pods[i].count >= *c) {
            still.push_back(i);
            continue;
        }
        let taken = match policy {
            PolicyKind::Ideal => fit_slices(model, gpus, &pods[i]),
            _ => fit(model, gpus, &pods[i], tainted),
        };
        match taken {
            Some(taken) => {
                for (g, inst) in &taken {
                    gpus[*g].used.insert(*inst, i);
                }
                bound.push((i, taken));
            }
            None => {
                let c = blocked.entry(pods[i].profile).or_insert(u32::MAX);
                *c = (*c).min(pods[i].count);
                still.push_back(i);
            }
        }
    }
    *pending = still;
    bound
}

/// Compute slices a pod holds while it runs (all its instances).
fn slices(model: &GpuModel, p: &TracePod) -> f64 {
    model
        .profile_by_name(p.profile)
        .and_then(|i| model.profile(i))
        .map_or(0.0, |pr| f64::from(pr.compute_slices) * f64::from(p.count))
}

/// Waits into `report`, in the pods' order: start − arrival, or (for a pod that never started) the
/// time it waited until `until`, capped at the horizon. Pods arriving after the horizon are left out.
fn record_waits(report: &mut Report, pods: &[TracePod], starts: &[Option<f64>], horizon: f64, until: f64) {
    for (p, start) in pods.iter().zip(starts) {
        if p.arrival > horizon {
            continue;
        }
        report.wait_profiles.push(p.label());
        match start {
            Some(s) => {
                report.started += 1;
                report.waits.push(s - p.arrival);
            }
            None => report.waits.push(horizon.min(until).max(p.arrival) - p.arrival),
        }
    }
}

/// A report from start times observed elsewhere (the slow path: the full system on kube-emulator),
/// measured as [`simulate`] measures: waits (a pod never started counts until `end`, capped at the
/// horizon), and allocation and demand as time-averages over [first arrival, end] of the compute
/// slices held (start → start + duration) and wanted (arrival → start + duration, or `end`).
pub fn report_from_starts(
    policy: &str,
    config: &SimConfig,
    pods: &[TracePod],
    starts: &[Option<f64>],
    end: f64,
    reconfigurations: usize,
) -> Result<Report, SimError> {
    let model = Catalog::embedded()
        .lookup(&config.product)
        .map_err(|e| SimError::Config(e.to_string()))?;
    let end = end.min(config.horizon);
    let first = pods.iter().map(|p| p.arrival).fold(f64::INFINITY, f64::min);
    let span = (end - first).max(1e-9);
    let total = (config.nodes * config.gpus_per_node) as f64 * f64::from(model.compute_slices);
    let overlap = |a: f64, b: f64| (b.min(end) - a.max(first)).max(0.0);
    let mut report = Report {
        policy: policy.to_string(),
        pods: pods.len(),
        reconfigurations,
        ..Default::default()
    };
    record_waits(&mut report, pods, starts, config.horizon, end);
    let (mut held, mut wanted) = (0.0, 0.0);
    for (p, start) in pods.iter().zip(starts) {
        let slices = slices(model, p);
        match start {
            Some(s) => {
                held += slices * overlap(*s, s + p.duration);
                wanted += slices * overlap(p.arrival, s + p.duration);
            }
            None => wanted += slices * overlap(p.arrival, end),
        }
    }
    report.allocation = held / span / total;
    report.demand = wanted / span / total;
    Ok(report)
}

/// Free instances of the pod's profile on one node (not reconfiguring, not `tainted`), or None.
fn fit(
    model: &GpuModel,
    gpus: &[SimGpu],
    pod: &TracePod,
    tainted: &[usize],
) -> Option<Vec<(usize, Instance)>> {
    let want = model.profile_by_name(pod.profile)?;
    let need = pod.count as usize;
    // One pass over the GPUs, node by node (in node order, as first-fit over nodes would).
    let mut by_node: BTreeMap<usize, Vec<(usize, Instance)>> = BTreeMap::new();
    for (gi, g) in gpus
        .iter()
        .enumerate()
        .filter(|(_, g)| g.target.is_none() && !tainted.contains(&g.node))
    {
        let free = by_node.entry(g.node).or_default();
        if free.len() < need {
            free.extend(
                g.layout
                    .instances()
                    .iter()
                    .filter(|i| i.profile == want && !g.used.contains_key(i))
                    .map(|i| (gi, *i))
                    .take(need - free.len()),
            );
        }
    }
    by_node.into_values().find(|free| free.len() == need)
}

/// The ideal policy's GPU: the one-compute-slice profile (smallest memory) at every placement.
fn slice_pool(model: &GpuModel) -> Result<String, SimError> {
    let one = model
        .profiles
        .iter()
        .filter(|p| p.compute_slices == 1 && !p.media_extensions)
        .min_by_key(|p| p.memory_slices)
        .ok_or_else(|| SimError::Config(format!("{} has no one-slice profile", model.key)))?;
    if one.starts.len() != usize::from(model.compute_slices) {
        return Err(SimError::Config(format!(
            "{}: {} one-slice placements for {} compute slices",
            model.key,
            one.starts.len(),
            model.compute_slices
        )));
    }
    Ok(one
        .starts
        .iter()
        .map(|s| format!("{}@{s}", one.name))
        .collect::<Vec<_>>()
        .join(","))
}

/// The ideal policy's fit: each of the pod's `count` instances of size s is s free slices of one
/// GPU, all on one node (first-fit over nodes, then GPUs).
fn fit_slices(model: &GpuModel, gpus: &[SimGpu], pod: &TracePod) -> Option<Vec<(usize, Instance)>> {
    let size = usize::from(model.profile(model.profile_by_name(pod.profile)?)?.compute_slices);
    let mut by_node: BTreeMap<usize, (u32, Vec<(usize, Instance)>)> = BTreeMap::new();
    for (gi, g) in gpus.iter().enumerate() {
        let (placed, taken) = by_node.entry(g.node).or_default();
        let free: Vec<Instance> = g
            .layout
            .instances()
            .iter()
            .filter(|i| !g.used.contains_key(i))
            .copied()
            .collect();
        for chunk in free.chunks_exact(size) {
            if *placed == pod.count {
                break;
            }
            *placed += 1;
            taken.extend(chunk.iter().map(|i| (gi, *i)));
        }
        if *placed == pod.count {
            return by_node.remove(&g.node).map(|(_, t)| t);
        }
    }
    None
}

/// A simulated GPU as the planner's snapshot sees it: MIG on, `layout`'s instances, each with the
/// pod (namespace `sim`) that `pod_of` says uses it.
pub(crate) fn snapshot_gpu(
    model: &GpuModel,
    product: &str,
    index: u32,
    layout: &Layout,
    mut pod_of: impl FnMut(&Instance) -> Option<String>,
) -> Gpu {
    Gpu::from_layout(model, product, index, layout, |i| {
        pod_of(i).map(|p| format!("sim/{p}")).into_iter().collect()
    })
}

/// What the planner is shown besides the GPUs: the time, the queue and the running pods.
struct World<'a> {
    now: f64,
    pending: &'a VecDeque<usize>,
    holding: &'a BTreeMap<usize, Vec<(usize, Instance)>>,
    /// When each pod's current run began.
    run_start: &'a [f64],
}

/// Plan with the planner; evict what it evicts (their instances freed; the caller requeues them),
/// start the reconfigurations it asks for and carry its reservations. Returns the GPUs changed and
/// the pods evicted.
#[allow(clippy::too_many_arguments)]
fn plan_round(
    model: &GpuModel,
    gpus: &mut [SimGpu],
    pods: &[TracePod],
    world: &World<'_>,
    reserved: &mut Vec<(Reservation, f64)>,
    policy: &PolicyKind,
    config: &SimConfig,
    report: &mut Report,
) -> (Vec<usize>, Vec<usize>) {
    let World {
        now,
        pending,
        holding,
        run_start,
    } = *world;
    let name = |i: usize| format!("p{i}");
    let mut nodes: Vec<Node> = (0..config.nodes)
        .map(|n| Node {
            name: format!("node-{n}"),
            schedulable: true,
            ..Default::default()
        })
        .collect();
    for g in gpus.iter() {
        let layout = g.target.as_ref().unwrap_or(&g.layout);
        nodes[g.node].frozen |= g.target.is_some();
        nodes[g.node]
            .gpus
            .push(snapshot_gpu(model, &config.product, g.index, layout, |i| {
                g.used.get(i).map(|p| name(*p))
            }));
    }
    let snapshot = Snapshot {
        nodes,
        pending_pods: pending
            .iter()
            .map(|i| PendingPod {
                namespace: "sim".into(),
                name: name(*i),
                requests: [(
                    format!("nvidia.com/mig-{}", pods[*i].profile),
                    i64::from(pods[*i].count),
                )]
                .into(),
                created: Some(format!("{:020.3}", pods[*i].arrival)),
                waited_seconds: Some((now - pods[*i].arrival).max(0.0) as u64),
                ..Default::default()
            })
            .collect(),
        running_pods: holding
            .keys()
            .map(|i| RunningPod {
                namespace: "sim".into(),
                name: name(*i),
                running_seconds: Some((now - run_start[*i]).max(0.0) as u64),
                ..Default::default()
            })
            .collect(),
        reservations: reserved
            .iter()
            .map(|(r, since)| Reservation {
                age_seconds: (now - since).max(0.0) as u64,
                ..r.clone()
            })
            .collect(),
        ..Default::default()
    };
    let mut p = Policy::default();
    if *policy == PolicyKind::Greedy {
        p.solver.kind = SolverKind::Greedy;
    }
    p.drain = config.drain;
    p.backend = config.backend;
    p.budgets.max_evictions = config.max_evictions;
    p.solver.time_limit_ms = 2_000;
    p.reservations = config.reservations.clone();
    let clock = Clock::now();
    let plan = mig_planner::plan(&snapshot, &p);
    report.plan_millis.push(clock.elapsed().as_secs_f64() * 1000.0);
    let made_at = |r: &mig_planner::PlannedReservation| {
        reserved
            .iter()
            .find(|(old, _)| old.pod == r.pod && old.node == r.node && !r.new)
            .map_or(now, |(_, since)| *since)
    };
    let next: Vec<(Reservation, f64)> = plan
        .reservations
        .iter()
        .map(|r| (r.carried(0), made_at(r)))
        .collect();
    report.reservations += plan.reservations.iter().filter(|r| r.new).count();
    *reserved = next;
    let mut evicted = Vec::new();
    for e in &plan.evictions {
        let Some(i) = e
            .pod
            .strip_prefix("sim/p")
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|i| holding.contains_key(i))
        else {
            continue;
        };
        for (g, inst) in &holding[&i] {
            gpus[*g].used.remove(inst);
        }
        evicted.push(i);
    }
    let mut changed = Vec::new();
    for gp in plan.gpus.iter().filter(|g| g.changed) {
        let Some(n) = gp
            .node
            .strip_prefix("node-")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let Some(gi) = gpus.iter().position(|g| g.node == n && g.index == gp.index) else {
            continue;
        };
        let Ok(target) = model.parse_layout(&gp.target) else {
            continue;
        };
        // mig-manager rebuilds a GPU whole: only an empty one changes. nvml keeps the instances in
        // use, so every one must stay at its placement in the target. (The planner plans so;
        // anything else is kept safe here.)
        let keeps_pods = match config.backend {
            Backend::MigManager => gpus[gi].used.is_empty(),
            Backend::Nvml => gpus[gi].used.keys().all(|i| target.contains(i)),
        };
        if !keeps_pods || gpus[gi].target.is_some() {
            continue;
        }
        gpus[gi].target = Some(target);
        changed.push(gi);
    }
    report.reconfigurations += changed.len();
    (changed, evicted)
}

/// The candidates for "the best static layout in hindsight": one layout per count vector that uses
/// only `profiles` and is maximal among those (no other such vector covers it).
pub fn static_candidates(product: &str, profiles: &[&str]) -> Result<Vec<String>, SimError> {
    let model = Catalog::embedded()
        .lookup(product)
        .map_err(|e| SimError::Config(e.to_string()))?;
    let allowed: Vec<_> = profiles.iter().filter_map(|p| model.profile_by_name(p)).collect();
    let mut vectors: BTreeMap<String, (Counts, String)> = BTreeMap::new();
    for l in model.layouts() {
        if l.is_empty() || !l.instances().iter().all(|i| allowed.contains(&i.profile)) {
            continue;
        }
        let counts: Counts = model.counts(l);
        vectors
            .entry(model.format_counts(&counts))
            .or_insert_with(|| (counts, model.format_layout(l)));
    }
    let all: Vec<(Counts, String)> = vectors.into_values().collect();
    Ok(all
        .iter()
        .filter(|(c, _)| !all.iter().any(|(o, _)| o != c && o.covers(c)))
        .map(|(_, l)| l.clone())
        .collect())
}
