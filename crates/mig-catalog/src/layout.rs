//! Layouts: sets of GPU instances at explicit placements on one GPU, and the rules they must obey.
//!
//! The rule (shared/research/mig-domain.md §1): each instance sits at one of its profile's placements;
//! no two instances share a memory slice; per-profile counts stay within `max_instances`; at most one
//! media-extension (`+me`) instance per GPU, since the GPU has one set of OFA/JPEG engines; driver gates.
//! Rules 1 and 2 already bound the compute slices, so there is no separate compute rule.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{InvalidLayout, ParseLayoutError};
use crate::model::{GpuModel, ProfileIdx};

/// One GPU instance: a profile at a placement. Orders by start, then profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Instance {
    /// First memory slice.
    pub start: u8,
    /// The profile, as an index into the model's profiles.
    pub profile: ProfileIdx,
}

impl Instance {
    /// An instance of `profile` starting at memory slice `start`.
    pub fn new(profile: ProfileIdx, start: u8) -> Self {
        Instance { start, profile }
    }
}

/// One GPU instance in words: a profile by its catalog name at a placement (`3g.40gb@4`). What
/// crosses a process boundary or reaches people (nvidia-smi and NVML calls, plans, the web view);
/// [`Instance`] is the same within one model, and [`GpuModel::name_instance`] and
/// [`GpuModel::resolve_instance`] convert between them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NamedInstance {
    /// Profile name (`3g.40gb`).
    pub profile: String,
    /// First memory slice.
    pub start: u8,
}

impl NamedInstance {
    /// `profile` at memory slice `start`.
    pub fn new(profile: impl Into<String>, start: u8) -> Self {
        NamedInstance {
            profile: profile.into(),
            start,
        }
    }
}

impl fmt::Display for NamedInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.profile, self.start)
    }
}

/// A set of instances on one GPU, kept sorted (canonical order: by start, then profile).
///
/// A `Layout` is only a set; whether it is valid depends on the model ([`GpuModel::validate`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Layout(Vec<Instance>);

impl Layout {
    /// The empty layout (MIG enabled, no instances).
    pub fn empty() -> Self {
        Layout(Vec::new())
    }

    /// A layout from instances in any order.
    pub fn new(instances: impl IntoIterator<Item = Instance>) -> Self {
        let mut v: Vec<Instance> = instances.into_iter().collect();
        v.sort_unstable();
        Layout(v)
    }

    /// The instances, in canonical order.
    pub fn instances(&self) -> &[Instance] {
        &self.0
    }

    /// Number of instances.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no instances.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `instance` is part of this layout.
    pub fn contains(&self, instance: &Instance) -> bool {
        self.0.binary_search(instance).is_ok()
    }

    /// Whether every instance of `other` is in this layout at the same placement.
    pub fn contains_all(&self, other: &Layout) -> bool {
        other.0.iter().all(|i| self.contains(i))
    }

    /// This layout plus one instance.
    pub fn with(&self, instance: Instance) -> Layout {
        let mut v = self.0.clone();
        let at = v.binary_search(&instance).unwrap_or_else(|e| e);
        v.insert(at, instance);
        Layout(v)
    }

    /// Instances of this layout that are not in `other`.
    pub fn difference<'a>(&'a self, other: &'a Layout) -> impl Iterator<Item = &'a Instance> + 'a {
        self.0.iter().filter(move |i| !other.contains(i))
    }
}

impl FromIterator<Instance> for Layout {
    fn from_iter<T: IntoIterator<Item = Instance>>(iter: T) -> Self {
        Layout::new(iter)
    }
}

/// How many instances of each profile a layout has; indexed by [`ProfileIdx`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Counts(pub Vec<u8>);

impl Counts {
    /// All zero, for a model with `profiles` profiles.
    pub fn zero(profiles: usize) -> Self {
        Counts(vec![0; profiles])
    }

    /// Count of one profile.
    pub fn get(&self, p: ProfileIdx) -> u8 {
        self.0.get(usize::from(p.0)).copied().unwrap_or(0)
    }

    /// Total instances.
    pub fn total(&self) -> u32 {
        self.0.iter().map(|c| u32::from(*c)).sum()
    }

    /// Whether every count of `self` is at least that of `other`.
    pub fn covers(&self, other: &Counts) -> bool {
        (0..self.0.len().max(other.0.len())).all(|i| {
            let p = ProfileIdx(i as u8);
            self.get(p) >= other.get(p)
        })
    }
}

/// One broken rule, with the instances involved, in the model's own profile names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "kebab-case")]
pub enum Violation {
    /// The profile index does not exist on this model.
    UnknownProfile {
        /// The index.
        index: u8,
    },
    /// The instance does not start at one of its profile's placements.
    Placement {
        /// Profile name.
        profile: String,
        /// The start asked for.
        start: u8,
        /// Allowed starts.
        allowed: Vec<u8>,
    },
    /// Two instances share memory slices.
    Overlap {
        /// First instance, `profile@start`.
        first: String,
        /// Second instance, `profile@start`.
        second: String,
        /// The memory slices both would occupy.
        slices: Vec<u8>,
    },
    /// More instances of a profile than the GPU supports.
    MaxInstances {
        /// Profile name.
        profile: String,
        /// How many the layout has.
        count: usize,
        /// How many are allowed.
        max: u8,
    },
    /// More than one media-extension instance; the GPU has one set of media engines.
    MediaExtensions {
        /// The `+me` instances.
        instances: Vec<String>,
    },
    /// A driver older than some part of the layout needs.
    Driver {
        /// What needs the newer driver.
        needs: String,
        /// Minimum driver branch.
        min_driver: u32,
        /// The driver branch given.
        driver: u32,
    },
}

impl Violation {
    /// Short, bounded name of the rule, for metrics and machine-readable output.
    pub fn rule(&self) -> &'static str {
        match self {
            Violation::UnknownProfile { .. } => "unknown-profile",
            Violation::Placement { .. } => "placement",
            Violation::Overlap { .. } => "overlap",
            Violation::MaxInstances { .. } => "max-instances",
            Violation::MediaExtensions { .. } => "media-extensions",
            Violation::Driver { .. } => "driver",
        }
    }
}

fn slice_list(mask: u32) -> Vec<u8> {
    (0..32u8).filter(|i| mask & (1 << i) != 0).collect()
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::UnknownProfile { index } => {
                write!(f, "profile index {index} does not exist on this model")
            }
            Violation::Placement {
                profile,
                start,
                allowed,
            } => {
                write!(
                    f,
                    "{profile} cannot start at memory slice {start} (allowed starts: {allowed:?})"
                )
            }
            Violation::Overlap {
                first,
                second,
                slices,
            } => {
                write!(f, "{first} and {second} both occupy memory slice(s) {slices:?}")
            }
            Violation::MaxInstances { profile, count, max } => {
                write!(f, "{count} instances of {profile}, at most {max} allowed")
            }
            Violation::MediaExtensions { instances } => write!(
                f,
                "{} media-extension instances ({}), the GPU has one set of media engines",
                instances.len(),
                instances.join(", ")
            ),
            Violation::Driver {
                needs,
                min_driver,
                driver,
            } => {
                write!(
                    f,
                    "{needs} needs driver R{min_driver} or later, the node has R{driver}"
                )
            }
        }
    }
}

impl GpuModel {
    /// Memory-slice bitmask an instance occupies (empty if its profile does not exist here).
    pub fn instance_mask(&self, i: &Instance) -> u32 {
        match self.profile(i.profile) {
            Some(p) => {
                let size = u32::from(p.memory_slices);
                let start = u32::from(i.start);
                if start + size > 32 {
                    u32::MAX
                } else {
                    ((1u32 << size) - 1) << start
                }
            }
            None => 0,
        }
    }

    /// Memory slices occupied by a layout, as a bitmask.
    pub fn occupied_mask(&self, layout: &Layout) -> u32 {
        layout
            .instances()
            .iter()
            .fold(0, |m, i| m | self.instance_mask(i))
    }

    /// Free memory slices of a layout, in increasing order.
    pub fn free_slices(&self, layout: &Layout) -> Vec<u8> {
        slice_list(self.full_mask() & !self.occupied_mask(layout))
    }

    /// `profile@start`.
    pub fn format_instance(&self, i: &Instance) -> String {
        self.name_instance(i).to_string()
    }

    /// `i` in words: its profile's canonical name.
    pub fn name_instance(&self, i: &Instance) -> NamedInstance {
        NamedInstance::new(self.profile_name(i.profile), i.start)
    }

    /// `named` as an instance of this model, if it has the profile (aliases and resource names
    /// are accepted, as [`GpuModel::profile_by_name`] does). Placement is not checked.
    pub fn resolve_instance(&self, named: &NamedInstance) -> Option<Instance> {
        self.profile_by_name(&named.profile)
            .map(|p| Instance::new(p, named.start))
    }

    /// Canonical text form: `3g.40gb@0,2g.20gb@4,1g.10gb@6`; the empty layout is `empty`.
    pub fn format_layout(&self, layout: &Layout) -> String {
        if layout.is_empty() {
            return "empty".to_string();
        }
        layout
            .instances()
            .iter()
            .map(|i| self.format_instance(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Parse the canonical form (order, spaces, aliases and resource names are tolerated).
    /// Does not check validity: see [`GpuModel::validate`].
    pub fn parse_layout(&self, text: &str) -> Result<Layout, ParseLayoutError> {
        let err = |message: String| ParseLayoutError {
            model: self.key.clone(),
            text: text.to_string(),
            message,
        };
        let t = text.trim();
        if t.is_empty() || t.eq_ignore_ascii_case("empty") {
            return Ok(Layout::empty());
        }
        let mut v = Vec::new();
        for part in t.split(',') {
            let part = part.trim();
            let (name, start) = part.split_once('@').ok_or_else(|| {
                err(format!(
                    "{part:?} is not of the form <profile>@<start>, e.g. 3g.40gb@4"
                ))
            })?;
            let profile = self.profile_by_name(name.trim()).ok_or_else(|| {
                let known: Vec<&str> = self.profiles.iter().map(|p| p.name.as_str()).collect();
                err(format!(
                    "unknown profile {:?}; {} has {}",
                    name.trim(),
                    self.key,
                    known.join(", ")
                ))
            })?;
            let start: u8 = start.trim().parse().map_err(|_| {
                err(format!(
                    "start {:?} of {part:?} is not a memory-slice index",
                    start.trim()
                ))
            })?;
            v.push(Instance::new(profile, start));
        }
        Ok(Layout::new(v))
    }

    /// Profile counts of a layout.
    pub fn counts(&self, layout: &Layout) -> Counts {
        let mut c = Counts::zero(self.profiles.len());
        for i in layout.instances() {
            if let Some(slot) = c.0.get_mut(usize::from(i.profile.0)) {
                *slot = slot.saturating_add(1);
            }
        }
        c
    }

    /// Counts as text, `1g.10gb:2,3g.40gb:1` (zero counts left out; `none` when all are zero).
    pub fn format_counts(&self, counts: &Counts) -> String {
        let parts: Vec<String> = self
            .profiles_indexed()
            .filter(|(i, _)| counts.get(*i) > 0)
            .map(|(i, p)| format!("{}:{}", p.name, counts.get(i)))
            .collect();
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(",")
        }
    }

    /// Every rule the layout breaks, ignoring driver versions.
    pub fn violations(&self, layout: &Layout) -> Vec<Violation> {
        let mut out = Vec::new();
        let inst = layout.instances();
        for i in inst {
            match self.profile(i.profile) {
                None => out.push(Violation::UnknownProfile { index: i.profile.0 }),
                Some(p) if !p.starts.contains(&i.start) => out.push(Violation::Placement {
                    profile: p.name.clone(),
                    start: i.start,
                    allowed: p.starts.clone(),
                }),
                Some(_) => {}
            }
        }
        for (a, ia) in inst.iter().enumerate() {
            for ib in &inst[a + 1..] {
                let shared = self.instance_mask(ia) & self.instance_mask(ib) & self.full_mask();
                if shared != 0 {
                    out.push(Violation::Overlap {
                        first: self.format_instance(ia),
                        second: self.format_instance(ib),
                        slices: slice_list(shared),
                    });
                }
            }
        }
        let counts = self.counts(layout);
        for (idx, p) in self.profiles_indexed() {
            let n = usize::from(counts.get(idx));
            if n > usize::from(p.max_instances) {
                out.push(Violation::MaxInstances {
                    profile: p.name.clone(),
                    count: n,
                    max: p.max_instances,
                });
            }
        }
        let me: Vec<String> = inst
            .iter()
            .filter(|i| self.profile(i.profile).is_some_and(|p| p.media_extensions))
            .map(|i| self.format_instance(i))
            .collect();
        if me.len() > 1 {
            out.push(Violation::MediaExtensions { instances: me });
        }
        out
    }

    /// Rules that a driver branch (e.g. 535) additionally breaks for this layout.
    pub fn driver_violations(&self, layout: &Layout, driver: u32) -> Vec<Violation> {
        let mut out = Vec::new();
        if let Some(min) = self.min_driver
            && driver < min
        {
            out.push(Violation::Driver {
                needs: format!("MIG on {}", self.key),
                min_driver: min,
                driver,
            });
        }
        let counts = self.counts(layout);
        for (idx, p) in self.profiles_indexed() {
            if let Some(min) = p.min_driver
                && counts.get(idx) > 0
                && driver < min
            {
                out.push(Violation::Driver {
                    needs: format!("profile {}", p.name),
                    min_driver: min,
                    driver,
                });
            }
        }
        for g in &self.gates {
            let all_present = g
                .profiles
                .iter()
                .all(|n| self.profile_by_name(n).is_some_and(|i| counts.get(i) > 0));
            if all_present && driver < g.min_driver {
                out.push(Violation::Driver {
                    needs: format!("{} together", g.profiles.join(" + ")),
                    min_driver: g.min_driver,
                    driver,
                });
            }
        }
        out
    }

    /// Check a layout; `driver` (branch, e.g. 535) adds the driver gates when known.
    pub fn validate_with_driver(&self, layout: &Layout, driver: Option<u32>) -> Result<(), InvalidLayout> {
        let mut v = self.violations(layout);
        if let Some(d) = driver {
            v.extend(self.driver_violations(layout, d));
        }
        if v.is_empty() {
            Ok(())
        } else {
            Err(InvalidLayout {
                model: self.key.clone(),
                layout: self.format_layout(layout),
                violations: v,
            })
        }
    }

    /// Check a layout against the hardware rules (any driver new enough).
    pub fn validate(&self, layout: &Layout) -> Result<(), InvalidLayout> {
        self.validate_with_driver(layout, None)
    }

    /// Whether a layout obeys the hardware rules.
    pub fn is_valid(&self, layout: &Layout) -> bool {
        self.violations(layout).is_empty()
    }

    /// Whether `instance` can be added to the (valid) `layout` without breaking a rule.
    pub fn can_add(&self, layout: &Layout, instance: &Instance) -> bool {
        let Some(p) = self.profile(instance.profile) else {
            return false;
        };
        if !p.starts.contains(&instance.start)
            || self.occupied_mask(layout) & self.instance_mask(instance) != 0
        {
            return false;
        }
        let counts = self.counts(layout);
        if counts.get(instance.profile) >= p.max_instances {
            return false;
        }
        !(p.media_extensions
            && layout
                .instances()
                .iter()
                .any(|i| self.profile(i.profile).is_some_and(|q| q.media_extensions)))
    }

    /// Free slots: every instance that could be added to `layout` as it stands.
    pub fn addable(&self, layout: &Layout) -> Vec<Instance> {
        self.profiles_indexed()
            .flat_map(|(idx, p)| p.starts.iter().map(move |s| Instance::new(idx, *s)))
            .filter(|i| self.can_add(layout, i))
            .collect()
    }

    /// Whether no further instance fits.
    pub fn is_maximal(&self, layout: &Layout) -> bool {
        self.addable(layout).is_empty()
    }

    /// Fragmentation of the free memory of a layout, in `[0, 1)`: the share of free memory slices that
    /// the largest instance still creatable cannot use, `1 - largest / free`. `0` when nothing is free
    /// or the free slices can be taken by one instance; e.g. on an 8-slice GPU with only `1g@0` in use,
    /// 7 slices are free but the largest new instance is a 3g (4 slices): `1 - 4/7 ≈ 0.43`.
    pub fn fragmentation(&self, layout: &Layout) -> f64 {
        let free = self.free_slices(layout).len();
        if free == 0 {
            return 0.0;
        }
        let largest = self
            .addable(layout)
            .iter()
            .filter_map(|i| self.profile(i.profile))
            .map(|p| usize::from(p.memory_slices))
            .max()
            .unwrap_or(0);
        1.0 - largest as f64 / free as f64
    }
}
