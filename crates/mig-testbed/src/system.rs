//! The whole system in one process: kube-emulator (API server, scheduler, kubelets / device
//! plugin, mig-manager), a node agent per node and the controller, all talking real HTTP. `demo`
//! runs it for people; `simulate --system-scale` runs a trace through it (the slow path) to
//! compare with the simulator's direct planner calls.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use mig_agent::AgentSettings;

use crate::EmulatedGpus;
use mig_controller::settings::Settings;
use serde_json::json;

/// A running system; [`System::stop`] ends it.
pub struct System {
    /// The embedded Kubernetes API.
    pub server: kube_emulator::Running,
    /// Its simulated nodes and GPUs.
    pub cluster: Arc<kube_emulator::Cluster>,
    /// A client of the embedded API.
    pub client: Client,
    /// The controller.
    pub controller: mig_controller::Running,
    node_names: Vec<String>,
    agents: Vec<mig_agent::Running>,
    actors: tokio::task::JoinHandle<()>,
}

impl System {
    /// Start the API on `api_listen` with the GPU operator's mig-parted ConfigMap, the cluster of
    /// `spec`, an agent per node but the last `without_agent` (ticking every `agent_tick`, on the
    /// planner's backend) and the controller. With the nvml backend, `spec` should run
    /// device-plugin pods (the agents restart them after a change).
    pub async fn start(
        api_listen: SocketAddr,
        spec: &kube_emulator::ClusterSpec,
        settings: Settings,
        agent_tick: Duration,
        without_agent: usize,
    ) -> Result<System> {
        let server = kube_emulator::Running::start(api_listen, kube_emulator::Config::default())
            .await
            .with_context(|| format!("cannot listen on {api_listen}"))?;
        server
            .seed([kube_emulator::fleet::default_mig_parted_config_map()])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let cluster =
            kube_emulator::Cluster::new(server.state.clone(), spec).map_err(|e| anyhow::anyhow!("{e}"))?;
        let actors = cluster.spawn();
        let mut config = kube::Config::new(server.url().parse()?);
        config.default_retry = false;
        let client = Client::try_from(config)?;
        let mut agents = Vec::new();
        for n in &spec.nodes[..spec.nodes.len().saturating_sub(without_agent)] {
            let mut s = AgentSettings::new(n.name.clone());
            s.tick = agent_tick;
            s.sequence.backend = settings.planner.backend;
            let source = Arc::new(EmulatedGpus::new(cluster.hardware(), n.name.clone()));
            agents.push(mig_agent::start(client.clone(), s, source).await?);
        }
        let listen = settings.http.listen.clone();
        let controller = mig_controller::start(client.clone(), settings, "demo-controller".into())
            .await
            .with_context(|| format!("cannot serve on {listen}"))?;
        Ok(System {
            server,
            cluster,
            client,
            controller,
            node_names: spec.nodes.iter().map(|n| n.name.clone()).collect(),
            agents,
            actors,
        })
    }

    /// A replayer of trace pods on this system.
    pub fn replayer(&self) -> Replayer {
        Replayer {
            client: self.client.clone(),
            cluster: self.cluster.clone(),
            nodes: self.node_names.clone(),
        }
    }

    /// Stop the controller, the agents, the actors and the API.
    pub async fn stop(self) {
        self.controller.stop().await;
        for a in self.agents {
            a.stop().await;
        }
        self.actors.abort();
        self.server.stop().await;
    }
}

/// What a replay saw, in trace seconds.
#[derive(Clone, Debug, Default)]
pub struct Replayed {
    /// When each pod was first seen running, in the pods' own time base (None: never).
    pub starts: Vec<Option<f64>>,
    /// GPU layout changes seen (one per GPU per reconfiguration).
    pub reconfigurations: usize,
    /// When the replay ended, in the pods' time base.
    pub end: f64,
}

/// Replays trace pods through the API.
pub struct Replayer {
    client: Client,
    cluster: Arc<kube_emulator::Cluster>,
    nodes: Vec<String>,
}

impl Replayer {
    /// Create each pod at its arrival and delete it `duration` after it is first seen running (as
    /// the simulator does), at `scale` wall seconds per trace second, looking every `poll`. Ends at
    /// `horizon` (trace seconds), or once every pod has arrived and none runs or can start (nothing
    /// bound and the layouts unchanged for `stall`).
    pub async fn run(
        &self,
        pods: &[mig_sim::TracePod],
        scale: f64,
        horizon: f64,
        poll: Duration,
        stall: Duration,
    ) -> Replayed {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), "default");
        let origin = pods.iter().map(|p| p.arrival).fold(f64::INFINITY, f64::min);
        let origin = if origin.is_finite() { origin } else { 0.0 };
        let began = Instant::now();
        let trace_now = || began.elapsed().as_secs_f64() / scale;
        let mut out = Replayed {
            starts: vec![None; pods.len()],
            ..Default::default()
        };
        let names: Vec<String> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}-{i}", p.name.to_lowercase()))
            .collect();
        let index: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        let mut order: Vec<usize> = (0..pods.len()).collect();
        order.sort_by(|a, b| pods[*a].arrival.total_cmp(&pods[*b].arrival));
        let (mut next, mut ended) = (0, vec![false; pods.len()]);
        let mut layouts: BTreeMap<(String, u32), String> = BTreeMap::new();
        let mut last_progress = Instant::now();
        loop {
            let now = trace_now();
            if now >= horizon {
                break;
            }
            while next < order.len() && pods[order[next]].arrival - origin <= now {
                let (i, p) = (order[next], &pods[order[next]]);
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": names[i], "namespace": "default", "labels": {"app": "mig-trace"}},
                    "spec": {"containers": [{"name": "work", "image": "nvcr.io/nvidia/cuda:12.4.0-base-ubuntu22.04",
                        "resources": {"limits": {format!("nvidia.com/mig-{}", p.profile): p.count.to_string()}}}]},
                }))
                .unwrap_or_default();
                if let Err(e) = api.create(&PostParams::default(), &pod).await {
                    tracing::warn!(pod = %names[i], error = %e, "trace pod not created");
                }
                next += 1;
                last_progress = Instant::now();
            }
            let listed = api
                .list(&ListParams::default().labels("app=mig-trace"))
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            for p in &listed {
                let Some(&i) = index.get(p.name_any().as_str()) else {
                    continue;
                };
                let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                if running && out.starts[i].is_none() {
                    out.starts[i] = Some(origin + now);
                    last_progress = Instant::now();
                }
                if out.starts[i].is_some_and(|s| origin + now - s >= pods[i].duration) && !ended[i] {
                    let gone = api
                        .delete(
                            &names[i],
                            &DeleteParams {
                                grace_period_seconds: Some(0),
                                ..DeleteParams::default()
                            },
                        )
                        .await;
                    ended[i] = gone.is_ok();
                }
            }
            for node in &self.nodes {
                for g in self.cluster.gpus(node) {
                    let text = g.model.format_layout(&g.layout);
                    let key = (node.clone(), g.index);
                    if layouts.get(&key).is_some_and(|old| *old != text) {
                        out.reconfigurations += 1;
                        last_progress = Instant::now();
                    }
                    layouts.insert(key, text);
                }
            }
            let arrived = next == order.len();
            let running = (0..pods.len()).any(|i| out.starts[i].is_some() && !ended[i]);
            let all_ended = ended.iter().all(|e| *e);
            if arrived && (all_ended || (!running && last_progress.elapsed() >= stall)) {
                break;
            }
            tokio::time::sleep(poll).await;
        }
        out.end = origin + trace_now();
        out
    }
}
