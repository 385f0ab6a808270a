//! Controller settings: one YAML/JSON document (file), overridable by flags and environment in the
//! binary. Every field has a default; [`Settings::validate`] reports every problem with its path.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What the controller may do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Plan, publish the plan API, metrics and Events; never write to nodes or the mig-parted ConfigMap.
    #[default]
    DryRun,
    /// Also grant reconfigurations to node agents, within the disruption budgets.
    Auto,
}

impl FromStr for Mode {
    type Err = BadValue;
    fn from_str(s: &str) -> Result<Self, BadValue> {
        match s {
            "dry-run" => Ok(Mode::DryRun),
            "auto" => Ok(Mode::Auto),
            other => Err(BadValue(format!("unknown mode {other:?}: use dry-run or auto"))),
        }
    }
}

impl Mode {
    /// `dry-run` or `auto`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::DryRun => "dry-run",
            Mode::Auto => "auto",
        }
    }
}

/// A duration written as `10s`, `2m 30s`, `1h` or ISO 8601 (`PT10S`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    /// From milliseconds.
    pub const fn millis(ms: u64) -> Dur {
        Dur(Duration::from_millis(ms))
    }
    /// From seconds.
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
}

impl FromStr for Dur {
    type Err = BadValue;
    fn from_str(s: &str) -> Result<Self, BadValue> {
        let d: jiff::SignedDuration = s
            .parse()
            .map_err(|e| BadValue(format!("{s:?} is not a duration (write 10s, 2m, 1h30m): {e}")))?;
        Duration::try_from(d)
            .map(Dur)
            .map_err(|_| BadValue(format!("{s:?}: a duration must not be negative")))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = jiff::SignedDuration::try_from(self.0).unwrap_or(jiff::SignedDuration::MAX);
        write!(f, "{d:#}")
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A count (`2`) or a percentage of managed nodes (`10%`, rounded up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    /// An absolute count.
    Count(u32),
    /// A percentage, 0–100.
    Percent(u32),
}

impl Amount {
    /// The count for `total` items: percentages round up (10% of 5 nodes is 1), as Karpenter does.
    pub fn of(self, total: usize) -> u32 {
        match self {
            Amount::Count(n) => n,
            Amount::Percent(p) => ((total as u64 * u64::from(p)).div_ceil(100)) as u32,
        }
    }
}

impl FromStr for Amount {
    type Err = BadValue;
    fn from_str(s: &str) -> Result<Self, BadValue> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: u32 = p
                .trim()
                .parse()
                .map_err(|_| BadValue(format!("{s:?}: write a count (2) or a percentage (10%)")))?;
            if p > 100 {
                return Err(BadValue(format!("{s:?}: a percentage must be at most 100%")));
            }
            Ok(Amount::Percent(p))
        } else {
            s.parse()
                .map(Amount::Count)
                .map_err(|_| BadValue(format!("{s:?}: write a count (2) or a percentage (10%)")))
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u32),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Amount::Count(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// When to plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Batching {
    /// Plan this long after the last new pending pod...
    pub quiet: Dur,
    /// ...but at most this long after the first pod of the batch.
    pub max_wait: Dur,
    /// Plan at least this often while anything is pending or in flight (grants continue as budgets free up).
    pub resync: Dur,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            quiet: Dur::secs(10),
            max_wait: Dur::secs(60),
            resync: Dur::secs(30),
        }
    }
}

/// A time window in which reconfigurations may start: from each cron match, for `duration`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Window {
    /// Cron expression (5 or 6 fields), in UTC: `0 22 * * *`.
    pub schedule: String,
    /// How long the window stays open after each match.
    pub duration: Dur,
}

/// Cluster-wide disruption budgets. Every one must allow a grant; the most restrictive wins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DisruptionBudgets {
    /// Most nodes reconfiguring at once: a count or a percentage of managed nodes (rounded up).
    pub max_nodes_reconfiguring: Amount,
    /// Most pod evictions granted within `evictionWindow`.
    pub max_evictions: u32,
    /// The sliding window of `maxEvictions`.
    pub eviction_window: Dur,
    /// Windows in which reconfigurations may start (empty: any time).
    pub windows: Vec<Window>,
    /// A node is not reconfigured again sooner than this after its last reconfiguration ended.
    pub node_cooldown: Dur,
    /// A grant the agent has not started after this long is withdrawn.
    pub grant_timeout: Dur,
    /// A sequence whose state the agent has not rewritten for this long (it heartbeats every
    /// 15 s by default) has lost its agent: before any GPU changed the grant is withdrawn and the
    /// taint removed; after, the node is left tainted and frozen, and stops holding the budget.
    pub agent_timeout: Dur,
}

impl Default for DisruptionBudgets {
    fn default() -> Self {
        DisruptionBudgets {
            max_nodes_reconfiguring: Amount::Count(1),
            max_evictions: 10,
            eviction_window: Dur::secs(3600),
            windows: Vec::new(),
            node_cooldown: Dur::secs(300),
            grant_timeout: Dur::secs(600),
            agent_timeout: Dur::secs(120),
        }
    }
}

/// Leader election.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// Lease namespace (the controller's own; `POD_NAMESPACE` in the chart).
    pub namespace: String,
    /// How long a lease holds without renewal.
    pub duration: Dur,
    /// How often the holder renews and followers try.
    pub retry: Dur,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            name: "mig-autoscaler".into(),
            namespace: "mig-autoscaler".into(),
            duration: Dur::secs(15),
            retry: Dur::secs(2),
        }
    }
}

/// The HTTP server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct HttpSettings {
    /// Listen address of the API, metrics and probes.
    pub listen: String,
    /// Per-request timeout.
    pub request_timeout: Dur,
    /// Largest accepted request body (a posted snapshot), bytes.
    pub max_body_bytes: usize,
    /// Most GPUs in a posted snapshot.
    pub max_snapshot_gpus: usize,
    /// Most pods (pending and running) in a posted snapshot.
    pub max_snapshot_pods: usize,
    /// What-if plans (`POST /api/v1/plan`) running at once; more are answered 429.
    pub max_concurrent_plans: usize,
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections at most from one client address.
    pub max_connections_per_client: usize,
    /// A request's headers must arrive within this.
    pub header_read_timeout: Dur,
    /// Who may call the API (probes are always open).
    pub auth: HttpAuth,
    /// Not a setting: the program what-if plans run in (`PROGRAM plan --snapshot - --json`, a
    /// child process killed when its request ends, by timeout or disconnect), which the CLI sets
    /// to itself. `None` (library use): they run in this process, to the end of the planner's
    /// time limit even when nobody waits for them.
    #[serde(skip)]
    pub what_if_program: Option<std::path::PathBuf>,
}

/// How the HTTP API authenticates and authorises callers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HttpAuth {
    /// `kubernetes`, unless `listen` is a loopback address (reachable only from inside the pod),
    /// then `none`.
    #[default]
    Auto,
    /// A bearer token checked with a TokenReview, and the call with a SubjectAccessReview for the
    /// non-resource URL (verb `get`, or `create` for `POST /api/v1/plan`), as kube-rbac-proxy does.
    Kubernetes,
    /// No checks; allowed only on a loopback `listen` address.
    None,
}

impl HttpSettings {
    /// Whether `listen` is a loopback address (`127.0.0.1:8080`, `[::1]:8080`, `localhost:8080`).
    pub fn loopback(&self) -> bool {
        let host = self
            .listen
            .rsplit_once(':')
            .map_or(self.listen.as_str(), |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// Whether callers are checked.
    pub fn authenticates(&self) -> bool {
        match self.auth {
            HttpAuth::Auto => !self.loopback(),
            HttpAuth::Kubernetes => true,
            HttpAuth::None => false,
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: "0.0.0.0:8080".into(),
            request_timeout: Dur::secs(30),
            max_body_bytes: 16 << 20,
            max_snapshot_gpus: 40_000,
            max_snapshot_pods: 50_000,
            max_concurrent_plans: 1,
            max_connections: 1024,
            max_connections_per_client: 64,
            header_read_timeout: Dur::secs(10),
            auth: HttpAuth::Auto,
            what_if_program: None,
        }
    }
}

/// All controller settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Settings {
    /// `dry-run` (default) or `auto`.
    pub mode: Mode,
    /// When to plan.
    pub batching: Batching,
    /// Cluster-wide disruption budgets.
    pub budgets: DisruptionBudgets,
    /// Planner policy (backend, drain policy, per-plan budgets, solver).
    pub planner: mig_planner::Policy,
    /// Leader election.
    pub lease: LeaseSettings,
    /// The mig-parted ConfigMap mig-manager reads (`namespace/name`, key `config.yaml`); the
    /// controller adds and removes only `mig-autoscaler-*` entries.
    pub mig_parted_config_map: String,
    /// The same Event (object, reason, note) is not sent again within this time.
    pub event_dedupe: Dur,
    /// How often the control loop wakes up.
    pub tick: Dur,
    /// MIG requests of pods created within this window (pending or running) are the planner's
    /// `recentDemand`: spare capacity on GPUs that change anyway is shaped like it. `0s` turns it
    /// off.
    pub demand_window: Dur,
    /// A node's agent report the controller has not seen change for this long is stale: the agent
    /// stopped (agents rewrite it at least every `--report-refresh-seconds`, 5 minutes by
    /// default). Its GPUs are then neither counted nor changed, with a `NoAgentReport` Warning.
    pub report_timeout: Dur,
    /// HTTP server.
    pub http: HttpSettings,
    /// Not a setting: the API server's URL, which the CLI takes from the kubeconfig, for log lines
    /// about connection errors (`None`: library use, not named).
    #[serde(skip)]
    pub api_server: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::DryRun,
            batching: Batching::default(),
            budgets: DisruptionBudgets::default(),
            planner: mig_planner::Policy::default(),
            lease: LeaseSettings::default(),
            mig_parted_config_map: "gpu-operator/default-mig-parted-config".into(),
            event_dedupe: Dur::secs(120),
            tick: Dur::millis(500),
            demand_window: Dur::secs(3600),
            report_timeout: Dur::secs(900),
            http: HttpSettings::default(),
            api_server: None,
        }
    }
}

/// A setting's value that does not parse (the input is rejected; the message says what to write).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadValue(pub String);

/// Settings that cannot work, every problem with its path.
#[derive(Debug, thiserror::Error)]
#[error("invalid settings:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct InvalidSettings {
    /// `path: problem` lines.
    pub problems: Vec<String>,
}

impl Settings {
    /// Read settings from YAML or JSON text; unknown keys are errors with their path.
    pub fn from_yaml(text: &str) -> Result<Settings, InvalidSettings> {
        let de = serde_yaml::Deserializer::from_str(text);
        let s: Settings =
            serde_path_to_error_free(de).map_err(|p| InvalidSettings { problems: vec![p.0] })?;
        s.validate()?;
        Ok(s)
    }

    /// Check what serde cannot: relations between fields, cron syntax, addresses.
    pub fn validate(&self) -> Result<(), InvalidSettings> {
        let mut problems = Vec::new();
        let b = &self.batching;
        if b.quiet > b.max_wait {
            problems.push(format!(
                "batching.quiet ({}) must not exceed batching.maxWait ({})",
                b.quiet, b.max_wait
            ));
        }
        if b.resync.0.is_zero() {
            problems.push("batching.resync must be positive".into());
        }
        for (i, w) in self.budgets.windows.iter().enumerate() {
            if let Err(e) = w.schedule.parse::<croner::Cron>() {
                problems.push(format!("budgets.windows[{i}].schedule {:?}: {e}", w.schedule));
            }
            if w.duration.0.is_zero() {
                problems.push(format!("budgets.windows[{i}].duration must be positive"));
            }
        }
        if self.report_timeout.0 < Duration::from_secs(60) {
            problems.push(format!(
                "reportTimeout ({}) must be at least 1m, and well above the agents' --report-refresh-seconds (5m by default)",
                self.report_timeout
            ));
        }
        if self.budgets.eviction_window.0.is_zero() {
            problems.push("budgets.evictionWindow must be positive".into());
        }
        if self.mode == Mode::Auto && self.budgets.max_nodes_reconfiguring.of(1000) == 0 {
            problems.push(
                "budgets.maxNodesReconfiguring is 0: mode auto could never act (use mode dry-run)".into(),
            );
        }
        if self.http.auth == HttpAuth::None && !self.http.loopback() {
            problems.push(format!(
                "http.auth none is allowed only on a loopback address, not {}",
                self.http.listen
            ));
        }
        let l = &self.lease;
        if l.retry >= l.duration {
            problems.push(format!(
                "lease.retry ({}) must be shorter than lease.duration ({})",
                l.retry, l.duration
            ));
        }
        if l.name.is_empty() || l.namespace.is_empty() {
            problems.push("lease.name and lease.namespace must be set".into());
        }
        match self.mig_parted_config_map.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {}
            _ => problems.push(format!(
                "migPartedConfigMap {:?} must be namespace/name",
                self.mig_parted_config_map
            )),
        }
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!("http.listen {:?} is not host:port", self.http.listen));
        }
        if self.tick.0.is_zero() {
            problems.push("tick must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.planner.solver.mip_gap) {
            problems.push("planner.solver.mipGap must be within [0, 1]".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(InvalidSettings { problems })
        }
    }

    /// `(namespace, name)` of the mig-parted ConfigMap.
    pub fn config_map(&self) -> (&str, &str) {
        self.mig_parted_config_map
            .split_once('/')
            .unwrap_or(("gpu-operator", self.mig_parted_config_map.as_str()))
    }
}

/// Deserialize with the error's location in the document.
fn serde_path_to_error_free<'de, D: Deserializer<'de>>(de: D) -> Result<Settings, BadValue> {
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(de, &mut track);
    Settings::deserialize(de).map_err(|e| {
        let path = track.path().to_string();
        BadValue(if path == "." || path.is_empty() {
            e.to_string()
        } else {
            format!("{path}: {e}")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_round_trip() {
        let s = Settings::default();
        s.validate().unwrap();
        let yaml = serde_yaml::to_string(&s).unwrap();
        assert_eq!(Settings::from_yaml(&yaml).unwrap(), s);
    }

    #[test]
    fn amounts_round_up_percentages() {
        assert_eq!("10%".parse::<Amount>().unwrap().of(5), 1);
        assert_eq!("10%".parse::<Amount>().unwrap().of(0), 0);
        assert_eq!("25%".parse::<Amount>().unwrap().of(10), 3);
        assert_eq!("3".parse::<Amount>().unwrap().of(100), 3);
        assert!("120%".parse::<Amount>().is_err());
        assert!("-1".parse::<Amount>().is_err());
    }

    #[test]
    fn errors_name_the_path_and_every_problem() {
        let e = Settings::from_yaml("budgets:\n  maxEvictions: lots\n").unwrap_err();
        assert!(e.to_string().contains("budgets.maxEvictions"), "{e}");
        let e = Settings::from_yaml("batching:\n  quiet: 10 parsecs\n").unwrap_err();
        assert!(e.to_string().contains("batching.quiet"), "{e}");
        let e = Settings::from_yaml("mode: auto\nbudgets:\n  maxNodesReconfiguring: 0%\n  windows: [{schedule: 'not cron', duration: 1h}]\nlease: {retry: 20s}\n").unwrap_err();
        assert_eq!(e.problems.len(), 3, "{e}");
        assert!(e.to_string().contains("budgets.windows[0].schedule"), "{e}");
        let e = Settings::from_yaml("nope: 1\n").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
