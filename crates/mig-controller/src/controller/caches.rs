//! What the loop sees: the watch caches, the grants read back from the API server on becoming
//! leader, and the ledger's overlay of grants the caches do not show yet (for the budgets).

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use mig_protocol::{Flight, GRANT_ANNOTATION, Grant, NodeState, STATE_ANNOTATION};
use tokio::sync::Notify;

use super::ControlLoop;
use crate::budget::{self, NodeFacts};
use crate::observe::{ClusterView, observe};

pub(super) struct Caches {
    pub(super) nodes: Store<Node>,
    pub(super) pods: Store<Pod>,
    pub(super) pdbs: Store<PodDisruptionBudget>,
    pub(super) config_maps: Store<ConfigMap>,
}

/// kube's default watcher backoff (800 ms doubling to 30 s, with jitter), except that it is not
/// reset by the `Init` event a watcher yields before each (re)list. kube's `StreamBackoff` resets
/// its backoff on every item that is not an error, `Init` included, so against an API server that
/// refuses every list the delay never grew past its first step: each reflector retried about once
/// a second for as long as the server was down. Here a reset counts only once no error has come
/// for [`WatchBackoff::HEALTHY`] (more than the largest delay); kube's own timer still resets it
/// after two minutes without a backoff.
#[derive(Default)]
pub(crate) struct WatchBackoff {
    inner: watcher::DefaultBackoff,
    last_error: Option<tokio::time::Instant>,
}

impl WatchBackoff {
    /// How long a watch must go without an error before a success resets the delay.
    pub(crate) const HEALTHY: std::time::Duration = std::time::Duration::from_secs(60);
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    /// The delay after an error.
    fn next(&mut self) -> Option<Self::Item> {
        self.last_error = Some(tokio::time::Instant::now());
        self.inner.next()
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        if self
            .last_error
            .is_none_or(|t| t.elapsed() >= WatchBackoff::HEALTHY)
        {
            self.inner.reset();
            self.last_error = None;
        }
    }
}

/// A reflector of `api` that wakes the loop on every event; its errors are logged with the
/// resource and the API server (`api_server`), and retried with [`WatchBackoff`].
pub(super) fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    notify: Arc<Notify>,
    api_server: &str,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).backoff(WatchBackoff::default()));
    let (resource, api_server) = (
        K::kind(&K::DynamicType::default()).to_string(),
        api_server.to_string(),
    );
    let task = tokio::spawn(async move {
        stream
            .for_each(|event| {
                if let Err(e) = &event {
                    tracing::warn!(error = %e, %resource, %api_server, "watch error; retrying with backoff");
                }
                notify.notify_one();
                futures::future::ready(())
            })
            .await;
    });
    (reader, task)
}

/// One of our JSON annotations on `node`, if there and readable (the observation reports the
/// unreadable ones).
pub(super) fn annotation<T: serde::de::DeserializeOwned>(node: &Node, key: &'static str) -> Option<T> {
    mig_protocol::parse_annotation(Some(node.annotations()), key, "")
        .ok()
        .flatten()
}

impl ControlLoop {
    /// The cluster as the caches show it now, nodes whose agent report went stale left alone.
    pub(super) fn observe_now(&mut self) -> ClusterView {
        let s = &self.shared.settings;
        let mut view = observe(
            &self.caches.nodes.state(),
            &self.caches.pods.state(),
            &self.caches.pdbs.state(),
            &s.planner,
            &s.budgets,
            s.demand_window.0,
            self.now(),
        );
        let instant = self.instant();
        self.state
            .reports
            .apply(&mut view, instant, self.shared.settings.report_timeout.0);
        view
    }

    /// On becoming leader: the grants in flight on the Nodes as the API server has them now (a
    /// list is a consistent read; the watch cache may lag it), into the ledger. `false` if the read
    /// failed (tried again next round; nothing is granted meanwhile).
    pub(super) async fn read_back_grants(&mut self) -> bool {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let list = match nodes.list(&Default::default()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the Nodes' grants on becoming leader; retrying next round");
                return false;
            }
        };
        let now = self.now();
        self.read_back_reservations(&list.items);
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
    pub(super) fn budget_facts(&mut self, obs: &ClusterView) -> Vec<NodeFacts> {
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kube::runtime::utils::Backoff;

    use super::WatchBackoff;

    /// Issue 19: a watcher yields `Init` before each (re)list, and kube's `StreamBackoff` resets
    /// the backoff on it. Against a server that refuses every list (error, sleep, `Init`, error, …)
    /// the delays must still grow (kube's `DefaultBackoff` stayed between 0.8 and 1.6 s); after a
    /// healthy minute a success resets them.
    #[tokio::test(start_paused = true)]
    async fn an_init_between_failed_lists_does_not_reset_the_backoff() {
        let mut b = WatchBackoff::default();
        let mut delays = Vec::new();
        for _ in 0..7 {
            let d = b.next().unwrap();
            delays.push(d);
            tokio::time::advance(d).await;
            b.reset(); // the watcher's Init before its next list
        }
        // 800 ms doubling (jitter adds up to as much again), capped at 30 s (60 s with jitter).
        for (step, d) in delays.iter().enumerate() {
            let base = Duration::from_millis(800) * 2u32.pow(step as u32);
            let base = base.min(Duration::from_secs(30));
            assert!(*d >= base && *d < base * 2, "step {step}: {d:?} ({delays:?})");
        }
        // A minute without an error: the next success resets the delay.
        tokio::time::advance(WatchBackoff::HEALTHY).await;
        b.reset();
        assert!(b.next().unwrap() < Duration::from_millis(1600));
    }
}
