//! FGD's allocation-rate experiment (ATC '23) with MIG constraints.
//!
//! FGD's protocol (../shared/research/perf-anchors.md §1.2): the openb pod list is a distribution of
//! pod shapes; pods are sampled with replacement until their GPU request reaches `tune` (1.3) × the
//! cluster's GPUs, shuffled with a seed (42–51), and offered once each, in order, with no departures;
//! a pod that does not fit fails. The metric is the allocated GPU share against the arrived GPU
//! request, both in % of capacity, averaged per whole arrived %.
//!
//! Here every GPU is an A100/H100-80GB, each pod asks for its MIG profile (the trace mapping), and the
//! policies differ in how instances come to exist:
//! - `static`: every GPU has a fixed layout; a pod takes a free instance of its profile (best fit:
//!   the GPU with the fewest free instances);
//! - `first-fit`: instances are created on demand in free slices (the nvml backend: in-use instances
//!   stay), on the first GPU that can take one;
//! - `planner`: pods are planned in batches by the planner (nvml backend, every existing instance in
//!   use); a pod the plan cannot place fails.
//!
//! Not modelled: node CPU and memory (FGD enforces them), GPU-model constraints (`gpu_spec`).

use std::collections::BTreeMap;
use std::time::Instant;

use mig_catalog::{Catalog, GpuModel, Instance, Layout};
use mig_planner::snapshot::{Node, PendingPod, RunningPod};
use mig_planner::{Backend, PodOutcome, Policy, Snapshot, SolverKind};

use crate::{SimError, TracePod};

/// How instances come to exist.
#[derive(Clone, Debug, PartialEq)]
pub enum InflationPolicy {
    /// Every GPU keeps this layout.
    Static(String),
    /// Create the pod's instances in free slices of the first GPUs that can take them.
    FirstFit,
    /// Plan batches of this many arriving pods with the planner.
    Planner {
        /// Pods per plan.
        batch: usize,
        /// Solver.
        kind: SolverKind,
    },
}

impl InflationPolicy {
    /// Name for reports.
    pub fn name(&self) -> String {
        match self {
            InflationPolicy::Static(l) => format!("static {l}"),
            InflationPolicy::FirstFit => "first-fit".into(),
            InflationPolicy::Planner { batch, kind } => {
                let solver = match kind {
                    SolverKind::Highs => "ilp",
                    SolverKind::Microlp => "microlp",
                    SolverKind::Greedy => "greedy",
                };
                format!("planner-{solver} (batch {batch})")
            }
        }
    }
}

/// One run's result.
#[derive(Clone, Debug)]
pub struct InflationReport {
    /// Policy name.
    pub policy: String,
    /// Seed.
    pub seed: u64,
    /// Pods offered.
    pub offered: usize,
    /// Pods placed.
    pub placed: usize,
    /// Pods failed, by profile (multi-GPU pods as `N×7g.80gb`).
    pub failed: BTreeMap<String, usize>,
    /// For arrived k = 0..=130 % of capacity: mean requested allocation (Σ gpu_milli of placed pods
    /// over capacity, %) over the events at k (FGD's metric), `None` where no event fell.
    pub requested: Vec<Option<f64>>,
    /// The same for MIG-occupied allocation (compute slices of placed instances / 7 × GPUs, %).
    pub occupied: Vec<Option<f64>>,
    /// Planner calls and their total time, ms.
    pub plans: usize,
    /// Total planner time, ms.
    pub plan_millis: f64,
}

/// A small deterministic PRNG (SplitMix64): the same seed gives the same workload on every machine.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// FGD's workload tuning: the pod list plus copies sampled uniformly with replacement until the GPU
/// request reaches `tune` × `gpus` (or random pods removed while above it), then shuffled.
pub fn inflate(pods: &[TracePod], gpus: usize, tune: f64, seed: u64) -> Vec<TracePod> {
    let mut rng = SplitMix(seed);
    let target = tune * gpus as f64 * 1000.0;
    let mut out: Vec<TracePod> = pods.to_vec();
    let mut total: f64 = out.iter().map(|p| f64::from(p.gpu_milli)).sum();
    if pods.is_empty() {
        return out;
    }
    let mut copy = 0;
    while total < target {
        let mut p = pods[rng.below(pods.len())].clone();
        copy += 1;
        p.name = format!("{}-tuned-{copy}", p.name);
        total += f64::from(p.gpu_milli);
        out.push(p);
    }
    while total > target && !out.is_empty() {
        let p = out.swap_remove(rng.below(out.len()));
        total -= f64::from(p.gpu_milli);
    }
    // Fisher-Yates.
    for i in (1..out.len()).rev() {
        out.swap(i, rng.below(i + 1));
    }
    out
}

struct Cluster<'c> {
    model: &'c GpuModel,
    /// Per GPU: node, layout, instances in use.
    gpus: Vec<(usize, Layout, usize)>,
    nodes: Vec<Vec<usize>>,
    used_slices: u64,
    requested_milli: u64,
}

impl Cluster<'_> {
    fn profile(&self, name: &str) -> Result<mig_catalog::ProfileIdx, SimError> {
        self.model
            .profile_by_name(name)
            .ok_or_else(|| SimError::Config(format!("{} has no profile {name}", self.model.key)))
    }

    fn take(&mut self, g: usize, instance: Instance) {
        self.gpus[g].1 = self.gpus[g].1.with(instance);
        self.gpus[g].2 += 1;
        self.used_slices += self
            .model
            .profile(instance.profile)
            .map_or(0, |p| u64::from(p.compute_slices));
    }
}

/// Run one policy over an inflated workload on nodes with the given GPU counts.
pub fn run_inflation(
    product: &str,
    node_gpus: &[usize],
    workload: &[TracePod],
    policy: &InflationPolicy,
    seed: u64,
) -> Result<InflationReport, SimError> {
    let model = Catalog::embedded()
        .lookup(product)
        .map_err(|e| SimError::Config(e.to_string()))?;
    let mut cl = Cluster {
        model,
        gpus: Vec::new(),
        nodes: Vec::new(),
        used_slices: 0,
        requested_milli: 0,
    };
    let static_layout = match policy {
        InflationPolicy::Static(l) => Some(
            model
                .parse_layout(l)
                .map_err(|e| SimError::Config(format!("layout {l:?}: {e}")))?,
        ),
        _ => None,
    };
    for (n, count) in node_gpus.iter().enumerate() {
        let mut members = Vec::new();
        for _ in 0..*count {
            members.push(cl.gpus.len());
            cl.gpus.push((n, Layout::empty(), 0));
        }
        cl.nodes.push(members);
    }
    // Static layouts: instances exist up front; `in use` is tracked separately.
    let mut static_free: Vec<Vec<Instance>> = match &static_layout {
        Some(l) => vec![l.instances().to_vec(); cl.gpus.len()],
        None => Vec::new(),
    };
    let capacity_milli = cl.gpus.len() as f64 * 1000.0;
    let capacity_slices = cl.gpus.len() as f64 * f64::from(model.compute_slices);
    let mut report = InflationReport {
        policy: policy.name(),
        seed,
        offered: workload.len(),
        placed: 0,
        failed: BTreeMap::new(),
        requested: vec![None; 131],
        occupied: vec![None; 131],
        plans: 0,
        plan_millis: 0.0,
    };
    let mut sums: Vec<(f64, f64, u32)> = vec![(0.0, 0.0, 0); 131];
    let mut arrived_milli = 0u64;
    let mut record = |cl: &Cluster<'_>, arrived: u64| {
        let k = (arrived as f64 / capacity_milli * 100.0).round() as usize;
        if let Some(s) = sums.get_mut(k) {
            s.0 += cl.requested_milli as f64 / capacity_milli * 100.0;
            s.1 += cl.used_slices as f64 / capacity_slices * 100.0;
            s.2 += 1;
        }
    };

    match policy {
        InflationPolicy::Static(_) | InflationPolicy::FirstFit => {
            for pod in workload {
                arrived_milli += u64::from(pod.gpu_milli);
                let q = cl.profile(pod.profile)?;
                let placed = match policy {
                    InflationPolicy::Static(_) => place_static(&mut cl, &mut static_free, q, pod),
                    _ => place_first_fit(&mut cl, q, pod),
                };
                if placed {
                    report.placed += 1;
                    cl.requested_milli += u64::from(pod.gpu_milli);
                } else {
                    *report.failed.entry(pod.label()).or_default() += 1;
                }
                record(&cl, arrived_milli);
            }
        }
        InflationPolicy::Planner { batch, kind } => {
            for chunk in workload.chunks((*batch).max(1)) {
                let clock = Instant::now();
                let placed = plan_batch(&mut cl, product, chunk, *kind)?;
                report.plans += 1;
                report.plan_millis += clock.elapsed().as_secs_f64() * 1000.0;
                for (pod, ok) in chunk.iter().zip(placed) {
                    arrived_milli += u64::from(pod.gpu_milli);
                    if ok {
                        report.placed += 1;
                        cl.requested_milli += u64::from(pod.gpu_milli);
                    } else {
                        *report.failed.entry(pod.label()).or_default() += 1;
                    }
                }
                record(&cl, arrived_milli);
            }
        }
    }
    for (k, (r, o, n)) in sums.into_iter().enumerate() {
        if n > 0 {
            report.requested[k] = Some(r / f64::from(n));
            report.occupied[k] = Some(o / f64::from(n));
        }
    }
    Ok(report)
}

/// Static layouts: the pod's instances from the node whose GPUs have the fewest free instances of
/// the profile (best fit), all on one node.
fn place_static(
    cl: &mut Cluster<'_>,
    free: &mut [Vec<Instance>],
    q: mig_catalog::ProfileIdx,
    pod: &TracePod,
) -> bool {
    let need = pod.count as usize;
    let mut best: Option<(usize, usize)> = None; // (free count, node)
    for (n, members) in cl.nodes.iter().enumerate() {
        let have: usize = members
            .iter()
            .map(|g| free[*g].iter().filter(|i| i.profile == q).count())
            .sum();
        if have >= need && best.is_none_or(|(b, _)| have < b) {
            best = Some((have, n));
        }
    }
    let Some((_, n)) = best else { return false };
    let mut left = need;
    for g in cl.nodes[n].clone() {
        while left > 0 {
            let Some(pos) = free[g].iter().position(|i| i.profile == q) else {
                break;
            };
            let inst = free[g].remove(pos);
            cl.take(g, inst);
            left -= 1;
        }
    }
    true
}

/// On demand: the first node whose GPUs can take the pod's instances in free slices.
fn place_first_fit(cl: &mut Cluster<'_>, q: mig_catalog::ProfileIdx, pod: &TracePod) -> bool {
    let need = pod.count as usize;
    for n in 0..cl.nodes.len() {
        let mut picks: Vec<(usize, Instance)> = Vec::new();
        for &g in &cl.nodes[n] {
            let mut layout = cl.gpus[g].1.clone();
            while picks.len() < need {
                let Some(inst) = cl.model.addable(&layout).into_iter().find(|i| i.profile == q) else {
                    break;
                };
                layout = layout.with(inst);
                picks.push((g, inst));
            }
        }
        if picks.len() == need {
            for (g, inst) in picks {
                cl.take(g, inst);
            }
            return true;
        }
    }
    false
}

/// One planner call for a batch of arriving pods; returns which were placed.
fn plan_batch(
    cl: &mut Cluster<'_>,
    product: &str,
    batch: &[TracePod],
    kind: SolverKind,
) -> Result<Vec<bool>, SimError> {
    let model = cl.model;
    let mut nodes: Vec<Node> = (0..cl.nodes.len())
        .map(|n| Node {
            name: format!("n{n}"),
            schedulable: true,
            ..Default::default()
        })
        .collect();
    let mut running = Vec::new();
    for (g, (n, layout, _)) in cl.gpus.iter().enumerate() {
        let index = nodes[*n].gpus.len() as u32;
        // Every instance that exists is in use (instances are only created for pods).
        nodes[*n]
            .gpus
            .push(crate::snapshot_gpu(model, product, index, layout, |i| {
                let pod = format!("g{g}-{}", i.start);
                running.push(RunningPod {
                    namespace: "sim".into(),
                    name: pod.clone(),
                    ..Default::default()
                });
                Some(pod)
            }));
    }
    let snapshot = Snapshot {
        nodes,
        pending_pods: batch
            .iter()
            .enumerate()
            .map(|(i, p)| PendingPod {
                namespace: "sim".into(),
                name: format!("p{i}"),
                requests: [(format!("nvidia.com/mig-{}", p.profile), i64::from(p.count))].into(),
                created: Some(format!("{i:08}")),
                ..Default::default()
            })
            .collect(),
        running_pods: running,
        ..Default::default()
    };
    let mut policy = Policy {
        backend: Backend::Nvml,
        ..Default::default()
    };
    policy.solver.kind = kind;
    policy.solver.time_limit_ms = 2_000;
    let plan = mig_planner::plan(&snapshot, &policy);
    let node_members = cl.nodes.clone();
    let gpu_of = |node: &str, index: u32| -> Option<usize> {
        let n: usize = node.strip_prefix('n')?.parse().ok()?;
        node_members.get(n)?.get(index as usize).copied()
    };
    let mut placed = vec![false; batch.len()];
    for pp in &plan.pods {
        let PodOutcome::Fits { node, instances, .. } = &pp.outcome else {
            continue;
        };
        let Some(i) = pp.name.strip_prefix('p').and_then(|i| i.parse::<usize>().ok()) else {
            continue;
        };
        let mut takes = Vec::new();
        for inst in instances {
            let g = gpu_of(node, inst.gpu)
                .ok_or_else(|| SimError::Config(format!("plan names an unknown GPU {node}/{}", inst.gpu)))?;
            let q = cl.profile(&inst.instance.profile)?;
            takes.push((g, Instance::new(q, inst.instance.start)));
        }
        for (g, instance) in takes {
            let next = cl.gpus[g].1.with(instance);
            if !model.is_valid(&next) {
                return Err(SimError::Config(format!(
                    "the plan's instance {} does not fit GPU {g} ({})",
                    model.format_instance(&instance),
                    model.format_layout(&cl.gpus[g].1)
                )));
            }
            cl.take(g, instance);
        }
        placed[i] = true;
    }
    Ok(placed)
}

/// GPUs per node from an openb node list (`sn,cpu_milli,memory_mib,gpu,model`); CPU-only nodes are
/// skipped.
pub fn parse_openb_nodes(file: &str, text: &str) -> Result<Vec<usize>, crate::trace::TraceError> {
    let err = |line: usize, message: String| crate::trace::TraceError {
        file: file.into(),
        line,
        message,
    };
    let mut lines = text.lines().enumerate();
    let header: Vec<&str> = lines
        .next()
        .map(|(_, h)| h.trim().split(',').collect())
        .unwrap_or_default();
    let c = header
        .iter()
        .position(|h| *h == "gpu")
        .ok_or_else(|| err(1, "no column \"gpu\" (an openb node list is needed)".into()))?;
    let mut out = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let v = line.trim().split(',').nth(c).unwrap_or("");
        let n: usize = v
            .parse()
            .map_err(|_| err(i + 1, format!("gpu {v:?} is not a count")))?;
        if n > 0 {
            out.push(n);
        }
    }
    Ok(out)
}

/// FGD's published curves: per (workload, policy), the mean over seeds of each arrived % column of
/// `analysis_allo_discrete.csv`.
pub fn parse_fgd_results(text: &str) -> BTreeMap<(String, String), Vec<Option<f64>>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let first = header.iter().position(|h| *h == "0").unwrap_or(header.len());
    let mut sums: BTreeMap<(String, String), Vec<(f64, u32)>> = BTreeMap::new();
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < first {
            continue;
        }
        let key = (f[0].to_string(), f[1].to_string());
        let row = sums
            .entry(key)
            .or_insert_with(|| vec![(0.0, 0); header.len() - first]);
        for (k, v) in f[first..].iter().enumerate() {
            if let (Some(slot), Ok(x)) = (row.get_mut(k), v.parse::<f64>()) {
                slot.0 += x;
                slot.1 += 1;
            }
        }
    }
    sums.into_iter()
        .map(|(k, v)| {
            (
                k,
                v.into_iter()
                    .map(|(s, n)| (n > 0).then(|| s / f64::from(n)))
                    .collect(),
            )
        })
        .collect()
}
