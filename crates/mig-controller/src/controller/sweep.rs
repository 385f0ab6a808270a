//! The housekeeping sweep as a pure function: from the cluster as observed, what the sweep
//! remembers from earlier rounds, and the time, the commands to carry out. The control loop
//! performs them (API writes, Events, metrics); nothing here does I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use mig_protocol::{Flight, NodeState, Phase};

use crate::observe::ClusterView;

/// What the sweep remembers between rounds (this replica's own observations).
#[derive(Debug, Default)]
pub(crate) struct SweepMemory {
    /// Last flight per node, to count ended reconfigurations once.
    pub flights: BTreeMap<String, (Option<String>, Option<Phase>)>,
    /// Per node in flight: its agent's state as last seen, and when (this replica's clock) it
    /// last changed. A state that stops changing means the agent is gone.
    pub agent_seen: BTreeMap<String, (String, Instant)>,
    /// Nodes whose agent is gone mid-change: stuck (frozen, tainted, holding no budget).
    pub agents_gone: BTreeSet<String>,
}

/// The sweep's time limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// A grant no agent starts within this is withdrawn (`budgets.grantTimeout`).
    pub grant_timeout: Duration,
    /// An agent whose state does not change for this is gone (`budgets.agentTimeout`).
    pub agent_timeout: Duration,
}

/// One thing the sweep decided, for the loop to carry out.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Command {
    /// A reconfiguration ended (counted once, not those already ended when this replica started).
    Ended {
        /// Node.
        node: String,
        /// Its grant id.
        grant: String,
        /// The terminal phase.
        phase: Phase,
        /// The agent's message.
        message: String,
    },
    /// The agent stopped before any GPU changed: end the sequence as it would have (grant gone,
    /// `RolledBack`), so the node is idle and untainted.
    Release {
        /// Node.
        node: String,
        /// The agent's last state.
        state: NodeState,
        /// The grant's plan.
        plan_id: String,
    },
    /// The agent stopped mid-change: the node stays tainted and frozen for a person (said once).
    Stuck {
        /// Node.
        node: String,
        /// The phase it stopped in.
        phase: Phase,
        /// The grant's plan.
        plan_id: String,
    },
    /// Post the evictions the node's grant names (agents cannot evict).
    Drain {
        /// Node.
        node: String,
    },
    /// Withdraw a grant the agent never started within the grant timeout.
    Withdraw {
        /// Node.
        node: String,
        /// The grant's plan.
        plan_id: String,
    },
    /// Remove our taint from a node with nothing in flight (a crash between phases, or a removed
    /// grant).
    Untaint {
        /// Node.
        node: String,
    },
}

/// The commands of one sweep over `view` at wall time `now` and monotonic time `instant`.
pub(crate) fn sweep(
    view: &ClusterView,
    memory: &mut SweepMemory,
    now: Timestamp,
    instant: Instant,
    limits: Limits,
) -> Vec<Command> {
    let grant_timeout =
        jiff::SignedDuration::try_from(limits.grant_timeout).unwrap_or(jiff::SignedDuration::MAX);
    let first_round = memory.flights.is_empty();
    let mut out = Vec::new();
    for (name, node) in &view.nodes {
        if node.malformed {
            continue;
        }
        let current = (
            node.state.as_ref().map(|s| s.grant_id.clone()),
            node.state.as_ref().map(|s| s.phase),
        );
        let previous = memory.flights.insert(name.clone(), current.clone());
        if !first_round
            && previous.as_ref() != Some(&current)
            && let (Some(grant), Some(phase)) = &current
            && phase.is_terminal()
        {
            out.push(Command::Ended {
                node: name.clone(),
                grant: grant.clone(),
                phase: *phase,
                message: node
                    .state
                    .as_ref()
                    .and_then(|s| s.message.clone())
                    .unwrap_or_default(),
            });
        }
        if let (Flight::InFlight { phase: Some(_) }, Some(state), Some(g)) =
            (&node.flight, &node.state, &node.grant)
        {
            let seen = serde_json::to_string(state).unwrap_or_default();
            let entry = memory
                .agent_seen
                .entry(name.clone())
                .or_insert_with(|| (seen.clone(), instant));
            if entry.0 != seen {
                *entry = (seen, instant);
                memory.agents_gone.remove(name);
            } else if instant.saturating_duration_since(entry.1) > limits.agent_timeout {
                if matches!(state.phase, Phase::Tainting | Phase::Draining) {
                    out.push(Command::Release {
                        node: name.clone(),
                        state: state.clone(),
                        plan_id: g.plan_id.clone(),
                    });
                } else if memory.agents_gone.insert(name.clone()) {
                    out.push(Command::Stuck {
                        node: name.clone(),
                        phase: state.phase,
                        plan_id: g.plan_id.clone(),
                    });
                }
            }
        } else {
            memory.agent_seen.remove(name);
            memory.agents_gone.remove(name);
        }
        if node.grant.is_some() {
            out.push(Command::Drain { node: name.clone() });
        }
        if let (Flight::InFlight { phase: None }, Some(g)) = (&node.flight, &node.grant)
            && let Ok(at) = g.granted_at.parse::<Timestamp>()
            && now.duration_since(at) > grant_timeout
        {
            out.push(Command::Withdraw {
                node: name.clone(),
                plan_id: g.plan_id.clone(),
            });
        }
        if node.tainted && matches!(node.flight, Flight::Idle { .. }) {
            out.push(Command::Untaint { node: name.clone() });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::NodeView;
    use mig_protocol::Grant;

    fn node(grant: Option<Grant>, state: Option<NodeState>, tainted: bool) -> NodeView {
        NodeView {
            report_raw: None,
            flight: mig_protocol::flight(grant.as_ref(), state.as_ref()),
            grant,
            state,
            tainted,
            mig_config: None,
            malformed: false,
            reported: true,
            unreported: None,
            recent_evictions: Vec::new(),
        }
    }

    fn grant(at: Timestamp) -> Grant {
        Grant {
            id: "g1".into(),
            plan_id: "p1".into(),
            granted_at: at.to_string(),
            ..Default::default()
        }
    }

    fn state(phase: Phase, at: Timestamp) -> NodeState {
        NodeState {
            grant_id: "g1".into(),
            phase,
            since: at.to_string(),
            attempt: 1,
            message: Some("m".into()),
            previous_config: None,
            previous_layouts: Default::default(),
            restarting_device_plugin: false,
            heartbeat: None,
        }
    }

    const LIMITS: Limits = Limits {
        grant_timeout: Duration::from_secs(600),
        agent_timeout: Duration::from_secs(120),
    };

    fn view(nodes: Vec<(&str, NodeView)>) -> ClusterView {
        ClusterView {
            nodes: nodes.into_iter().map(|(n, v)| (n.to_string(), v)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_grant_never_started_is_withdrawn_after_the_timeout_and_not_before() {
        let t0: Timestamp = "2026-12-03T12:00:00Z".parse().unwrap();
        let i0 = Instant::now();
        let v = view(vec![("n", node(Some(grant(t0)), None, true))]);
        let mut m = SweepMemory::default();
        let at = |mins| t0 + jiff::SignedDuration::from_mins(mins);
        let early = sweep(&v, &mut m, at(9), i0, LIMITS);
        assert_eq!(early, vec![Command::Drain { node: "n".into() }]);
        let late = sweep(&v, &mut m, at(11), i0, LIMITS);
        assert!(late.contains(&Command::Withdraw {
            node: "n".into(),
            plan_id: "p1".into()
        }));
        // Tainted but in flight: the taint is the sequence's, never swept.
        assert!(!late.contains(&Command::Untaint { node: "n".into() }));
    }

    #[test]
    fn an_agent_silent_past_its_timeout_is_released_before_any_change_and_stuck_after() {
        let t0: Timestamp = "2026-12-03T12:00:00Z".parse().unwrap();
        let i0 = Instant::now();
        let v = view(vec![
            (
                "draining",
                node(Some(grant(t0)), Some(state(Phase::Draining, t0)), true),
            ),
            (
                "applying",
                node(Some(grant(t0)), Some(state(Phase::AwaitingMigManager, t0)), true),
            ),
        ]);
        let mut m = SweepMemory::default();
        let gone = |c: &Command| matches!(c, Command::Release { .. } | Command::Stuck { .. });
        assert!(!sweep(&v, &mut m, t0, i0, LIMITS).iter().any(gone));
        let later = i0 + Duration::from_secs(121);
        let cmds = sweep(&v, &mut m, t0, later, LIMITS);
        assert!(
            cmds.iter()
                .any(|c| matches!(c, Command::Release { node, .. } if node == "draining"))
        );
        assert!(cmds.contains(&Command::Stuck {
            node: "applying".into(),
            phase: Phase::AwaitingMigManager,
            plan_id: "p1".into()
        }));
        // Stuck is said once; the release is asked again until the node shows it.
        let again = sweep(&v, &mut m, t0, later, LIMITS);
        assert!(!again.iter().any(|c| matches!(c, Command::Stuck { .. })));
        assert!(again.iter().any(|c| matches!(c, Command::Release { .. })));
        assert!(m.agents_gone.contains("applying"));
    }

    #[test]
    fn an_end_is_counted_once_and_never_one_seen_at_start_and_an_idle_taint_goes() {
        let t0: Timestamp = "2026-12-03T12:00:00Z".parse().unwrap();
        let i0 = Instant::now();
        let mut m = SweepMemory::default();
        let done = view(vec![("n", node(None, Some(state(Phase::Done, t0)), true))]);
        let first = sweep(&done, &mut m, t0, i0, LIMITS);
        assert_eq!(first, vec![Command::Untaint { node: "n".into() }]);
        let running = view(vec![(
            "n",
            node(Some(grant(t0)), Some(state(Phase::Verifying, t0)), true),
        )]);
        sweep(&running, &mut m, t0, i0, LIMITS);
        let ended = sweep(&done, &mut m, t0, i0, LIMITS);
        assert_eq!(
            ended
                .iter()
                .filter(|c| matches!(c, Command::Ended { .. }))
                .count(),
            1,
            "{ended:?}"
        );
        let again = sweep(&done, &mut m, t0, i0, LIMITS);
        assert!(!again.iter().any(|c| matches!(c, Command::Ended { .. })));
    }
}
