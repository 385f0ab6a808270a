//! Enumeration of every valid layout of a model, computed once per model and cached.
//!
//! Layouts per model are few (2,318 placed layouts and 127 count vectors on the 8-slice GPUs with
//! `+me` profiles; 75 and 19 on the A30), so the planner can work from the full list.

use std::collections::HashMap;

use crate::error::ArrangeError;
use crate::layout::{Counts, Instance, Layout};
use crate::model::GpuModel;

/// Every valid non-empty layout of one model, with look-up tables.
#[derive(Debug)]
pub(crate) struct LayoutIndex {
    all: Vec<Layout>,
    maximal: Vec<usize>,
    count_vectors: Vec<Counts>,
    by_counts: HashMap<Counts, Vec<usize>>,
}

impl LayoutIndex {
    fn build(model: &GpuModel) -> LayoutIndex {
        let candidates: Vec<Instance> = model
            .profiles_indexed()
            .flat_map(|(idx, p)| p.starts.iter().map(move |s| Instance::new(idx, *s)))
            .collect();
        let mut all = Vec::new();
        let mut chosen = Vec::new();
        extend(model, &candidates, 0, &mut chosen, &mut all);
        all.sort_unstable();
        let maximal = (0..all.len()).filter(|i| model.is_maximal(&all[*i])).collect();
        let mut by_counts: HashMap<Counts, Vec<usize>> = HashMap::new();
        for (i, l) in all.iter().enumerate() {
            by_counts.entry(model.counts(l)).or_default().push(i);
        }
        let mut count_vectors: Vec<Counts> = by_counts.keys().cloned().collect();
        count_vectors.sort_unstable();
        LayoutIndex {
            all,
            maximal,
            count_vectors,
            by_counts,
        }
    }
}

/// Depth-first: at candidate `at`, either skip it or take it when it fits; record every non-empty set.
fn extend(
    model: &GpuModel,
    candidates: &[Instance],
    at: usize,
    chosen: &mut Vec<Instance>,
    out: &mut Vec<Layout>,
) {
    if at == candidates.len() {
        if !chosen.is_empty() {
            out.push(Layout::new(chosen.iter().copied()));
        }
        return;
    }
    extend(model, candidates, at + 1, chosen, out);
    let c = candidates[at];
    let current = Layout::new(chosen.iter().copied());
    if model.can_add(&current, &c) {
        chosen.push(c);
        extend(model, candidates, at + 1, chosen, out);
        chosen.pop();
    }
}

impl GpuModel {
    fn index(&self) -> &LayoutIndex {
        self.index.get_or_init(|| LayoutIndex::build(self))
    }

    /// Every valid non-empty layout, in canonical order (driver gates not applied).
    pub fn layouts(&self) -> &[Layout] {
        &self.index().all
    }

    /// Valid layouts to which no instance can be added.
    pub fn maximal_layouts(&self) -> impl Iterator<Item = &Layout> {
        let idx = self.index();
        idx.maximal.iter().map(|i| &idx.all[*i])
    }

    /// Every distinct profile-count vector of a valid non-empty layout, sorted.
    pub fn count_vectors(&self) -> &[Counts] {
        &self.index().count_vectors
    }

    /// Valid layouts with exactly these counts.
    pub fn layouts_with_counts<'a>(&'a self, counts: &Counts) -> impl Iterator<Item = &'a Layout> + 'a {
        let idx = self.index();
        let normalised = self.normalise_counts(counts);
        idx.by_counts
            .get(&normalised)
            .into_iter()
            .flatten()
            .map(|i| &idx.all[*i])
    }

    /// Valid layouts that keep every instance of `pinned` at its placement (including `pinned` itself
    /// when it is valid and non-empty).
    pub fn compatible_layouts<'a>(&'a self, pinned: &'a Layout) -> impl Iterator<Item = &'a Layout> + 'a {
        self.layouts().iter().filter(move |l| l.contains_all(pinned))
    }

    fn normalise_counts(&self, counts: &Counts) -> Counts {
        let mut c = counts.clone();
        c.0.resize(self.profiles.len(), 0);
        c
    }

    /// A placement arrangement for a count vector (the first in canonical order), or why none exists.
    /// The empty vector arranges to the empty layout.
    pub fn arrange(&self, counts: &Counts) -> Result<Layout, ArrangeError> {
        self.arrange_around(&Layout::empty(), counts)
    }

    /// An arrangement of `counts` that keeps the instances of `pinned` where they are.
    pub fn arrange_around(&self, pinned: &Layout, counts: &Counts) -> Result<Layout, ArrangeError> {
        let err = |reason: String| ArrangeError {
            model: self.key.clone(),
            counts: self.format_counts(counts),
            reason,
        };
        if counts.0.len() > self.profiles.len() && counts.0[self.profiles.len()..].iter().any(|c| *c > 0) {
            return Err(err("it counts profiles this model does not have".into()));
        }
        if counts.total() == 0 {
            return if pinned.is_empty() {
                Ok(Layout::empty())
            } else {
                Err(err("the pinned instances are not part of an empty layout".into()))
            };
        }
        if let Some(found) = self.layouts_with_counts(counts).find(|l| l.contains_all(pinned)) {
            return Ok(found.clone());
        }
        // Explain why, most specific reason first.
        for (idx, p) in self.profiles_indexed() {
            if counts.get(idx) > p.max_instances {
                return Err(err(format!(
                    "{} allows at most {} instance(s)",
                    p.name, p.max_instances
                )));
            }
        }
        let (memory, compute) = self.profiles_indexed().fold((0u32, 0u32), |(m, c), (idx, p)| {
            let n = u32::from(counts.get(idx));
            (
                m + n * u32::from(p.memory_slices),
                c + n * u32::from(p.compute_slices),
            )
        });
        if memory > u32::from(self.memory_slices) {
            return Err(err(format!(
                "it needs {memory} memory slices, the GPU has {}",
                self.memory_slices
            )));
        }
        if compute > u32::from(self.compute_slices) {
            return Err(err(format!(
                "it needs {compute} compute slices, the GPU has {}",
                self.compute_slices
            )));
        }
        if self.layouts_with_counts(counts).next().is_some() {
            return Err(err(format!(
                "no arrangement keeps {} in place",
                self.format_layout(pinned)
            )));
        }
        Err(err(
            "the profiles' placement slots cannot be combined without overlapping".into(),
        ))
    }
}
