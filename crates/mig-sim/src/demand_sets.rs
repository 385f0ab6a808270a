//! ParvaGPU's demand sets (SC '24): six SLO scenarios for which ParvaGPU published its own A100-80GB
//! deployment (2, 3, 5, 7, 13, 16 GPUs). Each deployment row is one MIG instance serving a model;
//! the multiset of instance sizes is the demand. We hand that demand to the planner as pending pods
//! on idle GPUs (MIG on, no instances) and count the GPUs its plan uses.
//!
//! ParvaGPU's `Placement` column is its own slot index, not an NVML start (read as starts, most of
//! its GPUs would overlap; see ../shared/traces/README.md §4), so its layouts are compared as
//! multisets of sizes, and our catalog chooses placements.

use std::time::Instant;

use mig_catalog::{Catalog, Counts};
use mig_planner::snapshot::{Gpu, Node, PendingPod};
use mig_planner::{Policy, Snapshot, SolverKind};

use crate::SimError;
use crate::trace::{TraceError, profile_for_size};

/// Memory slices (of 8) an instance of `gpcs` compute slices takes on an A100/H100-80GB.
fn memory_slices(gpcs: u8) -> u32 {
    match gpcs {
        3 | 4 => 4,
        7 => 8,
        g => u32::from(g),
    }
}

/// One scenario: the instances ParvaGPU deployed and how it laid them out.
#[derive(Clone, Debug, PartialEq)]
pub struct DemandSet {
    /// Scenario name (`SLO1`).
    pub name: String,
    /// (DNN model, instance size in compute slices), one per MIG instance.
    pub instances: Vec<(String, u8)>,
    /// ParvaGPU's GPUs, each as its instance sizes (largest first).
    pub parva_gpus: Vec<Vec<u8>>,
}

impl DemandSet {
    /// Compute slices asked for.
    pub fn compute_slices(&self) -> u32 {
        self.instances.iter().map(|(_, g)| u32::from(*g)).sum()
    }

    /// No plan can use fewer GPUs: by compute slices (7 per GPU) and memory slices (8 per GPU).
    pub fn lower_bound(&self) -> usize {
        let memory: u32 = self.instances.iter().map(|(_, g)| memory_slices(*g)).sum();
        self.compute_slices().div_ceil(7).max(memory.div_ceil(8)) as usize
    }
}

/// Read `SLO<i>_ParvaGPU_deploy.csv` (`Num instance,Num GPU,Model,Placement,Instance size,...`).
pub fn parse_parvagpu_deploy(name: &str, text: &str) -> Result<DemandSet, TraceError> {
    let err = |line: usize, message: String| TraceError {
        file: name.to_string(),
        line,
        message,
    };
    let mut lines = text.lines().enumerate();
    let header: Vec<&str> = lines
        .next()
        .map(|(_, h)| h.split(',').map(str::trim).collect())
        .unwrap_or_default();
    let col = |want: &str| {
        header
            .iter()
            .position(|h| *h == want)
            .ok_or_else(|| err(1, format!("no column {want:?}")))
    };
    let (node, gpu, model, size) = (
        col("Num instance")?,
        col("Num GPU")?,
        col("Model")?,
        col("Instance size")?,
    );
    let mut set = DemandSet {
        name: name.to_string(),
        instances: Vec::new(),
        parva_gpus: Vec::new(),
    };
    let mut gpus: std::collections::BTreeMap<(u32, u32), Vec<u8>> = Default::default();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let field = |c: usize| {
            f.get(c)
                .copied()
                .ok_or_else(|| err(i + 1, format!("missing column {}", header[c])))
        };
        let number = |c: usize| -> Result<u32, TraceError> {
            let v = field(c)?;
            v.parse()
                .map_err(|_| err(i + 1, format!("{}: {v:?} is not a number", header[c])))
        };
        let gpcs = number(size)?;
        let gpcs = u8::try_from(gpcs)
            .ok()
            .filter(|g| profile_for_size(*g).is_some())
            .ok_or_else(|| err(i + 1, format!("instance size {gpcs} is not 1, 2, 3, 4 or 7")))?;
        set.instances.push((field(model)?.to_string(), gpcs));
        gpus.entry((number(node)?, number(gpu)?)).or_default().push(gpcs);
    }
    set.parva_gpus = gpus
        .into_values()
        .map(|mut v| {
            v.sort_unstable_by(|a, b| b.cmp(a));
            v
        })
        .collect();
    Ok(set)
}

/// Whether a multiset of instance sizes fits on one GPU of `product` at some valid placement.
pub fn fits_one_gpu(product: &str, sizes: &[u8]) -> Result<bool, SimError> {
    let model = Catalog::embedded()
        .lookup(product)
        .map_err(|e| SimError::Config(e.to_string()))?;
    let mut counts = Counts::zero(model.profiles.len());
    for g in sizes {
        let name = profile_for_size(*g).ok_or_else(|| SimError::Config(format!("size {g}")))?;
        let idx = model
            .profile_by_name(name)
            .ok_or_else(|| SimError::Config(format!("{product} has no {name}")))?;
        counts.0[usize::from(idx.0)] += 1;
    }
    Ok(model
        .arrange_around(&mig_catalog::Layout::new([]), &counts)
        .is_ok())
}

/// What the planner made of one demand set.
#[derive(Clone, Debug)]
pub struct PackResult {
    /// Scenario.
    pub name: String,
    /// Instances asked for.
    pub instances: usize,
    /// Compute slices asked for.
    pub compute_slices: u32,
    /// GPUs ParvaGPU's plan uses.
    pub parva_gpus: usize,
    /// max(⌈compute/7⌉, ⌈memory/8⌉).
    pub lower_bound: usize,
    /// GPUs the plan configures.
    pub gpus_used: usize,
    /// Instances the plan places.
    pub placed: usize,
    /// `highs`, `greedy`, …: whose decision the plan follows, and its status.
    pub solver: String,
    /// Plan time, ms.
    pub millis: f64,
    /// The plan's layouts of used GPUs, as sizes (largest first).
    pub layouts: Vec<Vec<u8>>,
}

/// Plan a demand set on `gpus` idle GPUs of `product` (8 per node) with the given solver.
pub fn pack(set: &DemandSet, product: &str, gpus: usize, kind: SolverKind) -> Result<PackResult, SimError> {
    let model = Catalog::embedded()
        .lookup(product)
        .map_err(|e| SimError::Config(e.to_string()))?;
    let nodes: Vec<Node> = (0..gpus.div_ceil(8))
        .map(|n| Node {
            name: format!("node-{n}"),
            schedulable: true,
            gpus: (0..8.min(gpus - 8 * n))
                .map(|i| Gpu {
                    index: i as u32,
                    product: product.to_string(),
                    mig_enabled: true,
                    unknown: None,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    let pending_pods = set
        .instances
        .iter()
        .enumerate()
        .map(|(i, (dnn, g))| PendingPod {
            namespace: set.name.to_lowercase(),
            name: format!("{dnn}-{i}"),
            requests: [(
                format!("nvidia.com/mig-{}", profile_for_size(*g).unwrap_or("7g.80gb")),
                1,
            )]
            .into(),
            ..Default::default()
        })
        .collect();
    let snapshot = Snapshot {
        nodes,
        pending_pods,
        ..Default::default()
    };
    let mut policy = Policy::default();
    policy.solver.kind = kind;
    let clock = Instant::now();
    let plan = mig_planner::plan(&snapshot, &policy);
    let millis = clock.elapsed().as_secs_f64() * 1000.0;
    let mut layouts = Vec::new();
    for g in plan.gpus.iter().filter(|g| g.changed) {
        let layout = model
            .parse_layout(&g.target)
            .map_err(|e| SimError::Config(format!("the plan's layout {:?}: {e}", g.target)))?;
        let mut sizes: Vec<u8> = layout
            .instances()
            .iter()
            .filter_map(|i| model.profile(i.profile))
            .map(|p| p.compute_slices)
            .collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        layouts.push(sizes);
    }
    layouts.sort();
    Ok(PackResult {
        name: set.name.clone(),
        instances: set.instances.len(),
        compute_slices: set.compute_slices(),
        parva_gpus: set.parva_gpus.len(),
        lower_bound: set.lower_bound(),
        gpus_used: layouts.len(),
        placed: plan
            .pods
            .iter()
            .filter(|p| matches!(p.outcome, mig_planner::PodOutcome::Fits { .. }))
            .count(),
        solver: format!("{} {}", plan.solver.used, plan.solver.status),
        millis,
        layouts,
    })
}
