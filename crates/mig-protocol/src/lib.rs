//! The contract between mig-autoscaler's controller and its node agents, written on the Node
//! object; both depend on this crate and neither on the other.
//!
//! Everything lives under [`PREFIX`], so a start-up sweep can find (and only find) our own work:
//!
//! | key | written by | value |
//! |---|---|---|
//! | `mig-autoscaler.io/gpus` (annotation) | agent | [`NodeReport`]: actual layouts, pods per instance, utilization |
//! | `mig-autoscaler.io/grant` (annotation) | controller (leader) | [`Grant`]: plan id, per-GPU targets, evictions |
//! | `mig-autoscaler.io/state` (annotation) | agent | [`NodeState`]: phase of the sequence for a grant |
//! | `mig-autoscaler.io/reconfiguring` (NoSchedule taint) | agent | present while a sequence runs |
//! | `mig-autoscaler.io/do-not-disrupt` (pod annotation) | users | `"true"`: never evicted |
//!
//! Values are JSON. A value that does not parse is reported (Event, metric) and the node is left
//! alone; it is never overwritten blindly.

pub mod build;
pub mod clock;
pub mod events;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodSpec;
use serde::{Deserialize, Serialize};

pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use events::{Emitter, EventGate, Reason, clip_note};

/// Prefix of every annotation, label and taint key we own.
pub const PREFIX: &str = "mig-autoscaler.io/";
/// Node annotation: the agent's [`NodeReport`].
pub const REPORT_ANNOTATION: &str = "mig-autoscaler.io/gpus";
/// Node annotation: the controller's [`Grant`].
pub const GRANT_ANNOTATION: &str = "mig-autoscaler.io/grant";
/// Node annotation: the agent's [`NodeState`].
pub const STATE_ANNOTATION: &str = "mig-autoscaler.io/state";
/// Our NoSchedule taint on a node whose GPUs are being reconfigured.
pub const TAINT_KEY: &str = mig_planner::RECONFIGURING_TAINT;
/// Node annotation: the controller's [`NodeReservation`]s on the node (a JSON list).
pub const RESERVATIONS_ANNOTATION: &str = "mig-autoscaler.io/reservations";
/// Our NoSchedule taint on a node holding a reservation: no new pod lands there until the pods
/// using the reserved GPUs finish (the controller adds and removes it; the agent may not touch it).
pub const RESERVED_TAINT: &str = "mig-autoscaler.io/reserved";
/// Pod annotation: `"true"` means never evict this pod.
pub const DO_NOT_DISRUPT: &str = "mig-autoscaler.io/do-not-disrupt";
/// Pod annotation: when the pod expects to end (RFC 3339). Only a hint for choosing which GPUs
/// to reserve for a large waiting pod (a wrong one costs that pod time, bounded by the
/// reservation's maximum age); nothing is evicted by it.
pub const EXPECTED_END: &str = "mig-autoscaler.io/expected-end";
/// Label mig-manager reads.
pub const MIG_CONFIG_LABEL: &str = "nvidia.com/mig.config";
/// Label mig-manager writes (`pending`, `success`, `failed`, `rebooting`).
pub const MIG_STATE_LABEL: &str = "nvidia.com/mig.config.state";
/// The GPU operator's switch for a node's device plugin (`true`: deployed). The nvml backend
/// restarts the plugin as mig-manager does: [`DEVICE_PLUGIN_PAUSED`], then `true` once it is gone.
pub const DEVICE_PLUGIN_DEPLOY_LABEL: &str = "nvidia.com/gpu.deploy.device-plugin";
/// Value that stops the device plugin for a MIG change (mig-manager's own).
pub const DEVICE_PLUGIN_PAUSED: &str = "paused-for-mig-change";

/// Labels the node agent writes, on its own Node only.
pub const AGENT_LABELS: [&str; 3] = [MIG_CONFIG_LABEL, MIG_STATE_LABEL, DEVICE_PLUGIN_DEPLOY_LABEL];
/// Annotations the node agent writes, on its own Node only (never the grant).
pub const AGENT_ANNOTATIONS: [&str; 2] = [REPORT_ANNOTATION, STATE_ANNOTATION];

/// A Node update an agent may not make ([`agent_may_update_node`]): the request is denied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentNodeWrite {
    /// Another Node than the agent's own.
    #[error("the mig-autoscaler agent may only change the Node it runs on ({own}), not {other}")]
    OtherNode {
        /// The agent's Node.
        own: String,
        /// The Node it tried to change.
        other: String,
    },
    /// A label or annotation not the agent's.
    #[error("the mig-autoscaler agent may change only the {field} {allowed}, not {key}")]
    Key {
        /// `labels` or `annotations`.
        field: &'static str,
        /// The keys it may change.
        allowed: String,
        /// The key it tried to change.
        key: String,
    },
    /// A taint other than our NoSchedule taint.
    #[error("the mig-autoscaler agent may add or remove only its own NoSchedule taint {TAINT_KEY}")]
    Taint,
    /// `spec.unschedulable`.
    #[error("the mig-autoscaler agent may not cordon or uncordon a Node")]
    Cordon,
}

/// What the chart's admission policy (`<release>-agent-own-node`) lets a node agent change in an
/// update of a Node, in Rust: the Node it runs on (`agent_node`, from its bound service-account
/// token), only the labels [`AGENT_LABELS`] and annotations [`AGENT_ANNOTATIONS`], only our own
/// NoSchedule taint, never `spec.unschedulable`. The policy's CEL says the same (a test compares
/// their key lists), and the emulator enforces this for agent identities, so every agent write in
/// the fault suite is checked against it.
pub fn agent_may_update_node(
    agent_node: Option<&str>,
    old: &serde_json::Value,
    new: &serde_json::Value,
) -> Result<(), AgentNodeWrite> {
    use serde_json::{Map, Value};
    let name = new["metadata"]["name"].as_str().unwrap_or_default();
    if agent_node != Some(name) {
        return Err(AgentNodeWrite::OtherNode {
            own: agent_node.unwrap_or("unknown").to_string(),
            other: name.to_string(),
        });
    }
    let empty = Map::new();
    for (field, own) in [
        ("labels", &AGENT_LABELS[..]),
        ("annotations", &AGENT_ANNOTATIONS[..]),
    ] {
        let before = old["metadata"][field].as_object().unwrap_or(&empty);
        let after = new["metadata"][field].as_object().unwrap_or(&empty);
        if let Some(key) = before
            .keys()
            .chain(after.keys())
            .find(|k| !own.contains(&k.as_str()) && before.get(*k) != after.get(*k))
        {
            return Err(AgentNodeWrite::Key {
                field,
                allowed: own.join(", "),
                key: key.clone(),
            });
        }
    }
    let others = |node: &Value| -> Vec<Value> {
        node["spec"]["taints"]
            .as_array()
            .map(|t| t.iter().filter(|t| t["key"] != TAINT_KEY).cloned().collect())
            .unwrap_or_default()
    };
    let ours_ok = new["spec"]["taints"].as_array().is_none_or(|t| {
        t.iter()
            .all(|t| t["key"] != TAINT_KEY || t["effect"] == "NoSchedule")
    });
    if others(old) != others(new) || !ours_ok {
        return Err(AgentNodeWrite::Taint);
    }
    let cordoned = |node: &Value| node["spec"]["unschedulable"].as_bool().unwrap_or(false);
    if cordoned(old) != cordoned(new) {
        return Err(AgentNodeWrite::Cordon);
    }
    Ok(())
}

/// What the agent observed on its node (NVML, or the emulator's simulated GPUs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    /// When it was observed (RFC 3339).
    #[serde(default)]
    pub observed_at: String,
    /// Every GPU, with its instances at their placements and the pods using them.
    pub gpus: Vec<mig_planner::snapshot::Gpu>,
    /// The backend the agent runs (`--backend`); a node whose agent runs another one than the
    /// planner plans for is left alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<mig_planner::snapshot::Backend>,
}

/// The backend's name as settings and flags spell it.
pub fn backend_name(b: mig_planner::snapshot::Backend) -> &'static str {
    match b {
        mig_planner::snapshot::Backend::MigManager => "mig-manager",
        mig_planner::snapshot::Backend::Nvml => "nvml",
    }
}

/// GPUs of a node reserved for a large pending pod (written by the controller, read back by a new
/// leader; docs/planner.md "Reservations").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReservation {
    /// The pending pod, `namespace/name`.
    pub pod: String,
    /// The reserved GPUs, each with the instance kept for the pod.
    pub gpus: Vec<mig_planner::snapshot::ReservedInstance>,
    /// When it was made (RFC 3339).
    pub since: String,
}

/// The controller's permission for a node to reconfigure to a target.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    /// Unique per grant (`<plan id>-<grant time>`): the same plan granted again after a rollback is
    /// a new sequence.
    pub id: String,
    /// Plan id the grant comes from.
    pub plan_id: String,
    /// mig-parted config to set as `nvidia.com/mig.config` (mig-manager backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_config: Option<String>,
    /// GPU index → target layout (canonical form), for the GPUs that change.
    pub targets: BTreeMap<u32, String>,
    /// Pods (`namespace/name`) to evict, through the Eviction API only.
    #[serde(default)]
    pub evictions: Vec<String>,
    /// When it was granted (RFC 3339).
    pub granted_at: String,
    /// Identity of the controller replica that granted it.
    pub granted_by: String,
    /// Times (RFC 3339) of evictions granted on this node within the eviction window, this grant's
    /// included: the eviction budget survives restarts and leader changes.
    #[serde(default)]
    pub recent_evictions: Vec<String>,
}

/// Phase of a node's reconfiguration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum Phase {
    /// Adding our taint.
    Tainting,
    /// Evicting the pods on GPUs that change.
    Draining,
    /// Setting `nvidia.com/mig.config` (mig-manager backend).
    Relabeling,
    /// Destroying and creating GPU instances at the grant's placements, then restarting the device
    /// plugin so that it advertises them (nvml backend).
    Applying,
    /// Waiting for `nvidia.com/mig.config.state=success`.
    AwaitingMigManager,
    /// Checking actual == target.
    Verifying,
    /// Removing our taint.
    Untainting,
    /// Failed after relabeling: back to the previous `nvidia.com/mig.config`.
    RollingBack,
    /// Finished: actual == target, taint gone.
    Done,
    /// Failed and rolled back to the previous config; taint gone.
    RolledBack,
    /// Failed; the node stays tainted until someone looks (a Warning Event says why).
    Failed,
    /// Ended before any GPU changed because the plan was out of date (a pod it did not know had
    /// started on a GPU to change); taint gone. Not a failure: no cooldown, the next plan may
    /// grant the node again at once.
    Superseded,
}

impl Phase {
    /// Whether the sequence has ended (nothing more will happen for this grant).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Phase::Done | Phase::RolledBack | Phase::Failed | Phase::Superseded
        )
    }

    /// Every phase, in sequence order.
    pub const ALL: [Phase; 12] = [
        Phase::Tainting,
        Phase::Draining,
        Phase::Relabeling,
        Phase::Applying,
        Phase::AwaitingMigManager,
        Phase::Verifying,
        Phase::Untainting,
        Phase::RollingBack,
        Phase::Done,
        Phase::RolledBack,
        Phase::Failed,
        Phase::Superseded,
    ];

    /// Its one name, as on the Node, in metrics, logs and Events (PascalCase, like Kubernetes'
    /// pod phases).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Tainting => "Tainting",
            Phase::Draining => "Draining",
            Phase::Relabeling => "Relabeling",
            Phase::Applying => "Applying",
            Phase::AwaitingMigManager => "AwaitingMigManager",
            Phase::Verifying => "Verifying",
            Phase::Untainting => "Untainting",
            Phase::RollingBack => "RollingBack",
            Phase::Done => "Done",
            Phase::RolledBack => "RolledBack",
            Phase::Failed => "Failed",
            Phase::Superseded => "Superseded",
        }
    }
}

/// Where the agent is with a grant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    /// The id of the grant this sequence runs.
    pub grant_id: String,
    /// Phase.
    pub phase: Phase,
    /// When the phase began (RFC 3339).
    pub since: String,
    /// Attempt number (1-based).
    #[serde(default = "one")]
    pub attempt: u32,
    /// What happened, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `nvidia.com/mig.config` before the sequence began (what a rollback returns to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_config: Option<String>,
    /// The grant's GPUs as they were when the sequence began, GPU index → layout (canonical form):
    /// what an nvml-backend rollback returns to.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub previous_layouts: BTreeMap<u32, String>,
    /// nvml backend: a device-plugin restart was begun in this phase (so a plugin still starting
    /// is waited for, not paused again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restarting_device_plugin: bool,
    /// While a phase lasts, the agent rewrites its state every `--heartbeat-seconds` with this set
    /// to its time, so that the controller can tell a live agent waiting from a dead one (by when
    /// it last saw the state change, on its own clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<String>,
}

fn one() -> u32 {
    1
}

/// A value under our prefix that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key} on {object}: {message}")]
pub struct MalformedAnnotation {
    /// Annotation key.
    pub key: &'static str,
    /// `node/<name>` or `pod/<ns>/<name>`.
    pub object: String,
    /// The parse error.
    pub message: String,
}

/// Parse one of our JSON annotations; `Ok(None)` when absent.
pub fn parse_annotation<T: serde::de::DeserializeOwned>(
    annotations: Option<&BTreeMap<String, String>>,
    key: &'static str,
    object: &str,
) -> Result<Option<T>, MalformedAnnotation> {
    let Some(text) = annotations.and_then(|a| a.get(key)) else {
        return Ok(None);
    };
    serde_json::from_str(text)
        .map(Some)
        .map_err(|e| MalformedAnnotation {
            key,
            object: object.to_string(),
            message: e.to_string(),
        })
}

/// The in-flight status of a node, from its grant and state annotations.
#[derive(Clone, Debug, PartialEq)]
pub enum Flight {
    /// No grant, or its sequence has ended.
    Idle {
        /// When the last sequence ended (for cooldowns), if known.
        finished_at: Option<jiff::Timestamp>,
    },
    /// Granted and not yet ended (the agent may not have started).
    InFlight {
        /// The phase, if the agent has started.
        phase: Option<Phase>,
    },
    /// The sequence failed and the node was left tainted, or its agent is gone mid-change: the
    /// node is left alone (frozen) until a person clears the grant annotation, but no longer holds
    /// the node budget (a dead agent must not wedge repartitioning everywhere else).
    Stuck,
}

/// When the node's cooldown starts: the end of a sequence that touched (or tried to touch) its GPUs.
/// A superseded sequence changed nothing and starts none.
fn cooldown_from(state: &NodeState) -> Option<jiff::Timestamp> {
    match state.phase {
        Phase::Superseded => None,
        p if p.is_terminal() => state.since.parse().ok(),
        _ => None,
    }
}

/// Where a node stands, given its grant and state.
pub fn flight(grant: Option<&Grant>, state: Option<&NodeState>) -> Flight {
    let Some(grant) = grant else {
        return Flight::Idle {
            finished_at: state.and_then(cooldown_from),
        };
    };
    match state.filter(|s| s.grant_id == grant.id) {
        None => Flight::InFlight { phase: None },
        Some(s) if s.phase == Phase::Failed => Flight::Stuck,
        Some(s) if s.phase.is_terminal() => Flight::Idle {
            finished_at: cooldown_from(s),
        },
        Some(s) => Flight::InFlight { phase: Some(s.phase) },
    }
}

/// Prefix of MIG extended resources.
pub const MIG_RESOURCE_PREFIX: &str = "nvidia.com/mig-";

/// A pod's MIG request that is not a count of instances: the pod is not planned for (an API
/// server refuses such a pod at admission; a cache or another path may still carry one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadMigRequest {
    /// Not a whole number (`1.5`, `1Gi`).
    #[error("container {container}: {resource}: {value:?} is not a whole number of instances")]
    NotWhole {
        /// The container.
        container: String,
        /// The resource (`nvidia.com/mig-3g.40gb`).
        resource: String,
        /// The quantity as written.
        value: String,
    },
    /// Below zero.
    #[error("container {container}: {resource}: negative count {count}")]
    Negative {
        /// The container.
        container: String,
        /// The resource.
        resource: String,
        /// The count.
        count: i64,
    },
}

/// Requests of one pod per MIG resource: containers summed, init containers as a floor (as the
/// scheduler computes effective requests). Non-integer or negative counts are errors.
pub fn mig_requests(spec: &PodSpec) -> Result<BTreeMap<String, i64>, BadMigRequest> {
    fn of(c: &k8s_openapi::api::core::v1::Container) -> Result<BTreeMap<String, i64>, BadMigRequest> {
        let mut out = BTreeMap::new();
        let Some(r) = &c.resources else { return Ok(out) };
        // Extended resources: limits, and requests must equal them; take limits, else requests.
        for src in [r.limits.as_ref(), r.requests.as_ref()].into_iter().flatten() {
            for (k, q) in src {
                if !k.starts_with(MIG_RESOURCE_PREFIX) || out.contains_key(k) {
                    continue;
                }
                let n: i64 = q.0.trim().parse().map_err(|_| BadMigRequest::NotWhole {
                    container: c.name.clone(),
                    resource: k.clone(),
                    value: q.0.clone(),
                })?;
                if n < 0 {
                    return Err(BadMigRequest::Negative {
                        container: c.name.clone(),
                        resource: k.clone(),
                        count: n,
                    });
                }
                if n > 0 {
                    out.insert(k.clone(), n);
                }
            }
        }
        Ok(out)
    }
    let mut sum: BTreeMap<String, i64> = BTreeMap::new();
    for c in &spec.containers {
        for (k, n) in of(c)? {
            *sum.entry(k).or_default() += n;
        }
    }
    for c in spec.init_containers.iter().flatten() {
        for (k, n) in of(c)? {
            let e = sum.entry(k).or_default();
            *e = (*e).max(n);
        }
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_plan_names_the_phases_the_agent_writes() {
        use mig_planner::PlannedPhase as P;
        for planned in [
            P::Tainting {
                taint: TAINT_KEY.into(),
            },
            P::Draining { evict: vec![] },
            P::Relabeling { config: "c".into() },
            P::AwaitingMigManager,
            P::Applying { gpus: vec![0] },
            P::Verifying {
                targets: Default::default(),
            },
            P::Untainting {
                taint: TAINT_KEY.into(),
            },
        ] {
            assert!(
                Phase::ALL.iter().any(|p| p.as_str() == planned.name()),
                "the plan's {} is no agent phase",
                planned.name()
            );
            assert_eq!(serde_json::to_value(&planned).unwrap()["phase"], planned.name());
        }
        for p in Phase::ALL {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
    }

    use super::*;

    fn grant(id: &str) -> Grant {
        Grant {
            id: id.into(),
            plan_id: id.into(),
            granted_at: "2026-01-01T00:00:00Z".into(),
            ..Default::default()
        }
    }
    fn state(id: &str, phase: Phase) -> NodeState {
        NodeState {
            grant_id: id.into(),
            phase,
            since: "2026-01-01T00:05:00Z".into(),
            attempt: 1,
            message: None,
            previous_config: None,
            previous_layouts: Default::default(),
            restarting_device_plugin: false,
            heartbeat: None,
        }
    }

    #[test]
    fn flight_follows_the_state_of_the_same_plan_only() {
        assert_eq!(flight(None, None), Flight::Idle { finished_at: None });
        assert_eq!(flight(Some(&grant("a")), None), Flight::InFlight { phase: None });
        // A state left from an older grant does not end the new one.
        assert_eq!(
            flight(Some(&grant("b")), Some(&state("a", Phase::Done))),
            Flight::InFlight { phase: None }
        );
        assert_eq!(
            flight(Some(&grant("a")), Some(&state("a", Phase::Draining))),
            Flight::InFlight {
                phase: Some(Phase::Draining)
            }
        );
        let done = flight(Some(&grant("a")), Some(&state("a", Phase::Done)));
        assert_eq!(
            done,
            Flight::Idle {
                finished_at: Some("2026-01-01T00:05:00Z".parse().unwrap())
            }
        );
        assert_eq!(
            flight(Some(&grant("a")), Some(&state("a", Phase::Failed))),
            Flight::Stuck
        );
        // A stale plan abandoned before any change: ended, and no cooldown.
        for g in [Some(grant("a")), None] {
            assert_eq!(
                flight(g.as_ref(), Some(&state("a", Phase::Superseded))),
                Flight::Idle { finished_at: None }
            );
        }
    }

    #[test]
    fn malformed_annotations_name_key_and_object() {
        let mut a = BTreeMap::new();
        a.insert(GRANT_ANNOTATION.to_string(), "{not json".to_string());
        let e = parse_annotation::<Grant>(Some(&a), GRANT_ANNOTATION, "node/n1").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("annotation mig-autoscaler.io/grant on node/n1:"),
            "{e}"
        );
        assert!(
            parse_annotation::<Grant>(None, GRANT_ANNOTATION, "node/n1")
                .unwrap()
                .is_none()
        );
    }
}
