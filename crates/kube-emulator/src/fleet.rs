//! The default fleet of the standalone mode and the demo: A100-80GB and H100-80GB nodes on NVIDIA's
//! `all-balanced` MIG config, and a mig-parted ConfigMap for mig-manager.

use serde_json::{Value, json};

use crate::cluster::{ClusterSpec, GpuSpec, MIG_CONFIG_LABEL, NodeSpec};

/// All-balanced on the 80GB A100/H100: 2 x 1g.10gb, 1 x 2g.20gb, 1 x 3g.40gb.
pub const ALL_BALANCED_80GB: &str = "1g.10gb@0,1g.10gb@1,2g.20gb@2,3g.40gb@4";

/// `nodes` nodes alternating A100-80GB and H100-80GB with `gpus` GPUs each, all on `all-balanced`.
pub fn default_spec(nodes: usize, gpus: usize) -> ClusterSpec {
    spec(
        nodes,
        gpus,
        &["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"],
        2_000,
    )
}

/// `nodes` nodes of `gpus` GPUs each, node i of `products[i % len]`, every GPU on NVIDIA's
/// `all-balanced` (labelled so); mig-manager takes `mig_manager_delay_ms` per apply.
pub fn spec(nodes: usize, gpus: usize, products: &[&str], mig_manager_delay_ms: u64) -> ClusterSpec {
    ClusterSpec {
        nodes: (0..nodes)
            .map(|i| NodeSpec {
                name: format!("gpu-node-{i}"),
                labels: [(MIG_CONFIG_LABEL.to_string(), "all-balanced".to_string())]
                    .into_iter()
                    .collect(),
                gpus: (0..gpus)
                    .map(|_| GpuSpec {
                        product: products[i % products.len().max(1)].into(),
                        layout: ALL_BALANCED_80GB.into(),
                    })
                    .collect(),
            })
            .collect(),
        mig_parted_config_map: "gpu-operator/default-mig-parted-config".into(),
        mig_manager_delay_ms,
        device_plugin_pods: false,
    }
}

/// The GPU operator's ConfigMap with the `all-*` configs of the 80GB A100/H100.
pub fn default_mig_parted_config_map() -> Value {
    let mut configs = String::from("version: v1\nmig-configs:\n");
    configs.push_str("  all-balanced:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {\"1g.10gb\": 2, \"2g.20gb\": 1, \"3g.40gb\": 1}\n");
    for (profile, n) in [
        ("1g.10gb", 7),
        ("1g.20gb", 4),
        ("2g.20gb", 3),
        ("3g.40gb", 2),
        ("4g.40gb", 1),
        ("7g.80gb", 1),
    ] {
        configs.push_str(&format!("  all-{profile}:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {{\"{profile}\": {n}}}\n"));
    }
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "default-mig-parted-config", "namespace": "gpu-operator"},
        "data": {"config.yaml": configs},
    })
}
