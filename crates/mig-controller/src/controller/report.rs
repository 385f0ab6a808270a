//! What the loop tells people: Events (one gate, object references with UIDs) and the plan's
//! metrics, explanations on pods and nodes, problems found in the input.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector;
use mig_catalog::Catalog;
use mig_planner::{Plan, PodOutcome};
use mig_protocol::{Emitter, Reason};
use tokio::sync::mpsc;

use super::ControlLoop;
use crate::Metrics;
use crate::budget::Headroom;
use crate::metrics::{BudgetLabel, InstanceLabels, OutcomeLabel, ProfileLabel, ReasonLabel, ReportLabel};
use crate::observe::{ClusterView, InputProblem};
use crate::settings::Mode;

pub(super) async fn publish_events(recorder: Recorder, mut rx: mpsc::Receiver<(Event, ObjectReference)>) {
    while let Some((event, reference)) = rx.recv().await {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, reason = %event.reason, "could not publish event");
        }
    }
}

pub(super) fn node_ref(name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.into()),
        uid,
        ..Default::default()
    }
}

pub(super) fn pod_ref(ns: &str, name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.into()),
        namespace: Some(ns.into()),
        uid,
        ..Default::default()
    }
}

impl ControlLoop {
    /// Queue an Event; `true` when it was sent (this replica leads and it is not a repeat within
    /// `eventDedupe`).
    pub(super) fn emit(
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
    pub(super) fn with_uid(&self, mut r: ObjectReference) -> ObjectReference {
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

    pub(super) fn record_plan_metrics(&self, obs: &ClusterView, plan: &Plan, room: Headroom) {
        let m = &self.shared.metrics;
        record_pending(m, obs, plan);
        record_instances(m, plan);
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
        for report in ["missing", "stale"] {
            let n = obs
                .nodes
                .values()
                .filter(|v| v.unreported.is_some_and(|u| u.label() == report))
                .count();
            m.nodes_unreported
                .get_or_create(&ReportLabel { report })
                .set(n as i64);
        }
        m.nodes_reconfiguring.set(i64::from(room.in_flight));
        m.nodes_stuck.set(i64::from(room.stuck));
    }

    pub(super) fn report_problem(&mut self, p: &InputProblem) {
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

    pub(super) fn explain_to_pods_and_nodes(
        &mut self,
        plan: &Plan,
        decisions: &BTreeMap<String, String>,
        mode: Mode,
    ) {
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
}

/// `pending_pods` per profile: the profiles pending pods ask for, and zeros for the other profiles
/// of the GPU models in the cluster (not of every model in the catalog).
fn record_pending(m: &Metrics, obs: &ClusterView, plan: &Plan) {
    let catalog = Catalog::embedded();
    let mut by_profile: BTreeMap<String, i64> = plan
        .gpus
        .iter()
        .filter_map(|g| catalog.lookup(&g.model).ok())
        .flat_map(|model| model.profiles.iter().map(|p| (p.name.clone(), 0)))
        .collect();
    for p in &obs.snapshot.pending_pods {
        for r in p.requests.keys() {
            if let Some(profile) = r.strip_prefix(mig_protocol::MIG_RESOURCE_PREFIX) {
                *by_profile.entry(profile.to_string()).or_default() += 1;
            }
        }
    }
    m.pending_pods.clear();
    for (profile, n) in by_profile {
        m.pending_pods.get_or_create(&ProfileLabel { profile }).set(n);
    }
}

/// `gpu_instances` per GPU, side and profile: only the profiles the GPU has on either side (a
/// profile on one side only is 0 on the other, so `target - actual` sees it); no zeros otherwise.
fn record_instances(m: &Metrics, plan: &Plan) {
    let catalog = Catalog::embedded();
    m.gpu_instances.clear();
    for g in &plan.gpus {
        let Ok(model) = catalog.lookup(&g.model) else {
            continue;
        };
        let count = |text: &str| {
            let mut counts: BTreeMap<String, i64> = BTreeMap::new();
            for i in model
                .parse_layout(text)
                .map(|l| l.instances().to_vec())
                .unwrap_or_default()
            {
                *counts.entry(model.profile_name(i.profile)).or_default() += 1;
            }
            counts
        };
        let (actual, target) = (count(&g.actual), count(&g.target));
        let profiles: BTreeSet<&String> = actual.keys().chain(target.keys()).collect();
        for profile in profiles {
            for (side, counts) in [("actual", &actual), ("target", &target)] {
                m.gpu_instances
                    .get_or_create(&InstanceLabels {
                        node: g.node.clone(),
                        gpu: g.index.to_string(),
                        profile: profile.clone(),
                        side,
                    })
                    .set(counts.get(profile).copied().unwrap_or(0));
            }
        }
    }
}
