//! Simulated cluster actors over the store: a scheduler, kubelets with the NVIDIA device plugin
//! (mixed strategy), and NVIDIA's k8s-mig-manager, acting on simulated MIG GPUs.
//!
//! They act on the store directly (not over HTTP); what clients observe through the API is what a
//! real scheduler, kubelet and mig-manager would write: `spec.nodeName`, pod phases, node
//! capacity/allocatable per `nvidia.com/mig-<profile>`, and `nvidia.com/mig.config.state`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mig_catalog::NamedInstance;
use mig_catalog::migparted::MigPartedConfig;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::hardware::{ApplyError, ChangeError, Hardware, SimGpu, SimNode};
use crate::resources::{Resource, find};
use crate::selectors::expression_holds;
use crate::server::Shared;
use crate::status::ApiError;
use crate::store::Store;

/// Label mig-manager reads.
pub const MIG_CONFIG_LABEL: &str = "nvidia.com/mig.config";
/// Label mig-manager writes: `pending`, `success`, `failed`.
pub const MIG_STATE_LABEL: &str = "nvidia.com/mig.config.state";

/// A GPU in a cluster spec.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GpuSpec {
    /// GFD product label (`NVIDIA-A100-SXM4-80GB`).
    pub product: String,
    /// Initial layout, canonical form (`3g.40gb@0,3g.40gb@4`; `empty`).
    pub layout: String,
}

/// A node in a cluster spec.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Name.
    pub name: String,
    /// Extra labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// GPUs, by index.
    pub gpus: Vec<GpuSpec>,
}

/// A simulated cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// Nodes.
    pub nodes: Vec<NodeSpec>,
    /// Where mig-manager reads its mig-parted config: namespace/name, key `config.yaml`.
    #[serde(default = "default_config_map")]
    pub mig_parted_config_map: String,
    /// How long mig-manager takes to apply a config.
    #[serde(default = "default_delay")]
    pub mig_manager_delay_ms: u64,
    /// Run a device-plugin pod on every node (`gpu-operator/nvidia-device-plugin-<node>`, label
    /// [`DEVICE_PLUGIN_LABEL`]) while the node's [`DEVICE_PLUGIN_DEPLOY_LABEL`] is `true` (set so on
    /// every node), as the GPU operator's DaemonSet does: another value removes it, `true` again
    /// (or deleting the pod) starts it anew. Like the real one it does not notice instances
    /// created or destroyed directly (nvml backend): it advertises them only once restarted
    /// (mig-manager restarts it itself). Without it, allocatable always follows the GPUs.
    #[serde(default)]
    pub device_plugin_pods: bool,
}

/// The GPU operator's switch for a node's device plugin.
pub const DEVICE_PLUGIN_DEPLOY_LABEL: &str = "nvidia.com/gpu.deploy.device-plugin";

/// Where the GPU operator runs its device-plugin pods.
pub const DEVICE_PLUGIN_NAMESPACE: &str = "gpu-operator";

/// `key=value` label of the emulated device-plugin pods (the GPU operator's).
pub const DEVICE_PLUGIN_LABEL: (&str, &str) = ("app", "nvidia-device-plugin-daemonset");

fn default_config_map() -> String {
    "gpu-operator/default-mig-parted-config".into()
}
fn default_delay() -> u64 {
    200
}

/// The actors.
pub struct Cluster {
    state: Arc<Shared>,
    hardware: Arc<Hardware>,
    config_map: (String, String),
    delay: Duration,
    device_plugin_pods: bool,
}

fn res(group: &str, version: &str, plural: &str) -> &'static Resource {
    find(group, version, plural).unwrap_or_else(|| unreachable!("{plural} is served"))
}

/// A Kubernetes quantity as a number (`500m` is 0.5, `2Gi` is 2^31); 0 where it does not parse.
pub fn quantity(q: &Value) -> f64 {
    let s = match q {
        Value::String(s) => s.as_str(),
        Value::Number(n) => return n.as_f64().unwrap_or(0.0),
        _ => return 0.0,
    };
    let suffixes: [(&str, f64); 11] = [
        ("Ki", 1024.0),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("m", 1e-3),
        ("u", 1e-6),
        ("n", 1e-9),
    ];
    for (suf, mul) in suffixes {
        if let Some(num) = s.strip_suffix(suf) {
            return num.parse::<f64>().unwrap_or(0.0) * mul;
        }
    }
    s.parse().unwrap_or(0.0)
}

/// Summed container limits (else requests) of a pod, by resource name.
pub fn pod_requests(pod: &Value) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
        let r = &c["resources"];
        let src = if r["limits"].is_object() {
            &r["limits"]
        } else {
            &r["requests"]
        };
        for (k, v) in src.as_object().into_iter().flatten() {
            *out.entry(k.clone()).or_default() += quantity(v);
        }
        if r["limits"].is_object() {
            for (k, v) in r["requests"].as_object().into_iter().flatten() {
                if r["limits"].get(k).is_none_or(|x| x.is_null()) {
                    *out.entry(k.clone()).or_default() += quantity(v);
                }
            }
        }
    }
    out
}

fn tolerates(pod: &Value, taint: &Value) -> bool {
    pod["spec"]["tolerations"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| {
            let op = t["operator"].as_str().unwrap_or("Equal");
            let key_ok = (t["key"].as_str().unwrap_or_default().is_empty() && op == "Exists")
                || t["key"] == taint["key"];
            let value_ok = op == "Exists"
                || t["value"].as_str().unwrap_or_default() == taint["value"].as_str().unwrap_or_default();
            let effect_ok =
                t["effect"].as_str().unwrap_or_default().is_empty() || t["effect"] == taint["effect"];
            key_ok && value_ok && effect_ok
        })
}

/// Whether the scheduler may put `pod` on `node`: schedulable, node selector and required node
/// affinity met, every NoSchedule/NoExecute taint tolerated (resources apart).
pub fn node_admits(pod: &Value, node: &Value) -> bool {
    if node["spec"]["unschedulable"].as_bool() == Some(true) {
        return false;
    }
    let labels = &node["metadata"]["labels"];
    let selector_ok = pod["spec"]["nodeSelector"]
        .as_object()
        .is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let terms = &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
    let affinity_ok = terms.as_array().is_none_or(|terms| {
        terms.is_empty()
            || terms.iter().any(|term| {
                term["matchExpressions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|e| expression_holds(e, labels))
            })
    });
    let taints_ok = node["spec"]["taints"].as_array().into_iter().flatten().all(|t| {
        let effect = t["effect"].as_str().unwrap_or_default();
        !(effect == "NoSchedule" || effect == "NoExecute") || tolerates(pod, t)
    });
    selector_ok && affinity_ok && taints_ok
}

/// A cluster spec the emulator cannot build (the caller fixes the spec).
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpecError {
    /// A GPU product the catalog does not know.
    #[error("node {node}: {source}")]
    Model {
        /// The node.
        node: String,
        /// Why.
        source: mig_catalog::CatalogError,
    },
    /// A layout that does not parse.
    #[error("node {node}: {source}")]
    Layout {
        /// The node.
        node: String,
        /// Why.
        source: mig_catalog::ParseLayoutError,
    },
    /// A layout that breaks a MIG rule.
    #[error("node {node}: {source}")]
    Invalid {
        /// The node.
        node: String,
        /// Why.
        source: mig_catalog::InvalidLayout,
    },
    /// The Node could not be stored (it exists already).
    #[error("node {node}: {source}")]
    Store {
        /// The node.
        node: String,
        /// Why.
        source: ApiError,
    },
}

impl Cluster {
    /// Create the nodes of `spec` in the store and return the actors (not yet running).
    pub fn new(state: Arc<Shared>, spec: &ClusterSpec) -> Result<Arc<Cluster>, SpecError> {
        let hardware = Arc::new(Hardware::new(&spec.nodes)?);
        let (ns, name) = spec
            .mig_parted_config_map
            .split_once('/')
            .unwrap_or(("gpu-operator", &spec.mig_parted_config_map));
        let cluster = Arc::new(Cluster {
            state,
            hardware,
            config_map: (ns.to_string(), name.to_string()),
            delay: Duration::from_millis(spec.mig_manager_delay_ms),
            device_plugin_pods: spec.device_plugin_pods,
        });
        cluster.state.set_kubelets(true);
        {
            let mut store = cluster.state.store();
            for n in &spec.nodes {
                let labels = node_labels(n, spec.device_plugin_pods);
                let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name, "labels": labels}, "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
                store
                    .create(res("", "v1", "nodes"), "", node)
                    .map_err(|source| SpecError::Store {
                        node: n.name.clone(),
                        source,
                    })?;
            }
        }
        cluster.step();
        Ok(cluster)
    }

    /// Run the actors until the returned handle is aborted: a step after every store change, and at
    /// least every 20 ms (for mig-manager's delay).
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut rx = me.state.store().subscribe();
            loop {
                let _ = tokio::time::timeout(Duration::from_millis(20), rx.recv()).await;
                me.step();
            }
        })
    }

    /// The simulated hardware (shared with the agents' emulated GPU sources).
    pub fn hardware(&self) -> Arc<Hardware> {
        self.hardware.clone()
    }

    /// The simulated GPUs of a node (what NVML would report there).
    pub fn gpus(&self, node: &str) -> Vec<SimGpu> {
        self.hardware.gpus(node)
    }

    /// [`Hardware::change_instances`].
    pub fn change_instances(
        &self,
        node: &str,
        gpu: u32,
        destroy: &[NamedInstance],
        create: &[NamedInstance],
    ) -> Result<(), ChangeError> {
        self.hardware.change_instances(node, gpu, destroy, create)
    }

    /// [`Hardware::fail_next_applies`].
    pub fn fail_next_applies(&self, n: u32) {
        self.hardware.fail_next_applies(n);
    }

    /// Reboot a node: its pods die, its GPUs lose every instance, and mig-manager applies the
    /// node's `nvidia.com/mig.config` again (pending, then success).
    pub fn reboot(&self, node: &str) {
        self.hardware.power_cycle(node);
        delete_pods_where(&mut self.state.store(), |p| {
            p["spec"]["nodeName"].as_str() == Some(node)
        });
    }

    /// One round of every actor: kubelet, mig-manager, device plugin, scheduler.
    pub fn step(&self) {
        let mut nodes = self.hardware.lock();
        let mut store = self.state.store();
        kubelet(&mut store, &mut nodes);
        self.mig_manager(&mut store, &mut nodes);
        if self.device_plugin_pods {
            device_plugin_pods(&mut store, &mut nodes);
        }
        self.advertise(&mut store, &nodes);
        self.schedule(&mut store, &mut nodes);
    }

    /// mig-manager: applies a node's `nvidia.com/mig.config` after the delay (`pending`, then
    /// `success` or `failed`).
    fn mig_manager(&self, store: &mut Store, nodes: &mut BTreeMap<String, SimNode>) {
        let nodes_r = res("", "v1", "nodes");
        let config = store
            .get(
                res("", "v1", "configmaps"),
                &self.config_map.0,
                &self.config_map.1,
            )
            .ok()
            .and_then(|cm| cm["data"]["config.yaml"].as_str().map(str::to_string))
            .map(|text| MigPartedConfig::from_yaml(&text));
        for (name, n) in nodes.iter_mut() {
            let Ok(node) = store.get(nodes_r, "", name) else {
                continue;
            };
            let wanted = node["metadata"]["labels"][MIG_CONFIG_LABEL]
                .as_str()
                .map(str::to_string);
            let state = node["metadata"]["labels"][MIG_STATE_LABEL]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let Some(wanted) = wanted else { continue };
            if n.applied.as_deref() == Some(wanted.as_str()) && state == "success" {
                continue;
            }
            if n.applied.as_deref() == Some(wanted.as_str()) && state == "failed" {
                continue; // failed stays failed until the label changes
            }
            match n.pending_since {
                None => {
                    n.pending_since = Some(Instant::now());
                    let _ = set_label(store, nodes_r, name, MIG_STATE_LABEL, "pending");
                    continue;
                }
                Some(t) if t.elapsed() < self.delay => continue,
                Some(_) => {}
            }
            n.pending_since = None;
            n.applied = Some(wanted.clone());
            n.plugin_stale = false; // mig-manager restarts the device plugin
            let outcome = match &config {
                None => Err(ApplyError::NoConfigMap {
                    namespace: self.config_map.0.clone(),
                    name: self.config_map.1.clone(),
                }),
                Some(Err(e)) => Err(ApplyError::BadConfigMap(e.to_string())),
                Some(Ok(_)) if self.hardware.take_injected_failure() => Err(ApplyError::Injected),
                Some(Ok(cfg)) => n.apply(cfg, &wanted),
            };
            // Like the real mig-manager, the reason goes to the log; the label only says `failed`.
            let state = match &outcome {
                Ok(()) => "success",
                Err(reason) => {
                    tracing::warn!(node = %name, config = %wanted, %reason, "emulated mig-manager: apply failed");
                    "failed"
                }
            };
            let _ = set_label(store, nodes_r, name, MIG_STATE_LABEL, state);
        }
    }

    /// The device plugin: allocatable per MIG profile from the actual layouts (a stale plugin
    /// advertises what it saw when it started).
    fn advertise(&self, store: &mut Store, nodes: &BTreeMap<String, SimNode>) {
        let nodes_r = res("", "v1", "nodes");
        // Device plugin: allocatable per MIG profile from the actual layouts.
        for (name, n) in nodes.iter() {
            if n.plugin_stale && self.device_plugin_pods {
                continue; // it advertises what it saw when it started
            }
            let Ok(mut node) = store.get(nodes_r, "", name) else {
                continue;
            };
            let capacity = n.advertised();
            let mut changed = false;
            for field in ["capacity", "allocatable"] {
                if !node["status"][field].is_object() {
                    node["status"][field] = json!({"cpu": "64", "memory": "512Gi", "pods": "110"});
                }
                for (k, v) in &capacity {
                    if node["status"][field][k] != json!(v.to_string()) {
                        node["status"][field][k] = json!(v.to_string());
                        changed = true;
                    }
                }
            }
            if changed {
                let _ = store.replace(nodes_r, "", name, node);
            }
        }
    }

    /// The scheduler: binds pending pods in creation order where their MIG instances (and CPU and
    /// memory) are free.
    fn schedule(&self, store: &mut Store, nodes: &mut BTreeMap<String, SimNode>) {
        let pods_r = res("", "v1", "pods");
        let nodes_r = res("", "v1", "nodes");
        // Scheduler: bind pending pods in creation order where their MIG instances are free.
        let mut pending: Vec<Value> = store
            .list(pods_r, None)
            .into_iter()
            .filter(|p| {
                p["spec"]["nodeName"].as_str().is_none_or(str::is_empty)
                    && p["metadata"]["deletionTimestamp"].is_null()
            })
            .collect();
        pending.sort_by(|a, b| {
            let key = |p: &Value| {
                (
                    p["metadata"]["creationTimestamp"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    p["metadata"]["resourceVersion"]
                        .as_str()
                        .and_then(|r| r.parse::<u64>().ok())
                        .unwrap_or(0),
                )
            };
            key(a).cmp(&key(b))
        });
        for pod in pending {
            let (ns, pod_name) = ns_name(&pod);
            let key = format!("{ns}/{pod_name}");
            let requests = pod_requests(&pod);
            let mig: Vec<(String, u64)> = requests
                .iter()
                .filter(|(k, _)| k.starts_with("nvidia.com/mig-"))
                .map(|(k, v)| (k.clone(), *v as u64))
                .collect();
            let all_pods = store.list(pods_r, None);
            let chosen = nodes.iter_mut().find_map(|(name, n)| {
                let node = store.get(nodes_r, "", name).ok()?;
                if !node_admits(&pod, &node) {
                    return None;
                }
                // A device plugin that has not seen the node's instances cannot hand them out.
                if !mig.is_empty() && n.plugin_stale && self.device_plugin_pods {
                    return None;
                }
                // CPU and memory against allocatable, minus pods already bound here.
                for res_name in ["cpu", "memory"] {
                    let want = requests.get(res_name).copied().unwrap_or(0.0);
                    if want > 0.0 {
                        let have = quantity(&node["status"]["allocatable"][res_name]);
                        let used: f64 = all_pods
                            .iter()
                            .filter(|p| p["spec"]["nodeName"].as_str() == Some(name.as_str()))
                            .map(|p| pod_requests(p).get(res_name).copied().unwrap_or(0.0))
                            .sum();
                        if used + want > have {
                            return None;
                        }
                    }
                }
                n.allocate(&key, &mig).then(|| name.clone())
            });
            if let Some(node) = chosen {
                let mut bound = pod.clone();
                bound["spec"]["nodeName"] = json!(node);
                bound["status"]["phase"] = json!("Running");
                let _ = store.replace(pods_r, &ns, &pod_name, bound);
            } else if pod["status"]["phase"].is_null() {
                let mut waiting = pod.clone();
                waiting["status"]["phase"] = json!("Pending");
                let _ = store.replace(pods_r, &ns, &pod_name, waiting);
            }
        }
    }
}

/// The kubelet: terminating pods go when their grace period is over, and the instances of pods
/// that are gone are free again.
fn kubelet(store: &mut Store, nodes: &mut BTreeMap<String, SimNode>) {
    let pods_r = res("", "v1", "pods");
    // Kubelet: terminating pods go when their grace period is over.
    let now = jiff::Timestamp::now();
    delete_pods_where(store, |p| {
        let due = p["metadata"]["deletionTimestamp"]
            .as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok());
        due.is_some_and(|d| d <= now)
    });
    // Kubelet: instances of pods that are gone are free again.
    let live: std::collections::BTreeSet<String> = store
        .list(pods_r, None)
        .iter()
        .map(|p| {
            let (ns, name) = ns_name(p);
            format!("{ns}/{name}")
        })
        .collect();
    for n in nodes.values_mut() {
        for g in &mut n.gpus {
            g.used.retain(|_, pod| live.contains(pod));
        }
    }
}

/// Device-plugin pods: one per node while deployed, started again when gone (and then up to date).
fn device_plugin_pods(store: &mut Store, nodes: &mut BTreeMap<String, SimNode>) {
    let pods_r = res("", "v1", "pods");
    let nodes_r = res("", "v1", "nodes");
    for (name, n) in nodes.iter_mut() {
        let pod_name = device_plugin_pod_name(name);
        let deployed = store.get(nodes_r, "", name).is_ok_and(|node| {
            node["metadata"]["labels"][DEVICE_PLUGIN_DEPLOY_LABEL]
                .as_str()
                .is_none_or(|v| v == "true")
        });
        let exists = store.get(pods_r, DEVICE_PLUGIN_NAMESPACE, &pod_name).is_ok();
        if !deployed && exists {
            let _ = store.delete(pods_r, DEVICE_PLUGIN_NAMESPACE, &pod_name);
        }
        if !deployed || exists {
            continue;
        }
        let mut pod = device_plugin_pod(name);
        pod["status"] = json!({"phase": "Running"});
        if store.create(pods_r, DEVICE_PLUGIN_NAMESPACE, pod).is_ok() {
            n.plugin_stale = false;
        }
    }
}

/// The labels of a simulated node: as GPU Feature Discovery and the GPU operator label it (GPU
/// product and count, MIG capable, mixed strategy), its own, `nvidia.com/mig.config.state=success`
/// when it has a `nvidia.com/mig.config`, and the device plugin deployed when its pods are
/// simulated.
pub fn node_labels(n: &NodeSpec, device_plugin_pods: bool) -> Value {
    let product = n.gpus.first().map(|g| g.product.clone()).unwrap_or_default();
    let mut labels = json!({
        "kubernetes.io/hostname": n.name, "kubernetes.io/os": "linux",
        "nvidia.com/gpu.product": product, "nvidia.com/gpu.count": n.gpus.len().to_string(),
        "nvidia.com/mig.capable": "true", "nvidia.com/mig.strategy": "mixed",
    });
    for (k, v) in &n.labels {
        labels[k] = json!(v);
    }
    if n.labels.contains_key(MIG_CONFIG_LABEL) {
        labels[MIG_STATE_LABEL] = json!("success");
    }
    if device_plugin_pods {
        labels[DEVICE_PLUGIN_DEPLOY_LABEL] = json!("true");
    }
    labels
}

/// The name of the device-plugin pod on `node`.
pub fn device_plugin_pod_name(node: &str) -> String {
    format!("nvidia-device-plugin-{node}")
}

/// The device-plugin pod the GPU operator's DaemonSet runs on `node` (owned by the DaemonSet, in
/// its namespace, tolerating every taint), as it is created: not yet running.
pub fn device_plugin_pod(node: &str) -> Value {
    let (key, value) = DEVICE_PLUGIN_LABEL;
    json!({"apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": device_plugin_pod_name(node), "namespace": DEVICE_PLUGIN_NAMESPACE, "labels": {key: value},
                 "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": value,
                                      "uid": "00000000-0000-4000-8000-00000000d5e7", "controller": true}]},
    "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
             "containers": [{"name": "nvidia-device-plugin", "image": "nvcr.io/nvidia/k8s-device-plugin"}],
             "tolerations": [{"operator": "Exists"}]}})
}

/// `(namespace, name)` of an object.
fn ns_name(o: &Value) -> (String, String) {
    let field = |k: &str| o["metadata"][k].as_str().unwrap_or_default().to_string();
    (field("namespace"), field("name"))
}

/// Delete every pod for which `doomed` holds.
fn delete_pods_where(store: &mut crate::store::Store, doomed: impl Fn(&Value) -> bool) {
    let pods_r = res("", "v1", "pods");
    for p in store.list(pods_r, None) {
        if doomed(&p) {
            let (ns, name) = ns_name(&p);
            let _ = store.delete(pods_r, &ns, &name);
        }
    }
}

fn set_label(
    store: &mut crate::store::Store,
    r: &Resource,
    name: &str,
    key: &str,
    value: &str,
) -> Result<(), ApiError> {
    let mut node = store.get(r, "", name)?;
    if node["metadata"]["labels"][key] == json!(value) {
        return Ok(());
    }
    node["metadata"]["labels"][key] = json!(value);
    store.replace(r, "", name, node).map(|_| ())
}
