//! The housekeeping sweep's commands (see `sweep`), carried out by the leader in auto mode.

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use mig_protocol::{GRANT_ANNOTATION, NodeState, Phase, Reason, STATE_ANNOTATION, TAINT_KEY};
use serde_json::json;

use super::{ControlLoop, FIELD_MANAGER, node_ref, sweep};
use crate::metrics::ResultLabel;
use crate::observe::ClusterView;

impl ControlLoop {
    /// Leader only: merge-patch Node `name`, and once written record it as `what` and announce it
    /// with a `reason` Event saying `note`.
    pub(super) async fn sweep_write(
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
    pub(super) async fn housekeeping(&mut self) {
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
        self.sync_reservations().await;
    }

    /// A reconfiguration ended: counted, noted among the recent actions, its cooldown started on
    /// this replica's clock; a `Superseded` one (its plan was stale) makes the next round plan.
    fn ended(&mut self, node: String, grant: String, phase: Phase, message: &str) {
        self.shared
            .metrics
            .reconfigurations
            .get_or_create(&ResultLabel {
                result: phase.as_str(),
            })
            .inc();
        self.shared.note(format!(
            "{node}: reconfiguration ended {} (grant {grant}): {message}",
            phase.as_str()
        ));
        // Plan afresh now rather than at the next batch or resync (each retry costs a taint and
        // two agent ticks, so this cannot spin).
        self.state.replan |= phase == Phase::Superseded;
        // A reserved node whose change is made: the next plan finds its pod's instances and
        // releases the reservation (on mig-manager its taint keeps that pod off until then).
        self.state.replan |=
            phase == Phase::Done && self.state.reservations.values().any(|(r, _)| r.node == node);
        // The agent announces the end on the Node (it owns the Reconfiguration* reasons).
        tracing::info!(node = %node, grant_id = %grant, phase = phase.as_str(), message = %message, "reconfiguration ended");
        let now = self.now();
        self.state.ended_seen.insert(node, (grant, now));
    }

    /// One command of the sweep.
    pub(super) async fn carry_out(&mut self, obs: &ClusterView, command: sweep::Command) {
        use sweep::Command;
        let timeout = self.shared.settings.budgets.agent_timeout;
        match command {
            Command::Ended {
                node,
                grant,
                phase,
                message,
            } => self.ended(node, grant, phase, &message),
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
