//! The agent's errors, named by what the agent does next.

use std::process::ExitStatus;
use std::time::Duration;

use mig_catalog::CatalogError;

/// Why the GPU source could not read or change the GPUs.
///
/// What the agent does next is the same for every variant of a read (the GPUs are reported
/// unknown, never empty, and read again next tick) and of a change (nothing more is changed this
/// tick; the sequence tries again until its phase times out, then follows the failure policy);
/// [`GpuError::reason`] says which fault it was, for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The command could not be started (a missing binary, permissions): a deployment fault.
    #[error("cannot run {command}: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// The command hung past its timeout and was killed (a wedged driver).
    #[error("{command}: timed out after {} s and was killed", timeout.as_secs_f64())]
    TimedOut {
        /// The command line.
        command: String,
        /// Its timeout.
        timeout: Duration,
    },
    /// The command could not be waited for.
    #[error("{command}: {source}")]
    Wait {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// The command ran and failed; `words` is what it printed.
    #[error("{command}: {status}: {words}")]
    Failed {
        /// The command line.
        command: String,
        /// How it ended.
        status: ExitStatus,
        /// Its stderr and stdout.
        words: String,
    },
    /// The answer does not fit what the parser knows (another driver version?).
    #[error("{0}")]
    Output(String),
    /// The GPU is not a model the catalog knows.
    #[error(transparent)]
    Model(#[from] CatalogError),
    /// The driver's MIG profile table could not be read.
    #[error(transparent)]
    Profiles(#[from] mig_catalog::nvml::SourceError),
    /// The GPUs refuse the change (no instance at that placement, one in use, a placement taken).
    #[error("{0}")]
    Refused(String),
    /// This source cannot create or destroy instances.
    #[error("this GPU source cannot create or destroy instances (nvml backend unsupported)")]
    Unsupported,
    /// The source's call panicked or was cancelled.
    #[error("GPU source task failed: {0}")]
    Task(String),
}

impl GpuError {
    /// A short, bounded name of the fault, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            GpuError::Spawn { .. } => "cannot-run",
            GpuError::TimedOut { .. } => "timed-out",
            GpuError::Wait { .. } | GpuError::Failed { .. } => "command-failed",
            GpuError::Output(_) => "unreadable-output",
            GpuError::Model(_) => "unknown-gpu-model",
            GpuError::Profiles(_) => "unreadable-profiles",
            GpuError::Refused(_) => "refused",
            GpuError::Unsupported => "unsupported",
            GpuError::Task(_) => "task-failed",
        }
    }
}

/// Why a grant's targets cannot be compared with (or reached from) the GPUs as reported. The
/// sequence acts on none of them: it waits, and when the phase times out follows the failure
/// policy with this as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The source does not report this GPU.
    #[error("GPU {gpu} is not reported")]
    NotReported {
        /// GPU index.
        gpu: u32,
    },
    /// The source could not read this GPU's instances.
    #[error("GPU {gpu}'s instances are unknown ({why})")]
    Unknown {
        /// GPU index.
        gpu: u32,
        /// Why.
        why: String,
    },
    /// The GPU is not a model the catalog knows.
    #[error(transparent)]
    Model(#[from] CatalogError),
    /// An instance of a profile the model does not have.
    #[error("GPU {gpu}: unknown profile {profile:?}")]
    UnknownProfile {
        /// GPU index.
        gpu: u32,
        /// The profile as reported.
        profile: String,
    },
    /// A target that is not a valid layout of the GPU's model.
    #[error("GPU {gpu}: target {target:?}: {why}")]
    BadTarget {
        /// GPU index.
        gpu: u32,
        /// The target text.
        target: String,
        /// What is wrong with it.
        why: String,
    },
    /// The GPU's instances are not the target's, placements compared.
    #[error("GPU {gpu} differs from its target {target}: {destroy} to destroy, {create} to create")]
    Differs {
        /// GPU index.
        gpu: u32,
        /// The target.
        target: String,
        /// Instances to destroy.
        destroy: usize,
        /// Instances to create.
        create: usize,
    },
    /// The GPU's instances per profile are not the target's.
    #[error("GPU {gpu} has [{actual}], expected {target}")]
    Counts {
        /// GPU index.
        gpu: u32,
        /// What it has.
        actual: String,
        /// The target.
        target: String,
    },
    /// The device plugin does not advertise what the GPUs have.
    #[error("the device plugin advertises {have} {resource}, the GPUs have {want}")]
    Advertising {
        /// The extended resource.
        resource: String,
        /// Advertised.
        have: u64,
        /// On the GPUs.
        want: u64,
    },
    /// The device plugin is being restarted.
    #[error("the device plugin is stopping")]
    PluginStopping,
}

/// Why dcgm-exporter could not be read. The agent reports no per-instance utilization until it
/// answers again (instances are then neither idle nor busy by utilization) and counts the error.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The configured URL does not parse.
    #[error("bad URL: {0}")]
    Url(#[from] http::uri::InvalidUri),
    /// No answer within the time allowed.
    #[error("timed out")]
    TimedOut,
    /// The connection or the body failed (or the body was over the size limit).
    #[error("{0}")]
    Transport(String),
    /// The exporter answered with an error status.
    #[error("HTTP {0}")]
    Status(http::StatusCode),
}
