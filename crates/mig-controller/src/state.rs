//! What the control loop and the HTTP API share: settings, metrics, leadership, the latest plan
//! and the recent actions. The loop writes it, the API reads it; neither imports the other.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use mig_planner::Plan;
use mig_protocol::SharedClock;
use serde::Serialize;

use crate::Metrics;
use crate::lease::LeaseHandle;
use crate::settings::Settings;

/// The latest plan and what the controller made of it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    /// When it was computed.
    pub computed_at: String,
    /// Controller mode.
    pub mode: &'static str,
    /// Identity of the replica that computed it.
    pub computed_by: String,
    /// Whether that replica was the leader.
    pub leader: bool,
    /// The plan.
    pub plan: Plan,
    /// Per changed node: `granted`, `dry-run`, or why it was deferred.
    pub decisions: BTreeMap<String, String>,
    /// Input the controller could not use.
    pub problems: Vec<ProblemView>,
    /// Budget headroom when it was planned.
    pub headroom: HeadroomView,
}

/// An input problem, for the API.
#[derive(Clone, Debug, Serialize)]
pub struct ProblemView {
    /// `Pod/ns/name` or `Node/name`.
    pub object: String,
    /// Reason.
    pub reason: &'static str,
    /// Message.
    pub message: String,
}

/// Budget headroom, for the API.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeadroomView {
    /// Nodes that may start now.
    pub nodes: u32,
    /// Evictions that may be granted now.
    pub evictions: u32,
    /// Nodes reconfiguring.
    pub in_flight: u32,
    /// Whether a change window is open.
    pub window_open: bool,
}

/// State shared by the loop and the HTTP server.
pub struct Shared {
    /// Settings.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Metrics,
    /// Leadership.
    pub lease: LeaseHandle,
    /// Caches synced.
    pub ready: AtomicBool,
    /// Latest plan.
    pub latest: RwLock<Option<Arc<Published>>>,
    /// Successful writes to nodes and the ConfigMap (for tests and the fencing proof): when, what.
    pub writes: std::sync::Mutex<Vec<(Instant, String)>>,
    /// The last 100 actions (writes, ended reconfigurations), newest last, for the web view.
    pub recent: std::sync::Mutex<std::collections::VecDeque<RecentAction>>,
    /// Slots for what-if plans (`POST /api/v1/plan`): a plan holds one until the planner returns,
    /// even when its request has timed out, so the planner's CPU stays bounded.
    pub what_if: Arc<tokio::sync::Semaphore>,
    /// Checks API callers (`None`: `http.auth` lets everyone in, on loopback only).
    pub reviewer: Option<crate::auth::Reviewer>,
    /// Time, for the loop, the lease, caches and what is written.
    pub clock: SharedClock,
}

/// Something the controller did or saw end, for people.
#[derive(Clone, Debug, Serialize)]
pub struct RecentAction {
    /// When (RFC 3339).
    pub at: String,
    /// What.
    pub what: String,
}

impl Shared {
    /// The latest published plan.
    pub fn latest(&self) -> Option<Arc<Published>> {
        self.latest.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn record_write(&self, what: String) {
        self.note(what.clone());
        self.writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((self.clock.instant(), what));
    }

    pub(crate) fn note(&self, what: String) {
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        r.push_back(RecentAction {
            at: self.clock.now().to_string(),
            what,
        });
        while r.len() > 100 {
            r.pop_front();
        }
    }

    /// The recent actions, newest last.
    pub fn recent_actions(&self) -> Vec<RecentAction> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}
