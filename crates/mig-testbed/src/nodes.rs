//! Simulated nodes as clients of any API server, as kwok simulates nodes: each node's kubelet with
//! NVIDIA's device plugin (mixed strategy) and NVIDIA's k8s-mig-manager, acting on the simulated
//! hardware ([`Hardware`]) and reaching the API only over HTTP, so that they run against
//! kube-emulator and a real kube-apiserver alike.
//!
//! - **kubelet**: registers its Node Ready (and, as the node lifecycle controller would, lifts the
//!   `node.kubernetes.io/not-ready` taint the API server puts on a new Node); runs each pod bound to
//!   it once the device plugin allocates its MIG instances (`Running`), or fails it as the real
//!   kubelet does when they are not there (`UnexpectedAdmissionError`); removes a terminating pod
//!   when its grace period is over; frees the instances of pods that are gone or ended.
//! - **device plugin**: advertises `nvidia.com/mig-<profile>` capacity and allocatable from the
//!   actual layouts. With `device_plugin_pods` it also runs as the GPU operator's DaemonSet does: a
//!   pod `gpu-operator/nvidia-device-plugin-<node>` while the node's
//!   `nvidia.com/gpu.deploy.device-plugin` label is `true`, deleted when the label says otherwise
//!   and created anew when it is `true` again; like the real plugin it does not notice instances
//!   created or destroyed directly (nvml backend) until restarted, so meanwhile it advertises
//!   what it saw and the kubelet starts no MIG pod.
//! - **mig-manager**: applies a changed `nvidia.com/mig.config` after a delay from the mig-parted
//!   ConfigMap (`pending`, then `success`, or `failed` with the reason in the log).
//!
//! A real cluster's kube-scheduler binds the pods; kube-emulator has none of its own when these
//! nodes are used instead of its in-process actors, so [`Scheduler`] binds through `pods/binding`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, ServiceAccount};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client};
use kube_emulator::cluster::{
    DEVICE_PLUGIN_DEPLOY_LABEL, DEVICE_PLUGIN_NAMESPACE, MIG_CONFIG_LABEL, MIG_STATE_LABEL,
    device_plugin_pod, device_plugin_pod_name, node_admits, node_labels, pod_requests, quantity,
};
use kube_emulator::{ApplyError, ClusterSpec, Hardware};
use mig_catalog::migparted::MigPartedConfig;
use serde_json::{Value, json};

/// The taint the API server gives a new Node until its kubelet reports it Ready.
pub const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";

/// What every simulated node has besides its GPUs.
const BASE_CAPACITY: [(&str, &str); 3] = [("cpu", "64"), ("memory", "512Gi"), ("pods", "110")];

/// The kubelets, device plugins and mig-managers of the nodes of a [`ClusterSpec`].
pub struct SimulatedNodes {
    client: Client,
    hardware: Arc<Hardware>,
    names: BTreeSet<String>,
    config_map: (String, String),
    delay: Duration,
    plugin_pods: bool,
}

impl SimulatedNodes {
    /// Register the nodes of `spec` through `client` (an identity that may create Nodes and write
    /// their status and pods' status): their Node objects, labelled as GPU Feature Discovery and
    /// the GPU operator label them, Ready, with their capacity. Not yet running: see
    /// [`SimulatedNodes::spawn`]. With `spec.device_plugin_pods` each node is labelled
    /// `nvidia.com/gpu.deploy.device-plugin=true` and runs a device-plugin pod (the operator's
    /// namespace and its `default` ServiceAccount are made if missing).
    pub async fn register(client: Client, spec: &ClusterSpec) -> anyhow::Result<SimulatedNodes> {
        let hardware = Arc::new(Hardware::new(&spec.nodes)?);
        let (ns, name) = spec
            .mig_parted_config_map
            .split_once('/')
            .unwrap_or(("gpu-operator", &spec.mig_parted_config_map));
        let nodes = SimulatedNodes {
            client,
            hardware,
            names: spec.nodes.iter().map(|n| n.name.clone()).collect(),
            config_map: (ns.to_string(), name.to_string()),
            delay: Duration::from_millis(spec.mig_manager_delay_ms),
            plugin_pods: spec.device_plugin_pods,
        };
        if nodes.plugin_pods {
            nodes.operator_namespace().await?;
        }
        let api: Api<Node> = Api::all(nodes.client.clone());
        for n in &spec.nodes {
            let labels = node_labels(n, spec.device_plugin_pods);
            let node: Node = serde_json::from_value(json!({"metadata": {"name": n.name, "labels": labels}}))?;
            api.create(&PostParams::default(), &node)
                .await
                .with_context(|| format!("cannot create Node {}", n.name))?;
            let now = jiff::Timestamp::now().to_string();
            let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "simulated kubelet is posting ready status", "lastHeartbeatTime": now, "lastTransitionTime": now}]}});
            api.patch_status(&n.name, &PatchParams::default(), &Patch::Merge(&ready))
                .await
                .with_context(|| format!("cannot report Node {} Ready", n.name))?;
            let taints: Vec<Value> = api
                .get(&n.name)
                .await?
                .spec
                .and_then(|s| s.taints)
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t.key != NOT_READY_TAINT)
                .map(|t| serde_json::to_value(t).unwrap_or_default())
                .collect();
            api.patch(
                &n.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"taints": taints}})),
            )
            .await
            .with_context(|| format!("cannot lift the not-ready taint of Node {}", n.name))?;
        }
        nodes.step().await?;
        Ok(nodes)
    }

    /// The GPU operator's namespace and the ServiceAccount its pods run as (no controller-manager
    /// may run to make it), unless there.
    async fn operator_namespace(&self) -> anyhow::Result<()> {
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": DEVICE_PLUGIN_NAMESPACE}}))?;
        ignore_exists(
            Api::all(self.client.clone())
                .create(&PostParams::default(), &namespace)
                .await
                .map(|_| ()),
        )
        .context("cannot create the GPU operator's namespace")?;
        let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
        ignore_exists(
            Api::namespaced(self.client.clone(), DEVICE_PLUGIN_NAMESPACE)
                .create(&PostParams::default(), &account)
                .await
                .map(|_| ()),
        )
        .context("cannot create the GPU operator's default ServiceAccount")
    }

    /// The simulated GPUs (for the agents' emulated GPU sources).
    pub fn hardware(&self) -> Arc<Hardware> {
        self.hardware.clone()
    }

    /// Act every `tick` until the handle is aborted; a failed round is logged and retried.
    pub fn spawn(self, tick: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                if let Err(error) = self.step().await {
                    tracing::warn!(%error, "simulated nodes: a round failed");
                }
                tokio::time::sleep(tick).await;
            }
        })
    }

    /// One round of every node's kubelet, mig-manager and device plugin.
    pub async fn step(&self) -> Result<(), kube::Error> {
        let pods = list_values(&Api::<Pod>::all(self.client.clone())).await?;
        self.kubelet(&pods).await?;
        let nodes: BTreeMap<String, Value> = list_values(&Api::<Node>::all(self.client.clone()))
            .await?
            .into_iter()
            .filter_map(|n| {
                let name = n["metadata"]["name"].as_str()?.to_string();
                self.names.contains(&name).then_some((name, n))
            })
            .collect();
        self.mig_manager(&nodes).await?;
        if self.plugin_pods {
            self.device_plugin_daemon_set(&nodes, &pods).await?;
        }
        self.device_plugin(&nodes).await
    }

    /// As the GPU operator's DaemonSet: a device-plugin pod on each node whose
    /// `nvidia.com/gpu.deploy.device-plugin` is `true` (the node's kubelet then runs it), none on
    /// the others. A plugin started anew sees the node's instances as they are.
    async fn device_plugin_daemon_set(
        &self,
        nodes: &BTreeMap<String, Value>,
        pods: &[Value],
    ) -> Result<(), kube::Error> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), DEVICE_PLUGIN_NAMESPACE);
        for (name, node) in nodes {
            let pod_name = device_plugin_pod_name(name);
            let exists = pods.iter().any(|p| {
                p["metadata"]["namespace"] == DEVICE_PLUGIN_NAMESPACE
                    && p["metadata"]["name"] == pod_name.as_str()
            });
            let deployed = node["metadata"]["labels"][DEVICE_PLUGIN_DEPLOY_LABEL] == "true";
            if !deployed && exists {
                ignore_gone(api.delete(&pod_name, &DeleteParams::default()).await.map(|_| ()))?;
            }
            if !deployed || exists {
                continue;
            }
            let pod: Pod =
                serde_json::from_value(device_plugin_pod(name)).map_err(kube::Error::SerdeError)?;
            match api.create(&PostParams::default(), &pod).await {
                Ok(_) => {
                    if let Some(n) = self.hardware.lock().get_mut(name) {
                        n.plugin_stale = false;
                    }
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {} // the old one is still terminating
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether `node`'s device plugin has not seen its instances as they are (nvml backend, plugin
    /// not yet restarted).
    fn plugin_stale(&self, node: &str) -> bool {
        self.plugin_pods && self.hardware.lock().get(node).is_some_and(|n| n.plugin_stale)
    }

    async fn kubelet(&self, pods: &[Value]) -> Result<(), kube::Error> {
        let live: BTreeSet<String> = pods.iter().filter(|p| !ended(p)).map(key).collect();
        self.hardware.release_all_but(&live);
        let now = jiff::Timestamp::now();
        for pod in pods {
            let Some(node) = pod["spec"]["nodeName"]
                .as_str()
                .filter(|n| self.names.contains(*n))
            else {
                continue;
            };
            let (ns, name) = ns_name(pod);
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            if let Some(due) = pod["metadata"]["deletionTimestamp"].as_str() {
                if due.parse::<jiff::Timestamp>().is_ok_and(|d| d <= now) {
                    let gone = DeleteParams {
                        grace_period_seconds: Some(0),
                        preconditions: Some(Preconditions {
                            uid: pod["metadata"]["uid"].as_str().map(str::to_string),
                            resource_version: None,
                        }),
                        ..DeleteParams::default()
                    };
                    ignore_gone(api.delete(&name, &gone).await.map(|_| ()))?;
                }
                continue;
            }
            if ended(pod) || pod["status"]["phase"] == "Running" {
                continue;
            }
            let mig: Vec<(String, u64)> = pod_requests(pod)
                .into_iter()
                .filter(|(k, _)| k.starts_with("nvidia.com/mig-"))
                .map(|(k, v)| (k, v as u64))
                .collect();
            if !mig.is_empty() && self.plugin_stale(node) {
                continue; // the plugin cannot hand out instances it has not seen; wait for it
            }
            let pod_key = key(pod);
            let admitted = self
                .hardware
                .lock()
                .get_mut(node)
                .is_some_and(|n| n.holds(&pod_key) || n.allocate(&pod_key, &mig));
            let now = now.to_string();
            let status = if admitted {
                json!({"phase": "Running", "startTime": now, "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                    {"type": "Ready", "status": "True", "lastTransitionTime": now}]})
            } else {
                let wanted: Vec<String> = mig.iter().map(|(r, n)| format!("{n} {r}")).collect();
                json!({"phase": "Failed", "reason": "UnexpectedAdmissionError",
                       "message": format!("Allocate failed due to requested number of devices unavailable: {}, which is unexpected", wanted.join(", "))})
            };
            ignore_gone(
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": status})),
                )
                .await
                .map(|_| ()),
            )?;
        }
        Ok(())
    }

    async fn mig_manager(&self, nodes: &BTreeMap<String, Value>) -> Result<(), kube::Error> {
        let mut pending = Vec::new();
        let mut due = Vec::new();
        {
            let mut hardware = self.hardware.lock();
            for (name, node) in nodes {
                let labels = &node["metadata"]["labels"];
                let (Some(wanted), Some(n)) = (labels[MIG_CONFIG_LABEL].as_str(), hardware.get_mut(name))
                else {
                    continue;
                };
                let state = labels[MIG_STATE_LABEL].as_str().unwrap_or_default();
                if n.applied.as_deref() == Some(wanted) && matches!(state, "success" | "failed") {
                    continue; // done; failed stays failed until the label changes
                }
                match n.pending_since {
                    None => {
                        n.pending_since = Some(Instant::now());
                        pending.push(name.clone());
                    }
                    Some(t) if t.elapsed() >= self.delay => due.push((name.clone(), wanted.to_string())),
                    Some(_) => {}
                }
            }
        }
        for name in pending {
            self.set_state(&name, "pending").await?;
        }
        if due.is_empty() {
            return Ok(());
        }
        let (ns, cm) = &self.config_map;
        let config = match Api::<ConfigMap>::namespaced(self.client.clone(), ns)
            .get_opt(cm)
            .await?
        {
            None => Err(ApplyError::NoConfigMap {
                namespace: ns.clone(),
                name: cm.clone(),
            }),
            Some(map) => {
                let text = map.data.and_then(|d| d.get("config.yaml").cloned());
                MigPartedConfig::from_yaml(text.as_deref().unwrap_or_default())
                    .map_err(|e| ApplyError::BadConfigMap(e.to_string()))
            }
        };
        for (name, wanted) in due {
            let outcome = {
                let mut hardware = self.hardware.lock();
                let Some(n) = hardware.get_mut(&name) else {
                    continue;
                };
                n.pending_since = None;
                n.applied = Some(wanted.clone());
                n.plugin_stale = false; // mig-manager restarts the device plugin
                match &config {
                    Err(e) => Err(e.to_string()),
                    Ok(_) if self.hardware.take_injected_failure() => Err(ApplyError::Injected.to_string()),
                    Ok(cfg) => n.apply(cfg, &wanted).map_err(|e| e.to_string()),
                }
            };
            // Like the real mig-manager, the reason goes to the log; the label only says `failed`.
            let state = match outcome {
                Ok(()) => "success",
                Err(reason) => {
                    tracing::warn!(node = %name, config = %wanted, %reason, "simulated mig-manager: apply failed");
                    "failed"
                }
            };
            self.set_state(&name, state).await?;
        }
        Ok(())
    }

    async fn set_state(&self, node: &str, state: &str) -> Result<(), kube::Error> {
        let patch = json!({"metadata": {"labels": {MIG_STATE_LABEL: state}}});
        Api::<Node>::all(self.client.clone())
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
    }

    async fn device_plugin(&self, nodes: &BTreeMap<String, Value>) -> Result<(), kube::Error> {
        for (name, node) in nodes {
            if self.plugin_stale(name) {
                continue; // it advertises what it saw when it started
            }
            let Some(advertised) = self.hardware.lock().get(name).map(|n| n.advertised()) else {
                continue;
            };
            let mut resources: BTreeMap<String, String> = BASE_CAPACITY
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            resources.extend(advertised.into_iter().map(|(k, v)| (k, v.to_string())));
            let current = &node["status"]["allocatable"];
            if resources
                .iter()
                .all(|(k, v)| current[k].as_str() == Some(v.as_str()))
            {
                continue;
            }
            let patch = json!({"status": {"capacity": resources, "allocatable": resources}});
            Api::<Node>::all(self.client.clone())
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        Ok(())
    }
}

/// A scheduler for a server without kube-scheduler (kube-emulator with [`SimulatedNodes`]): binds
/// each unbound pod, oldest first, to the first Ready node (by name) that admits it and whose
/// allocatable, less what the pods bound there request, covers its requests.
pub struct Scheduler {
    client: Client,
}

impl Scheduler {
    /// A scheduler acting through `client` (which may bind pods).
    pub fn new(client: Client) -> Scheduler {
        Scheduler { client }
    }

    /// Bind every pod that fits now; how many were bound.
    pub async fn step(&self) -> Result<usize, kube::Error> {
        let pods = list_values(&Api::<Pod>::all(self.client.clone())).await?;
        let nodes = list_values(&Api::<Node>::all(self.client.clone())).await?;
        let mut used: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
        for p in pods.iter().filter(|p| !ended(p)) {
            if let Some(node) = p["spec"]["nodeName"].as_str() {
                let sum = used.entry(node.to_string()).or_default();
                for (r, v) in pod_requests(p) {
                    *sum.entry(r).or_default() += v;
                }
            }
        }
        let mut waiting: Vec<&Value> = pods
            .iter()
            .filter(|p| {
                p["spec"]["nodeName"].as_str().is_none_or(str::is_empty)
                    && p["metadata"]["deletionTimestamp"].is_null()
                    && !ended(p)
            })
            .collect();
        waiting.sort_by_key(|p| {
            (
                p["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                key(p),
            )
        });
        let mut bound = 0;
        for pod in waiting {
            let wants = pod_requests(pod);
            let fits = |node: &Value| {
                let name = node["metadata"]["name"].as_str().unwrap_or_default();
                let ready = node["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                let free = |r: &str| {
                    quantity(&node["status"]["allocatable"][r])
                        - used.get(name).and_then(|u| u.get(r)).copied().unwrap_or(0.0)
                };
                ready
                    && node_admits(pod, node)
                    && wants.iter().all(|(r, want)| *want <= 0.0 || free(r) >= *want)
            };
            let Some(node) = nodes.iter().find(|n| fits(n)) else {
                continue;
            };
            let node_name = node["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let (ns, name) = ns_name(pod);
            let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "namespace": ns},
                                 "target": {"apiVersion": "v1", "kind": "Node", "name": node_name}});
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            match api
                .create_subresource::<_, Value>("binding", &name, &PostParams::default(), &binding)
                .await
            {
                Ok(_) => {
                    bound += 1;
                    let sum = used.entry(node_name).or_default();
                    for (r, v) in wants {
                        *sum.entry(r).or_default() += v;
                    }
                }
                Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409) => {} // gone, or bound meanwhile
                Err(e) => return Err(e),
            }
        }
        Ok(bound)
    }

    /// Bind every `tick` until the handle is aborted.
    pub fn spawn(self, tick: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                if let Err(error) = self.step().await {
                    tracing::warn!(%error, "simulated scheduler: a round failed");
                }
                tokio::time::sleep(tick).await;
            }
        })
    }
}

async fn list_values<K>(api: &Api<K>) -> Result<Vec<Value>, kube::Error>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|o| serde_json::to_value(o).unwrap_or_default())
        .collect())
}

/// A pod whose containers will not run again (`Succeeded` or `Failed`).
fn ended(pod: &Value) -> bool {
    matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
}

fn ns_name(o: &Value) -> (String, String) {
    let field = |k: &str| o["metadata"][k].as_str().unwrap_or_default().to_string();
    (field("namespace"), field("name"))
}

/// `namespace/name`, as the hardware records who uses an instance.
fn key(o: &Value) -> String {
    let (ns, name) = ns_name(o);
    format!("{ns}/{name}")
}

/// A create that finds the object already there has what it wanted.
fn ignore_exists(r: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        other => other,
    }
}

/// Not found and conflicts are what a round racing with others sees; the next round looks again.
fn ignore_gone(r: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409) => Ok(()),
        other => other,
    }
}
