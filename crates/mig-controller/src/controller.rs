//! The control loop: watch (reflectors), batch, plan, decide under budgets, grant, drain, report.

mod drain;
mod sweep;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use mig_catalog::Catalog;
use mig_catalog::migparted::{GpuTarget, render_node_config};
use mig_planner::{Plan, PodOutcome};
use serde_json::json;
use tokio::sync::{Notify, mpsc, watch};

use crate::budget::{self, Candidate, Headroom, NodeFacts};
use crate::lease::{self, LeaseHandle};
use crate::metrics::{
    BudgetLabel, DecisionLabel, InstanceLabels, OutcomeLabel, ProfileLabel, ReasonLabel, ResultLabel,
    SolverLabels,
};
use crate::observe::{ClusterView, InputProblem, observe};
use crate::settings::{Mode, Settings};
use crate::state::{HeadroomView, ProblemView, Published, Shared};
use crate::{Metrics, api};
use mig_protocol::{
    Emitter, Flight, GRANT_ANNOTATION, Grant, NodeState, Phase, Reason, STATE_ANNOTATION, SharedClock,
    TAINT_KEY,
};

/// Name in Events' `reportingController`.
pub const CONTROLLER_NAME: &str = "mig-autoscaler.io/controller";
/// Field manager of our writes.
pub const FIELD_MANAGER: &str = "mig-autoscaler-controller";
/// Prefix of the mig-parted entries we own.
pub const CONFIG_PREFIX: &str = "mig-autoscaler-";

/// A running controller.
pub struct Running {
    /// Where the HTTP server listens.
    pub addr: SocketAddr,
    /// Shared state (plan, metrics, lease).
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    lease_task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Graceful stop: stop planning and serving, release the lease.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.lease_task).await;
        for t in self.tasks {
            t.abort();
        }
    }

    /// Stop as a crash would: no release, nothing finished.
    pub fn kill(self) {
        self.lease_task.abort();
        for t in self.tasks {
            t.abort();
        }
    }
}

fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    notify: Arc<Notify>,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    let task = tokio::spawn(async move {
        stream
            .for_each(|event| {
                if let Err(e) = &event {
                    tracing::warn!(error = %e, "watch error; retrying with backoff");
                }
                notify.notify_one();
                futures::future::ready(())
            })
            .await;
    });
    (reader, task)
}

/// Start the controller: reflectors, leader election, the control loop and the HTTP server.
/// `client` should not retry 429s by itself (`Config::default_retry = false`): a
/// PodDisruptionBudget's refusal of an eviction would hold the control loop in the client's backoff
/// instead of being reported and asked again next round (every write is retried by the loop).
pub async fn start(client: Client, settings: Settings, identity: String) -> anyhow::Result<Running> {
    start_with_clock(client, settings, identity, mig_protocol::clock::system()).await
}

/// [`start`] on `clock` (tests move time by hand with [`mig_protocol::ManualClock`]).
pub async fn start_with_clock(
    client: Client,
    settings: Settings,
    identity: String,
    clock: SharedClock,
) -> anyhow::Result<Running> {
    settings.validate()?;
    let catalog = Catalog::embedded();
    let mut profiles: BTreeSet<String> = BTreeSet::new();
    for m in catalog.models.iter() {
        profiles.extend(m.profiles.iter().map(|p| p.name.clone()));
    }
    let shared = Arc::new(Shared {
        metrics: Metrics::new(profiles),
        lease: LeaseHandle::with_clock(identity.clone(), clock.clone()),
        ready: AtomicBool::new(false),
        latest: RwLock::new(None),
        writes: std::sync::Mutex::new(Vec::new()),
        recent: std::sync::Mutex::new(std::collections::VecDeque::new()),
        what_if: Arc::new(tokio::sync::Semaphore::new(settings.http.max_concurrent_plans)),
        reviewer: settings
            .http
            .authenticates()
            .then(|| crate::auth::Reviewer::new(client.clone(), clock.clone())),
        clock,
        settings: settings.clone(),
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let notify = Arc::new(Notify::new());
    let (cm_ns, cm_name) = settings.config_map();
    let (nodes, t1) = spawn_reflector(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let (pods, t2) = spawn_reflector(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let (pdbs, t3) = spawn_reflector(
        Api::<PodDisruptionBudget>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let (config_maps, t4) = spawn_reflector(
        Api::<ConfigMap>::namespaced(client.clone(), cm_ns),
        watcher::Config::default().fields(&format!("metadata.name={cm_name}")),
        notify.clone(),
    );

    let lease_task = tokio::spawn(lease::run(
        Api::<Lease>::namespaced(client.clone(), &settings.lease.namespace),
        settings.lease.name.clone(),
        settings.lease.duration.0,
        settings.lease.retry.0,
        shared.lease.clone(),
        shutdown_rx.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(&settings.http.listen).await?;
    let addr = listener.local_addr()?;
    let app = api::router(shared.clone());
    let limits = crate::listener::Limits {
        max_connections: settings.http.max_connections,
        max_connections_per_client: settings.http.max_connections_per_client,
        header_read_timeout: settings.http.header_read_timeout.0,
    };
    let refused = shared.metrics.connections_refused.clone();
    let server = tokio::spawn(crate::listener::serve(
        listener,
        app,
        limits,
        shutdown_rx.clone(),
        move |limit| {
            refused.get_or_create(&crate::metrics::LimitLabel { limit }).inc();
        },
    ));

    let (events_tx, events_rx) = mpsc::channel(1024);
    let events = tokio::spawn(publish_events(
        Recorder::new(
            client.clone(),
            Reporter {
                controller: CONTROLLER_NAME.into(),
                instance: Some(identity.clone()),
            },
        ),
        events_rx,
    ));

    let caches = Caches {
        nodes,
        pods,
        pdbs,
        config_maps,
    };
    let control = tokio::spawn(control_loop(ControlLoop {
        client,
        shared: shared.clone(),
        caches,
        notify,
        shutdown: shutdown_rx,
        events: events_tx,
        state: LoopState {
            events: mig_protocol::EventGate::new(settings.event_dedupe.0),
            ..Default::default()
        },
    }));
    Ok(Running {
        addr,
        shared,
        shutdown,
        tasks: vec![control, server, events, t1, t2, t3, t4],
        lease_task,
    })
}

struct Caches {
    nodes: Store<Node>,
    pods: Store<Pod>,
    pdbs: Store<PodDisruptionBudget>,
    config_maps: Store<ConfigMap>,
}

#[derive(Default)]
struct LoopState {
    known_pending: BTreeSet<String>,
    batch_first: Option<Instant>,
    batch_last: Option<Instant>,
    last_plan: Option<Instant>,
    /// A sequence ended `Superseded` (its plan was stale): plan again at the next round.
    replan: bool,
    /// Events sent recently (not sent again within `eventDedupe`).
    events: mig_protocol::EventGate,
    /// mig-parted entries this replica wrote, and when: kept in the ConfigMap for `grantTimeout`
    /// even where the node cache has not yet seen the grant that names them (otherwise a grant on
    /// another node could garbage-collect an entry before mig-manager reads it).
    written_configs: BTreeMap<String, Instant>,
    /// Grants written (or found in flight when this replica became leader) that the node cache
    /// may not show yet: the budgets count them until it does.
    ledger: budget::Ledger,
    /// Whether this replica led at the last round (to read the Nodes afresh on becoming leader).
    led: bool,
    /// What the housekeeping sweep remembers (flights, agents' last states, agents gone).
    sweep: sweep::SweepMemory,
    /// Per node: the grant whose end this replica saw happen, and when (its own clock). Cooldowns
    /// start at the later of this and the agent's `since`, so a node whose clock runs behind
    /// does not shorten its cooldown.
    ended_seen: BTreeMap<String, (String, Timestamp)>,
    /// Pod UIDs this replica evicted, and when (not evicted again while the cache lags).
    evicted: HashMap<String, Instant>,
}

struct ControlLoop {
    client: Client,
    shared: Arc<Shared>,
    caches: Caches,
    notify: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
    events: mpsc::Sender<(Event, ObjectReference)>,
    state: LoopState,
}

async fn publish_events(recorder: Recorder, mut rx: mpsc::Receiver<(Event, ObjectReference)>) {
    while let Some((event, reference)) = rx.recv().await {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, reason = %event.reason, "could not publish event");
        }
    }
}

/// One of our JSON annotations on `node`, if there and readable (the observation reports the
/// unreadable ones).
fn annotation<T: serde::de::DeserializeOwned>(node: &Node, key: &'static str) -> Option<T> {
    mig_protocol::parse_annotation(Some(node.annotations()), key, "")
        .ok()
        .flatten()
}

fn node_ref(name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.into()),
        uid,
        ..Default::default()
    }
}

fn pod_ref(ns: &str, name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.into()),
        namespace: Some(ns.into()),
        uid,
        ..Default::default()
    }
}

async fn control_loop(mut cl: ControlLoop) {
    // Readiness: every cache has listed once.
    let synced = {
        let c = &cl.caches;
        futures::future::join4(
            c.nodes.wait_until_ready(),
            c.pods.wait_until_ready(),
            c.pdbs.wait_until_ready(),
            c.config_maps.wait_until_ready(),
        )
    };
    tokio::select! {
        _ = synced => {}
        _ = cl.shutdown.wait_for(|s| *s) => return,
    }
    cl.shared.ready.store(true, Ordering::SeqCst);
    cl.shared.metrics.caches_synced.set(1);
    tracing::info!("caches synced");
    let tick = cl.shared.settings.tick.0;
    loop {
        tokio::select! {
            _ = cl.notify.notified() => {}
            _ = tokio::time::sleep(tick) => {}
            _ = cl.shutdown.wait_for(|s| *s) => return,
        }
        cl.shared
            .metrics
            .leader
            .set(i64::from(cl.shared.lease.is_leader()));
        cl.round().await;
    }
}

impl ControlLoop {
    /// Monotonic time on the injected clock.
    fn instant(&self) -> Instant {
        self.shared.clock.instant()
    }

    /// Wall time on the injected clock.
    fn now(&self) -> Timestamp {
        self.shared.clock.now()
    }

    /// Queue an Event; `true` when it was sent (this replica leads and it is not a repeat within
    /// `eventDedupe`).
    fn emit(
        &mut self,
        reason: Reason,
        note: String,
        action: &str,
        regarding: ObjectReference,
        related: Option<ObjectReference>,
    ) -> bool {
        debug_assert_eq!(reason.emitter(), Emitter::Controller, "{reason} is the agents'");
        if !self.shared.lease.is_leader() {
            return false; // only the leader writes, Events included
        }
        let now = self.instant();
        if !self.state.events.admit(&regarding, reason, &note, now) {
            return false;
        }
        // With its UID, or `kubectl describe` does not list the Event under the object.
        let regarding = self.with_uid(regarding);
        let related = related.map(|r| self.with_uid(r));
        let note = mig_protocol::clip_note(note);
        let event = Event {
            type_: if reason.is_warning() {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.as_str().into(),
            note: Some(note),
            action: action.into(),
            secondary: related,
        };
        if self.events.try_send((event, regarding)).is_err() {
            tracing::warn!(%reason, "event queue full; event dropped");
        }
        true
    }

    /// `r` with the UID of the Pod or Node it names, from the caches, where it has none.
    fn with_uid(&self, mut r: ObjectReference) -> ObjectReference {
        if r.uid.is_some() {
            return r;
        }
        let name = r.name.clone().unwrap_or_default();
        r.uid = match r.kind.as_deref() {
            Some("Pod") => {
                let ns = r.namespace.clone().unwrap_or_default();
                self.caches
                    .pods
                    .get(&reflector::ObjectRef::new(&name).within(&ns))
                    .and_then(|p| p.metadata.uid.clone())
            }
            Some("Node") => self
                .caches
                .nodes
                .get(&reflector::ObjectRef::new(&name))
                .and_then(|n| n.metadata.uid.clone()),
            _ => None,
        };
        r
    }

    async fn round(&mut self) {
        let now = self.instant();
        let pods = self.caches.pods.state();
        let pending: BTreeSet<String> = pods
            .iter()
            .filter(|p| crate::observe::is_pending(p))
            .filter(|p| {
                p.spec.as_ref().is_some_and(|s| {
                    mig_protocol::mig_requests(s)
                        .map(|r| !r.is_empty())
                        .unwrap_or(true)
                })
            })
            .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
            .collect();
        let new = pending.difference(&self.state.known_pending).count();
        // Pods that stopped waiting because they were bound: their time to slice.
        for gone in self.state.known_pending.difference(&pending) {
            let Some((ns, name)) = gone.split_once('/') else {
                continue;
            };
            if let Some(p) = pods
                .iter()
                .find(|p| p.namespace().as_deref() == Some(ns) && p.name_any() == name)
                && p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()
                && let Some(created) = &p.metadata.creation_timestamp
            {
                let waited = self.now().duration_since(created.0).as_secs_f64().max(0.0);
                self.shared.metrics.time_to_slice.observe(waited);
            }
        }
        self.state.known_pending = pending.clone();
        if new > 0 {
            self.state.batch_first.get_or_insert(now);
            self.state.batch_last = Some(now);
        }
        let b = &self.shared.settings.batching;
        let batch_due = match (self.state.batch_first, self.state.batch_last) {
            (Some(first), Some(last)) => {
                now.duration_since(last) >= b.quiet.0 || now.duration_since(first) >= b.max_wait.0
            }
            _ => false,
        };
        let resync_due = self
            .state
            .last_plan
            .is_none_or(|t| now.duration_since(t) >= b.resync.0);
        let leads = self.shared.lease.is_leader();
        if leads && !self.state.led {
            self.state.led = self.read_back_grants().await;
        } else if !leads {
            self.state.led = false;
        }
        if self.shared.settings.mode == Mode::Auto && leads {
            self.housekeeping().await;
        }
        if !(batch_due || resync_due || self.state.replan) {
            return;
        }
        self.state.replan = false;
        self.state.batch_first = None;
        self.state.batch_last = None;
        self.state.last_plan = Some(now);
        self.plan_and_act().await;
    }

    /// On becoming leader: the grants in flight on the Nodes as the API server has them now (a
    /// list is a consistent read; the watch cache may lag it), into the ledger. `false` if the read
    /// failed (tried again next round; nothing is granted meanwhile).
    async fn read_back_grants(&mut self) -> bool {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let list = match nodes.list(&Default::default()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the Nodes' grants on becoming leader; retrying next round");
                return false;
            }
        };
        let now = self.now();
        for n in list.items {
            let Some(g) = annotation::<Grant>(&n, GRANT_ANNOTATION) else {
                continue;
            };
            let state = annotation::<NodeState>(&n, STATE_ANNOTATION);
            if matches!(
                mig_protocol::flight(Some(&g), state.as_ref()),
                Flight::Idle { .. }
            ) {
                continue;
            }
            self.state.ledger.record(
                &n.name_any(),
                budget::Written {
                    grant_id: g.id.clone(),
                    at: now,
                    evictions: g.recent_evictions.iter().filter_map(|t| t.parse().ok()).collect(),
                },
            );
        }
        true
    }

    /// What the budgets see: the cache's nodes, plus the ledger's grants the cache does not show.
    fn budget_facts(&mut self, obs: &ClusterView) -> Vec<NodeFacts> {
        let mut facts = obs.facts();
        let keep = jiff::SignedDuration::try_from(self.shared.settings.budgets.grant_timeout.0)
            .unwrap_or(jiff::SignedDuration::MAX);
        self.state.ledger.overlay(&mut facts, self.now(), keep, |node| {
            obs.nodes
                .get(node)
                .map(|v| {
                    v.grant
                        .iter()
                        .map(|g| g.id.clone())
                        .chain(v.state.iter().map(|s| s.grant_id.clone()))
                        .collect()
                })
                .unwrap_or_default()
        });
        for f in &mut facts {
            if self.state.sweep.agents_gone.contains(&f.name) && matches!(f.flight, Flight::InFlight { .. }) {
                f.flight = Flight::Stuck;
            }
            let seen = obs.nodes.get(&f.name).and_then(|v| {
                let (grant, at) = self.state.ended_seen.get(&f.name)?;
                (v.state.as_ref()?.grant_id == *grant).then_some(*at)
            });
            if let (Flight::Idle { finished_at: Some(t) }, Some(seen)) = (&mut f.flight, seen) {
                *t = (*t).max(seen);
            }
        }
        facts
    }

    fn observe_now(&self) -> ClusterView {
        let s = &self.shared.settings;
        observe(
            &self.caches.nodes.state(),
            &self.caches.pods.state(),
            &self.caches.pdbs.state(),
            &s.planner,
            &s.budgets,
            s.demand_window.0,
            self.now(),
        )
    }

    async fn plan_and_act(&mut self) {
        let settings = self.shared.settings.clone();
        let started = Instant::now(); // the planner's run time, a metric: the machine's clock
        let obs = self.observe_now();
        let now = self.now();
        let facts = self.budget_facts(&obs);
        if !self.state.led && self.shared.lease.is_leader() {
            return; // the Nodes' grants are not read back yet
        }
        let room = budget::headroom(&settings.budgets, now, obs.managed, &facts);
        let mut policy = settings.planner.clone();
        let cap = |a: Option<u32>, b: u32| Some(a.map_or(b, |a| a.min(b)));
        policy.budgets.max_nodes_changed = cap(policy.budgets.max_nodes_changed, room.nodes);
        policy.budgets.max_evictions = cap(policy.budgets.max_evictions, room.evictions);
        let snapshot = obs.snapshot.clone();
        let plan = match tokio::task::spawn_blocking(move || mig_planner::plan(&snapshot, &policy)).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "planner task failed");
                return;
            }
        };
        let m = &self.shared.metrics;
        m.plan_duration.observe(started.elapsed().as_secs_f64());
        m.last_plan_timestamp.set(now.as_millisecond() as f64 / 1000.0);
        m.plans
            .get_or_create(&SolverLabels {
                solver: plan.solver.used.clone(),
                status: plan.solver.status.clone(),
            })
            .inc();
        self.record_plan_metrics(&obs, &plan, room);
        for p in &obs.problems {
            self.report_problem(p);
        }

        let (decisions, leader) = self.decide(&plan, &obs, &facts, now).await;
        self.explain_to_pods_and_nodes(&plan, &decisions, settings.mode);

        let published = Published {
            computed_at: now.to_string(),
            mode: settings.mode.as_str(),
            computed_by: self.shared.lease.identity().to_string(),
            leader,
            plan,
            decisions,
            problems: obs
                .problems
                .iter()
                .map(|p| ProblemView {
                    object: if p.namespace.is_empty() {
                        format!("{}/{}", p.kind, p.name)
                    } else {
                        format!("{}/{}/{}", p.kind, p.namespace, p.name)
                    },
                    reason: p.reason.as_str(),
                    message: p.message.clone(),
                })
                .collect(),
            headroom: HeadroomView {
                nodes: room.nodes,
                evictions: room.evictions,
                in_flight: room.in_flight,
                window_open: room.window_open,
            },
        };
        *self.shared.latest.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(published));
    }

    /// Per changed node of `plan`: deferred by a budget, dry-run, left to the leader, or granted
    /// (or why not). The decisions by node, and whether this replica led when deciding.
    async fn decide(
        &mut self,
        plan: &Plan,
        obs: &ClusterView,
        facts: &[NodeFacts],
        now: Timestamp,
    ) -> (BTreeMap<String, String>, bool) {
        let settings = self.shared.settings.clone();
        let candidates: Vec<Candidate> = plan
            .nodes
            .iter()
            .map(|n| Candidate {
                node: n.node.clone(),
                evictions: plan.evictions.iter().filter(|e| e.node == n.node).count() as u32,
            })
            .collect();
        let (verdicts, _) = budget::decide(&settings.budgets, now, obs.managed, facts, &candidates);
        let mut decisions = BTreeMap::new();
        let leader = self.shared.lease.is_leader();
        for (c, verdict) in verdicts {
            let decision = match (&verdict, settings.mode) {
                (Err(d), _) => {
                    let words = d.describe(&settings.budgets);
                    self.emit(
                        Reason::ReconfigurationDeferred,
                        format!("plan {}: {words}", plan.id),
                        "Plan",
                        node_ref(&c.node, None),
                        None,
                    );
                    decisions.insert(c.node.clone(), format!("deferred: {words}"));
                    d.reason()
                }
                (Ok(()), Mode::DryRun) => {
                    decisions.insert(c.node.clone(), "dry-run".into());
                    "dry-run"
                }
                (Ok(()), Mode::Auto) if !leader => {
                    decisions.insert(c.node.clone(), "follower: the leader decides".into());
                    continue;
                }
                (Ok(()), Mode::Auto) => match self.grant(plan, obs, &c).await {
                    Ok(()) => {
                        decisions.insert(c.node.clone(), "granted".into());
                        "granted"
                    }
                    Err(GrantError::Invalidated(why)) => {
                        decisions.insert(c.node.clone(), format!("invalidated: {why}"));
                        "invalidated"
                    }
                    Err(GrantError::Write(result, why)) => {
                        self.shared
                            .metrics
                            .grants
                            .get_or_create(&ResultLabel { result })
                            .inc();
                        decisions.insert(c.node.clone(), format!("not written ({result}): {why}"));
                        continue;
                    }
                },
            };
            self.shared
                .metrics
                .decisions
                .get_or_create(&DecisionLabel { decision })
                .inc();
        }
        (decisions, leader)
    }

    fn record_plan_metrics(&self, obs: &ClusterView, plan: &Plan, room: Headroom) {
        let m = &self.shared.metrics;
        let mut by_profile: BTreeMap<String, i64> = BTreeMap::new();
        for p in &obs.snapshot.pending_pods {
            for r in p.requests.keys() {
                if let Some(profile) = r.strip_prefix(mig_protocol::MIG_RESOURCE_PREFIX) {
                    *by_profile.entry(profile.to_string()).or_default() += 1;
                }
            }
        }
        for (profile, n) in &by_profile {
            m.pending_pods
                .get_or_create(&ProfileLabel {
                    profile: profile.clone(),
                })
                .set(*n);
        }
        // Zero the profiles no pod asks for any more.
        let catalog = Catalog::embedded();
        for model in catalog.models.iter() {
            for p in &model.profiles {
                if !by_profile.contains_key(&p.name) {
                    m.pending_pods
                        .get_or_create(&ProfileLabel {
                            profile: p.name.clone(),
                        })
                        .set(0);
                }
            }
        }
        m.gpu_instances.clear();
        for g in &plan.gpus {
            let Ok(model) = catalog.lookup(&g.model) else {
                continue;
            };
            for (side, text) in [("actual", &g.actual), ("target", &g.target)] {
                let Ok(l) = model.parse_layout(text) else { continue };
                let mut counts: BTreeMap<String, i64> =
                    model.profiles.iter().map(|p| (p.name.clone(), 0)).collect();
                for i in l.instances() {
                    if let Some(p) = model.profile(i.profile) {
                        *counts.entry(p.name.clone()).or_default() += 1;
                    }
                }
                for (profile, n) in counts {
                    m.gpu_instances
                        .get_or_create(&InstanceLabels {
                            node: g.node.clone(),
                            gpu: g.index.to_string(),
                            profile,
                            side,
                        })
                        .set(n);
                }
            }
        }
        let fits = plan
            .pods
            .iter()
            .filter(|p| matches!(p.outcome, PodOutcome::Fits { .. }))
            .count() as i64;
        m.plan_pods
            .get_or_create(&OutcomeLabel { outcome: "fits" })
            .set(fits);
        m.plan_pods
            .get_or_create(&OutcomeLabel { outcome: "waits" })
            .set(plan.pods.len() as i64 - fits);
        m.plan_evictions.set(plan.evictions.len() as i64);
        m.budget_headroom
            .get_or_create(&BudgetLabel { budget: "nodes" })
            .set(i64::from(room.nodes));
        m.budget_headroom
            .get_or_create(&BudgetLabel { budget: "evictions" })
            .set(i64::from(room.evictions));
        m.nodes_reconfiguring.set(i64::from(room.in_flight));
        m.nodes_stuck.set(i64::from(room.stuck));
    }

    fn report_problem(&mut self, p: &InputProblem) {
        let regarding = if p.kind == "Pod" {
            pod_ref(&p.namespace, &p.name, None)
        } else {
            node_ref(&p.name, None)
        };
        let sent = self.emit(p.reason, p.message.clone(), "Observe", regarding, None);
        if sent || !self.shared.lease.is_leader() {
            // Counted once per dedupe period per distinct problem (on followers: per plan).
            self.shared
                .metrics
                .input_problems
                .get_or_create(&ReasonLabel {
                    reason: p.reason.as_str(),
                })
                .inc();
        }
    }

    fn explain_to_pods_and_nodes(&mut self, plan: &Plan, decisions: &BTreeMap<String, String>, mode: Mode) {
        for pod in &plan.pods {
            let reference = pod_ref(&pod.namespace, &pod.name, None);
            match &pod.outcome {
                PodOutcome::Waits { reason } => {
                    self.emit(
                        Reason::WaitingForMigCapacity,
                        format!("no MIG layout can serve this pod now: {reason}"),
                        "Plan",
                        reference,
                        None,
                    );
                }
                PodOutcome::Fits {
                    node,
                    needs_repartition: true,
                    ..
                } => {
                    let decision = decisions.get(node).map(String::as_str).unwrap_or("planned");
                    let note = match (mode, decision) {
                        (Mode::DryRun, _) => format!(
                            "would fit on node {node} after a repartition (plan {}); mode dry-run changes nothing",
                            plan.id
                        ),
                        (Mode::Auto, "granted") => {
                            format!("waiting for repartition of node {node} (plan {})", plan.id)
                        }
                        (Mode::Auto, other) => format!(
                            "fits on node {node} after a repartition (plan {}), not started yet: {other}",
                            plan.id
                        ),
                    };
                    self.emit(
                        Reason::WaitingForRepartition,
                        note,
                        "Plan",
                        reference,
                        Some(node_ref(node, None)),
                    );
                }
                PodOutcome::Fits { .. } => {}
            }
        }
        for n in &plan.nodes {
            let changes: Vec<String> = plan
                .gpus
                .iter()
                .filter(|g| g.node == n.node && g.changed)
                .map(|g| {
                    format!(
                        "GPU {}: {} -> {}{}",
                        g.index,
                        g.actual,
                        g.target,
                        g.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
                    )
                })
                .collect();
            let reason = match decisions.get(&n.node).map(String::as_str) {
                Some("granted") => Reason::ReconfigurationGranted,
                _ => Reason::LayoutChangePlanned,
            };
            self.emit(
                reason,
                format!("plan {}: {}", plan.id, changes.join("; ")),
                "Plan",
                node_ref(&n.node, None),
                None,
            );
        }
    }

    /// Re-check a candidate against fresh state, then write the ConfigMap entry and the grant.
    async fn grant(&mut self, plan: &Plan, planned: &ClusterView, c: &Candidate) -> Result<(), GrantError> {
        let settings = self.shared.settings.clone();
        let fresh = self.observe_now();
        let now = self.now();
        let (view, evictions) = self.still_valid(plan, planned, &fresh, c, now)?;
        let Some(node_plan) = plan.nodes.iter().find(|n| n.node == c.node) else {
            return Err(GrantError::Invalidated("not in the plan".into()));
        };
        let targets: BTreeMap<u32, String> = plan
            .gpus
            .iter()
            .filter(|g| g.node == c.node && g.changed)
            .map(|g| (g.index, g.target.clone()))
            .collect();
        if !self.shared.lease.is_leader() {
            return Err(GrantError::Invalidated("no longer the leader".into()));
        }
        if let Some(config) = &node_plan.mig_config {
            self.ensure_config(plan, &c.node, config).await?;
        }
        let window = jiff::SignedDuration::try_from(settings.budgets.eviction_window.0)
            .unwrap_or(jiff::SignedDuration::MAX);
        let mut recent: Vec<String> = view
            .recent_evictions
            .iter()
            .filter(|t| now.duration_since(**t) < window)
            .map(|t| t.to_string())
            .collect();
        recent.extend(std::iter::repeat_n(now.to_string(), evictions.len()));
        let grant = Grant {
            id: format!("{}-{}", plan.id, now.as_millisecond()),
            plan_id: plan.id.clone(),
            mig_config: node_plan.mig_config.clone(),
            targets,
            evictions: evictions.clone(),
            granted_at: now.to_string(),
            granted_by: self.shared.lease.identity().to_string(),
            recent_evictions: recent,
        };
        let written = budget::Written {
            grant_id: grant.id.clone(),
            at: now,
            evictions: vec![now; evictions.len()],
        };
        self.write_grant(plan, c, &grant, written).await
    }

    /// Whether candidate `c` of `plan` still holds on `fresh` state: the node and its GPUs as
    /// planned, within the budgets, the pods to evict still there and evictable. Its view and the
    /// evictions, or why not.
    fn still_valid<'v>(
        &mut self,
        plan: &Plan,
        planned: &ClusterView,
        fresh: &'v ClusterView,
        c: &Candidate,
        now: Timestamp,
    ) -> Result<(&'v crate::observe::NodeView, Vec<String>), GrantError> {
        let shared = self.shared.clone();
        let settings = &shared.settings;
        let Some(view) = fresh.nodes.get(&c.node) else {
            return Err(GrantError::Invalidated("node is gone".into()));
        };
        let Some(old) = planned.nodes.get(&c.node) else {
            return Err(GrantError::Invalidated("node was not observed".into()));
        };
        if view.report_raw != old.report_raw {
            return Err(GrantError::Invalidated(
                "the node's GPUs changed since planning".into(),
            ));
        }
        let facts = self.budget_facts(fresh);
        let (verdicts, _) = budget::decide(
            &settings.budgets,
            now,
            fresh.managed,
            &facts,
            std::slice::from_ref(c),
        );
        if let Some((_, Err(d))) = verdicts.first() {
            return Err(GrantError::Invalidated(d.describe(&settings.budgets)));
        }
        let evictions: Vec<String> = plan
            .evictions
            .iter()
            .filter(|e| e.node == c.node)
            .map(|e| e.pod.clone())
            .collect();
        for pod in &evictions {
            let gone_or_protected = !fresh
                .snapshot
                .running_pods
                .iter()
                .any(|r| format!("{}/{}", r.namespace, r.name) == *pod && !r.do_not_disrupt);
            if gone_or_protected {
                return Err(GrantError::Invalidated(format!(
                    "pod {pod} to evict is gone or now do-not-disrupt"
                )));
            }
        }
        Ok((view, evictions))
    }

    /// Write `grant` on the node (optimistic: a changed node is a conflict, retried next round),
    /// recording it in the ledger when it landed, even if the answer was lost.
    async fn write_grant(
        &mut self,
        plan: &Plan,
        c: &Candidate,
        grant: &Grant,
        written: budget::Written,
    ) -> Result<(), GrantError> {
        let evictions = &grant.evictions;
        let node = self
            .caches
            .nodes
            .state()
            .into_iter()
            .find(|n| n.name_any() == c.node)
            .ok_or_else(|| GrantError::Invalidated("node is gone".into()))?;
        let patch = json!({"metadata": {
            "resourceVersion": node.resource_version(),
            "annotations": {GRANT_ANNOTATION: serde_json::to_string(grant).unwrap_or_default()},
        }});
        if !self.shared.lease.is_leader() {
            return Err(GrantError::Invalidated("no longer the leader".into()));
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        match nodes
            .patch(&c.node, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.state.ledger.record(&c.node, written);
                self.shared.record_write(format!(
                    "{}: granted plan {} ({} GPU(s) to change, {} eviction(s))",
                    c.node,
                    plan.id,
                    grant.targets.len(),
                    evictions.len()
                ));
                self.shared
                    .metrics
                    .grants
                    .get_or_create(&ResultLabel { result: "written" })
                    .inc();
                self.shared
                    .metrics
                    .evictions_granted
                    .inc_by(evictions.len() as u64);
                tracing::info!(node = %c.node, plan_id = %plan.id, evictions = evictions.len(), "reconfiguration granted");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Err(GrantError::Write(
                "conflict",
                "the node changed; retried next round".into(),
            )),
            Err(e) => {
                // The write may have landed (a timeout after the server applied it): read the
                // Node back; count the grant if it is there, or if that cannot be told, until the
                // cache shows it or `grantTimeout` passes.
                let mut landed = true; // unless a read says otherwise
                for _ in 0..3 {
                    if let Ok(n) = nodes.get(&c.node).await {
                        landed = annotation::<Grant>(&n, GRANT_ANNOTATION).is_some_and(|g| g.id == grant.id);
                        break;
                    }
                }
                if !landed {
                    return Err(GrantError::Write("error", e.to_string()));
                }
                self.state.ledger.record(&c.node, written);
                Err(GrantError::Write("error", e.to_string()))
            }
        }
    }

    /// Put the node's mig-parted config into the ConfigMap; drop our entries nothing refers to.
    async fn ensure_config(&mut self, plan: &Plan, node: &str, name: &str) -> Result<(), GrantError> {
        let catalog = Catalog::embedded();
        let mut targets = Vec::new();
        for g in plan.gpus.iter().filter(|g| g.node == node) {
            let model = catalog
                .lookup(&g.model)
                .map_err(|e| GrantError::Invalidated(e.to_string()))?;
            let layout = model
                .parse_layout(&g.target)
                .map_err(|e| GrantError::Invalidated(e.to_string()))?;
            targets.push((g.index, model, layout));
        }
        let gpus: Vec<(u32, GpuTarget<'_>)> = targets
            .iter()
            .map(|(i, model, layout)| (*i, GpuTarget::Mig { model, layout }))
            .collect();
        let rendered =
            render_node_config(&gpus).map_err(|e| GrantError::Invalidated(format!("invalid target: {e}")))?;
        if rendered.name != name {
            return Err(GrantError::Invalidated(format!(
                "config name {} differs from the plan's {name}",
                rendered.name
            )));
        }
        let (ns, cm_name) = self.shared.settings.config_map();
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let mut cm = match api.get(cm_name).await {
            Ok(cm) => cm,
            Err(e) => {
                return Err(GrantError::Write(
                    "error",
                    format!("mig-parted ConfigMap {ns}/{cm_name}: {e}"),
                ));
            }
        };
        let text = cm
            .data
            .as_ref()
            .and_then(|d| d.get("config.yaml"))
            .cloned()
            .unwrap_or_default();
        let mut doc: serde_yaml::Value = serde_yaml::from_str(&text)
            .map_err(|e| GrantError::Write("error", format!("ConfigMap {ns}/{cm_name} config.yaml: {e}")))?;
        let Some(configs) = doc.get_mut("mig-configs").and_then(|c| c.as_mapping_mut()) else {
            return Err(GrantError::Write(
                "error",
                format!("ConfigMap {ns}/{cm_name} config.yaml has no mig-configs"),
            ));
        };
        // Entries still referenced: by a node's label, by a grant, this one, and any this replica
        // wrote within `grantTimeout` (the node cache may not show their grants yet).
        let keep_written = self.shared.settings.budgets.grant_timeout.0;
        let now = self.instant();
        self.state
            .written_configs
            .retain(|_, at| now.saturating_duration_since(*at) < keep_written);
        self.state.written_configs.insert(name.to_string(), now);
        let mut referenced: BTreeSet<String> = self.state.written_configs.keys().cloned().collect();
        for n in self.caches.nodes.state() {
            if let Some(v) = n.labels().get(mig_protocol::MIG_CONFIG_LABEL) {
                referenced.insert(v.clone());
            }
            if let Some(c) = annotation::<Grant>(&n, GRANT_ANNOTATION).and_then(|g| g.mig_config) {
                referenced.insert(c);
            }
        }
        let before = configs.clone();
        configs.retain(|k, _| {
            k.as_str()
                .is_none_or(|k| !k.starts_with(CONFIG_PREFIX) || referenced.contains(k))
        });
        let entries =
            serde_yaml::to_value(&rendered.entries).map_err(|e| GrantError::Write("error", e.to_string()))?;
        configs.insert(serde_yaml::Value::String(name.to_string()), entries);
        if *configs == before {
            return Ok(());
        }
        let text = serde_yaml::to_string(&doc).map_err(|e| GrantError::Write("error", e.to_string()))?;
        cm.data
            .get_or_insert_with(Default::default)
            .insert("config.yaml".into(), text);
        if !self.shared.lease.is_leader() {
            return Err(GrantError::Invalidated("no longer the leader".into()));
        }
        match api.replace(cm_name, &PostParams::default(), &cm).await {
            Ok(_) => {
                self.shared
                    .record_write(format!("mig-parted config {name} written"));
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Err(GrantError::Write(
                "conflict",
                "the ConfigMap changed; retried next round".into(),
            )),
            Err(e) => Err(GrantError::Write("error", e.to_string())),
        }
    }

    /// Leader only: merge-patch Node `name`, and once written record it as `what` and announce it
    /// with a `reason` Event saying `note`.
    async fn sweep_write(
        &mut self,
        name: &str,
        patch: &serde_json::Value,
        what: &str,
        reason: Reason,
        note: String,
    ) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let written = self.shared.lease.is_leader()
            && nodes
                .patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(patch))
                .await
                .is_ok();
        if written {
            self.shared.record_write(format!("{name}: {what}"));
            self.emit(reason, note, "Sweep", node_ref(name, None), None);
        }
    }

    /// Leader, auto mode, every round: the sweep's commands (see `sweep`), carried out.
    async fn housekeeping(&mut self) {
        let obs = self.observe_now();
        let budgets = &self.shared.settings.budgets;
        let limits = sweep::Limits {
            grant_timeout: budgets.grant_timeout.0,
            agent_timeout: budgets.agent_timeout.0,
        };
        let (now, instant) = (self.now(), self.instant());
        for command in sweep::sweep(&obs, &mut self.state.sweep, now, instant, limits) {
            self.carry_out(&obs, command).await;
        }
    }

    /// One command of the sweep.
    async fn carry_out(&mut self, obs: &ClusterView, command: sweep::Command) {
        use sweep::Command;
        let timeout = self.shared.settings.budgets.agent_timeout;
        match command {
            Command::Ended {
                node,
                grant,
                phase,
                message,
            } => {
                self.shared
                    .metrics
                    .reconfigurations
                    .get_or_create(&ResultLabel {
                        result: phase.as_str(),
                    })
                    .inc();
                self.state
                    .ended_seen
                    .insert(node.clone(), (grant.clone(), self.now()));
                // The agent found the plan stale before changing anything: plan afresh now rather
                // than at the next batch or resync (each retry costs a taint and two agent ticks,
                // so this cannot spin).
                self.state.replan |= phase == Phase::Superseded;
                // The agent announces the end on the Node (it owns the Reconfiguration* reasons).
                tracing::info!(node = %node, grant_id = %grant, phase = phase.as_str(), message = %message, "reconfiguration ended");
            }
            Command::Release { node, state, plan_id } => {
                let phase = state.phase;
                let ended = NodeState {
                    phase: Phase::RolledBack,
                    since: self.now().to_string(),
                    message: Some(format!(
                        "released by the controller: the node agent stopped during {}; nothing was changed",
                        phase.as_str()
                    )),
                    heartbeat: None,
                    ..state
                };
                let patch = json!({"metadata": {"annotations": {
                    GRANT_ANNOTATION: null,
                    STATE_ANNOTATION: serde_json::to_string(&ended).unwrap_or_default(),
                }}});
                let note = format!(
                    "the node agent stopped during {} of plan {plan_id} (no state change for {timeout}); no GPU was changed yet, so the grant is withdrawn and the node untainted",
                    phase.as_str()
                );
                self.sweep_write(
                    &node,
                    &patch,
                    "grant withdrawn (its agent is gone)",
                    Reason::AgentGone,
                    note,
                )
                .await;
            }
            Command::Stuck { node, phase, plan_id } => {
                tracing::warn!(node = %node, phase = phase.as_str(), "node agent gone mid-change; node left tainted and frozen");
                self.emit(
                    Reason::AgentGone,
                    format!("the node agent stopped during {} of plan {plan_id} (no state change for {timeout}); its GPUs may be half-changed, so the node stays tainted and is left alone, and no longer holds the node budget. See docs/install.md, runbook", phase.as_str()),
                    "Sweep",
                    node_ref(&node, None),
                    None,
                );
            }
            Command::Drain { node } => {
                if let Some(view) = obs.nodes.get(&node)
                    && let Some(g) = &view.grant
                {
                    self.drain(&node, view, g).await;
                }
            }
            Command::Withdraw { node, plan_id } => {
                let patch = json!({"metadata": {"annotations": {GRANT_ANNOTATION: null}}});
                let note = format!(
                    "the node agent did not start plan {plan_id} within {}; is the agent running on this node?",
                    self.shared.settings.budgets.grant_timeout
                );
                self.sweep_write(
                    &node,
                    &patch,
                    "grant withdrawn (the agent never started it)",
                    Reason::GrantWithdrawn,
                    note,
                )
                .await;
            }
            Command::Untaint { node: name } => {
                let Some(node) = self
                    .caches
                    .nodes
                    .state()
                    .into_iter()
                    .find(|n| n.name_any() == name)
                else {
                    return;
                };
                let taints: Vec<_> = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| t.key != TAINT_KEY)
                    .collect();
                let patch = json!({"metadata": {"resourceVersion": node.resource_version()}, "spec": {"taints": taints}});
                let note = format!("removed taint {TAINT_KEY}: no reconfiguration is in flight on this node");
                self.sweep_write(
                    &name,
                    &patch,
                    "stale taint removed",
                    Reason::StaleTaintRemoved,
                    note,
                )
                .await;
            }
        }
    }
}

/// Why a grant was not written.
#[derive(Debug)]
enum GrantError {
    /// Fresh state no longer supports it (counted as decision `invalidated`).
    Invalidated(String),
    /// The write failed (`conflict` or `error`).
    Write(&'static str, String),
}
