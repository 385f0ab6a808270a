//! NVIDIA mig-parted configuration files (`version: v1`, `mig-configs`): render them for per-GPU
//! layouts, parse existing ones (such as the GPU operator's `default-mig-parted-config`), and say
//! whether each is realisable on a model.
//!
//! mig-parted configs carry profile *counts* only, no placements (NVIDIA/mig-parted
//! `api/spec/v1/spec.go`); mig-parted rebuilds a changed GPU whole and picks placements itself.
//! So a rendered config fixes each GPU's count vector, and [`GpuModel::arrange`] says which placed
//! layout realises it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::error::{ConfigError, InvalidLayout};
use crate::layout::{Counts, Layout};
use crate::model::{GpuModel, parse_pci_device_id};

/// Prefix of every config name mig-autoscaler generates.
pub const CONFIG_NAME_PREFIX: &str = "mig-autoscaler-";

/// A whole mig-parted config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigPartedConfig {
    /// Always `v1`.
    pub version: String,
    /// Named configs; a node selects one with the `nvidia.com/mig.config` label.
    #[serde(rename = "mig-configs")]
    pub mig_configs: BTreeMap<String, Vec<DeviceConfig>>,
}

/// Which GPUs of a node an entry applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "DevicesRepr", into = "DevicesRepr")]
pub enum Devices {
    /// `devices: all`.
    All,
    /// `devices: [0, 1]`: GPU indices on the node.
    List(Vec<u32>),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum DevicesRepr {
    Word(String),
    List(Vec<u32>),
}

/// A `devices` word other than `all`.
#[derive(Debug, thiserror::Error)]
#[error("devices must be \"all\" or a list of GPU indices, not {0:?}")]
pub struct BadDevices(String);

impl TryFrom<DevicesRepr> for Devices {
    type Error = BadDevices;
    fn try_from(r: DevicesRepr) -> Result<Self, BadDevices> {
        match r {
            DevicesRepr::Word(w) if w == "all" => Ok(Devices::All),
            DevicesRepr::Word(w) => Err(BadDevices(w)),
            DevicesRepr::List(l) => Ok(Devices::List(l)),
        }
    }
}

impl From<Devices> for DevicesRepr {
    fn from(d: Devices) -> Self {
        match d {
            Devices::All => DevicesRepr::Word("all".into()),
            Devices::List(l) => DevicesRepr::List(l),
        }
    }
}

impl Devices {
    /// Whether GPU `index` is selected.
    pub fn includes(&self, index: u32) -> bool {
        match self {
            Devices::All => true,
            Devices::List(l) => l.contains(&index),
        }
    }
}

/// `device-filter`: one PCI device id or several.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeviceFilter {
    /// `device-filter: "0x20B710DE"`.
    One(String),
    /// `device-filter: ["0x233010DE", ...]`.
    Many(Vec<String>),
}

impl DeviceFilter {
    /// The ids as written.
    pub fn ids(&self) -> Vec<&str> {
        match self {
            DeviceFilter::One(s) => vec![s.as_str()],
            DeviceFilter::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// One entry of a named config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Only GPUs with one of these PCI ids; all GPUs when absent.
    #[serde(rename = "device-filter", default, skip_serializing_if = "Option::is_none")]
    pub device_filter: Option<DeviceFilter>,
    /// Which GPU indices.
    pub devices: Devices,
    /// MIG mode.
    #[serde(rename = "mig-enabled")]
    pub mig_enabled: bool,
    /// Profile name → count. Absent with MIG off; `{}` means MIG on without instances.
    #[serde(rename = "mig-devices", default, skip_serializing_if = "Option::is_none")]
    pub mig_devices: Option<BTreeMap<String, u32>>,
}

/// Problems reading a mig-parted config.
#[derive(Debug, Error)]
pub enum MigPartedError {
    /// Not YAML, or not of the mig-parted shape.
    #[error("not a mig-parted config: {0}")]
    Syntax(String),
    /// The version is not `v1`.
    #[error("unsupported mig-parted config version {0:?} (only v1 is known)")]
    Version(String),
    /// A ConfigMap without a config in its data.
    #[error("ConfigMap has no mig-parted config under data (looked for {0})")]
    NoConfigInConfigMap(String),
}

/// What mig-autoscaler wants one GPU of a node to be.
#[derive(Clone, Copy, Debug)]
pub enum GpuTarget<'a> {
    /// MIG mode off (whole GPU).
    MigDisabled,
    /// MIG on, with this layout on this model.
    Mig {
        /// The GPU's model.
        model: &'a GpuModel,
        /// The layout (must be valid).
        layout: &'a Layout,
    },
}

impl DeviceConfig {
    fn for_target(index: u32, target: GpuTarget<'_>) -> DeviceConfig {
        match target {
            GpuTarget::MigDisabled => DeviceConfig {
                device_filter: None,
                devices: Devices::List(vec![index]),
                mig_enabled: false,
                mig_devices: None,
            },
            GpuTarget::Mig { model, layout } => {
                let counts = model.counts(layout);
                let devices = model
                    .profiles_indexed()
                    .filter(|(i, _)| counts.get(*i) > 0)
                    .map(|(i, p)| (p.name.clone(), u32::from(counts.get(i))))
                    .collect();
                DeviceConfig {
                    device_filter: None,
                    devices: Devices::List(vec![index]),
                    mig_enabled: true,
                    mig_devices: Some(devices),
                }
            }
        }
    }

    /// Whether this entry applies to GPU `index` of the given model (device filter and index).
    pub fn applies_to(&self, model: &GpuModel, index: u32) -> bool {
        self.devices.includes(index) && self.matches_model(model)
    }

    /// Whether the device filter admits the model (no filter admits every model).
    pub fn matches_model(&self, model: &GpuModel) -> bool {
        match &self.device_filter {
            None => true,
            Some(f) => f
                .ids()
                .iter()
                .filter_map(|s| parse_pci_device_id(s))
                .any(|id| model.pci_device_ids().any(|m| m == id)),
        }
    }

    /// The count vector this entry asks of a GPU of `model`: `Ok(None)` for MIG off, an error naming
    /// the first key the model cannot honour.
    pub fn counts_on(&self, model: &GpuModel) -> Result<Option<Counts>, ConfigError> {
        if !self.mig_enabled {
            return Ok(None);
        }
        let mut counts = Counts::zero(model.profiles.len());
        for (name, n) in self.mig_devices.iter().flatten() {
            if is_compute_instance_key(name) {
                return Err(ConfigError::ComputeInstance { key: name.clone() });
            }
            let idx = model
                .profile_by_name(name)
                .ok_or_else(|| ConfigError::UnknownProfile {
                    profile: name.clone(),
                    model: model.key.clone(),
                    known: model.profiles.iter().map(|p| p.name.clone()).collect(),
                })?;
            let n = u8::try_from(*n).map_err(|_| ConfigError::CountOutOfRange {
                profile: name.clone(),
                count: *n,
            })?;
            let slot = &mut counts.0[usize::from(idx.0)];
            *slot = slot.saturating_add(n);
        }
        Ok(Some(counts))
    }
}

/// `1c.3g.20gb`-style keys name compute instances inside a GPU instance.
fn is_compute_instance_key(name: &str) -> bool {
    let mut parts = name.split('.');
    matches!((parts.next(), parts.next()), (Some(c), Some(g))
        if c.ends_with('c') && c[..c.len() - 1].parse::<u32>().is_ok() && g.ends_with('g'))
}

/// The entries and deterministic name of one node's config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// `mig-autoscaler-<12 hex digits of the SHA-256 of the entries>`: equal content, equal name.
    pub name: String,
    /// One entry per group of GPUs with the same target.
    pub entries: Vec<DeviceConfig>,
}

/// Render the mig-parted config for a node's GPUs (index → target). Every layout is validated first;
/// an invalid one is an error, never rendered. GPUs with the same target share an entry.
pub fn render_node_config(gpus: &[(u32, GpuTarget<'_>)]) -> Result<NodeConfig, InvalidLayout> {
    for (_, t) in gpus {
        if let GpuTarget::Mig { model, layout } = t {
            model.validate(layout)?;
        }
    }
    let mut sorted: Vec<(u32, DeviceConfig)> = gpus
        .iter()
        .map(|(i, t)| (*i, DeviceConfig::for_target(*i, *t)))
        .collect();
    sorted.sort_by_key(|(i, _)| *i);
    let mut entries: Vec<DeviceConfig> = Vec::new();
    for (index, entry) in sorted {
        match entries
            .iter_mut()
            .find(|e| e.mig_enabled == entry.mig_enabled && e.mig_devices == entry.mig_devices)
        {
            Some(e) => {
                if let Devices::List(l) = &mut e.devices
                    && !l.contains(&index)
                {
                    l.push(index);
                }
            }
            None => entries.push(entry),
        }
    }
    let body = serde_yaml::to_string(&entries).unwrap_or_default();
    let digest = Sha256::digest(body.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    Ok(NodeConfig {
        name: format!("{CONFIG_NAME_PREFIX}{hex}"),
        entries,
    })
}

impl MigPartedConfig {
    /// An empty v1 config.
    pub fn new() -> Self {
        MigPartedConfig {
            version: "v1".into(),
            mig_configs: BTreeMap::new(),
        }
    }

    /// Add (or replace) a node config.
    pub fn insert(&mut self, node: NodeConfig) {
        self.mig_configs.insert(node.name, node.entries);
    }

    /// Parse a mig-parted config, or a Kubernetes ConfigMap holding one (under `data.config.yaml`, or
    /// its only data key).
    pub fn from_yaml(text: &str) -> Result<Self, MigPartedError> {
        let value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| MigPartedError::Syntax(e.to_string()))?;
        if value.get("kind").and_then(|k| k.as_str()) == Some("ConfigMap") {
            let data = value.get("data").and_then(|d| d.as_mapping());
            let body = data.and_then(|d| {
                d.get("config.yaml")
                    .or_else(|| if d.len() == 1 { d.values().next() } else { None })
                    .and_then(|v| v.as_str())
            });
            return match body {
                Some(b) => Self::from_yaml(b),
                None => Err(MigPartedError::NoConfigInConfigMap(
                    "config.yaml or a single key".into(),
                )),
            };
        }
        let config: MigPartedConfig =
            serde_yaml::from_value(value).map_err(|e| MigPartedError::Syntax(e.to_string()))?;
        if config.version != "v1" {
            return Err(MigPartedError::Version(config.version));
        }
        Ok(config)
    }

    /// The config as YAML.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }

    /// What config `name` asks of GPU `index` of `model`: `Ok(None)` = MIG off; errors say why the
    /// config cannot apply (unknown name, no entry for this GPU, unknown profile).
    pub fn counts_for_gpu(
        &self,
        name: &str,
        model: &GpuModel,
        index: u32,
    ) -> Result<Option<Counts>, ConfigError> {
        let entries = self.mig_configs.get(name).ok_or_else(|| ConfigError::NoConfig {
            name: name.to_string(),
        })?;
        let entry = entries
            .iter()
            .find(|e| e.applies_to(model, index))
            .ok_or_else(|| ConfigError::NoEntry {
                name: name.to_string(),
                gpu: index,
                model: model.key.clone(),
            })?;
        entry.counts_on(model)
    }

    /// For every named config, whether it can be realised on a GPU of `model`.
    pub fn check_on(&self, model: &GpuModel) -> Vec<ConfigVerdict> {
        self.mig_configs
            .iter()
            .map(|(name, entries)| {
                let applicable: Vec<&DeviceConfig> =
                    entries.iter().filter(|e| e.matches_model(model)).collect();
                let verdict = if applicable.is_empty() {
                    Verdict::NotApplicable
                } else {
                    let mut layouts = Vec::new();
                    let mut reasons = Vec::new();
                    for e in applicable {
                        match e
                            .counts_on(model)
                            .map_err(|e| e.to_string())
                            .and_then(|c| match c {
                                None => Ok(None),
                                Some(c) => model.arrange(&c).map(Some).map_err(|e| e.reason),
                            }) {
                            Ok(layout) => layouts.push((e.devices.clone(), layout)),
                            Err(r) => reasons.push(r),
                        }
                    }
                    if reasons.is_empty() {
                        Verdict::Realisable { layouts }
                    } else {
                        Verdict::Unrealisable { reasons }
                    }
                };
                ConfigVerdict {
                    name: name.clone(),
                    verdict,
                }
            })
            .collect()
    }
}

impl Default for MigPartedConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a named config fits a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigVerdict {
    /// Config name.
    pub name: String,
    /// The answer.
    pub verdict: Verdict,
}

/// Realisability of a config on a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every entry that applies can be placed; `None` = MIG off for those devices.
    Realisable {
        /// Per applicable entry: its devices and one arrangement.
        layouts: Vec<(Devices, Option<Layout>)>,
    },
    /// The device filters exclude this model.
    NotApplicable,
    /// Some applicable entry cannot be realised.
    Unrealisable {
        /// Why, one reason per failing entry.
        reasons: Vec<String>,
    },
}
