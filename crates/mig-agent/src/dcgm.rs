//! Per-instance utilization, and which pod uses which instance, from NVIDIA's DCGM exporter on the
//! node.
//!
//! dcgm-exporter publishes one series per MIG instance, labelled with the parent GPU's index
//! (`gpu`), the GPU-instance ID (`GPU_I_ID`, which is not the placement) and the profile
//! (`GPU_I_PROFILE`); with its Kubernetes mapping on (the GPU operator's default) also the pod the
//! kubelet allocated the instance to (`pod` and `namespace`; older releases `pod_name` and
//! `pod_namespace`). The agent joins `(gpu, GPU_I_ID)` to placements through `nvidia-smi mig -lgi`
//! ([`crate::GpuSource::instance_ids`]). Utilization is `DCGM_FI_PROF_GR_ENGINE_ACTIVE` (on by
//! default; `DCGM_FI_DEV_GPU_UTIL` is not supported for MIG instances).

use std::collections::{BTreeMap, BTreeSet};

use mig_planner::snapshot::Gpu;

/// The series read: graphics-engine activity per instance, a ratio in `[0, 1]`.
pub const UTILIZATION_METRIC: &str = "DCGM_FI_PROF_GR_ENGINE_ACTIVE";

/// Utilization is reported in steps of this much, so that the node report (written only when it
/// changes) is not rewritten for every flicker.
pub const UTILIZATION_STEP: f64 = 0.05;

/// One sample of the Prometheus text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Parse the Prometheus text exposition format (what dcgm-exporter serves): comments and lines
/// that do not parse are skipped, so one odd line never hides the others.
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let end;
        loop {
            // Skip separators.
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            match chars.peek() {
                Some((i, '}')) => {
                    end = *i;
                    break;
                }
                None => return None,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c)? {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    other => value.push(other),
                }
            }
            if !closed {
                return None;
            }
            labels.insert(key.trim().to_string(), value);
        }
        rest = &body[end + 1..];
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// What dcgm-exporter says of one MIG instance.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceSeries {
    /// Parent GPU index.
    pub gpu: u32,
    /// GPU-instance ID.
    pub gi_id: u32,
    /// `GPU_I_PROFILE` (`3g.40gb`), when labelled.
    pub profile: Option<String>,
    /// `namespace/name` of the pod the instance is allocated to, when the mapping is on.
    pub pod: Option<String>,
    /// Graphics-engine activity in `[0, 1]` (NaN and out-of-range values are dropped).
    pub utilization: Option<f64>,
}

/// The per-instance series among `samples` (those with `gpu` and `GPU_I_ID` labels).
pub fn instance_series(samples: &[Sample]) -> Vec<InstanceSeries> {
    samples
        .iter()
        .filter(|s| s.name == UTILIZATION_METRIC)
        .filter_map(|s| {
            let gpu = s.labels.get("gpu")?.parse().ok()?;
            let gi_id = s.labels.get("GPU_I_ID")?.parse().ok()?;
            let label = |new: &str, old: &str| {
                s.labels
                    .get(new)
                    .or_else(|| s.labels.get(old))
                    .filter(|v| !v.is_empty())
                    .cloned()
            };
            let pod = match (label("namespace", "pod_namespace"), label("pod", "pod_name")) {
                (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
                _ => None,
            };
            Some(InstanceSeries {
                gpu,
                gi_id,
                profile: s.labels.get("GPU_I_PROFILE").cloned(),
                pod,
                utilization: (s.value.is_finite() && (0.0..=1.0).contains(&s.value))
                    .then(|| (s.value / UTILIZATION_STEP).round() * UTILIZATION_STEP),
            })
        })
        .collect()
}

/// Put the series on the GPUs: utilization, and the pods among `live` (the pods bound to this node
/// and not finished, with their MIG requests; a pod gone since the scrape is not put back).
/// `ids`: `(gpu, GI ID)` → placement start. Returns the pods placed, so that the others can be
/// attributed otherwise.
///
/// A GPU whose series do not fit what the GPU has now is left out whole: a series for an unknown
/// GPU-instance ID, of another profile than the instance at that placement, or naming a pod that
/// does not request that profile. dcgm-exporter may lag a change of instances (IDs are reused), and
/// a pod put on the wrong instance would make its real one look free.
pub fn apply(
    gpus: &mut [Gpu],
    ids: &BTreeMap<(u32, u32), u8>,
    series: &[InstanceSeries],
    live: &BTreeMap<String, BTreeMap<String, i64>>,
) -> BTreeSet<String> {
    let mut placed = BTreeSet::new();
    for g in gpus.iter_mut() {
        let Ok(model) = mig_catalog::Catalog::embedded().lookup(&g.product) else {
            continue;
        };
        let canonical = |name: &str| model.profile_by_name(name).map(|p| model.profile_name(p));
        let mut found = Vec::new();
        let consistent = series.iter().filter(|s| s.gpu == g.index).all(|s| {
            let Some(at) = ids
                .get(&(s.gpu, s.gi_id))
                .and_then(|start| g.instances.iter().position(|i| i.start == *start))
            else {
                return false;
            };
            let here = canonical(&g.instances[at].profile);
            if s.profile.as_deref().is_some_and(|p| canonical(p) != here) {
                return false;
            }
            let resource = here
                .as_deref()
                .and_then(|p| model.profile_by_name(p))
                .and_then(|p| model.profile(p))
                .map(|p| p.resource_name());
            let pod = s.pod.as_ref().filter(|p| live.contains_key(*p));
            let requests_it = |p: &String| {
                live.get(p)
                    .zip(resource.as_ref())
                    .is_some_and(|(r, res)| r.get(res).is_some_and(|n| *n > 0))
            };
            if pod.is_some_and(|p| !requests_it(p)) {
                return false;
            }
            found.push((at, s.utilization, pod.cloned()));
            true
        });
        if !consistent {
            continue;
        }
        for (at, utilization, pod) in found {
            let instance = &mut g.instances[at];
            if utilization.is_some() {
                instance.utilization = utilization;
            }
            if let Some(pod) = pod {
                if !instance.pods.contains(&pod) {
                    instance.pods.push(pod.clone());
                }
                placed.insert(pod);
            }
        }
    }
    placed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::test_support::gpu;

    const SCRAPE: &str = r#"# HELP DCGM_FI_PROF_GR_ENGINE_ACTIVE Ratio of time the graphics engine is active.
# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge
DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="0",UUID="GPU-8c1",pci_bus_id="00000000:4F:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",GPU_I_PROFILE="3g.40gb",GPU_I_ID="2",Hostname="node-a",container="main",namespace="ml",pod="trainer-0"} 0.812345
DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="0",UUID="GPU-8c1",GPU_I_PROFILE="1g.10gb",GPU_I_ID="9",Hostname="node-a",container="",namespace="",pod=""} 0.000000
DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="1",UUID="GPU-2b7",GPU_I_PROFILE="7g.80gb",GPU_I_ID="0",pod_namespace="old",pod_name="style"} 0.03
DCGM_FI_DEV_FB_USED{gpu="0",GPU_I_ID="2",GPU_I_PROFILE="3g.40gb"} 1234
DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="0",GPU_I_ID="10",weird="a \"quoted\", value"} NaN
DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="0",GPU_I_ID=
not a metric line at all
"#;

    #[test]
    fn the_exposition_parses_labels_with_escapes_and_skips_what_does_not() {
        let samples = parse_exposition(SCRAPE);
        assert_eq!(samples.len(), 5, "{samples:#?}");
        assert_eq!(samples[0].labels["pod"], "trainer-0");
        assert!((samples[0].value - 0.812345).abs() < 1e-9);
        assert_eq!(samples[4].labels["weird"], "a \"quoted\", value");
        assert!(samples[4].value.is_nan());
        assert_eq!(parse_line("up 1 1700000000000").unwrap().value, 1.0);
        assert_eq!(parse_line("x{} 2").unwrap().labels.len(), 0);
    }

    #[test]
    fn series_give_pods_and_rounded_utilization_per_instance() {
        let series = instance_series(&parse_exposition(SCRAPE));
        assert_eq!(
            series,
            vec![
                InstanceSeries {
                    gpu: 0,
                    gi_id: 2,
                    profile: Some("3g.40gb".into()),
                    pod: Some("ml/trainer-0".into()),
                    utilization: Some(0.8),
                },
                InstanceSeries {
                    gpu: 0,
                    gi_id: 9,
                    profile: Some("1g.10gb".into()),
                    pod: None,
                    utilization: Some(0.0),
                },
                InstanceSeries {
                    gpu: 1,
                    gi_id: 0,
                    profile: Some("7g.80gb".into()),
                    pod: Some("old/style".into()),
                    utilization: Some(0.05),
                },
                InstanceSeries {
                    gpu: 0,
                    gi_id: 10,
                    profile: None,
                    pod: None,
                    utilization: None,
                },
            ]
        );
    }

    #[test]
    fn series_land_on_instances_by_gpu_instance_id_and_only_live_pods_are_placed() {
        // GI IDs as in the user guide: not the placements.
        let mut gpus = vec![
            gpu(0, &[("1g.10gb", 0), ("1g.10gb+me", 1), ("3g.40gb", 4)]),
            gpu(1, &[("7g.80gb", 0)]),
        ];
        let ids: BTreeMap<(u32, u32), u8> = [((0, 9), 0), ((0, 10), 1), ((0, 2), 4), ((1, 0), 0)].into();
        let series = instance_series(&parse_exposition(SCRAPE));
        let live: BTreeMap<String, BTreeMap<String, i64>> = [(
            "ml/trainer-0".to_string(),
            [("nvidia.com/mig-3g.40gb".to_string(), 1)].into(),
        )]
        .into();
        let placed = apply(&mut gpus, &ids, &series, &live);
        assert_eq!(placed, ["ml/trainer-0".to_string()].into());
        assert_eq!(gpus[0].instances[2].pods, vec!["ml/trainer-0".to_string()]);
        assert_eq!(gpus[0].instances[2].utilization, Some(0.8));
        assert_eq!(gpus[0].instances[0].utilization, Some(0.0));
        assert!(gpus[0].instances[0].pods.is_empty());
        assert_eq!(gpus[0].instances[1].utilization, None);
        // `old/style` is not bound here any more: its instance is free, its utilization known.
        assert!(gpus[1].instances[0].pods.is_empty());
        assert_eq!(gpus[1].instances[0].utilization, Some(0.05));
    }

    #[test]
    fn a_gpu_whose_series_do_not_fit_its_instances_is_left_out_whole() {
        // dcgm-exporter lagging a change: IDs it does not know now, another profile at the
        // placement, or a pod that does not request the instance's profile.
        let ids: BTreeMap<(u32, u32), u8> = [((0, 9), 0), ((0, 2), 4)].into();
        let live: BTreeMap<String, BTreeMap<String, i64>> = [(
            "ml/a".to_string(),
            [("nvidia.com/mig-1g.10gb".to_string(), 1)].into(),
        )]
        .into();
        let good = InstanceSeries {
            gpu: 0,
            gi_id: 9,
            profile: Some("1g.10gb".into()),
            pod: Some("ml/a".into()),
            utilization: Some(0.5),
        };
        let fresh = || vec![gpu(0, &[("1g.10gb", 0), ("3g.40gb", 4)])];
        let mut gpus = fresh();
        assert_eq!(
            apply(&mut gpus, &ids, std::slice::from_ref(&good), &live).len(),
            1
        );
        for bad in [
            InstanceSeries {
                gi_id: 77,
                ..good.clone()
            },
            InstanceSeries {
                gi_id: 2,
                profile: Some("1g.10gb".into()),
                pod: None,
                ..good.clone()
            },
            InstanceSeries {
                gi_id: 2,
                profile: Some("3g.40gb".into()),
                ..good.clone()
            },
        ] {
            let mut gpus = fresh();
            let placed = apply(&mut gpus, &ids, &[good.clone(), bad.clone()], &live);
            assert!(placed.is_empty(), "{bad:?}");
            assert_eq!(gpus, fresh(), "{bad:?}");
        }
    }
}
