//! Snapshot builders and a seeded random generator of small clusters.

use std::collections::BTreeMap;

use mig_catalog::Catalog;
use mig_planner::snapshot::{Gpu, GpuInstance, Node, PendingPod, RunningPod};
use mig_planner::{Backend, DrainPolicy, Policy, Snapshot};

/// xorshift64*: small, seedable, good enough for test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// A GPU from a product and `(profile, start, pod)` triples.
pub fn gpu(index: u32, product: &str, instances: &[(&str, u8, Option<&str>)]) -> Gpu {
    Gpu {
        index,
        product: product.into(),
        mig_enabled: true,
        unknown: None,
        instances: instances
            .iter()
            .map(|(p, s, pod)| GpuInstance {
                profile: (*p).into(),
                start: *s,
                pods: pod.map(|x| vec![x.to_string()]).unwrap_or_default(),
                utilization: None,
            })
            .collect(),
    }
}

pub fn node(name: &str, labels: &[(&str, &str)], gpus: Vec<Gpu>) -> Node {
    Node {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        taints: Vec::new(),
        schedulable: true,
        frozen: false,
        unobserved: None,
        gpus,
    }
}

pub fn pending(name: &str, priority: i32, requests: &[(&str, i64)]) -> PendingPod {
    PendingPod {
        namespace: "ml".into(),
        name: name.into(),
        priority,
        requests: requests
            .iter()
            .map(|(p, n)| (format!("nvidia.com/mig-{p}"), *n))
            .collect(),
        ..Default::default()
    }
}

pub fn running(key: &str, priority: i32) -> RunningPod {
    let (ns, name) = key.split_once('/').unwrap();
    RunningPod {
        namespace: ns.into(),
        name: name.into(),
        priority,
        ..Default::default()
    }
}

const MODELS: [&str; 3] = ["a30-24gb", "a100-80gb", "h100-80gb"];

/// A random small cluster: `max_gpus` GPUs at most over 1–3 nodes, some instances in use, up to
/// `max_pods` pending pods asking for profiles of the models present (sometimes with a zone selector).
pub fn random_snapshot(rng: &mut Rng, max_gpus: usize, max_pods: usize, drain: bool) -> Snapshot {
    let catalog = Catalog::embedded();
    let mut s = Snapshot::default();
    let n_nodes = 1 + rng.below(3);
    let mut gpus_left = max_gpus.max(1);
    let mut run = 0;
    let mut profile_names: Vec<String> = Vec::new();
    for ni in 0..n_nodes {
        if gpus_left == 0 {
            break;
        }
        let k = 1 + rng.below(gpus_left.min(2));
        gpus_left -= k;
        let zone = if rng.chance(50) { "a" } else { "b" };
        let mut gpus = Vec::new();
        for gi in 0..k {
            let model = catalog.model(MODELS[rng.below(MODELS.len())]).unwrap();
            profile_names.extend(
                model
                    .profiles
                    .iter()
                    .filter(|p| !p.media_extensions)
                    .map(|p| p.name.clone()),
            );
            let label = model.product_labels().next().unwrap().to_string();
            let layouts = model.layouts();
            let layout = if rng.chance(25) {
                mig_catalog::Layout::empty()
            } else {
                layouts[rng.below(layouts.len())].clone()
            };
            let mut insts = Vec::new();
            for i in layout.instances() {
                let pod = if rng.chance(30) {
                    run += 1;
                    let key = format!("run/p{run}");
                    s.running_pods.push(running(&key, [0, 10][rng.below(2)]));
                    if drain && rng.chance(20) {
                        s.running_pods.last_mut().unwrap().do_not_disrupt = true;
                    }
                    vec![key]
                } else {
                    Vec::new()
                };
                let utilization = if rng.chance(50) {
                    Some((rng.below(100) as f64) / 100.0)
                } else {
                    None
                };
                insts.push(GpuInstance {
                    profile: model.profile_name(i.profile),
                    start: i.start,
                    pods: pod,
                    utilization,
                });
            }
            gpus.push(Gpu {
                index: gi as u32,
                product: label,
                mig_enabled: true,
                unknown: None,
                instances: insts,
            });
        }
        s.nodes.push(node(&format!("n{ni}"), &[("zone", zone)], gpus));
    }
    profile_names.sort();
    profile_names.dedup();
    for pi in 0..(1 + rng.below(max_pods.max(1))) {
        let mut requests = BTreeMap::new();
        let p = &profile_names[rng.below(profile_names.len())];
        requests.insert(format!("nvidia.com/mig-{p}"), if rng.chance(20) { 2 } else { 1 });
        if rng.chance(15) {
            let q = &profile_names[rng.below(profile_names.len())];
            requests.insert(format!("nvidia.com/mig-{q}"), 1);
        }
        let mut pod = PendingPod {
            namespace: "ml".into(),
            name: format!("pod{pi}"),
            priority: [0, 10, 20][rng.below(3)],
            requests,
            ..Default::default()
        };
        if rng.chance(30) {
            pod.node_selector.insert(
                "zone".into(),
                if rng.chance(50) { "a".into() } else { "b".into() },
            );
        }
        s.pending_pods.push(pod);
    }
    if drain {
        s.pdbs.push(mig_planner::snapshot::Pdb {
            namespace: "run".into(),
            name: "guard".into(),
            disruptions_allowed: rng.below(2) as u32,
        });
        for r in &mut s.running_pods {
            if rng.chance(30) {
                r.pdbs.push("run/guard".into());
            }
        }
    }
    s
}

pub fn random_policy(rng: &mut Rng, drain: bool) -> Policy {
    let mut p = Policy {
        backend: if rng.chance(50) {
            Backend::MigManager
        } else {
            Backend::Nvml
        },
        ..Default::default()
    };
    if drain {
        p.drain = [
            DrainPolicy::Never,
            DrainPolicy::IdleOrLowPriority,
            DrainPolicy::Allowed,
        ][rng.below(3)];
        p.low_priority_below = 10;
        p.budgets.max_evictions = [None, Some(0), Some(1), Some(3)][rng.below(4)];
    }
    p.budgets.max_nodes_changed = [None, None, Some(0), Some(1)][rng.below(4)];
    p
}
