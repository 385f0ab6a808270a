//! Where the agent learns the node's GPUs: a trait with two sources, the emulator's simulated GPUs
//! and NVML through its own command line (`nvidia-smi`).
//!
//! Why not nvml-wrapper: the workspace forbids `unsafe`, and nvml-wrapper's safe API does not list
//! GPU instances with their placements (`nvmlDeviceGetGpuInstances` and `nvmlGpuInstanceGetInfo`
//! are only in its raw `-sys` bindings). `nvidia-smi mig -lgi` prints exactly those, read-only.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube_emulator::Cluster;
use mig_catalog::nvml::{ObservedGpu, ObservedPlacement, ObservedProfile};
use mig_catalog::{Catalog, GpuModel};
use mig_planner::snapshot::{Gpu, GpuInstance};

use crate::sequence::InstanceChange;

/// A source of the node's GPUs.
pub trait GpuSource: Send + Sync {
    /// Every GPU with its GPU instances at their placements, and the pods using each where known.
    fn gpus(&self) -> Result<Vec<Gpu>, String>;

    /// The MIG profiles and possible placements the driver reports for GPU `gpu` (checked against
    /// the catalog before the agent acts); `None` where the source cannot tell.
    fn profiles(&self, gpu: &Gpu) -> Result<Option<ObservedGpu>, String> {
        let _ = gpu;
        Ok(None)
    }

    /// Whether [`GpuSource::gpus`] says which pods use each instance. When it does not (NVML knows
    /// processes, not pods), the agent attributes the node's pods by profile with
    /// [`attribute_by_profile`].
    fn knows_pods(&self) -> bool {
        false
    }

    /// `(GPU index, GPU-instance ID)` → placement start, as of the last [`GpuSource::gpus`]: how
    /// DCGM's series (labelled with GPU-instance IDs) are joined to placements. Empty where
    /// unknown.
    fn instance_ids(&self) -> BTreeMap<(u32, u32), u8> {
        BTreeMap::new()
    }

    /// nvml backend: destroy `change.destroy`, then create `change.create` at exactly their
    /// placements, on GPU `change.gpu`. Must refuse to destroy an instance in use.
    fn apply(&self, change: &InstanceChange) -> Result<(), String> {
        let _ = change;
        Err("this GPU source cannot create or destroy instances (nvml backend unsupported)".into())
    }
}

/// What NVML would report for a GPU of `model`: the catalog's own profiles and placements (the
/// emulator's GPUs follow the catalog).
pub fn observed_from_catalog(model: &GpuModel, origin: &str) -> ObservedGpu {
    ObservedGpu {
        name: model
            .skus
            .iter()
            .find_map(|s| s.nvml_name.clone())
            .unwrap_or_else(|| model.key.clone()),
        pci_device_id: None,
        origin: origin.to_string(),
        profiles: model
            .profiles
            .iter()
            .map(|p| ObservedProfile {
                profile_id: p.profile_id,
                name: Some(format!("MIG {}", p.name)),
                slice_count: u32::from(p.compute_slices),
                instance_count: u32::from(p.max_instances),
                memory_mib: None,
                placements: p
                    .starts
                    .iter()
                    .map(|s| ObservedPlacement {
                        start: u32::from(*s),
                        size: u32::from(p.memory_slices),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// For a source that cannot say which pod uses which instance: every instance of a profile that a
/// pod on the node requests is reported as used by that pod (`pods`: `namespace/name` → MIG
/// resource requests, for the pods bound to the node and not finished). Conservative on purpose:
/// the planner then never rebuilds a GPU that may hold a running pod, nor destroys an instance that
/// may be in use; the price is that a profile in use pins every instance of it on the node, and
/// that such a pod, seen on several GPUs, is never drained.
pub fn attribute_by_profile(gpus: &mut [Gpu], pods: &[(String, BTreeMap<String, i64>)]) {
    for g in gpus {
        let Ok(model) = Catalog::embedded().lookup(&g.product) else {
            continue;
        };
        for i in &mut g.instances {
            let Some(resource) = model
                .profile_by_name(&i.profile)
                .and_then(|p| model.profile(p))
                .map(|p| p.resource_name())
            else {
                continue;
            };
            for (key, requests) in pods {
                if requests.get(&resource).is_some_and(|n| *n > 0) && !i.pods.contains(key) {
                    i.pods.push(key.clone());
                }
            }
        }
    }
}

/// The GPUs kube-emulator simulates on one node (what NVML would report there).
pub struct EmulatedGpus {
    cluster: Arc<Cluster>,
    node: String,
}

impl EmulatedGpus {
    /// The simulated GPUs of `node`.
    pub fn new(cluster: Arc<Cluster>, node: impl Into<String>) -> EmulatedGpus {
        EmulatedGpus {
            cluster,
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
        self.cluster
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

    fn profiles(&self, gpu: &Gpu) -> Result<Option<ObservedGpu>, String> {
        let model = Catalog::embedded()
            .lookup(&gpu.product)
            .map_err(|e| e.to_string())?;
        Ok(Some(observed_from_catalog(model, "kube-emulator")))
    }

    fn gpus(&self) -> Result<Vec<Gpu>, String> {
        Ok(self
            .cluster
            .gpus(&self.node)
            .iter()
            .map(|g| Gpu {
                index: g.index,
                product: g.model.key.clone(),
                mig_enabled: true,
                instances: g
                    .layout
                    .instances()
                    .iter()
                    .filter_map(|i| {
                        Some(GpuInstance {
                            profile: g.model.profile(i.profile)?.name.clone(),
                            start: i.start,
                            pods: g.used.get(i).cloned().into_iter().collect(),
                            utilization: None,
                        })
                    })
                    .collect(),
            })
            .collect())
    }

    /// Through the emulator, which checks what NVML would: instance there and free, placement valid.
    fn apply(&self, change: &InstanceChange) -> Result<(), String> {
        self.cluster
            .change_instances(&self.node, change.gpu, &change.destroy, &change.create)
    }
}

/// The GPUs as NVIDIA's own NVML command line reports them: `nvidia-smi --query-gpu` for models and
/// MIG mode, `nvidia-smi mig -lgi` for GPU instances at their placements. Read-only commands.
///
/// Pods per instance are not known here (that needs the kubelet's pod-resources socket), so the
/// report carries none; the controller then treats every instance as free unless a pod on the node
/// holds that profile (see docs/agent.md).
pub struct NvidiaSmiGpus {
    /// The command (`nvidia-smi`, or a path).
    pub command: String,
    /// The GPU-instance IDs seen by the last `gpus()`.
    ids: std::sync::Mutex<BTreeMap<(u32, u32), u8>>,
}

impl NvidiaSmiGpus {
    /// Read GPUs with `command` (`nvidia-smi`, or a path).
    pub fn new(command: impl Into<String>) -> NvidiaSmiGpus {
        NvidiaSmiGpus {
            command: command.into(),
            ids: Default::default(),
        }
    }
}

impl Default for NvidiaSmiGpus {
    fn default() -> Self {
        NvidiaSmiGpus::new("nvidia-smi")
    }
}

fn run(command: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(command)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {command}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{command} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One GPU instance as `nvidia-smi mig -lgi` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LgiRow {
    /// GPU index.
    pub gpu: u32,
    /// Profile name (`3g.40gb`).
    pub profile: String,
    /// GPU instance ID (what `-gi` takes; not the placement).
    pub gi_id: u32,
    /// Placement start.
    pub start: u8,
}

/// Parse `nvidia-smi mig -lgi`: rows like `|   0  MIG 3g.40gb   9   2   4:4   |` (GPU, name, profile
/// ID, instance ID, placement start:size); other lines are ignored.
pub fn lgi_rows(lgi: &str) -> Result<Vec<LgiRow>, String> {
    let mut rows = Vec::new();
    for line in lgi.lines() {
        let cells: Vec<&str> = line
            .trim_matches(|c| c == '|' || c == ' ')
            .split_whitespace()
            .collect();
        let Some(mig) = cells.iter().position(|c| *c == "MIG") else {
            continue;
        };
        let (Some(gpu), Some(profile), Some(placement)) = (cells.first(), cells.get(mig + 1), cells.last())
        else {
            continue;
        };
        let Ok(gpu) = gpu.parse::<u32>() else { continue };
        let start = placement
            .split_once(':')
            .and_then(|(s, _)| s.parse::<u8>().ok())
            .ok_or_else(|| format!("-lgi: placement {placement:?} in {line:?}"))?;
        let gi_id = cells
            .len()
            .checked_sub(2)
            .and_then(|i| cells.get(i))
            .and_then(|c| c.parse::<u32>().ok())
            .ok_or_else(|| format!("-lgi: no instance ID in {line:?}"))?;
        rows.push(LgiRow {
            gpu,
            profile: profile.to_string(),
            gi_id,
            start,
        });
    }
    Ok(rows)
}

/// Parse `nvidia-smi --query-gpu=index,name,mig.mode.current --format=csv,noheader` and
/// `nvidia-smi mig -lgi` into GPUs. The NVML name (`NVIDIA H100 80GB HBM3`) is the product; the
/// catalog resolves NVML names.
pub fn parse_nvidia_smi(query: &str, lgi: &str) -> Result<Vec<Gpu>, String> {
    let mut gpus = Vec::new();
    for (n, line) in query.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [index, name, mode] = fields.as_slice() else {
            return Err(format!(
                "--query-gpu line {}: expected index, name, mig.mode.current: {line:?}",
                n + 1
            ));
        };
        gpus.push(Gpu {
            index: index
                .parse()
                .map_err(|_| format!("--query-gpu line {}: GPU index {index:?}", n + 1))?,
            product: name.to_string(),
            mig_enabled: mode.eq_ignore_ascii_case("enabled"),
            instances: Vec::new(),
        });
    }
    for row in lgi_rows(lgi)? {
        let g = gpus
            .iter_mut()
            .find(|g| g.index == row.gpu)
            .ok_or_else(|| format!("-lgi lists GPU {}, which --query-gpu did not", row.gpu))?;
        g.instances.push(GpuInstance {
            profile: row.profile,
            start: row.start,
            pods: Vec::new(),
            utilization: None,
        });
    }
    for g in &mut gpus {
        g.instances.sort_by_key(|i| i.start);
    }
    Ok(gpus)
}

impl GpuSource for NvidiaSmiGpus {
    fn gpus(&self) -> Result<Vec<Gpu>, String> {
        let query = run(
            &self.command,
            &["--query-gpu=index,name,mig.mode.current", "--format=csv,noheader"],
        )?;
        // With MIG off everywhere, -lgi fails ("No MIG-enabled devices found"): no instances.
        let lgi = run(&self.command, &["mig", "-lgi"]).unwrap_or_default();
        let gpus = parse_nvidia_smi(&query, &lgi)?;
        let ids = lgi_rows(&lgi)?
            .into_iter()
            .map(|r| ((r.gpu, r.gi_id), r.start))
            .collect();
        *self.ids.lock().unwrap_or_else(|e| e.into_inner()) = ids;
        Ok(gpus)
    }

    fn instance_ids(&self) -> BTreeMap<(u32, u32), u8> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `nvidia-smi mig -i N -gi ID -dci` then `-dgi` for each instance to destroy (found by
    /// placement in `-lgi`), then `nvidia-smi mig -i N -cgi PROFILE_ID:START -C` for each to
    /// create: explicit placements, so the driver never picks the slot. The driver refuses to
    /// destroy an instance a process uses; the planner and the sequence never ask for one a pod
    /// holds. Profile IDs come from the catalog, which was checked against this driver at start.
    fn apply(&self, change: &InstanceChange) -> Result<(), String> {
        let index = change.gpu.to_string();
        let product = run(
            &self.command,
            &["--query-gpu=name", "--format=csv,noheader", "-i", &index],
        )?;
        let model = Catalog::embedded()
            .lookup(product.trim())
            .map_err(|e| e.to_string())?;
        let profile_id = |name: &str| {
            model
                .profile_by_name(name)
                .and_then(|p| model.profile(p))
                .map(|p| p.profile_id)
                .ok_or_else(|| format!("{} has no profile {name}", model.key))
        };
        if !change.destroy.is_empty() {
            let rows = lgi_rows(&run(&self.command, &["mig", "-lgi", "-i", &index])?)?;
            for (name, start) in &change.destroy {
                let id = profile_id(name)?;
                let row = rows
                    .iter()
                    .find(|r| {
                        r.gpu == change.gpu
                            && r.start == *start
                            && model
                                .profile_by_name(&r.profile)
                                .and_then(|p| model.profile(p))
                                .map(|p| p.profile_id)
                                == Some(id)
                    })
                    .ok_or_else(|| format!("GPU {index} has no instance {name}@{start}"))?;
                let gi = row.gi_id.to_string();
                // Compute instances first; with none left this fails harmlessly.
                let _ = run(&self.command, &["mig", "-i", &index, "-gi", &gi, "-dci"]);
                run(&self.command, &["mig", "-i", &index, "-gi", &gi, "-dgi"])?;
            }
        }
        for (name, start) in &change.create {
            let tuple = format!("{}:{start}", profile_id(name)?);
            run(&self.command, &["mig", "-i", &index, "-cgi", &tuple, "-C"])?;
        }
        Ok(())
    }

    /// `nvidia-smi mig -lgip -i N` and `-lgipp -i N` (read-only), parsed by the catalog.
    fn profiles(&self, gpu: &Gpu) -> Result<Option<ObservedGpu>, String> {
        if !gpu.mig_enabled {
            return Ok(None); // no MIG profiles are listed with MIG off
        }
        let index = gpu.index.to_string();
        let lgip = run(&self.command, &["mig", "-lgip", "-i", &index])?;
        let lgipp = run(&self.command, &["mig", "-lgipp", "-i", &index])?;
        ObservedGpu::from_nvidia_smi(&gpu.product, gpu.index, &lgip, &lgipp)
            .map(|mut o| {
                o.origin = "nvidia-smi".into();
                Some(o)
            })
            .map_err(|e| e.to_string())
    }
}
