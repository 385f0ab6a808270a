//! The simulated scheduler, kubelet/device plugin and mig-manager, seen through the real kube-rs client.

#![allow(clippy::unwrap_used)] // Tests fail loudly on unexpected input.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use kube_emulator::{Cluster, ClusterSpec, Config, GpuSpec, NodeSpec, Running};
use serde_json::json;

const CONFIG: &str = r#"
version: v1
mig-configs:
  all-1g.10gb:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.10gb": 7}
  all-3g.40gb:
    - devices: all
      mig-enabled: true
      mig-devices: {"3g.40gb": 2}
"#;

const SEVEN_1G: &str = "1g.10gb@0,1g.10gb@1,1g.10gb@2,1g.10gb@3,1g.10gb@4,1g.10gb@5,1g.10gb@6";

async fn start(
    nodes: Vec<NodeSpec>,
) -> (
    Running,
    std::sync::Arc<Cluster>,
    tokio::task::JoinHandle<()>,
    Client,
) {
    let server = Running::start("127.0.0.1:0".parse().unwrap(), Config::default())
        .await
        .unwrap();
    let spec = ClusterSpec {
        nodes,
        mig_parted_config_map: "gpu-operator/default-mig-parted-config".into(),
        mig_manager_delay_ms: 100,
        device_plugin_pods: false,
    };
    let cluster = Cluster::new(server.state.clone(), &spec).unwrap();
    let actors = cluster.spawn();
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.default_retry = false;
    let client = Client::try_from(config).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "gpu-operator");
    let cm: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "default-mig-parted-config"}, "data": {"config.yaml": CONFIG}}),
    )
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    (server, cluster, actors, client)
}

fn a100_node(name: &str, layout: &str, labels: &[(&str, &str)]) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        gpus: vec![GpuSpec {
            product: "NVIDIA-A100-SXM4-80GB".into(),
            layout: layout.into(),
        }],
    }
}

fn mig_pod(name: &str, profile: &str, extra: serde_json::Value) -> Pod {
    let mut v = json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "x", "resources": {"limits": {format!("nvidia.com/mig-{profile}"): "1"}}}]},
    });
    if let Some(spec) = extra.as_object() {
        for (k, x) in spec {
            v["spec"][k] = x.clone();
        }
    }
    serde_json::from_value(v).unwrap()
}

async fn eventually<F: Fn() -> Fut, Fut: std::future::Future<Output = bool>>(what: &str, f: F) {
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn set_mig_config(nodes: &Api<Node>, node: &str, config: &str) {
    let patch = json!({"metadata": {"labels": {"nvidia.com/mig.config": config}}});
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

async fn wait_state(nodes: &Api<Node>, node: &str, state: &str) {
    eventually(&format!("{node} mig.config.state={state}"), || async {
        nodes
            .get(node)
            .await
            .unwrap()
            .labels()
            .get("nvidia.com/mig.config.state")
            .map(String::as_str)
            == Some(state)
    })
    .await;
}

async fn node_of(pods: &Api<Pod>, name: &str) -> Option<String> {
    pods.get(name).await.ok()?.spec?.node_name
}

#[tokio::test]
async fn a_pod_waits_for_its_profile_and_binds_after_mig_manager_reconfigures() {
    let (server, cluster, actors, client) = start(vec![a100_node(
        "n1",
        SEVEN_1G,
        &[("nvidia.com/mig.config", "all-1g.10gb")],
    )])
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ml");
    let nodes: Api<Node> = Api::all(client.clone());

    // The device plugin advertises what the layout has.
    eventually("allocatable", || async {
        nodes
            .get("n1")
            .await
            .unwrap()
            .status
            .unwrap()
            .allocatable
            .unwrap()
            .get("nvidia.com/mig-1g.10gb")
            .map(|q| q.0.clone())
            == Some("7".into())
    })
    .await;
    pods.create(&PostParams::default(), &mig_pod("big", "3g.40gb", json!({})))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &mig_pod("small", "1g.10gb", json!({})))
        .await
        .unwrap();
    eventually("small binds", || async {
        node_of(&pods, "small").await.as_deref() == Some("n1")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let big = pods.get("big").await.unwrap();
    assert!(big.spec.unwrap().node_name.is_none(), "no 3g.40gb exists yet");
    assert_eq!(big.status.unwrap().phase.as_deref(), Some("Pending"));

    // A changed GPU still in use: mig-manager fails and changes nothing.
    set_mig_config(&nodes, "n1", "all-3g.40gb").await;
    wait_state(&nodes, "n1", "failed").await;
    assert_eq!(cluster.gpus("n1")[0].layout.len(), 7);

    // Free the GPU, ask again: pending, then success, then the 3g pod binds.
    // Deleting with a grace period leaves the pod terminating, holding its instance, until the kubelet
    // removes it.
    pods.delete("small", &DeleteParams::default().grace_period(1))
        .await
        .unwrap();
    assert!(
        pods.get("small")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );
    eventually("small is gone", || async { pods.get("small").await.is_err() }).await;
    set_mig_config(&nodes, "n1", "all-1g.10gb").await;
    wait_state(&nodes, "n1", "success").await;
    set_mig_config(&nodes, "n1", "all-3g.40gb").await;
    wait_state(&nodes, "n1", "pending").await;
    wait_state(&nodes, "n1", "success").await;
    let gpu = &cluster.gpus("n1")[0];
    assert_eq!(gpu.model.format_layout(&gpu.layout), "3g.40gb@0,3g.40gb@4");
    eventually("big binds", || async {
        node_of(&pods, "big").await.as_deref() == Some("n1")
    })
    .await;
    let alloc = nodes
        .get("n1")
        .await
        .unwrap()
        .status
        .unwrap()
        .allocatable
        .unwrap();
    assert_eq!(alloc["nvidia.com/mig-3g.40gb"].0, "2");
    assert_eq!(alloc["nvidia.com/mig-1g.10gb"].0, "0");
    actors.abort();
    server.stop().await;
}

#[tokio::test]
async fn the_scheduler_honours_selectors_taints_and_capacity() {
    let (server, _cluster, actors, client) = start(vec![
        a100_node("a", "3g.40gb@0,3g.40gb@4", &[("zone", "a")]),
        a100_node("b", "3g.40gb@0,3g.40gb@4", &[("zone", "b")]),
    ])
    .await;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"taints": [{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]}}),
            ),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ml");
    pods.create(
        &PostParams::default(),
        &mig_pod("to-b", "3g.40gb", json!({"nodeSelector": {"zone": "b"}})),
    )
    .await
    .unwrap();
    pods.create(&PostParams::default(), &mig_pod("tolerant-a", "3g.40gb", json!({"nodeSelector": {"zone": "a"}, "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "x", "effect": "NoSchedule"}]}))).await.unwrap();
    pods.create(
        &PostParams::default(),
        &mig_pod("intolerant-a", "3g.40gb", json!({"nodeSelector": {"zone": "a"}})),
    )
    .await
    .unwrap();
    eventually("bindings", || async {
        node_of(&pods, "to-b").await.is_some() && node_of(&pods, "tolerant-a").await.is_some()
    })
    .await;
    assert_eq!(node_of(&pods, "to-b").await.as_deref(), Some("b"));
    assert_eq!(node_of(&pods, "tolerant-a").await.as_deref(), Some("a"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(node_of(&pods, "intolerant-a").await, None);
    // Capacity: b has one 3g left; two more pods, one binds.
    pods.create(
        &PostParams::default(),
        &mig_pod("x1", "3g.40gb", json!({"nodeSelector": {"zone": "b"}})),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &mig_pod("x2", "3g.40gb", json!({"nodeSelector": {"zone": "b"}})),
    )
    .await
    .unwrap();
    eventually("x1 binds", || async { node_of(&pods, "x1").await.is_some() }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(node_of(&pods, "x2").await, None, "no 3g.40gb left on b");
    actors.abort();
    server.stop().await;
}

#[tokio::test]
async fn eviction_grace_injected_failures_and_reboots() {
    let (server, cluster, actors, client) = start(vec![a100_node(
        "n1",
        "3g.40gb@0,3g.40gb@4",
        &[("nvidia.com/mig.config", "all-3g.40gb")],
    )])
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ml");
    let nodes: Api<Node> = Api::all(client.clone());
    let mut graceful = mig_pod("graceful", "3g.40gb", json!({"terminationGracePeriodSeconds": 1}));
    graceful.metadata.labels = Some([("app".to_string(), "x".to_string())].into_iter().collect());
    pods.create(&PostParams::default(), &graceful).await.unwrap();
    pods.create(&PostParams::default(), &mig_pod("other", "3g.40gb", json!({})))
        .await
        .unwrap();
    eventually("both bound", || async {
        node_of(&pods, "graceful").await.is_some() && node_of(&pods, "other").await.is_some()
    })
    .await;
    pods.create(&PostParams::default(), &mig_pod("third", "3g.40gb", json!({})))
        .await
        .unwrap();

    // Evicted with a grace period, under a PDB allowing one disruption: terminating, still holding
    // its instance, then gone; then "third" binds.
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "ml");
    let pdb = json!({
        "metadata": {"name": "x"},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "x"}}},
        "status": {"observedGeneration": 1, "disruptionsAllowed": 1, "currentHealthy": 1, "desiredHealthy": 0, "expectedPods": 1}
    });
    pdbs.create(&PostParams::default(), &serde_json::from_value(pdb).unwrap())
        .await
        .unwrap();
    let allowed = || async { pdbs.get("x").await.unwrap().status.unwrap().disruptions_allowed };
    pods.evict("graceful", &kube::api::EvictParams::default())
        .await
        .unwrap();
    let p = pods.get("graceful").await.unwrap();
    assert!(p.metadata.deletion_timestamp.is_some());
    assert_eq!(allowed().await, Some(0));
    // Evicting it again while it terminates spends no disruption (the real server's canIgnorePDB).
    pods.evict("graceful", &kube::api::EvictParams::default())
        .await
        .unwrap();
    assert_eq!(allowed().await, Some(0));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        node_of(&pods, "third").await,
        None,
        "the instance is held until the pod is gone"
    );
    eventually("graceful gone", || async { pods.get("graceful").await.is_err() }).await;
    eventually("third binds", || async {
        node_of(&pods, "third").await.is_some()
    })
    .await;

    // An injected mig-manager failure is visible as state=failed; the next change succeeds.
    pods.delete("other", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    pods.delete("third", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    cluster.fail_next_applies(1);
    set_mig_config(&nodes, "n1", "all-1g.10gb").await;
    wait_state(&nodes, "n1", "failed").await;
    assert_eq!(
        cluster.gpus("n1")[0].layout.len(),
        2,
        "a failed apply changes nothing"
    );
    set_mig_config(&nodes, "n1", "all-3g.40gb").await;
    wait_state(&nodes, "n1", "success").await;

    // A reboot loses every instance and kills the node's pods; mig-manager applies the config again.
    pods.create(&PostParams::default(), &mig_pod("victim", "3g.40gb", json!({})))
        .await
        .unwrap();
    eventually("victim bound", || async {
        node_of(&pods, "victim").await.is_some()
    })
    .await;
    cluster.reboot("n1");
    assert!(pods.get("victim").await.is_err());
    assert!(cluster.gpus("n1")[0].layout.is_empty());
    eventually("layout restored", || async {
        cluster.gpus("n1")[0].layout.len() == 2
    })
    .await;
    wait_state(&nodes, "n1", "success").await;
    actors.abort();
    server.stop().await;
}
