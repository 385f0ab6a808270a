//! Cross-check of the catalog against what NVML reports on a real GPU.
//!
//! Placements for most models are inferred from the A100 pattern (see the data file), so the agent
//! compares them with `nvmlDeviceGetGpuInstanceProfileInfo` + `nvmlDeviceGetGpuInstancePossiblePlacements_v2`
//! at start and refuses to act on a blocking mismatch. The source of the observation is a trait, so
//! the check is tested with recorded data: JSON, or the text of `nvidia-smi mig -lgip` / `-lgipp`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::error::CatalogError;
use crate::model::{Catalog, GpuModel};

/// One GPU-instance placement as NVML reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObservedPlacement {
    /// First memory slice.
    pub start: u32,
    /// Memory slices.
    pub size: u32,
}

/// One GPU-instance profile as NVML reports it (`nvmlGpuInstanceProfileInfo_t` + placements).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedProfile {
    /// `info.id`.
    pub profile_id: u32,
    /// Name as printed by nvidia-smi / derived by go-nvlib, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `info.sliceCount` (compute slices).
    pub slice_count: u32,
    /// `info.instanceCount` (most instances).
    pub instance_count: u32,
    /// `info.memorySizeMB` (MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// `nvmlDeviceGetGpuInstancePossiblePlacements_v2`.
    pub placements: Vec<ObservedPlacement>,
}

/// Everything the cross-check needs to know about one GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedGpu {
    /// NVML device name.
    pub name: String,
    /// NVML `pciDeviceId`, if read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u32>,
    /// Where this came from (`nvml`, `nvidia-smi 550.54`, a file name).
    #[serde(default)]
    pub origin: String,
    /// GPU-instance profiles.
    pub profiles: Vec<ObservedProfile>,
}

/// Failure to read the GPU.
#[derive(Debug, Error)]
#[error("cannot read MIG profiles: {0}")]
pub struct SourceError(pub String);

/// Something that can describe a GPU's MIG profiles: NVML on a node, or a recording in tests.
pub trait ProfileSource {
    /// Read the GPU.
    fn observe(&self) -> Result<ObservedGpu, SourceError>;
}

impl ProfileSource for ObservedGpu {
    fn observe(&self) -> Result<ObservedGpu, SourceError> {
        Ok(self.clone())
    }
}

/// A difference between catalog and NVML.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Mismatch {
    /// NVML reports no profiles at all (old drivers do so with MIG disabled).
    NoProfiles,
    /// The catalog has a profile NVML does not report.
    MissingInNvml {
        /// Catalog name.
        profile: String,
        /// Catalog profile id.
        profile_id: u32,
    },
    /// NVML reports a profile the catalog lacks; harmless to plans, worth adding.
    UnknownToCatalog {
        /// NVML profile id.
        profile_id: u32,
        /// NVML name, if known.
        name: Option<String>,
    },
    /// Placements differ.
    Placements {
        /// Catalog name.
        profile: String,
        /// Catalog `(start, size)`.
        catalog: Vec<(u32, u32)>,
        /// NVML `(start, size)`.
        nvml: Vec<(u32, u32)>,
    },
    /// Compute slices differ.
    ComputeSlices {
        /// Catalog name.
        profile: String,
        /// Catalog value.
        catalog: u32,
        /// NVML value.
        nvml: u32,
    },
    /// Maximum instance counts differ.
    MaxInstances {
        /// Catalog name.
        profile: String,
        /// Catalog value.
        catalog: u32,
        /// NVML value.
        nvml: u32,
    },
    /// Same profile id, NVML calling it by one of the catalog profile's aliases (informative).
    Name {
        /// Profile id.
        profile_id: u32,
        /// Catalog name.
        catalog: String,
        /// NVML name.
        nvml: String,
    },
    /// Same profile id, a name that is neither the catalog's nor an alias (`1g.5gb` where the
    /// catalog says `1g.10gb`): another memory size, so another GPU than the catalog thinks, and
    /// the device plugin would advertise resources no plan asks for.
    OtherName {
        /// Profile id.
        profile_id: u32,
        /// Catalog name.
        catalog: String,
        /// NVML name.
        nvml: String,
    },
}

impl Mismatch {
    /// Whether plans built from the catalog could be wrong on this GPU: the agent must not act.
    pub fn is_blocking(&self) -> bool {
        !matches!(self, Mismatch::UnknownToCatalog { .. } | Mismatch::Name { .. })
    }
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::NoProfiles => write!(f, "NVML reports no GPU-instance profiles (is MIG mode enabled?)"),
            Mismatch::MissingInNvml { profile, profile_id } => {
                write!(
                    f,
                    "catalog profile {profile} (id {profile_id}) is not reported by NVML"
                )
            }
            Mismatch::UnknownToCatalog { profile_id, name } => {
                write!(
                    f,
                    "NVML profile id {profile_id} ({}) is not in the catalog",
                    name.as_deref().unwrap_or("unnamed")
                )
            }
            Mismatch::Placements {
                profile,
                catalog,
                nvml,
            } => {
                write!(
                    f,
                    "{profile}: catalog placements {catalog:?}, NVML placements {nvml:?} (start, size)"
                )
            }
            Mismatch::ComputeSlices {
                profile,
                catalog,
                nvml,
            } => {
                write!(f, "{profile}: catalog has {catalog} compute slices, NVML {nvml}")
            }
            Mismatch::MaxInstances {
                profile,
                catalog,
                nvml,
            } => {
                write!(f, "{profile}: catalog allows {catalog} instances, NVML {nvml}")
            }
            Mismatch::Name {
                profile_id,
                catalog,
                nvml,
            } => {
                write!(
                    f,
                    "profile id {profile_id}: catalog calls it {catalog}, NVML {nvml}"
                )
            }
            Mismatch::OtherName {
                profile_id,
                catalog,
                nvml,
            } => {
                write!(
                    f,
                    "profile id {profile_id}: catalog says {catalog}, NVML {nvml}, which is not one of its names: another GPU than the catalog thinks (the device plugin would advertise nvidia.com/mig-{})",
                    nvml.replace('+', ".")
                )
            }
        }
    }
}

/// The outcome of a cross-check.
#[derive(Clone, Debug, Serialize)]
pub struct CrossCheck {
    /// Model the GPU was identified as.
    pub model: String,
    /// Where the observation came from.
    pub origin: String,
    /// Every difference found.
    pub mismatches: Vec<Mismatch>,
}

impl CrossCheck {
    /// Whether the agent may act on this GPU.
    pub fn is_consistent(&self) -> bool {
        !self.mismatches.iter().any(Mismatch::is_blocking)
    }
}

/// Identify the GPU (by NVML name, then PCI id) and compare its profiles with the catalog.
pub fn cross_check(catalog: &Catalog, source: &dyn ProfileSource) -> Result<CrossCheck, CrossCheckError> {
    let gpu = source.observe()?;
    let model = catalog.by_nvml_name(&gpu.name).or_else(|e| {
        gpu.pci_device_id
            .map_or(Err(e), |id| catalog.by_pci_device_id(id))
    })?;
    Ok(CrossCheck {
        model: model.key.clone(),
        origin: gpu.origin.clone(),
        mismatches: compare(model, &gpu),
    })
}

/// Errors of [`cross_check`].
#[derive(Debug, Error)]
pub enum CrossCheckError {
    /// The GPU could not be read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The GPU is not a known model.
    #[error(transparent)]
    Model(#[from] CatalogError),
}

/// Compare one observed GPU with one model.
pub fn compare(model: &GpuModel, gpu: &ObservedGpu) -> Vec<Mismatch> {
    if gpu.profiles.is_empty() {
        return vec![Mismatch::NoProfiles];
    }
    let mut out = Vec::new();
    for p in &model.profiles {
        let Some(o) = gpu.profiles.iter().find(|o| o.profile_id == p.profile_id) else {
            out.push(Mismatch::MissingInNvml {
                profile: p.name.clone(),
                profile_id: p.profile_id,
            });
            continue;
        };
        if let Some(n) = &o.name
            && n.trim_start_matches("MIG ") != p.name
        {
            let nvml = n.trim_start_matches("MIG ").to_string();
            let (profile_id, catalog) = (p.profile_id, p.name.clone());
            out.push(if p.aliases.contains(&nvml) {
                Mismatch::Name {
                    profile_id,
                    catalog,
                    nvml,
                }
            } else {
                Mismatch::OtherName {
                    profile_id,
                    catalog,
                    nvml,
                }
            });
        }
        if o.slice_count != u32::from(p.compute_slices) {
            out.push(Mismatch::ComputeSlices {
                profile: p.name.clone(),
                catalog: u32::from(p.compute_slices),
                nvml: o.slice_count,
            });
        }
        if !model.nvml_unreliable_instance_counts && o.instance_count != u32::from(p.max_instances) {
            out.push(Mismatch::MaxInstances {
                profile: p.name.clone(),
                catalog: u32::from(p.max_instances),
                nvml: o.instance_count,
            });
        }
        let mut catalog: Vec<(u32, u32)> = p
            .starts
            .iter()
            .map(|s| (u32::from(*s), u32::from(p.memory_slices)))
            .collect();
        let mut nvml: Vec<(u32, u32)> = o.placements.iter().map(|x| (x.start, x.size)).collect();
        catalog.sort_unstable();
        nvml.sort_unstable();
        if catalog != nvml {
            out.push(Mismatch::Placements {
                profile: p.name.clone(),
                catalog,
                nvml,
            });
        }
    }
    for o in &gpu.profiles {
        if model.profile_by_id(o.profile_id).is_none() {
            out.push(Mismatch::UnknownToCatalog {
                profile_id: o.profile_id,
                name: o.name.clone(),
            });
        }
    }
    out
}

impl ObservedGpu {
    /// Build an observation from the text of `nvidia-smi mig -lgip` and `nvidia-smi mig -lgipp`
    /// for GPU `gpu_index` (other GPUs' rows are ignored).
    pub fn from_nvidia_smi(
        device_name: &str,
        gpu_index: u32,
        lgip: &str,
        lgipp: &str,
    ) -> Result<Self, SourceError> {
        let mut profiles: Vec<ObservedProfile> = Vec::new();
        for line in lgip.lines() {
            let cells: Vec<&str> = line.trim().trim_matches('|').split_whitespace().collect();
            // |   0  MIG 1g.5gb   19   7/7   4.75   No   14   0   0   |
            if cells.len() < 8 || cells[1] != "MIG" || cells[0].parse::<u32>().ok() != Some(gpu_index) {
                continue;
            }
            let bad = |what: &str| SourceError(format!("lgip row {line:?}: bad {what}"));
            let profile_id = cells[3].parse().map_err(|_| bad("profile id"))?;
            let total = cells[4]
                .split('/')
                .nth(1)
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| bad("instance count"))?;
            let gib: f64 = cells[5].parse().map_err(|_| bad("memory"))?;
            let slices = cells[2]
                .split('.')
                .next()
                .and_then(|g| g.strip_suffix('g'))
                .and_then(|g| g.parse().ok())
                .ok_or_else(|| bad("profile name"))?;
            profiles.push(ObservedProfile {
                profile_id,
                name: Some(cells[2].to_string()),
                slice_count: slices,
                instance_count: total,
                memory_mib: Some((gib * 1024.0).round() as u64),
                placements: Vec::new(),
            });
        }
        for line in lgipp.lines() {
            // GPU  0 Profile ID 19 Placements: {0,1,2,3,4,5,6}:1
            let Some(rest) = line.trim().strip_prefix("GPU") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            if words.next().and_then(|g| g.parse::<u32>().ok()) != Some(gpu_index) {
                continue;
            }
            let bad = || {
                SourceError(format!(
                    "lgipp row {line:?} is not `GPU n Profile ID p Placements: {{..}}:size`"
                ))
            };
            let id: u32 = rest
                .split("Profile ID")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)?;
            let set = rest
                .split('{')
                .nth(1)
                .and_then(|r| r.split_once('}'))
                .ok_or_else(bad)?;
            let size: u32 = set
                .1
                .trim()
                .trim_start_matches(':')
                .trim()
                .parse()
                .map_err(|_| bad())?;
            let starts: Vec<u32> = set
                .0
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse())
                .collect::<Result<_, _>>()
                .map_err(|_| bad())?;
            let placements = starts
                .into_iter()
                .map(|start| ObservedPlacement { start, size })
                .collect();
            match profiles.iter_mut().find(|p| p.profile_id == id) {
                Some(p) => p.placements = placements,
                None => {
                    return Err(SourceError(format!(
                        "lgipp lists profile id {id}, which lgip does not"
                    )));
                }
            }
        }
        Ok(ObservedGpu {
            name: device_name.to_string(),
            pci_device_id: None,
            origin: "nvidia-smi".into(),
            profiles,
        })
    }
}
