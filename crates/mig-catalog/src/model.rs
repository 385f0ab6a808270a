//! GPU models, their SKUs and MIG profiles, loaded from the catalog data file.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{LazyLock, OnceLock};

use serde::{Deserialize, Deserializer, Serialize};

use crate::enumerate::LayoutIndex;
use crate::error::CatalogError;

/// The catalog data shipped with the crate (`data/catalog.toml`).
pub const EMBEDDED_CATALOG: &str = include_str!("../data/catalog.toml");

static EMBEDDED: LazyLock<Result<Catalog, CatalogError>> =
    LazyLock::new(|| Catalog::from_toml_str(EMBEDDED_CATALOG));

/// How sure we are of a fact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Confidence {
    /// Stated by a primary NVIDIA source (MIG User Guide, NVML header, NVIDIA code or config, NVIDIA staff).
    Confirmed,
    /// Anything else: a third-party capture, the shared family pattern, or NVIDIA config counts only.
    Inferred,
}

/// Index of a profile within its model's profile list. Only meaningful together with that model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProfileIdx(pub u8);

/// One product (SKU) of a GPU model, as NVML, GPU Feature Discovery and PCI see it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sku {
    /// Human description of the variant.
    pub variant: String,
    /// NVML device name (`nvmlDeviceGetName`), where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvml_name: Option<String>,
    /// GPU Feature Discovery `nvidia.com/gpu.product` value (sanitised NVML name), where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_label: Option<String>,
    /// Names reported by old drivers (without the `NVIDIA ` prefix).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub legacy_names: Vec<String>,
    /// 32-bit NVML `pciDeviceId` (`device << 16 | 0x10DE`), as used by mig-parted `device-filter`.
    #[serde(deserialize_with = "de_pci_id", serialize_with = "ser_pci_id")]
    pub pci_device_id: u32,
    /// Total device memory in MiB, where recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Confidence in this row.
    pub confidence: Confidence,
    /// Keys into [`Catalog::sources`].
    pub sources: Vec<String>,
}

/// A GPU-instance profile of one model, with its placement slots.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Profile name as NVIDIA prints it (`3g.40gb`, `1g.10gb+me`).
    pub name: String,
    /// NVML GPU-instance profile ID (`nvidia-smi mig -lgip` ID column); device-specific.
    pub profile_id: u32,
    /// `NVML_GPU_INSTANCE_PROFILE_*` index passed to `nvmlDeviceGetGpuInstanceProfileInfo`.
    pub nvml_index: u32,
    /// Compute (SM) slices.
    pub compute_slices: u8,
    /// Memory slices; also the size of every placement.
    pub memory_slices: u8,
    /// Most instances of this profile on one GPU.
    pub max_instances: u8,
    /// Whether this is a `+me` profile holding the GPU's single set of media engines.
    #[serde(default)]
    pub media_extensions: bool,
    /// First memory slice of each allowed placement.
    pub starts: Vec<u8>,
    /// Instance memory in MiB (informative; NVML is authoritative at runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// SM count (informative).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_count: Option<u32>,
    /// Minimum driver branch for this profile, when above the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_driver: Option<u32>,
    /// Other names seen for this profile in the wild (e.g. `7g.79gb`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Confidence in name, slices, max_instances, profile_id and starts.
    pub confidence: Confidence,
    /// Confidence in memory_mib and sm_count.
    pub memory_confidence: Confidence,
    /// Keys into [`Catalog::sources`].
    pub sources: Vec<String>,
}

impl Profile {
    /// Device-plugin resource name under the mixed strategy: `nvidia.com/mig-1g.10gb.me`.
    pub fn resource_name(&self) -> String {
        format!("nvidia.com/mig-{}", self.name.replace('+', "."))
    }
}

/// A set of profiles that may only appear together from a given driver branch on.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverGate {
    /// Profile names that, all present on one GPU, trigger the gate.
    pub profiles: Vec<String>,
    /// Minimum driver branch (e.g. 510 for R510).
    pub min_driver: u32,
    /// Confidence in this rule.
    pub confidence: Confidence,
    /// Keys into [`Catalog::sources`].
    pub sources: Vec<String>,
}

/// A MIG-capable GPU model: SKUs that share one geometry.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuModel {
    /// Stable key (`a100-80gb`).
    pub key: String,
    /// Human name.
    pub display_name: String,
    /// GPU architecture (`ampere`, `hopper`, `blackwell`).
    pub architecture: String,
    /// Compute slices of the whole GPU (7, or 4 on A30).
    pub compute_slices: u8,
    /// Memory slices of the whole GPU (8, or 4 on A30).
    pub memory_slices: u8,
    /// Minimum driver branch for MIG on this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_driver: Option<u32>,
    /// NVIDIA's `all-balanced` mig-parted counts for this model.
    pub all_balanced: BTreeMap<String, u8>,
    /// Keys into [`Catalog::sources`].
    pub sources: Vec<String>,
    /// Caveats worth knowing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// NVML is known to report wrong `instanceCount`s on this model (A30: NVIDIA/mig-parted
    /// `pkg/mig/discovery/discovery.go` hard-codes them), so the NVML cross-check skips that field.
    #[serde(default)]
    pub nvml_unreliable_instance_counts: bool,
    /// Driver-version rules on combinations of profiles.
    #[serde(default, rename = "gate", skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<DriverGate>,
    /// Products with this geometry.
    #[serde(rename = "sku")]
    pub skus: Vec<Sku>,
    /// GPU-instance profiles, in data-file order; [`ProfileIdx`] indexes this list.
    #[serde(rename = "profile")]
    pub profiles: Vec<Profile>,
    #[serde(skip)]
    pub(crate) index: OnceLock<LayoutIndex>,
}

impl GpuModel {
    /// The profile at `idx`.
    ///
    /// Returns `None` when `idx` belongs to another model with more profiles.
    pub fn profile(&self, idx: ProfileIdx) -> Option<&Profile> {
        self.profiles.get(usize::from(idx.0))
    }

    /// Iterate over `(index, profile)`.
    pub fn profiles_indexed(&self) -> impl Iterator<Item = (ProfileIdx, &Profile)> {
        self.profiles
            .iter()
            .enumerate()
            .map(|(i, p)| (ProfileIdx(i as u8), p))
    }

    /// Find a profile by name, alias, or device-plugin resource name
    /// (`3g.40gb`, `7g.79gb`, `mig-1g.10gb.me`, `nvidia.com/mig-1g.10gb.me`).
    pub fn profile_by_name(&self, name: &str) -> Option<ProfileIdx> {
        let bare = name.strip_prefix("nvidia.com/").unwrap_or(name);
        let bare = bare.strip_prefix("mig-").unwrap_or(bare);
        let find = |n: &str| {
            self.profiles_indexed()
                .find(|(_, p)| p.name == n || p.aliases.iter().any(|a| a == n))
                .map(|(i, _)| i)
        };
        find(bare).or_else(|| {
            // Resource names replace '+' by '.': "1g.10gb.me" is "1g.10gb+me".
            let (head, tail) = bare.rsplit_once('.')?;
            if tail.chars().all(|c| c.is_ascii_alphabetic()) && !tail.ends_with("gb") {
                find(&format!("{head}+{tail}"))
            } else {
                None
            }
        })
    }

    /// Find a profile by its NVML profile ID.
    pub fn profile_by_id(&self, profile_id: u32) -> Option<ProfileIdx> {
        self.profiles_indexed()
            .find(|(_, p)| p.profile_id == profile_id)
            .map(|(i, _)| i)
    }

    /// Name of the profile at `idx`, or `#idx` if it does not exist in this model.
    pub fn profile_name(&self, idx: ProfileIdx) -> String {
        self.profile(idx)
            .map_or_else(|| format!("#{}", idx.0), |p| p.name.clone())
    }

    /// PCI device IDs of every SKU.
    pub fn pci_device_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.skus.iter().map(|s| s.pci_device_id)
    }

    /// The GFD product labels of every SKU that has one.
    pub fn product_labels(&self) -> impl Iterator<Item = &str> {
        self.skus.iter().filter_map(|s| s.product_label.as_deref())
    }

    /// Bitmask of all memory slices.
    pub fn full_mask(&self) -> u32 {
        (1u32 << self.memory_slices) - 1
    }
}

impl fmt::Display for GpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

/// All known GPU models.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Version of the data-file schema.
    pub schema_version: u32,
    /// Citations, by key.
    pub sources: BTreeMap<String, String>,
    /// The models.
    #[serde(rename = "model")]
    pub models: Vec<GpuModel>,
}

/// What a GPU Feature Discovery `nvidia.com/gpu.product` label says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProductLabel<'a> {
    /// The product without suffixes (`NVIDIA-A100-SXM4-40GB`).
    pub base: &'a str,
    /// The MIG profile of the single strategy (`1g.5gb`, or `INVALID`), if any.
    pub mig_profile: Option<&'a str>,
    /// Whether the `-SHARED` suffix (sharing with renamed resources) was present.
    pub shared: bool,
}

impl<'a> ProductLabel<'a> {
    /// Split a product label into its base and suffixes.
    pub fn parse(label: &'a str) -> Self {
        let label = label.trim();
        let (label, shared) = match label.strip_suffix("-SHARED") {
            Some(rest) => (rest, true),
            None => (label, false),
        };
        match label.find("-MIG-") {
            Some(i) => ProductLabel {
                base: &label[..i],
                mig_profile: Some(&label[i + 5..]),
                shared,
            },
            None => ProductLabel {
                base: label,
                mig_profile: None,
                shared,
            },
        }
    }
}

/// GPU Feature Discovery's `sanitise()`: drop characters outside `[A-Za-z0-9-_. ]`, then turn runs of
/// whitespace into `-` (NVIDIA/k8s-device-plugin `internal/lm/resource.go`).
pub fn sanitise_product_name(name: &str) -> String {
    let kept: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '))
        .collect();
    kept.split_whitespace().collect::<Vec<_>>().join("-")
}

/// Parse a PCI device ID: `0x20B010DE` (NVML 32-bit form), `0x20B0` or `20b0` (device only).
pub fn parse_pci_device_id(text: &str) -> Option<u32> {
    let t = text.trim();
    let hex = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    if hex.is_empty() || hex.len() > 8 {
        return None;
    }
    let v = u32::from_str_radix(hex, 16).ok()?;
    Some(if hex.len() <= 4 { (v << 16) | 0x10DE } else { v })
}

fn de_pci_id<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let s = String::deserialize(d)?;
    parse_pci_device_id(&s).ok_or_else(|| serde::de::Error::custom(format!("bad PCI device id {s:?}")))
}

fn ser_pci_id<S: serde::Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("0x{v:08X}"))
}

impl Catalog {
    /// The catalog embedded in this crate.
    ///
    /// # Panics
    /// Only if the embedded data file is invalid, which this crate's tests rule out before release.
    pub fn embedded() -> &'static Catalog {
        match &*EMBEDDED {
            Ok(c) => c,
            Err(e) => panic!("embedded catalog data is invalid (a build defect): {e}"),
        }
    }

    /// Parse and check a catalog from TOML text.
    pub fn from_toml_str(text: &str) -> Result<Catalog, CatalogError> {
        let catalog: Catalog = toml::from_str(text).map_err(|e| CatalogError::Data {
            message: e.to_string(),
        })?;
        catalog.check()?;
        Ok(catalog)
    }

    /// Model by key (`a100-80gb`).
    pub fn model(&self, key: &str) -> Option<&GpuModel> {
        self.models.iter().find(|m| m.key.eq_ignore_ascii_case(key))
    }

    /// Keys of all models.
    pub fn model_keys(&self) -> Vec<&str> {
        self.models.iter().map(|m| m.key.as_str()).collect()
    }

    fn unknown(&self, query: &str, kind: &'static str) -> CatalogError {
        CatalogError::UnknownModel {
            query: query.to_string(),
            kind,
            known: self
                .models
                .iter()
                .flat_map(|m| m.product_labels().map(str::to_string).collect::<Vec<_>>())
                .collect(),
        }
    }

    /// Model by GPU Feature Discovery `nvidia.com/gpu.product` label, with or without the
    /// `-MIG-<profile>` and `-SHARED` suffixes; legacy driver names are accepted too.
    pub fn by_product_label(&self, label: &str) -> Result<&GpuModel, CatalogError> {
        let base = ProductLabel::parse(label).base;
        self.models
            .iter()
            .find(|m| {
                m.skus.iter().any(|s| {
                    s.product_label
                        .as_deref()
                        .is_some_and(|l| l.eq_ignore_ascii_case(base))
                        || s.nvml_name
                            .as_deref()
                            .is_some_and(|n| sanitise_product_name(n).eq_ignore_ascii_case(base))
                        || s.legacy_names
                            .iter()
                            .any(|n| sanitise_product_name(n).eq_ignore_ascii_case(base))
                })
            })
            .ok_or_else(|| self.unknown(label, "gpu.product label"))
    }

    /// Model by NVML device name (`NVIDIA H100 80GB HBM3`).
    pub fn by_nvml_name(&self, name: &str) -> Result<&GpuModel, CatalogError> {
        let wanted = sanitise_product_name(name);
        self.by_product_label(&wanted)
            .map_err(|_| self.unknown(name, "NVML device name"))
    }

    /// Model by NVML PCI device ID (32-bit `0x233010DE` or 16-bit `0x2330`).
    pub fn by_pci_device_id(&self, id: u32) -> Result<&GpuModel, CatalogError> {
        let id = if id <= 0xFFFF { (id << 16) | 0x10DE } else { id };
        self.models
            .iter()
            .find(|m| m.pci_device_ids().any(|p| p == id))
            .ok_or_else(|| self.unknown(&format!("0x{id:08X}"), "PCI device id"))
    }

    /// Model by any identifier a user might type: model key, product label, NVML name or PCI id.
    pub fn lookup(&self, query: &str) -> Result<&GpuModel, CatalogError> {
        if let Some(m) = self.model(query.trim()) {
            return Ok(m);
        }
        if let Ok(m) = self.by_product_label(query) {
            return Ok(m);
        }
        if let Ok(m) = self.by_nvml_name(query) {
            return Ok(m);
        }
        if let Some(id) = parse_pci_device_id(query)
            && let Ok(m) = self.by_pci_device_id(id)
        {
            return Ok(m);
        }
        Err(self.unknown(query, "GPU"))
    }

    /// Check the data's internal consistency: unique names, placements inside the GPU, known sources,
    /// unique identities across models.
    fn check(&self) -> Result<(), CatalogError> {
        let bad = |model: &str, message: String| CatalogError::Data {
            message: format!("model {model}: {message}"),
        };
        let mut seen_ids = BTreeMap::new();
        let mut seen_labels = BTreeMap::new();
        for m in &self.models {
            if !(1..=16).contains(&m.memory_slices) || m.compute_slices == 0 {
                return Err(bad(
                    &m.key,
                    format!("{} memory slices is out of range", m.memory_slices),
                ));
            }
            if m.profiles.is_empty() || m.profiles.len() > 32 {
                return Err(bad(&m.key, "must have between 1 and 32 profiles".into()));
            }
            if self.models.iter().filter(|o| o.key == m.key).count() > 1 {
                return Err(bad(&m.key, "duplicate model key".into()));
            }
            let cite = |what: &str, sources: &[String]| -> Result<(), CatalogError> {
                if sources.is_empty() {
                    return Err(bad(&m.key, format!("{what} has no source")));
                }
                match sources.iter().find(|s| !self.sources.contains_key(*s)) {
                    Some(s) => Err(bad(&m.key, format!("{what} cites unknown source {s}"))),
                    None => Ok(()),
                }
            };
            cite("model", &m.sources)?;
            for s in &m.skus {
                cite(&format!("sku {}", s.variant), &s.sources)?;
                if let Some(other) = seen_ids.insert(s.pci_device_id, &m.key) {
                    return Err(bad(
                        &m.key,
                        format!("PCI id 0x{:08X} also belongs to {other}", s.pci_device_id),
                    ));
                }
                if let Some(l) = &s.product_label
                    && let Some(other) = seen_labels.insert(l.to_ascii_lowercase(), &m.key)
                {
                    return Err(bad(&m.key, format!("product label {l} also belongs to {other}")));
                }
            }
            for (i, p) in m.profiles.iter().enumerate() {
                cite(&format!("profile {}", p.name), &p.sources)?;
                if m.profiles[..i]
                    .iter()
                    .any(|q| q.name == p.name || q.profile_id == p.profile_id)
                {
                    return Err(bad(
                        &m.key,
                        format!("profile {} repeats a name or profile id", p.name),
                    ));
                }
                if p.max_instances == 0
                    || p.starts.is_empty()
                    || p.memory_slices == 0
                    || p.compute_slices == 0
                {
                    return Err(bad(
                        &m.key,
                        format!("profile {} has an empty size, count or placement list", p.name),
                    ));
                }
                if let Some(s) = p.starts.iter().find(|s| **s + p.memory_slices > m.memory_slices) {
                    return Err(bad(
                        &m.key,
                        format!("profile {} placement {s} runs past the last slice", p.name),
                    ));
                }
                if p.name.contains(['@', ',', ':', ' ']) {
                    return Err(bad(
                        &m.key,
                        format!("profile name {:?} has a reserved character", p.name),
                    ));
                }
            }
            for name in m
                .all_balanced
                .keys()
                .chain(m.gates.iter().flat_map(|g| g.profiles.iter()))
            {
                if m.profile_by_name(name).is_none() {
                    return Err(bad(&m.key, format!("names unknown profile {name}")));
                }
            }
            for g in &m.gates {
                cite("driver gate", &g.sources)?;
            }
        }
        Ok(())
    }
}
