//! Disruption budgets: which of the nodes a plan changes may start now. Pure: facts in, decisions out.
//!
//! Karpenter-style and cluster-wide. A node may start only if every budget allows it (the most
//! restrictive wins): nodes reconfiguring at once, evictions per sliding window, allowed time
//! windows, and a per-node cooldown. A node already in flight is never granted again.

use jiff::{SignedDuration, Timestamp};

use crate::settings::DisruptionBudgets;
use mig_protocol::Flight;

/// What the budgets need to know about a node.
#[derive(Clone, Debug)]
pub struct NodeFacts {
    /// Node name.
    pub name: String,
    /// Whether a sequence is in flight.
    pub flight: Flight,
    /// When evictions were granted on it recently (from its grant annotation).
    pub recent_evictions: Vec<Timestamp>,
}

/// A node the plan wants to change.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Node name.
    pub node: String,
    /// Pods it evicts.
    pub evictions: u32,
}

/// Why a candidate does not start now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deferral {
    /// It is already reconfiguring (or stuck after a failure).
    InFlight,
    /// No allowed window is open.
    OutsideWindow,
    /// It was reconfigured too recently.
    Cooldown {
        /// When it may start again.
        until: Timestamp,
    },
    /// `maxNodesReconfiguring` is used up.
    NodeBudget,
    /// `maxEvictions` within the window is used up.
    EvictionBudget,
}

impl Deferral {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Deferral::InFlight => "in-flight",
            Deferral::OutsideWindow => "outside-window",
            Deferral::Cooldown { .. } => "cooldown",
            Deferral::NodeBudget => "node-budget",
            Deferral::EvictionBudget => "eviction-budget",
        }
    }

    /// Words for Events and the API.
    pub fn describe(&self, budgets: &DisruptionBudgets) -> String {
        match self {
            Deferral::InFlight => "a reconfiguration of this node is already in flight".into(),
            Deferral::OutsideWindow => format!(
                "changes are allowed only in the configured windows ({})",
                budgets
                    .windows
                    .iter()
                    .map(|w| format!("{} for {}", w.schedule, w.duration))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            Deferral::Cooldown { until } => format!("node cooldown until {until}"),
            Deferral::NodeBudget => format!(
                "disruption budget: at most {} nodes reconfiguring at once",
                budgets.max_nodes_reconfiguring
            ),
            Deferral::EvictionBudget => format!(
                "disruption budget: at most {} evictions per {}",
                budgets.max_evictions, budgets.eviction_window
            ),
        }
    }
}

/// What is left of each budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Headroom {
    /// Nodes that may start reconfiguring now.
    pub nodes: u32,
    /// Evictions that may be granted now.
    pub evictions: u32,
    /// Nodes reconfiguring now (stuck ones are not counted).
    pub in_flight: u32,
    /// Whether an allowed window is open.
    pub window_open: bool,
    /// Nodes stuck (failed and tainted, or their agent gone mid-change): frozen, holding no budget.
    pub stuck: u32,
}

/// Whether a window is open at `now`.
pub fn window_open(budgets: &DisruptionBudgets, now: Timestamp) -> bool {
    if budgets.windows.is_empty() {
        return true;
    }
    let zoned = now.to_zoned(jiff::tz::TimeZone::UTC);
    budgets.windows.iter().any(|w| {
        let Ok(cron) = w.schedule.parse::<croner::Cron>() else {
            return false; // validated at start; an unparsable window never opens
        };
        let Ok(start) = cron.find_previous_occurrence(&zoned, true) else {
            return false;
        };
        let open = SignedDuration::try_from(w.duration.0).unwrap_or(SignedDuration::MAX);
        now.duration_since(start.timestamp()) < open
    })
}

/// The headroom of every budget over `managed` nodes.
pub fn headroom(
    budgets: &DisruptionBudgets,
    now: Timestamp,
    managed: usize,
    nodes: &[NodeFacts],
) -> Headroom {
    // A stuck node (failed, or its agent gone mid-change) stays frozen but holds no budget.
    let in_flight = nodes
        .iter()
        .filter(|n| matches!(n.flight, Flight::InFlight { .. }))
        .count() as u32;
    let window = SignedDuration::try_from(budgets.eviction_window.0).unwrap_or(SignedDuration::MAX);
    let evicted = nodes
        .iter()
        .flat_map(|n| &n.recent_evictions)
        .filter(|t| now.duration_since(**t) < window)
        .count() as u32;
    Headroom {
        nodes: budgets
            .max_nodes_reconfiguring
            .of(managed)
            .saturating_sub(in_flight),
        evictions: budgets.max_evictions.saturating_sub(evicted),
        in_flight,
        window_open: window_open(budgets, now),
        stuck: nodes.iter().filter(|n| matches!(n.flight, Flight::Stuck)).count() as u32,
    }
}

/// Why a node may not start now regardless of the shared budgets (in flight, cooldown, window).
pub fn node_blocked(
    budgets: &DisruptionBudgets,
    now: Timestamp,
    facts: &NodeFacts,
    window_open: bool,
) -> Option<Deferral> {
    match facts.flight {
        Flight::InFlight { .. } | Flight::Stuck => return Some(Deferral::InFlight),
        Flight::Idle { finished_at } => {
            let cooldown = SignedDuration::try_from(budgets.node_cooldown.0).unwrap_or(SignedDuration::MAX);
            if let Some(end) = finished_at
                && let Ok(until) = end.checked_add(cooldown)
                && until > now
            {
                return Some(Deferral::Cooldown { until });
            }
        }
    }
    if !window_open {
        return Some(Deferral::OutsideWindow);
    }
    None
}

/// A candidate and whether it starts now.
pub type Verdict = (Candidate, Result<(), Deferral>);

/// Decide, in order, which candidates start now. Each grant uses up headroom for the next.
pub fn decide(
    budgets: &DisruptionBudgets,
    now: Timestamp,
    managed: usize,
    nodes: &[NodeFacts],
    candidates: &[Candidate],
) -> (Vec<Verdict>, Headroom) {
    let mut room = headroom(budgets, now, managed, nodes);
    let mut out = Vec::new();
    let mut granted = std::collections::BTreeSet::new();
    for c in candidates {
        let verdict = match nodes.iter().find(|n| n.name == c.node) {
            // Unknown, or granted a moment ago in this round: never granted (twice).
            None => Err(Deferral::InFlight),
            Some(_) if granted.contains(&c.node) => Err(Deferral::InFlight),
            Some(facts) => match node_blocked(budgets, now, facts, room.window_open) {
                Some(d) => Err(d),
                None if room.nodes == 0 => Err(Deferral::NodeBudget),
                None if c.evictions > room.evictions => Err(Deferral::EvictionBudget),
                None => Ok(()),
            },
        };
        if verdict.is_ok() {
            granted.insert(c.node.clone());
            room.nodes -= 1;
            room.evictions -= c.evictions;
            room.in_flight += 1;
        }
        out.push((c.clone(), verdict));
    }
    (out, room)
}

/// Grants this replica wrote (or found in flight on a fresh read of the Nodes when it became
/// leader) that its watch cache may not show yet. The budgets count them as in flight, with their
/// evictions, until the cache shows the same grant: a cache that lags the API server by seconds
/// (a slow watch, a restart, a failover) never lets a budget be spent twice.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    written: std::collections::BTreeMap<String, Written>,
}

/// One grant in the [`Ledger`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// The grant's id.
    pub grant_id: String,
    /// When it was written.
    pub at: Timestamp,
    /// When its evictions were granted (the eviction budget's window counts them).
    pub evictions: Vec<Timestamp>,
}

impl Ledger {
    /// Remember a grant written to `node` (replacing an older one there).
    pub fn record(&mut self, node: &str, written: Written) {
        self.written.insert(node.to_string(), written);
    }

    /// How many grants the cache does not show yet.
    pub fn unseen(&self) -> usize {
        self.written.len()
    }

    /// Forget what the cache now shows (`shown(node)`: the grant ids the cache has on that node,
    /// its grant's and the one its agent's state names) and what is older than `keep` (a write
    /// whose outcome was unknown and that never appeared), then count the rest into `facts`:
    /// their nodes in flight, their evictions recent.
    pub fn overlay(
        &mut self,
        facts: &mut Vec<NodeFacts>,
        now: Timestamp,
        keep: SignedDuration,
        shown: impl Fn(&str) -> Vec<String>,
    ) {
        self.written
            .retain(|node, w| now.duration_since(w.at) < keep && !shown(node).contains(&w.grant_id));
        for (node, w) in &self.written {
            let at = match facts.iter_mut().position(|f| &f.name == node) {
                Some(i) => i,
                None => {
                    facts.push(NodeFacts {
                        name: node.clone(),
                        flight: Flight::InFlight { phase: None },
                        recent_evictions: Vec::new(),
                    });
                    facts.len() - 1
                }
            };
            let f = &mut facts[at];
            if matches!(f.flight, Flight::Idle { .. }) {
                f.flight = Flight::InFlight { phase: None };
            }
            for t in &w.evictions {
                if !f.recent_evictions.contains(t) {
                    f.recent_evictions.push(*t);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::settings::{Amount, Dur, Window};

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }
    fn idle(name: &str) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            flight: Flight::Idle { finished_at: None },
            recent_evictions: vec![],
        }
    }
    fn cand(node: &str, evictions: u32) -> Candidate {
        Candidate {
            node: node.into(),
            evictions,
        }
    }

    #[test]
    fn the_most_restrictive_budget_wins() {
        let b = DisruptionBudgets {
            max_nodes_reconfiguring: Amount::Count(2),
            max_evictions: 3,
            ..Default::default()
        };
        let now = t("2026-06-01T12:00:00Z");
        let mut busy = idle("busy");
        busy.flight = Flight::InFlight { phase: None };
        busy.recent_evictions = vec![t("2026-06-01T11:30:00Z")];
        let nodes = vec![busy, idle("a"), idle("b"), idle("c")];
        let (d, room) = decide(
            &b,
            now,
            4,
            &nodes,
            &[cand("busy", 0), cand("a", 3), cand("b", 2), cand("c", 0)],
        );
        let verdicts: Vec<_> = d.iter().map(|(c, v)| (c.node.as_str(), v.clone())).collect();
        assert_eq!(
            verdicts,
            vec![
                ("busy", Err(Deferral::InFlight)),
                ("a", Err(Deferral::EvictionBudget)), // 1 used of 3 in the window
                ("b", Ok(())),
                ("c", Err(Deferral::NodeBudget)),
            ]
        );
        assert_eq!(room.nodes, 0);
        assert_eq!(room.evictions, 0);
    }

    #[test]
    fn evictions_leave_the_window_and_cooldowns_end() {
        let b = DisruptionBudgets {
            max_evictions: 1,
            eviction_window: Dur::secs(3600),
            node_cooldown: Dur::secs(600),
            ..Default::default()
        };
        let mut n = idle("a");
        n.recent_evictions = vec![t("2026-06-01T11:00:00Z")];
        n.flight = Flight::Idle {
            finished_at: Some(t("2026-06-01T11:55:00Z")),
        };
        let early = decide(
            &b,
            t("2026-06-01T11:59:00Z"),
            1,
            std::slice::from_ref(&n),
            &[cand("a", 1)],
        )
        .0;
        assert!(matches!(early[0].1, Err(Deferral::Cooldown { .. })));
        let later = decide(
            &b,
            t("2026-06-01T12:05:00Z"),
            1,
            std::slice::from_ref(&n),
            &[cand("a", 1)],
        )
        .0;
        assert_eq!(later[0].1, Ok(()));
    }

    #[test]
    fn windows_open_and_close_on_schedule() {
        let b = DisruptionBudgets {
            windows: vec![Window {
                schedule: "0 22 * * *".into(),
                duration: Dur::secs(2 * 3600),
            }],
            ..Default::default()
        };
        assert!(window_open(&b, t("2026-06-01T22:00:00Z")));
        assert!(window_open(&b, t("2026-06-01T23:59:00Z")));
        assert!(!window_open(&b, t("2026-06-02T00:00:00Z")));
        assert!(!window_open(&b, t("2026-06-01T21:59:59Z")));
        let d = decide(&b, t("2026-06-01T12:00:00Z"), 1, &[idle("a")], &[cand("a", 0)]).0;
        assert_eq!(d[0].1, Err(Deferral::OutsideWindow));
        assert!(Deferral::OutsideWindow.describe(&b).contains("0 22 * * * for 2h"));
    }

    proptest! {
        /// Whatever the state and the candidates, grants never push a budget past its limit.
        #[test]
        fn grants_never_exceed_a_budget(
            max_nodes in 0u32..5, percent in proptest::bool::ANY, max_ev in 0u32..6,
            flights in proptest::collection::vec((0u8..3, 0usize..3), 1..12),
            cands in proptest::collection::vec((0usize..12, 0u32..4), 0..12),
        ) {
            let b = DisruptionBudgets {
                max_nodes_reconfiguring: if percent { Amount::Percent(max_nodes * 20) } else { Amount::Count(max_nodes) },
                max_evictions: max_ev,
                node_cooldown: Dur::secs(0),
                ..Default::default()
            };
            let now = t("2026-06-01T12:00:00Z");
            let nodes: Vec<NodeFacts> = flights.iter().enumerate().map(|(i, (f, ev))| NodeFacts {
                name: format!("n{i}"),
                flight: match f { 0 => Flight::Idle { finished_at: None }, 1 => Flight::InFlight { phase: None }, _ => Flight::Stuck },
                recent_evictions: vec![t("2026-06-01T11:30:00Z"); *ev],
            }).collect();
            let cands: Vec<Candidate> = cands.iter().map(|(n, e)| cand(&format!("n{}", n % nodes.len()), *e)).collect();
            let (d, _) = decide(&b, now, nodes.len(), &nodes, &cands);
            let granted: Vec<&Candidate> = d.iter().filter(|(_, v)| v.is_ok()).map(|(c, _)| c).collect();
            // Stuck nodes hold no budget (and are never granted: the names check below and
            // node_blocked see to that).
            let in_flight = nodes.iter().filter(|n| matches!(n.flight, Flight::InFlight { .. })).count() as u32;
            let idle = |c: &&Candidate| nodes.iter().any(|n| n.name == c.node && matches!(n.flight, Flight::Idle { .. }));
            prop_assert!(granted.iter().all(idle), "a node in flight or stuck was granted");
            let limit = b.max_nodes_reconfiguring.of(nodes.len());
            let mut names: Vec<&str> = granted.iter().map(|c| c.node.as_str()).collect();
            names.sort();
            names.dedup();
            prop_assert_eq!(names.len(), granted.len(), "a node granted twice");
            prop_assert!(granted.len() as u32 + in_flight <= limit.max(in_flight));
            let used: u32 = nodes.iter().map(|n| n.recent_evictions.len() as u32).sum();
            let ev: u32 = granted.iter().map(|c| c.evictions).sum();
            prop_assert!(ev + used <= max_ev.max(used));
            for c in &granted {
                let f = nodes.iter().find(|n| n.name == c.node).unwrap();
                let idle = matches!(f.flight, Flight::Idle { .. });
                prop_assert!(idle, "granted a node in flight");
            }
        }
    }

    #[test]
    fn the_ledger_counts_own_grants_until_the_cache_shows_them() {
        let now = t("2026-06-01T12:00:00Z");
        let budgets = DisruptionBudgets {
            max_nodes_reconfiguring: Amount::Count(1),
            max_evictions: 1,
            ..Default::default()
        };
        let keep = SignedDuration::from_mins(10);
        let mut ledger = Ledger::default();
        ledger.record(
            "a",
            Written {
                grant_id: "g1".into(),
                at: now,
                evictions: vec![now],
            },
        );
        // The cache still shows node a idle and knows no grant: without the ledger b would start.
        let cache = vec![idle("a"), idle("b")];
        let (v, _) = decide(&budgets, now, 2, &cache, &[cand("b", 0)]);
        assert_eq!(v[0].1, Ok(()), "without the ledger");
        let mut facts = cache.clone();
        ledger.overlay(&mut facts, now, keep, |_| vec![]);
        let (v, room) = decide(&budgets, now, 2, &facts, &[cand("b", 0)]);
        assert_eq!(v[0].1, Err(Deferral::NodeBudget));
        assert_eq!(room.in_flight, 1);
        assert_eq!(
            headroom(&budgets, now, 2, &facts).evictions,
            0,
            "its eviction counts too"
        );
        // A node the cache does not know yet counts as well.
        let mut facts = vec![idle("b")];
        ledger.overlay(&mut facts, now, keep, |_| vec![]);
        assert_eq!(headroom(&budgets, now, 2, &facts).in_flight, 1);
        // Once the cache shows grant g1 on a, the cache alone decides.
        let mut facts = cache.clone();
        ledger.overlay(&mut facts, now, keep, |n| {
            if n == "a" { vec!["g1".to_string()] } else { vec![] }
        });
        assert_eq!(ledger.unseen(), 0);
        assert!(matches!(facts[0].flight, Flight::Idle { .. }));
        // A write that never appears is forgotten after `keep`.
        ledger.record(
            "a",
            Written {
                grant_id: "g2".into(),
                at: now,
                evictions: vec![],
            },
        );
        let mut facts = cache.clone();
        let later = now.checked_add(keep).unwrap();
        ledger.overlay(&mut facts, later, keep, |_| vec![]);
        assert_eq!(ledger.unseen(), 0);
    }
}
