//! Reservations by attrition in the cluster (docs/planner.md "Reservations"). The planner decides
//! them; the controller carries them from plan to plan (with their age), and the leader in auto
//! mode keeps the Nodes in step every round: the `mig-autoscaler.io/reservations` annotation (read
//! back by the next leader) and the `mig-autoscaler.io/reserved` NoSchedule taint, so that no new
//! pod lands on a reserved node (on both backends: see the planner's `reserve` module for why not
//! only withdrawn instances on nvml). A node with our annotation or taint and no reservation is
//! cleaned the same way (the sweep).

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use mig_planner::Plan;
use mig_planner::snapshot::Reservation;
use mig_protocol::{NodeReservation, RESERVATIONS_ANNOTATION, RESERVED_TAINT, Reason};
use serde_json::json;

use super::{ControlLoop, FIELD_MANAGER, annotation, node_ref, pod_ref};
use crate::metrics::EventLabel;
use crate::settings::Mode;

/// The reservations in force: by pod, the reservation and when it was made.
pub(super) type Held = BTreeMap<String, (Reservation, Timestamp)>;

/// The reservations written on `node`, or none (a malformed annotation counts as none: the
/// controller owns it and writes it again).
pub(super) fn written(node: &Node) -> Vec<NodeReservation> {
    annotation(node, RESERVATIONS_ANNOTATION).unwrap_or_default()
}

/// The reservations of `held` on each node, as written there (sorted by pod).
fn by_node(held: &Held) -> BTreeMap<String, Vec<NodeReservation>> {
    let mut out: BTreeMap<String, Vec<NodeReservation>> = BTreeMap::new();
    for (pod, (r, since)) in held {
        out.entry(r.node.clone()).or_default().push(NodeReservation {
            pod: pod.clone(),
            gpus: r.gpus.clone(),
            since: since.to_string(),
        });
    }
    out
}

impl ControlLoop {
    /// The reservations in force, aged to `now`, for the next snapshot.
    pub(super) fn reservations_at(&self, now: Timestamp) -> Vec<Reservation> {
        self.state
            .reservations
            .values()
            .map(|(r, since)| Reservation {
                age_seconds: now.duration_since(*since).as_secs().max(0) as u64,
                ..r.clone()
            })
            .collect()
    }

    /// A new leader's view: the reservations written on the Nodes (the planner checks each again).
    pub(super) fn read_back_reservations(&mut self, nodes: &[Node]) {
        self.state.reservations.clear();
        for n in nodes {
            for r in written(n) {
                let since = r.since.parse().unwrap_or_else(|_| self.now());
                let reservation = Reservation {
                    pod: r.pod.clone(),
                    node: n.name_any(),
                    gpus: r.gpus,
                    age_seconds: 0,
                };
                self.state.reservations.insert(r.pod, (reservation, since));
            }
        }
    }

    /// After a plan: its reservations are the ones in force (new ones made `now`), counted, and in
    /// auto mode announced (the leader's Events only).
    pub(super) fn carry_reservations(&mut self, plan: &Plan, now: Timestamp) {
        let m = &self.shared.metrics;
        m.reserved_gpus
            .set(plan.reservations.iter().map(|r| r.gpus.len() as i64).sum());
        let made = plan.reservations.iter().filter(|r| r.new).count() as u64;
        m.reservations
            .get_or_create(&EventLabel { event: "made" })
            .inc_by(made);
        m.reservations
            .get_or_create(&EventLabel { event: "released" })
            .inc_by(plan.released.len() as u64);
        let mut next = Held::new();
        for r in &plan.reservations {
            let since = match self.state.reservations.get(&r.pod) {
                Some((old, since)) if !r.new && old.node == r.node => *since,
                _ => now,
            };
            next.insert(r.pod.clone(), (r.carried(0), since));
        }
        self.state.reservations = next;
        if self.shared.settings.mode != Mode::Auto {
            return;
        }
        for r in plan.reservations.iter().filter(|r| r.new) {
            let gpus: Vec<String> = r.gpus.iter().map(|g| format!("GPU {} ({g})", g.gpu)).collect();
            let note = format!(
                "plan {}: {} on {} reserved for {} until {} running pod(s) finish",
                plan.id,
                gpus.join(", "),
                r.node,
                r.pod,
                r.waiting_for.len()
            );
            let (ns, name) = r.pod.split_once('/').unwrap_or(("", &r.pod));
            self.emit(
                Reason::GpusReserved,
                note.clone(),
                "Reserve",
                pod_ref(ns, name, None),
                Some(node_ref(&r.node, None)),
            );
            self.emit(
                Reason::GpusReserved,
                note,
                "Reserve",
                node_ref(&r.node, None),
                None,
            );
        }
        for r in &plan.released {
            let note = format!(
                "plan {}: the reservation for {} ends: {}",
                plan.id, r.pod, r.reason
            );
            self.emit(
                Reason::ReservationReleased,
                note,
                "Release",
                node_ref(&r.node, None),
                None,
            );
        }
    }

    /// Leader, auto mode, every round: each Node's reservation annotation and (mig-manager) taint
    /// made to match the reservations in force; a write the API server refuses (a newer Node)
    /// is tried again next round.
    pub(super) async fn sync_reservations(&mut self) {
        let want = by_node(&self.state.reservations);
        let api: Api<Node> = Api::all(self.client.clone());
        for node in self.caches.nodes.state() {
            let name = node.name_any();
            let wanted = want.get(&name).cloned().unwrap_or_default();
            let taints = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default();
            let tainted = taints.iter().any(|t| t.key == RESERVED_TAINT);
            let want_taint = !wanted.is_empty();
            let annotated = node.annotations().contains_key(RESERVATIONS_ANNOTATION);
            if written(&node) == wanted && annotated != wanted.is_empty() && tainted == want_taint {
                continue;
            }
            let mut new_taints: Vec<Taint> = taints.into_iter().filter(|t| t.key != RESERVED_TAINT).collect();
            if want_taint {
                new_taints.push(Taint {
                    key: RESERVED_TAINT.into(),
                    value: Some("attrition".into()),
                    effect: "NoSchedule".into(),
                    time_added: None,
                });
            }
            let value = (!wanted.is_empty()).then(|| serde_json::to_string(&wanted).unwrap_or_default());
            let patch = json!({
                "metadata": {
                    "resourceVersion": node.resource_version(),
                    "annotations": {RESERVATIONS_ANNOTATION: value},
                },
                "spec": {"taints": new_taints},
            });
            match api
                .patch(&name, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    let what = match wanted.len() {
                        0 => "reservations cleared".to_string(),
                        n => format!("{n} reservation(s) written, tainted {RESERVED_TAINT}"),
                    };
                    self.shared.record_write(format!("{name}: {what}"));
                }
                Err(e) => tracing::debug!(node = %name, error = %e, "reservation write refused; next round"),
            }
        }
    }
}
