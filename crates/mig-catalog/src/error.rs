//! Errors of the catalog crate. Every variant is permanent for its input: the caller fixes the input
//! (or the data file), retrying does not help.

use thiserror::Error;

use crate::layout::Violation;

/// Errors from catalog look-ups and data loading.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CatalogError {
    /// No model matches a product label, NVML name, PCI id or key.
    #[error("unknown {kind} {query:?}: mig-autoscaler knows {}", known.join(", "))]
    UnknownModel {
        /// What was asked for.
        query: String,
        /// Which kind of identifier it was.
        kind: &'static str,
        /// Product labels of the known models.
        known: Vec<String>,
    },
    /// The catalog data file is malformed or inconsistent.
    #[error("catalog data: {message}")]
    Data {
        /// What is wrong, and where.
        message: String,
    },
}

impl CatalogError {
    /// A short, bounded reason for metrics and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            CatalogError::UnknownModel { .. } => "unknown-gpu-model",
            CatalogError::Data { .. } => "catalog-data",
        }
    }
}

/// A layout text that could not be parsed (`3g.40gb@0,2g.20gb@4`).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("cannot parse layout {text:?} for {model}: {message}")]
pub struct ParseLayoutError {
    /// Model key.
    pub model: String,
    /// The text.
    pub text: String,
    /// What is wrong.
    pub message: String,
}

/// A layout that breaks a MIG rule.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("layout {layout} is not valid on {model}: {}", violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct InvalidLayout {
    /// Model key.
    pub model: String,
    /// The layout in canonical form.
    pub layout: String,
    /// Every rule it breaks.
    pub violations: Vec<Violation>,
}

/// A profile-count vector with no valid arrangement of placements.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("no valid placement arrangement of {counts} exists on {model}: {reason}")]
pub struct ArrangeError {
    /// Model key.
    pub model: String,
    /// The counts, as `1g.10gb:2,3g.40gb:1`.
    pub counts: String,
    /// Why.
    pub reason: String,
}

/// Why a mig-parted config cannot apply to a GPU. Permanent for the config: the caller reports it
/// (mig-manager would leave `failed`), retrying does not help.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// No config of that name.
    #[error("no config named {name:?}")]
    NoConfig {
        /// The name asked for.
        name: String,
    },
    /// The config has no entry whose devices and device filter select this GPU.
    #[error("config {name:?} has no entry for GPU {gpu} ({model})")]
    NoEntry {
        /// Config name.
        name: String,
        /// GPU index.
        gpu: u32,
        /// Model key.
        model: String,
    },
    /// A compute-instance key (`1c.3g.40gb`): only whole GPU instances are planned.
    #[error("{key:?} is a compute-instance profile; mig-autoscaler plans whole GPU instances only")]
    ComputeInstance {
        /// The key.
        key: String,
    },
    /// A profile the model does not have.
    #[error("profile {profile:?} does not exist on {model} (it has {})", known.join(", "))]
    UnknownProfile {
        /// The profile key.
        profile: String,
        /// Model key.
        model: String,
        /// The model's profiles.
        known: Vec<String>,
    },
    /// A count that does not fit.
    #[error("count {count} of {profile} is out of range")]
    CountOutOfRange {
        /// The profile key.
        profile: String,
        /// The count.
        count: u32,
    },
}
