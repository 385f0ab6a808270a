//! Test equipment: kube-emulator with its actors, a stand-in node agent, controllers, plain HTTP.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use kube_emulator::{Cluster, ClusterSpec, Config, GpuSpec, NodeSpec, Running};
use mig_controller::settings::{Dur, Mode, Settings};
use mig_protocol::{
    GRANT_ANNOTATION, Grant, MIG_CONFIG_LABEL, MIG_STATE_LABEL, NodeReport, NodeState, Phase,
    REPORT_ANNOTATION, STATE_ANNOTATION, TAINT_KEY,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The GPU model most tests use.
pub const H100: &str = "NVIDIA-H100-80GB-HBM3";
/// An H100 as seven 1g.10gb instances (how the GPU operator's `all-1g.10gb` leaves it).
pub const SEVEN_1G: &str = "1g.10gb@0,1g.10gb@1,1g.10gb@2,1g.10gb@3,1g.10gb@4,1g.10gb@5,1g.10gb@6";

/// A running emulator with its cluster actors; they stop when it drops.
pub struct Env {
    /// The API server.
    pub server: Running,
    /// Its simulated nodes and GPUs.
    pub cluster: Arc<Cluster>,
    /// An admin client (no token: unchecked, like cluster-admin).
    pub client: Client,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// How the stand-in agent behaves.
#[derive(Clone, Copy)]
pub struct AgentBehaviour {
    /// Extra time it takes per reconfiguration (uniform in [min, max] ms, from a seed).
    pub min_ms: u64,
    /// See `min_ms`.
    pub max_ms: u64,
    /// Seed of those times.
    pub seed: u64,
    /// How far its clock is behind the controller's (the times it writes), seconds.
    pub clock_behind_s: i64,
}

impl Default for AgentBehaviour {
    fn default() -> Self {
        AgentBehaviour {
            min_ms: 0,
            max_ms: 0,
            seed: 1,
            clock_behind_s: 0,
        }
    }
}

/// `n` nodes `gpu-node-<i>` of `gpus` H100s each at `layout`, labelled as the GPU operator leaves them.
pub fn nodes(n: usize, gpus: usize, layout: &str) -> Vec<NodeSpec> {
    (0..n)
        .map(|i| NodeSpec {
            name: format!("gpu-node-{i}"),
            // As the GPU operator leaves nodes: labelled with the config mig-manager applied.
            labels: match layout {
                SEVEN_1G => [(MIG_CONFIG_LABEL.to_string(), "all-1g.10gb".to_string())].into(),
                "3g.40gb@0,3g.40gb@4" => [(MIG_CONFIG_LABEL.to_string(), "all-3g.40gb".to_string())].into(),
                _ => BTreeMap::new(),
            },
            gpus: (0..gpus)
                .map(|_| GpuSpec {
                    product: H100.into(),
                    layout: layout.into(),
                })
                .collect(),
        })
        .collect()
}

/// The node agents' service account, as the chart names it with its defaults.
pub const AGENT_USER: &str = "system:serviceaccount:mig-autoscaler:mig-autoscaler-agent";

/// A client that authenticates as the node agent on `node` (a bound service-account token): the
/// emulator checks its Node updates with the chart's admission policy.
pub fn agent_client(server: &Running, node: &str) -> Client {
    let token = format!("agent-token-{node}");
    server.state.add_token(
        &token,
        kube_emulator::UserInfo {
            username: AGENT_USER.into(),
            node_name: Some(node.into()),
        },
    );
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.default_retry = false;
    config.headers.push((
        http::header::AUTHORIZATION,
        http::HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    ));
    Client::try_from(config).unwrap()
}

/// An admin client of `server`, retrying nothing itself (as the CLI builds its clients).
pub fn client_for(server: &Running) -> Client {
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.default_retry = false;
    Client::try_from(config).unwrap()
}

/// Start the emulator, its actors (scheduler, kubelet, mig-manager), the default mig-parted
/// ConfigMap, and a stand-in agent on every node.
pub async fn env(spec_nodes: Vec<NodeSpec>, agent: AgentBehaviour) -> Env {
    let mut env = bare_env(spec_nodes.clone()).await;
    let names: Vec<String> = spec_nodes.iter().map(|n| n.name.clone()).collect();
    env.tasks.push(tokio::spawn(stand_in_agent(
        env.client.clone(),
        env.cluster.clone(),
        names,
        agent,
    )));
    env
}

/// The emulator, its actors and the default mig-parted ConfigMap; no agent.
pub async fn bare_env(spec_nodes: Vec<NodeSpec>) -> Env {
    bare_env_with(spec_nodes, false).await
}

/// [`bare_env`], with device-plugin pods that advertise instances changed directly (nvml backend)
/// only once restarted, as the real device plugin does (`device_plugin_pods`).
pub async fn bare_env_with(spec_nodes: Vec<NodeSpec>, device_plugin_pods: bool) -> Env {
    let server = Running::start("127.0.0.1:0".parse().unwrap(), Config::default())
        .await
        .unwrap();
    let spec = ClusterSpec {
        nodes: spec_nodes.clone(),
        mig_parted_config_map: "gpu-operator/default-mig-parted-config".into(),
        mig_manager_delay_ms: 50,
        device_plugin_pods,
    };
    chart_admission(&server);
    let cluster = Cluster::new(server.state.clone(), &spec).unwrap();
    let actors = cluster.spawn();
    server
        .seed([kube_emulator::fleet::default_mig_parted_config_map()])
        .unwrap();
    let client = client_for(&server);
    Env {
        server,
        cluster,
        client,
        tasks: vec![actors],
    }
}

/// For agent identities (see [`agent_client`]): the chart's RBAC, which grants agents no
/// `pods/eviction` (the controller evicts), and its per-node admission policy.
pub fn chart_admission(server: &Running) {
    server
        .state
        .add_admission(Arc::new(|r: &kube_emulator::AdmissionRequest<'_>| {
            if r.user.username != AGENT_USER {
                return Ok(());
            }
            match (r.resource, r.subresource) {
                ("pods", Some("eviction")) => Err(kube_emulator::Denied(format!(
                    "{AGENT_USER} cannot create resource \"pods/eviction\": the mig-autoscaler agent's ClusterRole grants no evictions"
                ))),
                ("nodes", _) => {
                    mig_protocol::agent_may_update_node(r.user.node_name.as_deref(), r.old, r.new)
                        .map_err(|e| kube_emulator::Denied(e.to_string()))
                }
                _ => Ok(()),
            }
        }));
}

fn report(cluster: &Cluster, node: &str) -> NodeReport {
    NodeReport {
        observed_at: String::new(),
        gpus: crate::emulated_gpus(&cluster.hardware(), node),
        backend: None,
    }
}

/// Plays the node agent's part (issue 6 builds the real one): reports the simulated GPUs on the
/// Node, and for a grant sets `nvidia.com/mig.config`, waits for mig-manager, writes Done.
async fn stand_in_agent(client: Client, cluster: Arc<Cluster>, names: Vec<String>, b: AgentBehaviour) {
    let api: Api<Node> = Api::all(client);
    let mut rng = b.seed;
    let mut started: BTreeMap<String, (String, tokio::time::Instant, Duration)> = BTreeMap::new();
    loop {
        for name in &names {
            let Ok(node) = api.get(name).await else { continue };
            let ann = node.annotations();
            let rep = serde_json::to_string(&report(&cluster, name)).unwrap();
            if ann.get(REPORT_ANNOTATION) != Some(&rep) {
                let _ = api
                    .patch(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"annotations": {REPORT_ANNOTATION: rep}}})),
                    )
                    .await;
            }
            let grant: Option<Grant> = ann
                .get(GRANT_ANNOTATION)
                .and_then(|g| serde_json::from_str(g).ok());
            let state: Option<NodeState> = ann
                .get(STATE_ANNOTATION)
                .and_then(|s| serde_json::from_str(s).ok());
            let Some(grant) = grant else { continue };
            if state
                .as_ref()
                .is_some_and(|s| s.grant_id == grant.id && s.phase.is_terminal())
            {
                continue;
            }
            let entry = started.entry(name.clone()).or_insert_with(|| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let extra = if b.max_ms > b.min_ms {
                    b.min_ms + rng % (b.max_ms - b.min_ms)
                } else {
                    b.min_ms
                };
                (
                    grant.id.clone(),
                    tokio::time::Instant::now(),
                    Duration::from_millis(extra),
                )
            });
            if entry.0 != grant.id {
                *entry = (grant.id.clone(), tokio::time::Instant::now(), entry.2);
            }
            let write_state = |phase: Phase, message: &str| {
                let s = NodeState {
                    grant_id: grant.id.clone(),
                    phase,
                    since: (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(b.clock_behind_s))
                        .to_string(),
                    attempt: 1,
                    message: Some(message.into()),
                    previous_config: None,
                    previous_layouts: Default::default(),
                    restarting_device_plugin: false,
                    heartbeat: None,
                };
                json!({"metadata": {"annotations": {STATE_ANNOTATION: serde_json::to_string(&s).unwrap()}}})
            };
            let Some(config) = &grant.mig_config else { continue };
            let labels = node.labels();
            if labels.get(MIG_CONFIG_LABEL) != Some(config) {
                let mut patch = write_state(Phase::AwaitingMigManager, "relabeled");
                patch["metadata"]["labels"] = json!({MIG_CONFIG_LABEL: config});
                let _ = api
                    .patch(name, &PatchParams::default(), &Patch::Merge(patch))
                    .await;
                continue;
            }
            let done = match labels.get(MIG_STATE_LABEL).map(String::as_str) {
                Some("success") => Phase::Done,
                Some("failed") => Phase::Failed,
                _ => continue,
            };
            if entry.1.elapsed() < entry.2 {
                continue;
            }
            let rep = serde_json::to_string(&report(&cluster, name)).unwrap();
            let mut patch = write_state(done, "mig-manager finished");
            patch["metadata"]["annotations"][REPORT_ANNOTATION] = json!(rep);
            let _ = api
                .patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// Settings for fast tests.
pub fn fast_settings(mode: Mode) -> Settings {
    let mut s = Settings {
        mode,
        ..Default::default()
    };
    s.batching.quiet = Dur::millis(100);
    s.batching.max_wait = Dur::millis(500);
    s.batching.resync = Dur::millis(300);
    s.tick = Dur::millis(50);
    s.lease.duration = Dur::millis(1500);
    s.lease.retry = Dur::millis(200);
    s.lease.namespace = "mig-autoscaler".into();
    s.budgets.node_cooldown = Dur::millis(0);
    s.http.listen = "127.0.0.1:0".into();
    s
}

/// Start a controller on `env` as replica `identity`.
pub async fn controller(env: &Env, settings: Settings, identity: &str) -> mig_controller::Running {
    mig_controller::start(client_for(&env.server), settings, identity.into())
        .await
        .unwrap()
}

/// Start a controller on `env` as replica `identity`, on `clock`.
pub async fn controller_with_clock(
    env: &Env,
    settings: Settings,
    identity: &str,
    clock: mig_protocol::SharedClock,
) -> mig_controller::Running {
    mig_controller::controller::start_with_clock(client_for(&env.server), settings, identity.into(), clock)
        .await
        .unwrap()
}

/// Write `grant` on `node`, as the controller would.
pub async fn write_grant(env: &Env, node: &str, grant: &Grant) {
    let text = serde_json::to_string(grant).unwrap();
    Api::<Node>::all(env.client.clone())
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {GRANT_ANNOTATION: text}}})),
        )
        .await
        .unwrap();
}

/// Write an agent report of `node`'s simulated GPUs, observed at `observed_at`, as an agent would.
pub async fn write_report(env: &Env, node: &str, observed_at: &str) {
    let report = NodeReport {
        observed_at: observed_at.into(),
        ..report(&env.cluster, node)
    };
    let text = serde_json::to_string(&report).unwrap();
    Api::<Node>::all(env.client.clone())
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {REPORT_ANNOTATION: text}}})),
        )
        .await
        .unwrap();
}

/// A pod in `default` asking for `count` instances of `profile` (`3g.40gb`).
pub fn mig_pod(name: &str, profile: &str, count: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "x", "resources": {"limits": {format!("nvidia.com/mig-{profile}"): count}}}]},
    }))
    .unwrap()
}

/// Create `pod` in `default`.
pub async fn create_pod(client: &Client, pod: &Pod) {
    Api::<Pod>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), pod)
        .await
        .unwrap();
}

/// Wait until `f` holds (polling), or panic with `what` after `secs`.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {secs}s waiting for: {what}");
}

/// A plain HTTP/1.1 request: (status, body).
pub async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    response(&String::from_utf8_lossy(&out))
}

/// An HTTP/1.1 response as read off the wire: (status, body with chunks decoded); status 0 when
/// there was none (the connection was closed at once).
pub fn response(text: &str) -> (u16, String) {
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (headers, rest) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let body = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// GET `path` as JSON: (status, body; `null` when not JSON).
pub async fn get_json(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = http(addr, "GET", path, b"").await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// events.k8s.io/v1 Events in a namespace: (regarding name, reason, note, type).
pub async fn events(client: &Client, ns: &str) -> Vec<(String, String, String, String)> {
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| {
            (
                e.regarding.and_then(|r| r.name).unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
                e.type_.unwrap_or_default(),
            )
        })
        .collect()
}

/// The value of one sample in a scrape (`name{labels}`), if present.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().split(' ').next()?.parse().ok())
}

/// The GPU operator's mig-parted config, as the controller left it.
pub async fn config_yaml(client: &Client) -> String {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), "gpu-operator")
        .get("default-mig-parted-config")
        .await
        .unwrap();
    cm.data
        .unwrap_or_default()
        .get("config.yaml")
        .cloned()
        .unwrap_or_default()
}

/// What a compromised agent on node `own` tries and must be refused (by the per-node admission
/// policy), as (what, node, merge patch); `other` is another node. The same list runs against the
/// emulator (fault suite s14) and the real API server (real tier).
pub fn agent_attacks(own: &str, other: &str) -> Vec<(&'static str, String, serde_json::Value)> {
    vec![
        (
            "another node's MIG config",
            other.into(),
            json!({"metadata": {"labels": {MIG_CONFIG_LABEL: "all-7g.80gb"}}}),
        ),
        (
            "a NoExecute taint (evicts past every PDB)",
            own.into(),
            json!({"spec": {"taints": [{"key": "x", "effect": "NoExecute"}]}}),
        ),
        (
            "our taint as NoExecute",
            own.into(),
            json!({"spec": {"taints": [{"key": TAINT_KEY, "effect": "NoExecute"}]}}),
        ),
        (
            "a forged grant",
            own.into(),
            json!({"metadata": {"annotations": {GRANT_ANNOTATION: "{}"}}}),
        ),
        ("a cordon", own.into(), json!({"spec": {"unschedulable": true}})),
        (
            "a label it does not own",
            own.into(),
            json!({"metadata": {"labels": {"nvidia.com/gpu.product": "x"}}}),
        ),
    ]
}

/// What an agent writes on its own Node `node` (as it is now), which must go through: its labels,
/// its taint added to the others there, its state.
pub fn agent_writes(node: &Node) -> Vec<serde_json::Value> {
    let mut taints: Vec<serde_json::Value> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|t| t.iter().map(|t| serde_json::to_value(t).unwrap()).collect())
        .unwrap_or_default();
    taints.push(json!({"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}));
    vec![
        json!({"metadata": {"labels": {MIG_CONFIG_LABEL: "all-3g.40gb", MIG_STATE_LABEL: "pending"}}}),
        json!({"spec": {"taints": taints}}),
        json!({"metadata": {"annotations": {STATE_ANNOTATION: "{}"}}}),
    ]
}

/// The product on simulated nodes that are API clients ([`crate::nodes::SimulatedNodes`]) of any
/// API server: a real agent per node on the mig-manager backend, each with its own client (as its
/// pod's bound token authenticates it), and a controller with the client it is given.
pub struct SystemOnNodes {
    /// The controller.
    pub controller: mig_controller::Running,
    agents: Vec<mig_agent::Running>,
}

impl SystemOnNodes {
    /// Start the agents (`(node, client)`, ticking every 100 ms, reading `hardware`, on the
    /// planner's backend) and the controller (replica `replica-a`).
    pub async fn start(
        hardware: Arc<kube_emulator::Hardware>,
        agents: Vec<(String, Client)>,
        controller: Client,
        settings: Settings,
    ) -> SystemOnNodes {
        let mut running = Vec::new();
        for (node, client) in agents {
            let mut s = mig_agent::AgentSettings::new(node.clone());
            s.tick = Duration::from_millis(100);
            s.sequence.backend = settings.planner.backend;
            let source = Arc::new(crate::EmulatedGpus::new(hardware.clone(), node));
            running.push(mig_agent::start(client, s, source).await.unwrap());
        }
        let controller = mig_controller::start(controller, settings, "replica-a".into())
            .await
            .unwrap();
        SystemOnNodes {
            controller,
            agents: running,
        }
    }

    /// Stop the controller, then the agents.
    pub async fn stop(self) {
        self.controller.stop().await;
        for a in self.agents {
            a.stop().await;
        }
    }
}

/// A pod asking for a 3g.40gb, created on a cluster whose GPUs are all 1g slices, runs within
/// `secs`: planned, granted, repartitioned by an agent and mig-manager, bound by the scheduler,
/// admitted by its kubelet. Then the node it runs on is untainted, its mig-manager state is
/// `success`, its GPUs are valid and one of them gives the pod a 3g instance. Its node's name.
pub async fn a_3g_pod_runs_after_a_repartition(
    admin: &Client,
    hardware: &kube_emulator::Hardware,
    secs: u64,
) -> String {
    create_pod(admin, &mig_pod("wants-3g", "3g.40gb", "1")).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let pod = loop {
        let pod = pods.get("wants-3g").await.unwrap();
        if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
            break pod;
        }
        if tokio::time::Instant::now() >= deadline {
            let nodes: Vec<String> = Api::<Node>::all(admin.clone())
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .map(|n| {
                    let taints = n.spec.as_ref().and_then(|s| s.taints.clone());
                    let state = n.annotations().get(STATE_ANNOTATION).cloned();
                    format!(
                        "{}: labels {:?}, taints {taints:?}, state {state:?}",
                        n.name_any(),
                        n.labels()
                    )
                })
                .collect();
            panic!(
                "the 3g pod is not Running after {secs} s: {:?}; nodes: {nodes:#?}",
                pod.status
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let node_name = pod.spec.and_then(|s| s.node_name).unwrap();
    let node = Api::<Node>::all(admin.clone()).get(&node_name).await.unwrap();
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    assert!(
        taints.iter().all(|t| t.key != TAINT_KEY),
        "{node_name} still carries our taint: {taints:?}"
    );
    assert_eq!(
        node.metadata
            .labels
            .unwrap_or_default()
            .get(MIG_STATE_LABEL)
            .map(String::as_str),
        Some("success")
    );
    let gpus = hardware.gpus(&node_name);
    for g in &gpus {
        g.model.validate(&g.layout).unwrap();
    }
    let holds_3g = gpus.iter().any(|g| {
        g.used.iter().any(|(i, pod)| {
            pod == "default/wants-3g" && g.model.profile(i.profile).is_some_and(|p| p.name == "3g.40gb")
        })
    });
    assert!(
        holds_3g,
        "no 3g.40gb instance of {node_name} is the pod's: {gpus:?}"
    );
    node_name
}

/// `pod`, allowed only on `node`.
pub fn only_on(mut pod: Pod, node: &str) -> Pod {
    if let Some(spec) = pod.spec.as_mut() {
        spec.node_selector = Some([("kubernetes.io/hostname".to_string(), node.to_string())].into());
    }
    pod
}

/// Whether pod `default/name` is `Running`.
pub async fn pod_running(client: &Client, name: &str) -> bool {
    Api::<Pod>::namespaced(client.clone(), "default")
        .get(name)
        .await
        .ok()
        .and_then(|p| p.status?.phase)
        .as_deref()
        == Some("Running")
}

/// Reservations by attrition, on two nodes of one H100 at seven 1g (`gpu-node-0`, `gpu-node-1`)
/// with the controller at `controller` in auto mode (either backend): a 7g pod that no GPU can
/// serve without evicting gets the GPU that should empty soonest (one pod, not two); its node is
/// annotated and tainted so that nothing new lands there, and the plan, `explain`, Events and
/// metrics say so; once that pod ends (a 1g pod that may only use that node waits meanwhile, and
/// does not take the freed instance), the GPU is rebuilt for the 7g pod, which runs there within
/// `secs`, and the reservation and its taint are gone.
pub async fn a_large_pod_gets_a_reserved_gpu_and_runs_there(
    admin: &Client,
    controller: std::net::SocketAddr,
    secs: u64,
) {
    use mig_protocol::{RESERVATIONS_ANNOTATION, RESERVED_TAINT};
    for (name, node) in [("a", "gpu-node-0"), ("b", "gpu-node-0"), ("c", "gpu-node-1")] {
        create_pod(admin, &only_on(mig_pod(name, "1g.10gb", "1"), node)).await;
    }
    eventually(secs, "the 1g pods run", || async {
        pod_running(admin, "a").await && pod_running(admin, "b").await && pod_running(admin, "c").await
    })
    .await;
    let api: Api<Node> = Api::all(admin.clone());
    // The agents' reports show them (a plan over an older report sees fewer pods and may reserve
    // the other node: a fresh-clone CI run on the real tier did).
    let reported = |node: &'static str, pods: &'static [&'static str]| {
        let api = api.clone();
        async move {
            let n = api.get(node).await.unwrap();
            let report: Option<NodeReport> = n
                .annotations()
                .get(REPORT_ANNOTATION)
                .and_then(|text| serde_json::from_str(text).ok());
            let reported: Vec<&String> = report
                .iter()
                .flat_map(|r| &r.gpus)
                .flat_map(|g| &g.instances)
                .flat_map(|i| &i.pods)
                .collect();
            pods.iter()
                .all(|p| reported.iter().any(|r| **r == format!("default/{p}")))
        }
    };
    eventually(secs, "the agents report the 1g pods", || async {
        reported("gpu-node-0", &["a", "b"]).await && reported("gpu-node-1", &["c"]).await
    })
    .await;
    create_pod(admin, &mig_pod("big", "7g.80gb", "1")).await;
    let reserved = |n: &Node| {
        let taints = n.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
        (
            n.annotations().get(RESERVATIONS_ANNOTATION).cloned(),
            taints
                .iter()
                .any(|t| t.key == RESERVED_TAINT && t.effect == "NoSchedule"),
        )
    };
    eventually(secs, "gpu-node-1 reserved for the 7g pod and tainted", || async {
        let (note, tainted) = reserved(&api.get("gpu-node-1").await.unwrap());
        note.is_some_and(|n| n.contains("default/big")) && tainted
    })
    .await;
    assert_eq!(reserved(&api.get("gpu-node-0").await.unwrap()), (None, false));
    let (_, p) = get_json(controller, "/api/v1/plan").await;
    let r = &p["plan"]["reservations"][0];
    assert_eq!(
        (r["pod"].as_str(), r["node"].as_str()),
        (Some("default/big"), Some("gpu-node-1")),
        "{p:#}"
    );
    assert_eq!(r["waitingFor"], json!(["default/c"]));
    let (_, e) = get_json(controller, "/api/v1/pods/default/big/explain").await;
    assert!(
        e["explanation"]
            .as_str()
            .unwrap_or_default()
            .contains("reserved for it: gpu-node-1/0 (7g.80gb@0)"),
        "{e}"
    );
    // A new 1g pod that may only use the reserved node stays off it.
    create_pod(admin, &only_on(mig_pod("late", "1g.10gb", "1"), "gpu-node-1")).await;
    eventually(secs, "GpusReserved on the pod and the node", || async {
        let ev = events(admin, "default").await;
        ev.iter().any(|(w, r, _, _)| w == "big" && r == "GpusReserved")
            && ev
                .iter()
                .any(|(w, r, _, _)| w == "gpu-node-1" && r == "GpusReserved")
    })
    .await;
    let (_, scrape) = http(controller, "GET", "/metrics", b"").await;
    assert_eq!(
        sample(&scrape, "mig_autoscaler_reserved_gpus"),
        Some(1.0),
        "{scrape}"
    );
    assert!(!pod_running(admin, "late").await);

    // The pod it waits for ends: the GPU is rebuilt for the 7g pod, which runs there.
    Api::<Pod>::namespaced(admin.clone(), "default")
        .delete("c", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    eventually(secs, "the 7g pod runs on gpu-node-1", || async {
        let pod = Api::<Pod>::namespaced(admin.clone(), "default")
            .get("big")
            .await
            .unwrap();
        pod_running(admin, "big").await && pod.spec.and_then(|s| s.node_name).as_deref() == Some("gpu-node-1")
    })
    .await;
    eventually(secs, "the reservation and its taint are gone", || async {
        reserved(&api.get("gpu-node-1").await.unwrap()) == (None, false)
    })
    .await;
    assert!(
        !pod_running(admin, "late").await,
        "the 1g pod never took the room"
    );
    eventually(secs, "ReservationReleased", || async {
        events(admin, "default")
            .await
            .iter()
            .any(|(w, r, note, _)| w == "gpu-node-1" && r == "ReservationReleased" && note.contains("ready"))
    })
    .await;
}

/// Pod lifecycle as the real API server keeps it, which the emulator must keep alike (both tiers
/// check it, with simulated kubelets running on `node`): a new pod is `Pending`; deleting a pod on
/// no node removes it at once, grace period or not; deleting a bound pod only marks it terminating
/// (`deletionTimestamp`), and its kubelet removes it once the grace period is over.
pub async fn pods_live_and_end_as_on_a_real_server(admin: &Client, node: &str) {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let pod = |name: &str, spec: serde_json::Value| -> Pod {
        let mut spec = spec;
        spec["containers"] = json!([{"name": "c", "image": "x"}]);
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
    };
    let unbound = pod(
        "nowhere",
        json!({"nodeSelector": {"example.com/no-such-node": "true"}, "terminationGracePeriodSeconds": 30}),
    );
    let created = pods.create(&PostParams::default(), &unbound).await.unwrap();
    assert_eq!(created.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
    pods.delete("nowhere", &Default::default()).await.unwrap();
    assert!(
        pods.get_opt("nowhere").await.unwrap().is_none(),
        "a pod on no node is removed at once"
    );
    let bound = pod(
        "somewhere",
        json!({"nodeName": node, "terminationGracePeriodSeconds": 1}),
    );
    pods.create(&PostParams::default(), &bound).await.unwrap();
    pods.delete("somewhere", &Default::default()).await.unwrap();
    let terminating = pods.get_opt("somewhere").await.unwrap();
    assert!(
        terminating.is_some_and(|p| p.metadata.deletion_timestamp.is_some()),
        "a bound pod is terminating until its kubelet ends it"
    );
    eventually(15, "the kubelet removes the terminated pod", || async {
        pods.get_opt("somewhere").await.unwrap().is_none()
    })
    .await;
}

/// The grant on a node, if any.
pub fn grant_of(node: &Node) -> Option<Grant> {
    node.annotations()
        .get(GRANT_ANNOTATION)
        .and_then(|g| serde_json::from_str(g).ok())
}

/// The most nodes in flight (granted and not yet idle) at once, as a watch of `client`'s server
/// sees them, until `stop` turns true.
pub async fn max_in_flight(client: kube::Client, stop: tokio::sync::watch::Receiver<bool>) -> usize {
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut max = 0;
    let stream = {
        use kube::runtime::WatchStreamExt;
        kube::runtime::watcher(
            Api::<Node>::all(client),
            kube::runtime::watcher::Config::default(),
        )
        .default_backoff()
    };
    futures::pin_mut!(stream);
    loop {
        if *stop.borrow() {
            return max;
        }
        let Ok(Some(ev)) =
            tokio::time::timeout(Duration::from_millis(100), futures::StreamExt::next(&mut stream)).await
        else {
            continue;
        };
        match ev {
            Ok(kube::runtime::watcher::Event::Apply(n)) | Ok(kube::runtime::watcher::Event::InitApply(n)) => {
                nodes.insert(n.name_any(), n);
            }
            Ok(kube::runtime::watcher::Event::Delete(n)) => {
                nodes.remove(&n.name_any());
            }
            _ => {}
        }
        let now = nodes
            .values()
            .filter(|n| {
                let g = grant_of(n);
                let s: Option<NodeState> = n
                    .annotations()
                    .get(STATE_ANNOTATION)
                    .and_then(|s| serde_json::from_str(s).ok());
                !matches!(
                    mig_protocol::flight(g.as_ref(), s.as_ref()),
                    mig_protocol::Flight::Idle { .. }
                )
            })
            .count();
        max = max.max(now);
    }
}
