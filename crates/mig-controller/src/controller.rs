//! The control loop: watch (reflectors), batch, plan, decide under budgets, grant, drain, report.

mod actuate;
mod caches;
mod drain;
mod housekeeping;
mod report;
mod reserve;
mod sweep;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use mig_catalog::Catalog;
use mig_planner::Plan;
use tokio::sync::{Notify, mpsc, watch};

use actuate::GrantError;
use caches::{Caches, annotation, spawn_reflector};
use report::{node_ref, pod_ref, publish_events};

use crate::budget::{self, Candidate, NodeFacts};
use crate::lease::{self, LeaseHandle};
use crate::metrics::{DecisionLabel, ResultLabel, SolverLabels};
use crate::observe::ClusterView;
use crate::settings::{Mode, Settings};
use crate::state::{HeadroomView, ProblemView, Published, Shared};
use crate::{Metrics, api};
use mig_protocol::{Reason, SharedClock};

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
    let api_server = settings.api_server.as_deref().unwrap_or("the API server");
    let (nodes, t1) = spawn_reflector(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
        api_server,
    );
    let (pods, t2) = spawn_reflector(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
        api_server,
    );
    let (pdbs, t3) = spawn_reflector(
        Api::<PodDisruptionBudget>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
        api_server,
    );
    let (config_maps, t4) = spawn_reflector(
        Api::<ConfigMap>::namespaced(client.clone(), cm_ns),
        watcher::Config::default().fields(&format!("metadata.name={cm_name}")),
        notify.clone(),
        api_server,
    );

    let lease_task = tokio::spawn(lease::run(
        Api::<Lease>::namespaced(client.clone(), &settings.lease.namespace),
        settings.lease.name.clone(),
        settings.lease.duration.0,
        settings.lease.retry.0,
        shared.lease.clone(),
        shutdown_rx.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(&settings.http.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (http.listen): {e}", settings.http.listen))?;
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
    /// When each node's agent report last changed (stale ones are left alone).
    reports: crate::observe::ReportClock,
    /// Reservations by attrition in force (from the last plan, or read back on becoming leader).
    reservations: reserve::Held,
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

    async fn plan_and_act(&mut self) {
        let settings = self.shared.settings.clone();
        let started = Instant::now(); // the planner's run time, a metric: the machine's clock
        let obs = self.observe_now();
        let now = self.now();
        let facts = self.budget_facts(&obs);
        if !self.state.led && self.shared.lease.is_leader() {
            // Leader since this round began: the Nodes' grants are not read back yet. Plan in the
            // next round, not at the next batch or resync (a plan skipped is not a plan made).
            self.state.replan = true;
            return;
        }
        let room = budget::headroom(&settings.budgets, now, obs.managed, &facts);
        let mut policy = settings.planner.clone();
        let cap = |a: Option<u32>, b: u32| Some(a.map_or(b, |a| a.min(b)));
        policy.budgets.max_nodes_changed = cap(policy.budgets.max_nodes_changed, room.nodes);
        policy.budgets.max_evictions = cap(policy.budgets.max_evictions, room.evictions);
        let mut snapshot = obs.snapshot.clone();
        snapshot.reservations = self.reservations_at(now);
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

        self.carry_reservations(&plan, now);
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
}
