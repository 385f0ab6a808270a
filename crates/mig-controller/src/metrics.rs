//! Prometheus metrics, `mig_autoscaler_*`. Label values come from fixed enums (never pod names, plan
//! ids or error strings); `node` and `gpu` are bounded by the cluster. Known label values start at 0.

use std::sync::atomic::AtomicU64;

use mig_protocol::Reason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `{profile}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProfileLabel {
    /// MIG profile (`3g.40gb`).
    pub profile: String,
}

/// `{node, gpu, profile, layout}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    /// Node.
    pub node: String,
    /// GPU index.
    pub gpu: String,
    /// MIG profile.
    pub profile: String,
    /// Which layout: `actual` or `target`.
    pub side: &'static str,
}

/// `{solver, status}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SolverLabels {
    /// `highs` or `greedy`.
    pub solver: String,
    /// `optimal`, `time-limit`, `gap-limit`, `greedy`, `trivial`.
    pub status: String,
}

/// A single `{label}` of a fixed set.
macro_rules! one_label {
    ($name:ident, $field:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        pub struct $name {
            #[doc = $doc]
            pub $field: &'static str,
        }
    };
}
one_label!(
    DecisionLabel,
    decision,
    "`granted`, `dry-run`, `invalidated`, or deferred: `in-flight`, `outside-window`, `cooldown`, `node-budget`, `eviction-budget`."
);
one_label!(ResultLabel, result, "Outcome of a write or a reconfiguration.");
one_label!(BudgetLabel, budget, "`nodes` or `evictions`.");
one_label!(ReportLabel, report, "`missing` or `stale`.");
one_label!(ReasonLabel, reason, "Input problem reason.");
one_label!(OutcomeLabel, outcome, "`fits` or `waits`.");
one_label!(EventLabel, event, "`made` or `released`.");
one_label!(
    LimitLabel,
    limit,
    "Which limit: `total`, `per-client` (connections), `concurrency`, `size` (what-if plans)."
);

/// Decisions per node of a plan.
pub const DECISIONS: [&str; 8] = [
    "granted",
    "dry-run",
    "invalidated",
    "in-flight",
    "outside-window",
    "cooldown",
    "node-budget",
    "eviction-budget",
];
/// Results of grant writes.
pub const GRANT_RESULTS: [&str; 3] = ["written", "conflict", "error"];
/// Results of reconfigurations (the agent's terminal phases).
pub const RECONFIGURATION_RESULTS: [&str; 4] = ["Done", "RolledBack", "Failed", "Superseded"];
/// Results of the evictions the controller posts.
pub const EVICTION_RESULTS: [&str; 4] = ["evicted", "blocked", "gone", "error"];
/// Input problem reasons.
pub const INPUT_PROBLEMS: [Reason; 6] = [
    Reason::InvalidMigRequest,
    Reason::MalformedAnnotation,
    Reason::UnknownGpuModel,
    Reason::GpuStateUnknown,
    Reason::AgentBackendMismatch,
    Reason::NoAgentReport,
];
/// Limits the HTTP API refuses requests or connections for.
pub const HTTP_LIMITS: [&str; 4] = ["total", "per-client", "concurrency", "size"];

/// Every metric the controller exports.
pub struct Metrics {
    /// The registry they are in.
    pub registry: Registry,
    /// 1 on the replica holding the lease.
    pub leader: Gauge,
    /// 1 once every cache has listed.
    pub caches_synced: Gauge,
    /// Pending pods per requested profile.
    pub pending_pods: Family<ProfileLabel, Gauge>,
    /// Instances per node, GPU, profile, actual or target.
    pub gpu_instances: Family<InstanceLabels, Gauge>,
    /// Planning time.
    pub plan_duration: Histogram,
    /// Plans by solver outcome.
    pub plans: Family<SolverLabels, Counter>,
    /// Pending pods of the last plan by outcome.
    pub plan_pods: Family<OutcomeLabel, Gauge>,
    /// Evictions in the last plan.
    pub plan_evictions: Gauge,
    /// GPUs reserved for large pending pods in the last plan.
    pub reserved_gpus: Gauge,
    /// Reservations made and released by plans.
    pub reservations: Family<EventLabel, Counter>,
    /// Node decisions.
    pub decisions: Family<DecisionLabel, Counter>,
    /// Grant writes by result.
    pub grants: Family<ResultLabel, Counter>,
    /// What is left of each budget.
    pub budget_headroom: Family<BudgetLabel, Gauge>,
    /// Nodes reconfiguring (or stuck) now.
    pub nodes_reconfiguring: Gauge,
    /// Nodes stuck for a person: failed and tainted, or their agent gone mid-change.
    pub nodes_stuck: Gauge,
    /// Nodes with MIG GPUs whose agent report is missing or stale (not counted, not changed).
    pub nodes_unreported: Family<ReportLabel, Gauge>,
    /// Ended reconfigurations by result.
    pub reconfigurations: Family<ResultLabel, Counter>,
    /// Evictions granted.
    pub evictions_granted: Counter,
    /// Evictions posted for draining nodes, by result.
    pub evictions: Family<ResultLabel, Counter>,
    /// Input problems by reason.
    pub input_problems: Family<ReasonLabel, Counter>,
    /// Unix time of the last plan.
    pub last_plan_timestamp: Gauge<f64, AtomicU64>,
    /// From a pending pod's creation to its binding.
    pub time_to_slice: Histogram,
    /// Connections closed and requests refused for a limit.
    pub connections_refused: Family<LimitLabel, Counter>,
}

impl Metrics {
    /// Register every metric and initialise known label values.
    pub fn new(profiles: impl IntoIterator<Item = String>) -> Metrics {
        let mut registry = Registry::with_prefix("mig_autoscaler");
        let m = Metrics {
            leader: Gauge::default(),
            caches_synced: Gauge::default(),
            pending_pods: Family::default(),
            gpu_instances: Family::default(),
            plan_duration: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            plans: Family::default(),
            plan_pods: Family::default(),
            plan_evictions: Gauge::default(),
            reserved_gpus: Gauge::default(),
            reservations: Family::default(),
            decisions: Family::default(),
            grants: Family::default(),
            budget_headroom: Family::default(),
            nodes_reconfiguring: Gauge::default(),
            nodes_stuck: Gauge::default(),
            nodes_unreported: Family::default(),
            reconfigurations: Family::default(),
            evictions_granted: Counter::default(),
            evictions: Family::default(),
            input_problems: Family::default(),
            last_plan_timestamp: Gauge::default(),
            time_to_slice: Histogram::new([1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]),
            connections_refused: Family::default(),
            registry: Registry::default(),
        };
        register(&m, &mut registry);
        initialise_labels(&m, profiles);
        Metrics { registry, ..m }
    }

    /// Evictions posted with `result` (`evicted`, `blocked`, `gone`, `error`), for tests.
    pub fn eviction_count(&self, result: &'static str) -> u64 {
        self.evictions.get_or_create(&ResultLabel { result }).get()
    }

    /// Reservations `made` or `released` by plans so far.
    pub fn reservation_count(&self, event: &'static str) -> u64 {
        self.reservations.get_or_create(&EventLabel { event }).get()
    }

    /// The exposition in the Prometheus text format 0.0.4 (for clients that do not ask for
    /// OpenMetrics: curl, promtool): counters' HELP/TYPE lines carry the `_total` name, no `# EOF`.
    pub fn encode_text(&self) -> String {
        to_prometheus_text(&self.encode())
    }

    /// The text exposition (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// OpenMetrics text → Prometheus text format 0.0.4.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Register every metric with its help text.
fn register(m: &Metrics, registry: &mut Registry) {
    let info: Family<Vec<(String, String)>, Gauge> = Family::default();
    let build = mig_protocol::build::get();
    info.get_or_create(&vec![
        ("version".into(), build.version.into()),
        ("commit".into(), build.commit.into()),
        ("date".into(), build.date.into()),
    ])
    .set(1);
    registry.register("build_info", "Build information (value 1)", info);
    registry.register(
        "leader",
        "1 while this replica holds the leader lease",
        m.leader.clone(),
    );
    registry.register(
        "caches_synced",
        "1 once the node, pod, PDB and ConfigMap caches have listed",
        m.caches_synced.clone(),
    );
    registry.register(
        "pending_pods",
        "Pending pods requesting each MIG profile",
        m.pending_pods.clone(),
    );
    registry.register(
        "gpu_instances",
        "MIG instances per node, GPU and profile, actual or target",
        m.gpu_instances.clone(),
    );
    registry.register(
        "plan_duration_seconds",
        "Time to build the snapshot and plan",
        m.plan_duration.clone(),
    );
    registry.register("plans", "Plans by solver used and status", m.plans.clone());
    registry.register(
        "plan_pods",
        "Pending pods of the last plan that fit or wait",
        m.plan_pods.clone(),
    );
    registry.register(
        "plan_evictions",
        "Evictions in the last plan",
        m.plan_evictions.clone(),
    );
    registry.register(
        "reserved_gpus",
        "GPUs reserved for large pending pods in the last plan (reservations by attrition)",
        m.reserved_gpus.clone(),
    );
    registry.register(
        "reservations",
        "Reservations by attrition made and released by plans",
        m.reservations.clone(),
    );
    registry.register(
        "decisions",
        "Per changed node of a plan: granted, dry-run, invalidated or deferred (and why)",
        m.decisions.clone(),
    );
    registry.register("grants", "Grant writes to nodes by result", m.grants.clone());
    registry.register(
        "budget_headroom",
        "What is left of each disruption budget",
        m.budget_headroom.clone(),
    );
    registry.register(
        "nodes_reconfiguring",
        "Nodes reconfiguring now (they hold the node budget)",
        m.nodes_reconfiguring.clone(),
    );
    registry.register(
        "nodes_stuck",
        "Nodes left tainted and frozen for a person (a failed reconfiguration, or an agent gone mid-change); they hold no budget",
        m.nodes_stuck.clone(),
    );
    registry.register(
        "nodes_unreported",
        "Nodes with MIG GPUs whose agent report is missing or stale (reportTimeout): the planner neither counts nor changes their GPUs",
        m.nodes_unreported.clone(),
    );
    registry.register(
        "reconfigurations",
        "Ended node reconfigurations by result",
        m.reconfigurations.clone(),
    );
    registry.register(
        "evictions_granted",
        "Pod evictions granted (the controller posts them once the node's agent has tainted it)",
        m.evictions_granted.clone(),
    );
    registry.register(
        "evictions",
        "Evictions the controller posted for draining nodes, by result: evicted, blocked (by a PodDisruptionBudget), gone, error",
        m.evictions.clone(),
    );
    registry.register(
        "input_problems",
        "Input the controller could not use, by reason",
        m.input_problems.clone(),
    );
    registry.register(
        "last_plan_timestamp_seconds",
        "Unix time of the last plan",
        m.last_plan_timestamp.clone(),
    );
    registry.register(
        "pod_time_to_slice_seconds",
        "From a pending MIG pod's creation to its binding to a node (pods the controller saw waiting)",
        m.time_to_slice.clone(),
    );
    registry.register(
        "http_refused",
        "HTTP connections closed at once and requests refused, by limit",
        m.connections_refused.clone(),
    );
}

/// Create the known label values, so that every series exists (at 0) from the start.
fn initialise_labels(m: &Metrics, profiles: impl IntoIterator<Item = String>) {
    for limit in HTTP_LIMITS {
        let _ = m.connections_refused.get_or_create(&LimitLabel { limit });
    }
    for profile in profiles {
        let _ = m.pending_pods.get_or_create(&ProfileLabel { profile });
    }
    for decision in DECISIONS {
        let _ = m.decisions.get_or_create(&DecisionLabel { decision });
    }
    for result in GRANT_RESULTS {
        let _ = m.grants.get_or_create(&ResultLabel { result });
    }
    for result in RECONFIGURATION_RESULTS {
        let _ = m.reconfigurations.get_or_create(&ResultLabel { result });
    }
    for result in EVICTION_RESULTS {
        let _ = m.evictions.get_or_create(&ResultLabel { result });
    }
    for report in ["missing", "stale"] {
        let _ = m.nodes_unreported.get_or_create(&ReportLabel { report });
    }
    for event in ["made", "released"] {
        let _ = m.reservations.get_or_create(&EventLabel { event });
    }
    for budget in ["nodes", "evictions"] {
        let _ = m.budget_headroom.get_or_create(&BudgetLabel { budget });
    }
    for reason in INPUT_PROBLEMS {
        let _ = m.input_problems.get_or_create(&ReasonLabel {
            reason: reason.as_str(),
        });
    }
    for outcome in ["fits", "waits"] {
        let _ = m.plan_pods.get_or_create(&OutcomeLabel { outcome });
    }
    for (solver, status) in [
        ("highs", "optimal"),
        ("highs", "time-limit"),
        ("highs", "gap-limit"),
        ("greedy", "greedy"),
        ("greedy", "trivial"),
    ] {
        let _ = m.plans.get_or_create(&SolverLabels {
            solver: solver.into(),
            status: status.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_labels_start_at_zero_and_counters_end_in_total() {
        let m = Metrics::new(["3g.40gb".to_string()]);
        let text = m.encode();
        assert!(
            text.contains("mig_autoscaler_pending_pods{profile=\"3g.40gb\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("mig_autoscaler_decisions_total{decision=\"eviction-budget\"} 0"),
            "{text}"
        );
        assert!(text.contains("mig_autoscaler_build_info{version="), "{text}");
        assert!(text.ends_with("# EOF\n"));
        let plain = m.encode_text();
        assert!(
            plain.contains("# TYPE mig_autoscaler_decisions_total counter"),
            "{plain}"
        );
        assert!(
            plain.contains("# HELP mig_autoscaler_decisions_total "),
            "{plain}"
        );
        assert!(!plain.contains("# EOF"));
        assert!(plain.contains("# TYPE mig_autoscaler_plan_duration_seconds histogram"));
        assert!(plain.contains("# TYPE mig_autoscaler_pod_time_to_slice_seconds histogram"));
    }
}
