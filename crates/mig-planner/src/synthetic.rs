//! Deterministic synthetic clusters for benchmarks, demos and tests: A100-80GB and H100-80GB nodes
//! with 8 GPUs each, a share of their slices in use, and pending pods with an openb-like size mix.

use std::collections::BTreeMap;

use mig_catalog::{Catalog, Layout};

use crate::snapshot::{Gpu, GpuInstance, Node, PendingPod, RunningPod, Snapshot};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Shape of a synthetic cluster.
#[derive(Clone, Debug)]
pub struct FleetSpec {
    /// GPUs (rounded up to whole nodes of 8).
    pub gpus: usize,
    /// Pending pods.
    pub pending: usize,
    /// Share of GPUs with pods on them.
    pub busy_gpu_share: f64,
    /// Seed.
    pub seed: u64,
}

/// Profiles pending pods ask for, with weights (a MIG rendering of the openb size mix: mostly small).
const MIX: [(&str, u32); 5] = [
    ("1g.10gb", 40),
    ("2g.20gb", 25),
    ("3g.40gb", 20),
    ("4g.40gb", 10),
    ("7g.80gb", 5),
];

/// Build the cluster. On busy GPUs every instance but one in three is in use, so overall 25–60% of
/// the memory slices are in use for `busy_gpu_share` between 0.4 and 0.8.
pub fn fleet(spec: &FleetSpec) -> Snapshot {
    let catalog = Catalog::embedded();
    let mut rng = Rng(spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let models = ["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"];
    let mut s = Snapshot::default();
    let nodes = spec.gpus.div_ceil(8);
    let mut run = 0usize;
    for n in 0..nodes {
        let product = models[n % 2];
        let model = catalog
            .by_product_label(product)
            .unwrap_or_else(|_| unreachable!("known product"));
        let maximal: Vec<&Layout> = model
            .maximal_layouts()
            .filter(|l| {
                l.instances()
                    .iter()
                    .all(|i| model.profile(i.profile).is_some_and(|p| !p.media_extensions))
            })
            .collect();
        let mut labels = BTreeMap::new();
        labels.insert("kubernetes.io/hostname".to_string(), format!("gpu-{n:05}"));
        labels.insert("nvidia.com/gpu.product".to_string(), product.to_string());
        labels.insert(
            "topology.kubernetes.io/zone".to_string(),
            format!("zone-{}", n % 3),
        );
        let mut gpus = Vec::new();
        for index in 0..8u32 {
            let busy = rng.unit() < spec.busy_gpu_share;
            let layout = maximal[rng.below(maximal.len())];
            let mut instances = Vec::new();
            for i in layout.instances() {
                let mut pods = Vec::new();
                let mut utilization = None;
                if busy && rng.below(3) != 0 {
                    run += 1;
                    let key = format!("serving/run-{run}");
                    pods.push(key.clone());
                    utilization = Some(rng.unit());
                    s.running_pods.push(RunningPod {
                        namespace: "serving".into(),
                        name: format!("run-{run}"),
                        priority: if rng.below(4) == 0 { 100 } else { 0 },
                        ..Default::default()
                    });
                }
                instances.push(GpuInstance {
                    profile: model.profile_name(i.profile),
                    start: i.start,
                    pods,
                    utilization,
                });
            }
            gpus.push(Gpu {
                index,
                product: product.to_string(),
                mig_enabled: true,
                unknown: None,
                instances,
            });
        }
        s.nodes.push(Node {
            name: format!("gpu-{n:05}"),
            labels,
            taints: Vec::new(),
            schedulable: true,
            frozen: false,
            unobserved: None,
            gpus,
        });
    }
    let total: u32 = MIX.iter().map(|(_, w)| w).sum();
    for p in 0..spec.pending {
        let mut pick = rng.below(total as usize) as u32;
        let profile = MIX
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map_or("1g.10gb", |(n, _)| n);
        let mut requests = BTreeMap::new();
        requests.insert(
            format!("nvidia.com/mig-{profile}"),
            if rng.below(20) == 0 { 2 } else { 1 },
        );
        let mut node_selector = BTreeMap::new();
        if rng.below(10) == 0 {
            node_selector.insert(
                "topology.kubernetes.io/zone".to_string(),
                format!("zone-{}", rng.below(3)),
            );
        }
        s.pending_pods.push(PendingPod {
            namespace: "ml".into(),
            name: format!("job-{p}"),
            priority: if rng.below(5) == 0 { 100 } else { 0 },
            requests,
            node_selector,
            created: Some(format!("2026-11-22T10:{:02}:{:02}Z", (p / 60) % 60, p % 60)),
            ..Default::default()
        });
    }
    s
}

/// Share of memory slices in use by running pods.
pub fn used_share(s: &Snapshot) -> f64 {
    let catalog = Catalog::embedded();
    let (mut used, mut all) = (0u32, 0u32);
    for g in s.nodes.iter().flat_map(|n| &n.gpus) {
        let Ok(model) = catalog.lookup(&g.product) else {
            continue;
        };
        all += u32::from(model.memory_slices);
        for i in g.instances.iter().filter(|i| !i.pods.is_empty()) {
            used += model
                .profile_by_name(&i.profile)
                .and_then(|p| model.profile(p))
                .map_or(0, |p| u32::from(p.memory_slices));
        }
    }
    if all == 0 {
        0.0
    } else {
        f64::from(used) / f64::from(all)
    }
}
