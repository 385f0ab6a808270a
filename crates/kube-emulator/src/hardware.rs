//! The simulated hardware: MIG GPUs per node, as NVML and mig-parted would change them, apart
//! from any API server. The in-process actors ([`crate::Cluster`]) and the testbed's simulated
//! nodes that are clients of an API server (kubelet, device plugin and mig-manager over HTTP) act
//! on it alike, and the agent's emulated GPU source reads and changes it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use mig_catalog::migparted::MigPartedConfig;
use mig_catalog::{Catalog, GpuModel, Instance, Layout, NamedInstance};

use crate::cluster::{NodeSpec, SpecError};

/// A simulated GPU.
#[derive(Clone, Debug)]
pub struct SimGpu {
    /// Index on the node.
    pub index: u32,
    /// Model.
    pub model: &'static GpuModel,
    /// Actual layout.
    pub layout: Layout,
    /// Instance → pod (`namespace/name`) using it.
    pub used: BTreeMap<Instance, String>,
}

/// A simulated node's GPUs, and what its mig-manager and device plugin remember of them.
#[derive(Clone, Debug, Default)]
pub struct SimNode {
    /// GPUs, by index.
    pub gpus: Vec<SimGpu>,
    /// Config mig-manager last applied.
    pub applied: Option<String>,
    /// Since when a different config is pending.
    pub pending_since: Option<Instant>,
    /// Instances changed directly since the device plugin last started: it advertises the old ones.
    pub plugin_stale: bool,
}

/// Why the emulated GPUs refuse an instance change, as NVML would. Nothing after the refused step
/// is done; what came before stays done (NVML calls are one by one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// No such node.
    #[error("no node {0}")]
    NoNode(String),
    /// No such GPU on the node.
    #[error("node {node} has no GPU {gpu}")]
    NoGpu {
        /// The node.
        node: String,
        /// GPU index.
        gpu: u32,
    },
    /// A profile the GPU's model does not have.
    #[error("{model} has no profile {profile}")]
    NoProfile {
        /// Model key.
        model: String,
        /// The profile.
        profile: String,
    },
    /// No instance at that placement.
    #[error("GPU {gpu} has no instance {instance}")]
    NoInstance {
        /// GPU index.
        gpu: u32,
        /// The instance asked for.
        instance: NamedInstance,
    },
    /// The instance is in use by a pod.
    #[error("GPU {gpu} instance {instance} is in use by {pod}")]
    InUse {
        /// GPU index.
        gpu: u32,
        /// The instance.
        instance: NamedInstance,
        /// The pod.
        pod: String,
    },
    /// The placement is taken or not valid.
    #[error("GPU {gpu}: cannot create {instance} on {layout} (insufficient resources at that placement)")]
    NoRoom {
        /// GPU index.
        gpu: u32,
        /// The instance asked for.
        instance: NamedInstance,
        /// The GPU's layout.
        layout: String,
    },
    /// [`Hardware::fail_next_applies`].
    #[error("injected failure: cannot create instances")]
    Injected,
}

/// Why the emulated mig-manager could not apply a config (it sets `failed`, as mig-manager does).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The mig-parted ConfigMap is missing.
    #[error("ConfigMap {namespace}/{name} with config.yaml not found")]
    NoConfigMap {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The ConfigMap's `config.yaml` does not parse.
    #[error("{0}")]
    BadConfigMap(String),
    /// The config cannot apply to a GPU.
    #[error(transparent)]
    Config(#[from] mig_catalog::ConfigError),
    /// The config turns MIG off.
    #[error("MIG disable is not simulated")]
    MigDisable,
    /// A GPU to rebuild is in use.
    #[error("GPU {gpu} is in use by {pod}")]
    InUse {
        /// GPU index.
        gpu: u32,
        /// A pod using it.
        pod: String,
    },
    /// The counts have no valid arrangement.
    #[error(transparent)]
    Arrange(#[from] mig_catalog::ArrangeError),
    /// [`Hardware::fail_next_applies`].
    #[error("injected failure")]
    Injected,
}

/// Every simulated node's GPUs. Locked briefly, never across an await.
#[derive(Debug, Default)]
pub struct Hardware {
    nodes: Mutex<BTreeMap<String, SimNode>>,
    fail_applies: Mutex<u32>,
}

impl Hardware {
    /// The GPUs of `nodes` at their initial layouts, each node's `nvidia.com/mig.config` label
    /// taken as the config its mig-manager last applied.
    pub fn new(nodes: &[NodeSpec]) -> Result<Hardware, SpecError> {
        let catalog = Catalog::embedded();
        let mut out = BTreeMap::new();
        for n in nodes {
            let mut gpus = Vec::new();
            for (i, g) in n.gpus.iter().enumerate() {
                let node = || n.name.clone();
                let model = catalog
                    .lookup(&g.product)
                    .map_err(|source| SpecError::Model { node: node(), source })?;
                let layout = model
                    .parse_layout(&g.layout)
                    .map_err(|source| SpecError::Layout { node: node(), source })?;
                model
                    .validate(&layout)
                    .map_err(|source| SpecError::Invalid { node: node(), source })?;
                gpus.push(SimGpu {
                    index: i as u32,
                    model,
                    layout,
                    used: BTreeMap::new(),
                });
            }
            out.insert(
                n.name.clone(),
                SimNode {
                    gpus,
                    applied: n.labels.get(crate::cluster::MIG_CONFIG_LABEL).cloned(),
                    pending_since: None,
                    plugin_stale: false,
                },
            );
        }
        Ok(Hardware {
            nodes: Mutex::new(out),
            fail_applies: Mutex::new(0),
        })
    }

    /// Every node, locked.
    pub fn lock(&self) -> MutexGuard<'_, BTreeMap<String, SimNode>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The GPUs of a node (what NVML would report there).
    pub fn gpus(&self, node: &str) -> Vec<SimGpu> {
        self.lock().get(node).map(|n| n.gpus.clone()).unwrap_or_default()
    }

    /// Make mig-manager's next `n` applies fail (state `failed`), as a broken driver or a held GPU
    /// would; also the next instance creations ([`Hardware::change_instances`]).
    pub fn fail_next_applies(&self, n: u32) {
        *self.fail_applies.lock().unwrap_or_else(|e| e.into_inner()) = n;
    }

    /// Whether this apply is one to fail ([`Hardware::fail_next_applies`]).
    pub fn take_injected_failure(&self) -> bool {
        let mut f = self.fail_applies.lock().unwrap_or_else(|e| e.into_inner());
        if *f > 0 {
            *f -= 1;
            true
        } else {
            false
        }
    }

    /// Destroy, then create, GPU instances on one GPU as NVML would (the nvml backend), at explicit
    /// placements. Fails, possibly after a part is done (as NVML calls one by one do), on an
    /// instance that is not there or in use, a placement that overlaps or is not valid, or an
    /// injected failure ([`Hardware::fail_next_applies`]: the destroys are done, the creates fail).
    pub fn change_instances(
        &self,
        node: &str,
        gpu: u32,
        destroy: &[NamedInstance],
        create: &[NamedInstance],
    ) -> Result<(), ChangeError> {
        let mut nodes = self.lock();
        let n = nodes
            .get_mut(node)
            .ok_or_else(|| ChangeError::NoNode(node.to_string()))?;
        let g = n
            .gpus
            .iter_mut()
            .find(|g| g.index == gpu)
            .ok_or_else(|| ChangeError::NoGpu {
                node: node.to_string(),
                gpu,
            })?;
        let model = g.model;
        let instance = |named: &NamedInstance| {
            model
                .resolve_instance(named)
                .ok_or_else(|| ChangeError::NoProfile {
                    model: model.key.clone(),
                    profile: named.profile.clone(),
                })
        };
        for d in destroy {
            let i = instance(d)?;
            if !g.layout.contains(&i) {
                return Err(ChangeError::NoInstance {
                    gpu,
                    instance: d.clone(),
                });
            }
            if let Some(pod) = g.used.get(&i) {
                return Err(ChangeError::InUse {
                    gpu,
                    instance: d.clone(),
                    pod: pod.clone(),
                });
            }
            g.layout = Layout::new(g.layout.instances().iter().copied().filter(|x| *x != i));
            n.plugin_stale = true;
        }
        if !create.is_empty() && self.take_injected_failure() {
            return Err(ChangeError::Injected);
        }
        for c in create {
            let i = instance(c)?;
            if !model.can_add(&g.layout, &i) {
                return Err(ChangeError::NoRoom {
                    gpu,
                    instance: c.clone(),
                    layout: model.format_layout(&g.layout),
                });
            }
            g.layout = g.layout.with(i);
            n.plugin_stale = true;
        }
        Ok(())
    }

    /// A reboot's effect on the hardware: every instance gone, nothing applied, nothing in use.
    pub fn power_cycle(&self, node: &str) {
        if let Some(n) = self.lock().get_mut(node) {
            for g in &mut n.gpus {
                g.layout = Layout::empty();
                g.used.clear();
            }
            n.applied = None;
            n.pending_since = None;
            n.plugin_stale = false;
        }
    }

    /// The instances of pods not in `live` (`namespace/name`) are free again.
    pub fn release_all_but(&self, live: &BTreeSet<String>) {
        for n in self.lock().values_mut() {
            for g in &mut n.gpus {
                g.used.retain(|_, pod| live.contains(pod));
            }
        }
    }
}

impl SimNode {
    /// What the device plugin advertises: instances per `nvidia.com/mig-<profile>` resource, every
    /// profile of the node's models listed (0 where none).
    pub fn advertised(&self) -> BTreeMap<String, u64> {
        let mut capacity: BTreeMap<String, u64> = BTreeMap::new();
        for g in &self.gpus {
            for p in &g.model.profiles {
                capacity.entry(p.resource_name()).or_default();
            }
            for i in g.layout.instances() {
                if let Some(p) = g.model.profile(i.profile) {
                    *capacity.entry(p.resource_name()).or_default() += 1;
                }
            }
        }
        capacity
    }

    /// The device plugin's allocation: free instances for each `(resource, count)` of `mig`, held
    /// for `pod` (`namespace/name`); `false`, holding nothing, when there are not enough.
    pub fn allocate(&mut self, pod: &str, mig: &[(String, u64)]) -> bool {
        let mut taken: Vec<(usize, Instance)> = Vec::new();
        for (resource, count) in mig {
            for _ in 0..*count {
                let free = self.gpus.iter().enumerate().find_map(|(gi, g)| {
                    g.layout
                        .instances()
                        .iter()
                        .find(|i| {
                            !g.used.contains_key(i)
                                && !taken.contains(&(gi, **i))
                                && g.model
                                    .profile(i.profile)
                                    .is_some_and(|p| &p.resource_name() == resource)
                        })
                        .map(|i| (gi, *i))
                });
                match free {
                    Some(f) => taken.push(f),
                    None => return false,
                }
            }
        }
        for (gi, i) in taken {
            self.gpus[gi].used.insert(i, pod.to_string());
        }
        true
    }

    /// Whether `pod` holds an instance here.
    pub fn holds(&self, pod: &str) -> bool {
        self.gpus.iter().any(|g| g.used.values().any(|p| p == pod))
    }

    /// mig-parted's apply of config `name` ([`apply`]).
    pub fn apply(&mut self, config: &MigPartedConfig, name: &str) -> Result<(), ApplyError> {
        apply(config, name, &mut self.gpus)
    }
}

/// mig-parted apply: every GPU whose count vector changes is rebuilt whole; that fails when a pod
/// still holds one of its instances. All or nothing, like a failed apply leaves `failed`.
fn apply(config: &MigPartedConfig, name: &str, gpus: &mut [SimGpu]) -> Result<(), ApplyError> {
    let mut targets: HashMap<u32, Layout> = HashMap::new();
    for g in gpus.iter() {
        let counts = config.counts_for_gpu(name, g.model, g.index)?;
        let Some(counts) = counts else {
            return Err(ApplyError::MigDisable);
        };
        if counts == g.model.counts(&g.layout) {
            continue;
        }
        if !g.used.is_empty() {
            return Err(ApplyError::InUse {
                gpu: g.index,
                pod: g.used.values().next().cloned().unwrap_or_default(),
            });
        }
        targets.insert(g.index, g.model.arrange(&counts)?);
    }
    for g in gpus.iter_mut() {
        if let Some(l) = targets.remove(&g.index) {
            g.layout = l;
        }
    }
    Ok(())
}
