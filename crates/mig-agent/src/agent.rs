//! The agent's runtime: observe the Node, its pods and GPUs; report; step; act; persist.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, Taint};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, ResourceExt};
use mig_catalog::Catalog;
use mig_protocol::{
    DEVICE_PLUGIN_DEPLOY_LABEL, DEVICE_PLUGIN_PAUSED, DO_NOT_DISRUPT, GRANT_ANNOTATION, Grant,
    MIG_CONFIG_LABEL, MIG_STATE_LABEL, NodeReport, NodeState, REPORT_ANNOTATION, Reason, STATE_ANNOTATION,
    SharedClock, TAINT_KEY, parse_annotation,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::watch;

use crate::error::{GpuError, ScrapeError};
use crate::sequence::{self, Effect, Observation, PodFact, SequencePolicy};
use crate::source::GpuSource;
use mig_planner::snapshot::Gpu;

/// Field manager of the agent's writes.
pub const FIELD_MANAGER: &str = "mig-autoscaler-agent";
/// Events' reporting controller.
pub const AGENT_NAME: &str = "mig-autoscaler.io/agent";

/// The GPU operator's device-plugin pods.
pub const DEVICE_PLUGIN_SELECTOR: &str = "app=nvidia-device-plugin-daemonset";

/// Where the node's dcgm-exporter serves its metrics.
#[derive(Clone, Debug)]
pub enum DcgmEndpoint {
    /// This URL (`http://…/metrics`).
    Url(String),
    /// The pod on this node with these `key=value` labels, at its pod IP and this port (the GPU
    /// operator's `nvidia-dcgm-exporter`, port 9400).
    Pod {
        /// `key=value[,key=value]`.
        selector: String,
        /// Metrics port.
        port: u16,
    },
}

/// The GPU operator's dcgm-exporter pods.
pub const DCGM_EXPORTER_SELECTOR: &str = "app=nvidia-dcgm-exporter";

/// Agent settings.
#[derive(Clone, Debug)]
pub struct AgentSettings {
    /// This node's name (downward API `spec.nodeName`).
    pub node: String,
    /// How often to look.
    pub tick: Duration,
    /// Timeouts and failure policy.
    pub sequence: SequencePolicy,
    /// Listen address for metrics and probes (`None`: no server).
    pub listen: Option<SocketAddr>,
    /// The same Event is not sent again within this.
    pub event_dedupe: Duration,
    /// After a failed start-up catalog check (unknown model, driver disagreeing with the catalog),
    /// check again this much later (a driver update or a new agent image may have fixed it); the
    /// node is reported every tick meanwhile.
    pub catalog_retry: Duration,
    /// nvml backend: `key=value[,key=value]` labels of the device-plugin pods, to see when the
    /// paused plugin is gone from this node.
    pub device_plugin_selector: String,
    /// Per-instance utilization and pods from dcgm-exporter (`None`: not read).
    pub dcgm: Option<DcgmEndpoint>,
    /// How often dcgm-exporter is read (it collects every 30 s by default).
    pub dcgm_interval: Duration,
    /// The namespace of the GPU operator: device-plugin and dcgm-exporter pods are trusted only
    /// there, and only when a DaemonSet owns them (a tenant's pod with the same labels is not).
    pub operator_namespace: String,
    /// While a sequence runs, its state is rewritten this often (a heartbeat: the controller takes
    /// a state unchanged for `agentTimeout` as a dead agent).
    pub heartbeat: Duration,
    /// `/healthz` fails once no step has finished for this long (a hung driver call, a wedged
    /// runtime), so that the kubelet restarts the agent.
    pub stall_after: Duration,
    /// The node report is written when it changes, and at least this often (its `observedAt`
    /// moves): the controller takes a report unchanged for its `reportTimeout` as an agent that
    /// stopped, and leaves the node's GPUs alone. As the kubelet's node status, every 5 minutes.
    pub report_refresh: Duration,
    /// The API server's URL, for log lines about failed steps (`None`: not named).
    pub api_server: Option<String>,
}

impl AgentSettings {
    /// Defaults for `node`.
    pub fn new(node: impl Into<String>) -> AgentSettings {
        AgentSettings {
            node: node.into(),
            tick: Duration::from_secs(1),
            sequence: SequencePolicy::default(),
            listen: None,
            event_dedupe: Duration::from_secs(120),
            catalog_retry: Duration::from_secs(60),
            device_plugin_selector: DEVICE_PLUGIN_SELECTOR.into(),
            dcgm: Some(DcgmEndpoint::Pod {
                selector: DCGM_EXPORTER_SELECTOR.into(),
                port: 9400,
            }),
            dcgm_interval: Duration::from_secs(15),
            operator_namespace: OPERATOR_NAMESPACE.into(),
            stall_after: Duration::from_secs(300),
            heartbeat: Duration::from_secs(15),
            report_refresh: Duration::from_secs(300),
            api_server: None,
        }
    }
}

/// The GPU operator's namespace (its Helm chart's default).
pub const OPERATOR_NAMESPACE: &str = "gpu-operator";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Label {
    kind: &'static str,
}

/// Agent metrics.
pub struct Metrics {
    registry: Registry,
    phase: Family<Label, Gauge>,
    transitions: Family<Label, Counter>,
    errors: Family<Label, Counter>,
    ready: Gauge,
}

/// The phase gauge's values: no sequence, or its phase by name.
const IDLE: &str = "Idle";

fn phases() -> impl Iterator<Item = &'static str> {
    std::iter::once(IDLE).chain(mig_protocol::Phase::ALL.map(mig_protocol::Phase::as_str))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mig_autoscaler_agent");
        let m = Metrics {
            phase: Family::default(),
            transitions: Family::default(),
            errors: Family::default(),
            ready: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "phase",
            "1 for the phase this node's sequence is in (idle when none)",
            m.phase.clone(),
        );
        registry.register("transitions", "Phases entered", m.transitions.clone());
        registry.register(
            "errors",
            "Failed API writes or observations, by kind",
            m.errors.clone(),
        );
        registry.register(
            "ready",
            "1 once the GPUs are observed and match the catalog",
            m.ready.clone(),
        );
        for p in phases() {
            let _ = m.phase.get_or_create(&Label { kind: p });
            let _ = m.transitions.get_or_create(&Label { kind: p });
        }
        for e in [
            "observe",
            "report",
            "act",
            "persist",
            "catalog",
            "annotation",
            "dcgm",
        ] {
            let _ = m.errors.get_or_create(&Label { kind: e });
        }
        Metrics { registry, ..m }
    }

    fn set_phase(&self, phase: &'static str) {
        for p in phases() {
            self.phase
                .get_or_create(&Label { kind: p })
                .set(i64::from(p == phase));
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// A counter value, for tests: `errors`/`transitions` by label.
    pub fn count(&self, family: &str, kind: &'static str) -> u64 {
        let f = match family {
            "errors" => &self.errors,
            _ => &self.transitions,
        };
        f.get_or_create(&Label { kind }).get()
    }
}

/// State shared with the HTTP server and tests.
pub struct Shared {
    /// Settings.
    pub settings: AgentSettings,
    /// Metrics.
    pub metrics: Metrics,
    ready: AtomicBool,
    /// When the last step finished (successfully or not).
    progress: std::sync::Mutex<Instant>,
    /// Time.
    clock: SharedClock,
}

impl Shared {
    /// Whether a step finished within `stall_after`.
    pub fn is_live(&self) -> bool {
        let last = *self.progress.lock().unwrap_or_else(|e| e.into_inner());
        self.clock.instant().saturating_duration_since(last) < self.settings.stall_after
    }

    /// Whether the agent acts on grants (its GPUs are known and agree with the catalog).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// A running agent.
pub struct Running {
    /// Metrics/probe address, if serving.
    pub addr: Option<SocketAddr>,
    /// Shared state.
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Graceful stop: the current step finishes (never stopped between an effect and its persist).
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(main) = self.tasks.first_mut() {
            let _ = tokio::time::timeout(Duration::from_secs(10), main).await;
        }
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Stop as a crash would, anywhere.
    pub fn kill(self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Start the agent. Its writes are retried by its own ticks, so `client` need not retry
/// (`Config::default_retry = false`, as the CLI builds it).
pub async fn start(
    client: Client,
    settings: AgentSettings,
    source: Arc<dyn GpuSource>,
) -> anyhow::Result<Running> {
    start_with_clock(client, settings, source, mig_protocol::clock::system()).await
}

/// [`start`] on `clock` (tests move time by hand with [`mig_protocol::ManualClock`]).
pub async fn start_with_clock(
    client: Client,
    settings: AgentSettings,
    source: Arc<dyn GpuSource>,
    clock: SharedClock,
) -> anyhow::Result<Running> {
    let shared = Arc::new(Shared {
        metrics: Metrics::new(),
        ready: AtomicBool::new(false),
        progress: std::sync::Mutex::new(clock.instant()),
        settings: settings.clone(),
        clock: clock.clone(),
    });
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let worker = Worker {
        nodes: Api::all(client.clone()),
        pods: Api::all(client.clone()),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: AGENT_NAME.into(),
                instance: Some(settings.node.clone()),
            },
        ),
        shared: shared.clone(),
        source,
        http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http(),
        dcgm_cache: None,
        events: mig_protocol::EventGate::new(settings.event_dedupe),
        catalog_checked: false,
        catalog_next_check: None,
        last_phase: None,
        last_persist: clock.instant(),
        unreadable: None,
        node_version: std::sync::Mutex::new(None),
    };
    tasks.push(tokio::spawn(worker.run(rx.clone())));
    let mut addr = None;
    if let Some(listen) = settings.listen {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        addr = Some(listener.local_addr()?);
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(shared.clone());
        let mut rx = rx.clone();
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
        }));
    }
    Ok(Running {
        addr,
        shared,
        shutdown,
        tasks,
    })
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn healthz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if s.is_live() {
        (StatusCode::OK, "ok".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no step has finished for {} s (a GPU command or an API call hangs)",
                s.settings.stall_after.as_secs()
            ),
        )
    }
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "GPUs not observed, or they do not match the catalog",
        )
    }
}

struct Worker {
    nodes: Api<Node>,
    pods: Api<Pod>,
    recorder: Recorder,
    shared: Arc<Shared>,
    source: Arc<dyn GpuSource>,
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
    /// The last dcgm-exporter read (`None`: it failed) and when it was made.
    dcgm_cache: Option<(Instant, Option<Vec<crate::dcgm::InstanceSeries>>)>,
    /// Events sent recently (not sent again within `event_dedupe`).
    events: mig_protocol::EventGate,
    catalog_checked: bool,
    /// When the catalog check may run again after a failure (None: at once).
    catalog_next_check: Option<Instant>,
    last_phase: Option<&'static str>,
    /// When the state was last written.
    last_persist: Instant,
    /// Why our annotations did not parse at the last tick (logged when it changes).
    unreadable: Option<mig_protocol::MalformedAnnotation>,
    /// The Node's resourceVersion as read this tick: taint changes are made against it (a 409
    /// means another writer changed the taints; the next tick reads them again).
    node_version: std::sync::Mutex<Option<String>>,
}

/// Why a tick stopped early.
#[derive(Debug, thiserror::Error)]
enum TickError {
    /// An API call failed (retried next tick).
    #[error("{0}: {1}")]
    Api(&'static str, kube::Error),
    /// The GPU source failed.
    #[error("observing GPUs: {0}")]
    Source(#[from] crate::error::GpuError),
}

impl Worker {
    /// Monotonic time on the injected clock.
    fn instant(&self) -> Instant {
        self.shared.clock.instant()
    }

    /// Wall time on the injected clock.
    fn now(&self) -> jiff::Timestamp {
        self.shared.clock.now()
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.tick().await {
                let settings = &self.shared.settings;
                let api_server = settings.api_server.as_deref().unwrap_or("the API server");
                tracing::warn!(node = %settings.node, error = %e, %api_server, "agent step incomplete; retrying");
            }
            *self.shared.progress.lock().unwrap_or_else(|e| e.into_inner()) = self.instant();
            tokio::select! {
                _ = tokio::time::sleep(self.shared.settings.tick) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    fn node_ref(&self, uid: Option<String>) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.shared.settings.node.clone()),
            uid,
            ..Default::default()
        }
    }

    async fn event(&mut self, reason: Reason, note: String, regarding: ObjectReference) {
        debug_assert_eq!(
            reason.emitter(),
            mig_protocol::Emitter::Agent,
            "{reason} is the controller's"
        );
        let now = self.instant();
        if !self.events.admit(&regarding, reason, &note, now) {
            return;
        }
        let ev = Event {
            type_: if reason.is_warning() {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.as_str().into(),
            note: Some(mig_protocol::clip_note(note)),
            action: "Reconfigure".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &regarding).await {
            tracing::warn!(error = %e, %reason, "could not publish event");
        }
    }

    async fn tick(&mut self) -> Result<(), TickError> {
        let name = self.shared.settings.node.clone();
        let node = self.nodes.get(&name).await.map_err(|e| {
            self.count_error("observe");
            TickError::Api("get node", e)
        })?;
        let source = self.source.clone();
        let gpus = off_runtime(move || source.gpus()).await.map_err(|e| {
            self.count_error("observe");
            TickError::Source(e)
        })?;
        let uid = node.metadata.uid.clone();
        *self.node_version.lock().unwrap_or_else(|e| e.into_inner()) = node.metadata.resource_version.clone();
        let check_due = self.catalog_next_check.is_none_or(|t| self.instant() >= t);
        if !self.catalog_checked && check_due {
            self.check_catalog(&gpus, uid.clone()).await;
        }
        let pods = self
            .pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
            .await
            .map_err(|e| TickError::Api("list pods", e))?;
        let gpus = self.attribute_pods(gpus, &pods.items).await;
        self.publish_report(&node, &gpus).await?;
        if !self.catalog_checked {
            return Ok(()); // refuse to act on GPUs the catalog does not know
        }
        let obs = self.observation(&node, &pods.items, gpus);
        self.note_unreadable(&obs);
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        self.run_step(&obs, &taints, uid).await
    }

    fn count_error(&self, kind: &'static str) {
        self.shared.metrics.errors.get_or_create(&Label { kind }).inc();
    }

    /// Every GPU's model must be known, and what the driver reports of its MIG profiles and
    /// placements must agree with the catalog the plans are built from; until then the agent
    /// reports but does not act (a Warning says why; checked again after `catalog_retry`).
    async fn check_catalog(&mut self, gpus: &[Gpu], uid: Option<String>) {
        let mut unknown = Vec::new();
        let mut mismatched = Vec::new();
        for g in gpus {
            let model = match Catalog::embedded().lookup(&g.product) {
                Ok(m) => m,
                Err(e) => {
                    unknown.push(format!("GPU {}: {e}", g.index));
                    continue;
                }
            };
            let (source, gpu) = (self.source.clone(), g.clone());
            match off_runtime(move || source.profiles(&gpu)).await {
                Ok(Some(observed)) => {
                    let blocking: Vec<String> = mig_catalog::nvml::compare(model, &observed)
                        .into_iter()
                        .filter(mig_catalog::nvml::Mismatch::is_blocking)
                        .map(|m| m.to_string())
                        .collect();
                    if !blocking.is_empty() {
                        mismatched.push(format!(
                            "GPU {} ({} per {}): {}",
                            g.index,
                            model.key,
                            observed.origin,
                            blocking.join("; ")
                        ));
                    }
                }
                Ok(None) => {}
                Err(e) => mismatched.push(format!("GPU {}: cannot read MIG profiles: {e}", g.index)),
            }
        }
        let problems: Vec<String> = unknown.into_iter().chain(mismatched).collect();
        if !problems.is_empty() {
            self.catalog_next_check = Some(self.instant() + self.shared.settings.catalog_retry);
            self.count_error("catalog");
            let note = format!(
                "{}; the agent reports but will not reconfigure this node",
                problems.join("; ")
            );
            self.event(Reason::CatalogMismatch, note, self.node_ref(uid.clone()))
                .await;
        } else {
            self.catalog_checked = true;
            self.shared.ready.store(true, Ordering::SeqCst);
            self.shared.metrics.ready.set(1);
        }
    }

    /// Which pods use which instances, where the source cannot say: from dcgm-exporter where it
    /// can, and the rest by profile (safe: every instance they may use counts as used); and
    /// utilization per instance.
    async fn attribute_pods(&mut self, mut gpus: Vec<Gpu>, pods: &[Pod]) -> Vec<Gpu> {
        // The pods on this node holding (or about to hold) MIG instances, with their requests
        // (none where the source knows the pods).
        let mig_pods: std::collections::BTreeMap<String, std::collections::BTreeMap<String, i64>> =
            if self.source.knows_pods() {
                Default::default()
            } else {
                pods.iter()
                    .filter(|p| live(p))
                    .filter_map(|p| {
                        let r = mig_protocol::mig_requests(p.spec.as_ref()?).ok()?;
                        (!r.is_empty()).then(|| (pod_key(p), r))
                    })
                    .collect()
            };
        let mut placed = std::collections::BTreeSet::new();
        if let Some(series) = self.dcgm_series(pods).await {
            placed = crate::dcgm::apply(&mut gpus, &self.source.instance_ids(), &series, &mig_pods);
        }
        let unplaced: Vec<(String, std::collections::BTreeMap<String, i64>)> = mig_pods
            .into_iter()
            .filter(|(k, _)| !placed.contains(k))
            .collect();
        crate::source::attribute_by_profile(&mut gpus, &unplaced);
        gpus
    }

    /// The report on the Node, written when it changed and at least every `report_refresh` (an
    /// idle node costs one write per refresh).
    async fn publish_report(&self, node: &Node, gpus: &[Gpu]) -> Result<(), TickError> {
        let now = self.now();
        let report = NodeReport {
            observed_at: now.to_string(),
            gpus: gpus.to_vec(),
            backend: Some(self.shared.settings.sequence.backend),
        };
        let refresh = jiff::SignedDuration::try_from(self.shared.settings.report_refresh)
            .unwrap_or(jiff::SignedDuration::MAX);
        let current = node
            .annotations()
            .get(REPORT_ANNOTATION)
            .and_then(|r| serde_json::from_str::<NodeReport>(r).ok())
            .is_some_and(|r| {
                r.gpus == report.gpus
                    && r.backend == report.backend
                    && r.observed_at
                        .parse::<jiff::Timestamp>()
                        .is_ok_and(|at| at <= now && now.duration_since(at) < refresh)
            });
        if current {
            return Ok(());
        }
        let text = serde_json::to_string(&report).unwrap_or_default();
        self.patch(json!({"metadata": {"annotations": {REPORT_ANNOTATION: text}}}))
            .await
            .inspect_err(|_| self.count_error("report"))
    }

    /// What the sequence sees now.
    fn observation(&self, node: &Node, pods: &[Pod], gpus: Vec<Gpu>) -> Observation {
        let name = &self.shared.settings.node;
        let object = format!("node/{name}");
        let annotations = node.annotations();
        let labels = node.labels();
        Observation {
            grant: parse_annotation::<Grant>(Some(annotations), GRANT_ANNOTATION, &object),
            state: parse_annotation::<NodeState>(Some(annotations), STATE_ANNOTATION, &object),
            tainted: node
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key == TAINT_KEY)),
            mig_config: labels.get(MIG_CONFIG_LABEL).cloned(),
            mig_state: labels.get(MIG_STATE_LABEL).cloned(),
            pods: pods
                .iter()
                .filter(|p| live(p))
                .map(|p| PodFact {
                    key: pod_key(p),
                    terminating: p.metadata.deletion_timestamp.is_some(),
                    do_not_disrupt: p.annotations().get(DO_NOT_DISRUPT).is_some_and(|v| v == "true"),
                })
                .collect(),
            gpus,
            advertised: node
                .status
                .as_ref()
                .and_then(|s| s.allocatable.as_ref())
                .map(|a| {
                    a.iter()
                        .filter(|(k, _)| k.starts_with("nvidia.com/mig-"))
                        .map(|(k, q)| (k.clone(), q.0.parse().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default(),
            device_plugin_label: labels.get(DEVICE_PLUGIN_DEPLOY_LABEL).cloned(),
            device_plugin_pods: pods
                .iter()
                .filter(|p| self.operator_pod(&self.shared.settings.device_plugin_selector, p))
                .count(),
            now: self.now(),
        }
    }

    /// Annotations that do not parse: counted every tick, logged when it changes.
    fn note_unreadable(&mut self, obs: &Observation) {
        let unreadable = obs.grant.as_ref().err().or(obs.state.as_ref().err()).cloned();
        if unreadable.is_some() {
            self.count_error("annotation");
        }
        if unreadable != self.unreadable {
            if let Some(e) = &unreadable {
                tracing::warn!(node = %self.shared.settings.node, error = %e, "our annotations do not parse; nothing is done on this node until they are fixed");
            }
            self.unreadable = unreadable;
        }
    }

    /// One step of the sequence: the heartbeat (first: an effect that keeps failing, a PDB's 429,
    /// ends the tick), the effects in order, then the next state.
    async fn run_step(
        &mut self,
        obs: &Observation,
        taints: &[Taint],
        uid: Option<String>,
    ) -> Result<(), TickError> {
        let phase_now = match &obs.state {
            Ok(Some(s))
                if obs
                    .grant
                    .as_ref()
                    .is_ok_and(|g| g.as_ref().is_some_and(|g| g.id == s.grant_id)) =>
            {
                s.phase.as_str()
            }
            _ => IDLE,
        };
        self.shared.metrics.set_phase(phase_now);
        let step = sequence::step(obs, &self.shared.settings.sequence);
        let beat = match (&obs.state, &obs.grant) {
            (Ok(Some(s)), Ok(Some(g)))
                if step.next.is_none()
                    && s.grant_id == g.id
                    && !s.phase.is_terminal()
                    && self.instant().saturating_duration_since(self.last_persist)
                        >= self.shared.settings.heartbeat =>
            {
                Some(NodeState {
                    heartbeat: Some(self.now().to_string()),
                    ..s.clone()
                })
            }
            _ => None,
        };
        if let Some(beat) = beat {
            let text = serde_json::to_string(&beat).unwrap_or_default();
            self.patch(json!({"metadata": {"annotations": {STATE_ANNOTATION: text}}}))
                .await?;
            self.last_persist = self.instant();
        }
        for effect in &step.effects {
            self.perform(effect, taints, uid.clone()).await?;
        }
        let Some(next) = step.next else {
            return Ok(());
        };
        let text = serde_json::to_string(&next).unwrap_or_default();
        self.patch(json!({"metadata": {"annotations": {STATE_ANNOTATION: text}}}))
            .await
            .inspect_err(|_| self.count_error("persist"))?;
        self.last_persist = self.instant();
        let label = next.phase.as_str();
        self.shared
            .metrics
            .transitions
            .get_or_create(&Label { kind: label })
            .inc();
        self.shared.metrics.set_phase(label);
        if self.last_phase != Some(label) {
            tracing::info!(node = %self.shared.settings.node, grant_id = %next.grant_id, phase = label, message = next.message.as_deref().unwrap_or(""), "phase");
        }
        self.last_phase = Some(label);
        Ok(())
    }

    /// Patch our Node; remembers the resourceVersion it answers with (for taint changes).
    async fn patch(&self, patch: serde_json::Value) -> Result<(), TickError> {
        let node = self
            .nodes
            .patch(
                &self.shared.settings.node,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| TickError::Api("patch node", e))?;
        *self.node_version.lock().unwrap_or_else(|e| e.into_inner()) = node.metadata.resource_version;
        Ok(())
    }

    fn node_version(&self) -> Option<String> {
        self.node_version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn perform(
        &mut self,
        effect: &Effect,
        taints: &[Taint],
        uid: Option<String>,
    ) -> Result<(), TickError> {
        let result = match effect {
            Effect::Taint => {
                if taints.iter().any(|t| t.key == TAINT_KEY) {
                    return Ok(());
                }
                let mut all = taints.to_vec();
                all.push(Taint {
                    key: TAINT_KEY.into(),
                    effect: "NoSchedule".into(),
                    value: Some("true".into()),
                    time_added: None,
                });
                let rv = self.node_version();
                self.patch(json!({"metadata": {"resourceVersion": rv}, "spec": {"taints": all}}))
                    .await
            }
            Effect::Untaint => {
                if !taints.iter().any(|t| t.key == TAINT_KEY) {
                    return Ok(());
                }
                let kept: Vec<&Taint> = taints.iter().filter(|t| t.key != TAINT_KEY).collect();
                let rv = self.node_version();
                self.patch(json!({"metadata": {"resourceVersion": rv}, "spec": {"taints": kept}}))
                    .await
            }
            Effect::Relabel(config) => {
                self.patch(
                    json!({"metadata": {"labels": {MIG_CONFIG_LABEL: config, MIG_STATE_LABEL: "pending"}}}),
                )
                .await
            }
            Effect::Apply(change) => {
                let (source, c) = (self.source.clone(), change.clone());
                off_runtime(move || source.apply(&c)).await.map_err(|e| {
                    tracing::warn!(node = %self.shared.settings.node, gpu = change.gpu, error = %e, "changing GPU instances failed; retrying until the phase times out");
                    TickError::Source(e)
                })
            }
            Effect::PauseDevicePlugin => {
                self.patch(
                    json!({"metadata": {"labels": {DEVICE_PLUGIN_DEPLOY_LABEL: DEVICE_PLUGIN_PAUSED}}}),
                )
                .await
            }
            Effect::ResumeDevicePlugin => {
                self.patch(json!({"metadata": {"labels": {DEVICE_PLUGIN_DEPLOY_LABEL: "true"}}}))
                    .await
            }
            Effect::Event { reason, note } => {
                self.event(*reason, note.clone(), self.node_ref(uid)).await;
                Ok(())
            }
        };
        if result.is_err() {
            self.count_error("act");
        }
        result
    }
}

impl Worker {
    /// dcgm-exporter's per-instance series, read at most every `dcgm_interval`. `None` when not
    /// configured, when no exporter runs on the node, or when the read failed (counted as
    /// `errors_total{kind="dcgm"}` and logged; tried again after the interval): then nothing of
    /// it is used, never stale pods.
    async fn dcgm_series(&mut self, pods: &[Pod]) -> Option<Vec<crate::dcgm::InstanceSeries>> {
        let endpoint = self.shared.settings.dcgm.clone()?;
        if let Some((at, series)) = &self.dcgm_cache
            && self.instant().saturating_duration_since(*at) < self.shared.settings.dcgm_interval
        {
            return series.clone();
        }
        let url = match endpoint {
            DcgmEndpoint::Url(u) => u,
            DcgmEndpoint::Pod { selector, port } => {
                let ip = pods
                    .iter()
                    .filter(|p| self.operator_pod(&selector, p))
                    .find_map(|p| p.status.as_ref()?.pod_ip.clone())?;
                format!("http://{ip}:{port}/metrics")
            }
        };
        match self.scrape(&url).await {
            Ok(text) => {
                let series = crate::dcgm::instance_series(&crate::dcgm::parse_exposition(&text));
                self.dcgm_cache = Some((self.instant(), Some(series.clone())));
                Some(series)
            }
            Err(e) => {
                self.count_error("dcgm");
                tracing::warn!(node = %self.shared.settings.node, %url, error = %e, "cannot read dcgm-exporter; no per-instance utilization until it answers");
                self.dcgm_cache = Some((self.instant(), None));
                None
            }
        }
    }

    async fn scrape(&self, url: &str) -> Result<String, ScrapeError> {
        use http_body_util::BodyExt;
        const LIMIT: usize = 16 << 20;
        let uri: http::Uri = url.parse()?;
        let within = Duration::from_secs(2);
        let response = tokio::time::timeout(within, self.http.get(uri))
            .await
            .map_err(|_| ScrapeError::TimedOut)?
            .map_err(|e| ScrapeError::Transport(e.to_string()))?;
        if !response.status().is_success() {
            return Err(ScrapeError::Status(response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), LIMIT);
        let bytes = tokio::time::timeout(within, body.collect())
            .await
            .map_err(|_| ScrapeError::TimedOut)?
            .map_err(|e| ScrapeError::Transport(e.to_string()))?
            .to_bytes();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// A pod still holding what it was given (not succeeded or failed).
fn live(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    phase != Some("Succeeded") && phase != Some("Failed")
}

/// `namespace/name`.
fn pod_key(p: &Pod) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

/// Run blocking GPU-source work (external commands) on the blocking pool, so that a slow driver
/// never stalls the runtime's timers, probes or shutdown.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GpuError> + Send + 'static,
) -> Result<T, GpuError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(GpuError::Task(e.to_string())))
}

impl Worker {
    /// Whether `pod` is one of the GPU operator's: in its namespace, owned by a DaemonSet, with the
    /// labels of `selector`. Labels alone are not trusted: any tenant can set them.
    fn operator_pod(&self, selector: &str, pod: &Pod) -> bool {
        pod.namespace().as_deref() == Some(self.shared.settings.operator_namespace.as_str())
            && pod
                .owner_references()
                .iter()
                .any(|o| o.kind == "DaemonSet" && o.api_version == "apps/v1" && o.controller == Some(true))
            && selects(selector, pod.labels())
    }
}

/// Whether `labels` has every `key=value` of `selector` (an empty selector selects nothing).
fn selects(selector: &str, labels: &std::collections::BTreeMap<String, String>) -> bool {
    let pairs: Vec<(&str, &str)> = selector
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    !pairs.is_empty() && pairs.iter().all(|(k, v)| labels.get(*k).is_some_and(|l| l == v))
}
