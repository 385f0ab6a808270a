//! mig-autoscaler's controller: watches nodes, pods, PDBs and the mig-parted ConfigMap through
//! kube-rs reflectors; plans in batches with [`mig_planner`]; grants node reconfigurations to the
//! node agents under cluster-wide disruption budgets (leader only, `auto` mode only); and serves
//! the dry-run plan API, metrics and probes.
//!
//! What it agrees on with the agents is `mig_protocol`. Pure parts, unit-tested without an API
//! server: [`settings`], [`budget`], [`observe`]. The rest ([`controller`], [`lease`], [`api`]) is
//! tested against kube-emulator by `mig-testbed`'s e2e suite and fault suite.

pub mod api;
pub mod auth;
pub mod budget;
pub mod controller;
pub mod error;
pub mod lease;
pub mod listener;
pub mod metrics;
pub mod observe;
pub mod settings;
pub mod state;

pub use controller::{Running, start};
pub use metrics::Metrics;
pub use settings::{Mode, Settings};
pub use state::{Published, Shared};
