//! kube-emulator's simulated GPUs as the agent's [`GpuSource`], and as the planner's [`Gpu`]s.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube_emulator::Hardware;
use mig_agent::{GpuError, GpuSource, InstanceChange, observed_from_catalog};
use mig_catalog::Catalog;
use mig_catalog::nvml::ObservedGpu;
use mig_planner::snapshot::Gpu;

/// The simulated GPUs of `node` as NVML would report them, with the pods using each instance.
pub fn emulated_gpus(hardware: &Hardware, node: &str) -> Vec<Gpu> {
    hardware
        .gpus(node)
        .iter()
        .map(|g| {
            Gpu::from_layout(g.model, &g.model.key, g.index, &g.layout, |i| {
                g.used.get(i).cloned().into_iter().collect()
            })
        })
        .collect()
}

/// The GPUs simulated on one node (what NVML would report there).
pub struct EmulatedGpus {
    hardware: Arc<Hardware>,
    node: String,
}

impl EmulatedGpus {
    /// The simulated GPUs of `node`.
    pub fn new(hardware: Arc<Hardware>, node: impl Into<String>) -> EmulatedGpus {
        EmulatedGpus {
            hardware,
            node: node.into(),
        }
    }
}

impl GpuSource for EmulatedGpus {
    fn knows_pods(&self) -> bool {
        true
    }

    /// The emulator has no GPU-instance IDs; it numbers instances by placement + 1 (so an ID is
    /// never the placement, as on real GPUs).
    fn instance_ids(&self) -> BTreeMap<(u32, u32), u8> {
        self.hardware
            .gpus(&self.node)
            .iter()
            .flat_map(|g| {
                g.layout
                    .instances()
                    .iter()
                    .map(move |i| ((g.index, u32::from(i.start) + 1), i.start))
            })
            .collect()
    }

    fn profiles(&self, gpu: &Gpu) -> Result<Option<ObservedGpu>, GpuError> {
        let model = Catalog::embedded().lookup(&gpu.product)?;
        Ok(Some(observed_from_catalog(model, "kube-emulator")))
    }

    fn gpus(&self) -> Result<Vec<Gpu>, GpuError> {
        Ok(emulated_gpus(&self.hardware, &self.node))
    }

    /// Through the emulator, which checks what NVML would: instance there and free, placement valid.
    fn apply(&self, change: &InstanceChange) -> Result<(), GpuError> {
        self.hardware
            .change_instances(&self.node, change.gpu, &change.destroy, &change.create)
            .map_err(|e| GpuError::Refused(e.to_string()))
    }
}
