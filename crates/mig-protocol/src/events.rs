//! Every Event reason mig-autoscaler emits, each with one emitter and one type. docs/controller.md
//! ("Events") lists them in one table, which a test keeps equal to [`Reason::ALL`].

/// Who emits a reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emitter {
    /// The controller (leader, or any replica for plan explanations and input problems).
    Controller,
    /// A node agent, about its own node.
    Agent,
}

/// An Event reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Pod: no layout can serve it now (the note says why).
    WaitingForMigCapacity,
    /// Pod: it fits after a repartition (granted, deferred, or dry-run).
    WaitingForRepartition,
    /// Node: the plan changes its GPUs.
    LayoutChangePlanned,
    /// Node: a grant was written.
    ReconfigurationGranted,
    /// Node: a budget, window, cooldown or flight stopped a change.
    ReconfigurationDeferred,
    /// Pod: a MIG request that is not a non-negative whole number.
    InvalidMigRequest,
    /// Node: one of our annotations does not parse; the node is left alone. Pod: its
    /// `mig-autoscaler.io/expected-end` does not parse; ignored.
    MalformedAnnotation,
    /// Node: a reported GPU the catalog does not know.
    UnknownGpuModel,
    /// Node: the agent cannot read a GPU's instances; that GPU is left alone.
    GpuStateUnknown,
    /// Node: its agent runs another backend than the planner's.
    AgentBackendMismatch,
    /// Node: it has MIG GPUs but no agent report, or one its agent stopped refreshing; its GPUs
    /// are not counted and not changed.
    NoAgentReport,
    /// Node: the agent never started a grant; withdrawn.
    GrantWithdrawn,
    /// Node: the agent stopped writing its state mid-sequence.
    AgentGone,
    /// Node: our taint with nothing in flight, removed.
    StaleTaintRemoved,
    /// Pod: evicted to reconfigure its node's GPUs.
    Evicted,
    /// Node: a PodDisruptionBudget refused an eviction; asked again next round.
    EvictionBlockedByPdb,
    /// Node: the agent began a grant's sequence.
    ReconfigurationStarted,
    /// Node: the sequence ended with the GPUs at their targets.
    ReconfigurationSucceeded,
    /// Node: the sequence failed after changing GPUs; returning them.
    ReconfigurationRollingBack,
    /// Node: the sequence ended with the GPUs as they were.
    ReconfigurationRolledBack,
    /// Node: the sequence failed; the node stays tainted for a person.
    ReconfigurationFailed,
    /// Node: the plan was stale before anything changed (a pod it did not know, an unreadable GPU).
    ReconfigurationSuperseded,
    /// Node: a grant the agent will not run (not our config, or too old).
    GrantRefused,
    /// Node: the driver's MIG profiles or placements differ from the catalog (or the model is not
    /// in it); the agent reports but will not reconfigure the node.
    CatalogMismatch,
    /// Pod and Node: GPUs reserved for the pod until the pods using them finish.
    GpusReserved,
    /// Node: a reservation ended (its pod placed or gone, expired, or outranked).
    ReservationReleased,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 26] = [
        Reason::WaitingForMigCapacity,
        Reason::WaitingForRepartition,
        Reason::LayoutChangePlanned,
        Reason::ReconfigurationGranted,
        Reason::ReconfigurationDeferred,
        Reason::InvalidMigRequest,
        Reason::MalformedAnnotation,
        Reason::UnknownGpuModel,
        Reason::GpuStateUnknown,
        Reason::AgentBackendMismatch,
        Reason::NoAgentReport,
        Reason::GrantWithdrawn,
        Reason::AgentGone,
        Reason::StaleTaintRemoved,
        Reason::Evicted,
        Reason::EvictionBlockedByPdb,
        Reason::ReconfigurationStarted,
        Reason::ReconfigurationSucceeded,
        Reason::ReconfigurationRollingBack,
        Reason::ReconfigurationRolledBack,
        Reason::ReconfigurationFailed,
        Reason::ReconfigurationSuperseded,
        Reason::GrantRefused,
        Reason::CatalogMismatch,
        Reason::GpusReserved,
        Reason::ReservationReleased,
    ];

    /// The reason as written on the Event (PascalCase).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::WaitingForMigCapacity => "WaitingForMigCapacity",
            Reason::WaitingForRepartition => "WaitingForRepartition",
            Reason::LayoutChangePlanned => "LayoutChangePlanned",
            Reason::ReconfigurationGranted => "ReconfigurationGranted",
            Reason::ReconfigurationDeferred => "ReconfigurationDeferred",
            Reason::InvalidMigRequest => "InvalidMigRequest",
            Reason::MalformedAnnotation => "MalformedAnnotation",
            Reason::UnknownGpuModel => "UnknownGpuModel",
            Reason::GpuStateUnknown => "GpuStateUnknown",
            Reason::AgentBackendMismatch => "AgentBackendMismatch",
            Reason::NoAgentReport => "NoAgentReport",
            Reason::GrantWithdrawn => "GrantWithdrawn",
            Reason::AgentGone => "AgentGone",
            Reason::StaleTaintRemoved => "StaleTaintRemoved",
            Reason::Evicted => "Evicted",
            Reason::EvictionBlockedByPdb => "EvictionBlockedByPDB",
            Reason::ReconfigurationStarted => "ReconfigurationStarted",
            Reason::ReconfigurationSucceeded => "ReconfigurationSucceeded",
            Reason::ReconfigurationRollingBack => "ReconfigurationRollingBack",
            Reason::ReconfigurationRolledBack => "ReconfigurationRolledBack",
            Reason::ReconfigurationFailed => "ReconfigurationFailed",
            Reason::ReconfigurationSuperseded => "ReconfigurationSuperseded",
            Reason::GrantRefused => "GrantRefused",
            Reason::CatalogMismatch => "CatalogMismatch",
            Reason::GpusReserved => "GpusReserved",
            Reason::ReservationReleased => "ReservationReleased",
        }
    }

    /// Who emits it (only that component does).
    pub fn emitter(self) -> Emitter {
        use Reason::*;
        match self {
            ReconfigurationStarted
            | ReconfigurationSucceeded
            | ReconfigurationRollingBack
            | ReconfigurationRolledBack
            | ReconfigurationFailed
            | ReconfigurationSuperseded
            | GrantRefused
            | CatalogMismatch => Emitter::Agent,
            _ => Emitter::Controller,
        }
    }

    /// Whether it is a Warning (else Normal).
    pub fn is_warning(self) -> bool {
        use Reason::*;
        matches!(
            self,
            InvalidMigRequest
                | MalformedAnnotation
                | UnknownGpuModel
                | GpuStateUnknown
                | AgentBackendMismatch
                | NoAgentReport
                | GrantWithdrawn
                | AgentGone
                | EvictionBlockedByPdb
                | ReconfigurationRollingBack
                | ReconfigurationRolledBack
                | ReconfigurationFailed
                | GrantRefused
                | CatalogMismatch
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest Event note the API server accepts (`events.k8s.io/v1`: 1 kB); a longer one is
/// refused with 422 and the Event is lost.
pub const NOTE_LIMIT: usize = 1024;

/// `note` cut to [`NOTE_LIMIT`] bytes at a character boundary, with `…` where it was cut.
pub fn clip_note(mut note: String) -> String {
    if note.len() <= NOTE_LIMIT {
        return note;
    }
    let mut cut = NOTE_LIMIT - '…'.len_utf8();
    while !note.is_char_boundary(cut) {
        cut -= 1;
    }
    note.truncate(cut);
    note.push('…');
    note
}

/// What controller and agents both do before an Event goes out: the same Event (object, reason,
/// note) is not sent again within `dedupe` (the default lets every Event through).
#[derive(Debug, Default)]
pub struct EventGate {
    dedupe: std::time::Duration,
    sent: std::collections::HashMap<String, std::time::Instant>,
}

impl EventGate {
    /// A gate that lets one Event through per `dedupe`.
    pub fn new(dedupe: std::time::Duration) -> EventGate {
        EventGate {
            dedupe,
            sent: Default::default(),
        }
    }

    /// Whether the Event about `regarding` with `reason` and `note` goes out at `now`; when it
    /// does, it is remembered (a repeat does not extend the window).
    pub fn admit(
        &mut self,
        regarding: &k8s_openapi::api::core::v1::ObjectReference,
        reason: Reason,
        note: &str,
        now: std::time::Instant,
    ) -> bool {
        let dedupe = self.dedupe;
        self.sent
            .retain(|_, t| now.saturating_duration_since(*t) < dedupe);
        let field = |f: &Option<String>| f.clone().unwrap_or_default();
        let key = format!(
            "{}/{}/{}|{reason}|{note}",
            field(&regarding.kind),
            field(&regarding.namespace),
            field(&regarding.name)
        );
        if self.sent.contains_key(&key) {
            return false;
        }
        self.sent.insert(key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn notes_are_clipped_to_what_the_api_accepts_at_a_character_boundary() {
        assert_eq!(clip_note("short".into()), "short");
        let long = "é".repeat(2000);
        let clipped = clip_note(long);
        assert!(clipped.len() <= NOTE_LIMIT, "{}", clipped.len());
        assert!(clipped.ends_with('…'));
        assert!(clipped.starts_with("éé"));
    }

    #[test]
    fn the_same_event_goes_out_once_per_dedupe_window() {
        let node = |name: &str| k8s_openapi::api::core::v1::ObjectReference {
            kind: Some("Node".into()),
            name: Some(name.into()),
            ..Default::default()
        };
        let (n, m) = (node("n"), node("m"));
        let mut gate = EventGate::new(std::time::Duration::from_secs(60));
        let t0 = std::time::Instant::now();
        let later = |s| t0 + std::time::Duration::from_secs(s);
        assert!(gate.admit(&n, Reason::AgentGone, "x", t0));
        assert!(!gate.admit(&n, Reason::AgentGone, "x", later(59)));
        assert!(gate.admit(&n, Reason::AgentGone, "y", t0));
        assert!(gate.admit(&m, Reason::AgentGone, "x", t0));
        assert!(gate.admit(&n, Reason::AgentGone, "x", later(61)));
    }

    use super::*;

    /// docs/controller.md, "Events": one row per reason with its emitter and type, no other rows.
    #[test]
    fn the_docs_table_is_the_enum() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/controller.md"))
            .unwrap_or_else(|e| panic!("docs/controller.md: {e}"));
        let section = doc
            .split("\n## ")
            .find(|s| s.starts_with("Events"))
            .unwrap_or_else(|| panic!("no Events section"));
        let rows: Vec<Vec<&str>> = section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| l.split('|').map(str::trim).collect())
            .collect();
        assert_eq!(rows.len(), Reason::ALL.len(), "one row per reason");
        for r in Reason::ALL {
            let row = rows
                .iter()
                .find(|row| row[1] == format!("`{}`", r.as_str()))
                .unwrap_or_else(|| panic!("{r} is not in the table"));
            let emitter = match r.emitter() {
                Emitter::Controller => "controller",
                Emitter::Agent => "agent",
            };
            assert_eq!(row[2], emitter, "{r}");
            assert_eq!(row[4], if r.is_warning() { "Warning" } else { "Normal" }, "{r}");
        }
    }

    #[test]
    fn all_lists_every_reason_once_with_a_distinct_name() {
        let mut names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
        // `as_str` is the variant's name (PDB spelt as Kubernetes does).
        for r in Reason::ALL {
            assert_eq!(format!("{r:?}").to_lowercase(), r.as_str().to_lowercase());
        }
    }
}
