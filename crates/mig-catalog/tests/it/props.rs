//! Property tests over every model: enumeration, validity, canonical form.

use mig_catalog::{GpuModel, Instance, Layout};
use proptest::prelude::*;

use crate::catalog;

fn candidates(m: &GpuModel) -> Vec<Instance> {
    m.profiles_indexed()
        .flat_map(|(i, p)| p.starts.iter().map(move |s| Instance::new(i, *s)))
        .collect()
}

/// (model index, arbitrary — possibly invalid — set of candidate instances, picks for a valid one)
fn model_and_picks() -> impl Strategy<Value = (usize, Vec<usize>)> {
    (
        0..catalog().models.len(),
        prop::collection::vec(0usize..64, 0..12),
    )
}

fn arbitrary_layout(m: &GpuModel, picks: &[usize]) -> Layout {
    let c = candidates(m);
    Layout::new(picks.iter().map(|p| c[p % c.len()]))
}

fn valid_layout(m: &GpuModel, picks: &[usize]) -> Layout {
    let c = candidates(m);
    picks.iter().fold(Layout::empty(), |l, p| {
        let i = c[p % c.len()];
        if m.can_add(&l, &i) { l.with(i) } else { l }
    })
}

#[test]
fn every_enumerated_layout_is_valid_sorted_and_unique() {
    for m in &catalog().models {
        let ls = m.layouts();
        assert!(ls.windows(2).all(|w| w[0] < w[1]), "{}", m.key);
        for l in ls {
            assert!(!l.is_empty());
            m.validate(l).unwrap_or_else(|e| panic!("{e}"));
        }
        for l in m.maximal_layouts() {
            assert!(m.is_maximal(l));
        }
    }
}

#[test]
fn every_layout_extends_to_a_maximal_one() {
    for m in &catalog().models {
        let maximal: Vec<&Layout> = m.maximal_layouts().collect();
        for l in m.layouts() {
            assert!(
                maximal.iter().any(|x| x.contains_all(l)),
                "{} {}",
                m.key,
                m.format_layout(l)
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_valid_sets_are_in_the_enumeration((mi, picks) in model_and_picks()) {
        let m = &catalog().models[mi];
        let l = valid_layout(m, &picks);
        prop_assert!(m.validate(&l).is_ok());
        prop_assert_eq!(l.is_empty(), m.layouts().binary_search(&l).is_err());
    }

    #[test]
    fn validity_and_enumeration_agree_on_arbitrary_sets((mi, picks) in model_and_picks()) {
        let m = &catalog().models[mi];
        let l = arbitrary_layout(m, &picks);
        let enumerated = m.layouts().binary_search(&l).is_ok();
        prop_assert_eq!(m.validate(&l).is_ok() && !l.is_empty(), enumerated, "{}", m.format_layout(&l));
    }

    #[test]
    fn canonical_form_round_trips((mi, picks) in model_and_picks()) {
        let m = &catalog().models[mi];
        let l = arbitrary_layout(m, &picks);
        let text = m.format_layout(&l);
        prop_assert_eq!(m.parse_layout(&text).unwrap(), l.clone());
        // Order and spacing do not matter.
        let shuffled: Vec<String> = text.split(',').rev().map(|s| format!(" {s} ")).collect();
        prop_assert_eq!(m.parse_layout(&shuffled.join(",")).unwrap(), l);
    }

    #[test]
    fn compatible_layouts_are_exactly_the_valid_supersets((mi, picks) in model_and_picks()) {
        let m = &catalog().models[mi];
        let pinned = valid_layout(m, &picks[..picks.len().min(3)]);
        let compatible: Vec<&Layout> = m.compatible_layouts(&pinned).collect();
        let expected = m.layouts().iter().filter(|l| pinned.instances().iter().all(|i| l.contains(i))).count();
        prop_assert_eq!(compatible.len(), expected);
        prop_assert!(compatible.iter().all(|l| l.contains_all(&pinned) && m.is_valid(l)));
        if !pinned.is_empty() {
            prop_assert!(compatible.contains(&&pinned));
        }
    }

    #[test]
    fn counts_arrange_to_a_layout_with_the_same_counts((mi, picks) in model_and_picks()) {
        let m = &catalog().models[mi];
        let l = valid_layout(m, &picks);
        let c = m.counts(&l);
        let a = m.arrange(&c).unwrap();
        prop_assert!(m.is_valid(&a));
        prop_assert_eq!(m.counts(&a), c.clone());
        let around = m.arrange_around(&l, &c).unwrap();
        prop_assert_eq!(around, l.clone());
        prop_assert!((0.0..=1.0).contains(&m.fragmentation(&l)));
        prop_assert_eq!(m.is_maximal(&l), m.addable(&l).is_empty());
        for i in m.addable(&l) {
            prop_assert!(m.is_valid(&l.with(i)));
        }
    }
}
