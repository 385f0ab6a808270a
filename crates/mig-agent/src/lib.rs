//! The mig-autoscaler node agent (one per MIG node, a DaemonSet): it reports the node's GPUs on the
//! Node, and when the controller grants a reconfiguration it runs taint → drain (the controller
//! evicts; the agent waits) →
//! relabel `nvidia.com/mig.config` → wait for mig-manager (or, with the nvml backend, create and
//! destroy instances at explicit placements) → verify → untaint, persisting every phase on the Node
//! so a restarted agent resumes where it was (docs/agent.md).
//!
//! [`sequence`] is the pure state machine; [`agent`] runs it against the API; [`source`] says where
//! the GPUs come from.

pub mod agent;
pub mod dcgm;
pub mod error;
pub mod sequence;
pub mod source;

pub use agent::{AgentSettings, Running, start, start_with_clock};
pub use error::{GpuError, LayoutError};
pub use sequence::{Effect, FailurePolicy, InstanceChange, Observation, SequencePolicy, Step, step};
pub use source::{GpuSource, NvidiaSmiGpus, observed_from_catalog};

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use mig_planner::snapshot::{Gpu, GpuInstance};

    /// An H100 at `index` with free instances at `layout` (`(profile, start)`).
    pub fn gpu(index: u32, layout: &[(&str, u8)]) -> Gpu {
        Gpu {
            index,
            product: "NVIDIA-H100-80GB-HBM3".into(),
            mig_enabled: true,
            unknown: None,
            instances: layout
                .iter()
                .map(|(p, s)| GpuInstance {
                    profile: p.to_string(),
                    start: *s,
                    pods: vec![],
                    utilization: None,
                })
                .collect(),
        }
    }
}
