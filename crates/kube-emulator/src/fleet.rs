//! The default fleet of the standalone mode: MIG nodes as GPU Feature Discovery and the device
//! plugin (mixed strategy) label and advertise them.

use serde_json::{Value, json};

/// One node type of the default fleet.
struct NodeType {
    product: &'static str,
    memory_mib: u64,
    /// `all-balanced` instances per GPU: (profile, count).
    balanced: &'static [(&'static str, u64)],
}

const TYPES: [NodeType; 2] = [
    NodeType {
        product: "NVIDIA-A100-SXM4-80GB",
        memory_mib: 81_920,
        balanced: &[("1g.10gb", 2), ("2g.20gb", 1), ("3g.40gb", 1)],
    },
    NodeType {
        product: "NVIDIA-H100-80GB-HBM3",
        memory_mib: 81_559,
        balanced: &[("1g.10gb", 2), ("2g.20gb", 1), ("3g.40gb", 1)],
    },
];

/// `nodes` nodes alternating A100-80GB and H100-80GB, `gpus` GPUs each, all on NVIDIA's
/// `all-balanced` MIG config, with the labels GFD and mig-manager set and the allocatable
/// `nvidia.com/mig-*` resources the device plugin advertises.
pub fn default_nodes(nodes: usize, gpus: u64) -> Vec<Value> {
    (0..nodes)
        .map(|i| {
            let t = &TYPES[i % TYPES.len()];
            let name = format!("gpu-node-{i}");
            let mut resources = json!({"cpu": "64", "memory": "512Gi", "pods": "110"});
            for (profile, n) in t.balanced {
                resources[format!("nvidia.com/mig-{profile}")] = json!((n * gpus).to_string());
            }
            json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "nvidia.com/gpu.product": t.product,
                        "nvidia.com/gpu.count": gpus.to_string(),
                        "nvidia.com/gpu.memory": t.memory_mib.to_string(),
                        "nvidia.com/mig.capable": "true",
                        "nvidia.com/mig.strategy": "mixed",
                        "nvidia.com/mig.config": "all-balanced",
                        "nvidia.com/mig.config.state": "success",
                    },
                },
                "spec": {},
                "status": {
                    "capacity": resources.clone(),
                    "allocatable": resources,
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            })
        })
        .collect()
}
