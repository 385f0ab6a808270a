//! `mig-autoscaler inflation`: FGD's allocation-rate experiment (arrivals only, workload inflated to
//! 130% of the cluster, seeds 42–51) with MIG instances instead of GPU shares (docs/evaluation.md).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use mig_planner::SolverKind;
use mig_sim::inflation::{
    InflationPolicy, InflationReport, inflate, parse_fgd_results, parse_openb_nodes, run_inflation,
};

const ALL_BALANCED: &str = "1g.10gb@0,1g.10gb@1,2g.20gb@2,3g.40gb@4";

/// Arguments of `inflation`.
#[derive(Args)]
pub struct InflationArgs {
    /// An openb pod list (times are ignored), e.g.
    /// ../shared/traces/alibaba-gpu-v2023/openb_pod_list_default.csv.
    #[arg(long)]
    pods: PathBuf,
    /// The openb node list whose GPU counts make the cluster, e.g.
    /// ../shared/traces/alibaba-gpu-v2023/openb_node_list_gpu_node.csv.
    #[arg(long)]
    nodes: PathBuf,
    /// FGD's `analysis_allo_discrete.csv`, to print its curves beside ours.
    #[arg(long)]
    fgd: Option<PathBuf>,
    /// The workload whose FGD curves to show (default: the pod list's file name without `.csv`).
    #[arg(long)]
    fgd_workload: Option<String>,
    /// GPU model every GPU is taken to be.
    #[arg(long, default_value = "NVIDIA-A100-SXM4-80GB")]
    product: String,
    /// Seeds (FGD: 42–51).
    #[arg(long, value_delimiter = ',', default_value = "42,43,44,45,46,47,48,49,50,51")]
    seeds: Vec<u64>,
    /// Workload inflation: GPU request over cluster GPUs.
    #[arg(long, default_value_t = 1.3)]
    tune: f64,
    /// Policies: static-balanced, static-7g, first-fit, planner, planner-greedy (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "static-balanced,static-7g,first-fit,planner"
    )]
    policies: Vec<String>,
    /// Arriving pods per planner call.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Write curves.csv and allocation.svg here.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn policy(name: &str, batch: usize) -> Result<InflationPolicy> {
    Ok(match name {
        "static-balanced" => InflationPolicy::Static(ALL_BALANCED.into()),
        "static-7g" => InflationPolicy::Static("7g.80gb@0".into()),
        "first-fit" => InflationPolicy::FirstFit,
        "planner" => InflationPolicy::Planner {
            batch,
            kind: SolverKind::Highs,
        },
        "planner-greedy" => InflationPolicy::Planner {
            batch,
            kind: SolverKind::Greedy,
        },
        other => anyhow::bail!(
            "unknown policy {other:?}: use static-balanced, static-7g, first-fit, planner, planner-greedy"
        ),
    })
}

/// Mean over runs of a curve (points where every run has a value... or any run: mean of those).
fn mean_curve(curves: &[&Vec<Option<f64>>]) -> Vec<Option<f64>> {
    (0..131)
        .map(|k| {
            let v: Vec<f64> = curves
                .iter()
                .filter_map(|c| c.get(k).copied().flatten())
                .collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        })
        .collect()
}

/// The value at k, or the nearest point within ±1 (FGD's rule).
fn at(curve: &[Option<f64>], k: usize) -> Option<f64> {
    curve
        .get(k)
        .copied()
        .flatten()
        .or_else(|| curve.get(k + 1).copied().flatten())
        .or_else(|| k.checked_sub(1).and_then(|j| curve.get(j).copied().flatten()))
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.2}"))
}

fn svg(series: &[(String, Vec<Option<f64>>, &str)]) -> String {
    let (w, h, left, top, pw, ph) = (860.0, 420.0, 50.0, 30.0, 520.0, 340.0);
    let x = |k: f64| left + pw * k / 130.0;
    let y = |v: f64| top + ph * (1.0 - v / 100.0);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<text x="{left}" y="18" font-size="13">Allocated GPU share (%) against arrived GPU request (% of capacity)</text>"#
    );
    for t in (0..=130).step_by(10) {
        let _ = write!(
            s,
            r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" stroke="#ddd"/><text x="{0}" y="{3}" text-anchor="middle">{t}</text>"##,
            x(f64::from(t)),
            top,
            top + ph,
            top + ph + 14.0
        );
    }
    for t in (0..=100).step_by(20) {
        let _ = write!(
            s,
            r##"<line x1="{left}" y1="{0}" x2="{1}" y2="{0}" stroke="#ddd"/><text x="{2}" y="{0}" text-anchor="end">{t}</text>"##,
            y(f64::from(t)),
            left + pw,
            left - 4.0
        );
    }
    for (i, (label, curve, color)) in series.iter().enumerate() {
        let points: Vec<String> = curve
            .iter()
            .enumerate()
            .filter_map(|(k, v)| v.map(|v| format!("{:.1},{:.1}", x(k as f64), y(v))))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"#,
            points.join(" ")
        );
        let ly = top + 14.0 * i as f64 + 8.0;
        let _ = write!(
            s,
            r#"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{2}" y="{3}">{label}</text>"#,
            left + pw + 10.0,
            left + pw + 26.0,
            left + pw + 30.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Run every policy on every seed; print the table at 90/100/130% arrived and write the curves.
pub fn run(args: InflationArgs) -> Result<ExitCode> {
    let read =
        |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
    let name = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    };
    let pods = mig_sim::parse_openb(&name(&args.pods), &read(&args.pods)?)?;
    let node_gpus = parse_openb_nodes(&name(&args.nodes), &read(&args.nodes)?)?;
    let gpus: usize = node_gpus.iter().sum();
    let policies: Vec<(&str, InflationPolicy)> = args
        .policies
        .iter()
        .map(|p| Ok((p.as_str(), policy(p, args.batch)?)))
        .collect::<Result<_>>()?;
    eprintln!(
        "{} GPU pods, {} nodes with {gpus} GPUs as {}; inflation {} ; seeds {:?}",
        pods.len(),
        node_gpus.len(),
        args.product,
        args.tune,
        args.seeds
    );
    let mut reports: Vec<InflationReport> = Vec::new();
    for seed in &args.seeds {
        let workload = inflate(&pods, gpus, args.tune, *seed);
        for (label, p) in &policies {
            let mut r = run_inflation(&args.product, &node_gpus, &workload, p, *seed)?;
            if let InflationPolicy::Static(_) = p {
                r.policy = label.to_string(); // the layout itself has commas
            }
            eprintln!(
                "seed {seed} {}: {} of {} placed, {:.2}% allocated at 130% arrived, {} plans in {:.0} ms",
                r.policy,
                r.placed,
                r.offered,
                at(&r.requested, 130).unwrap_or(f64::NAN),
                r.plans,
                r.plan_millis
            );
            reports.push(r);
        }
    }
    let mut by_policy: BTreeMap<String, Vec<&InflationReport>> = BTreeMap::new();
    for r in &reports {
        by_policy.entry(r.policy.clone()).or_default().push(r);
    }
    let header = "policy,runs,requested@90,requested@100,requested@130,occupied@130,failed,plan_ms_per_run";
    println!("{}", header.replace(',', "\t"));
    let colors = ["#2563eb", "#16a34a", "#ea580c", "#9333ea", "#0891b2"];
    let mut series = Vec::new();
    for (i, (policy, runs)) in by_policy.iter().enumerate() {
        let requested = mean_curve(&runs.iter().map(|r| &r.requested).collect::<Vec<_>>());
        let occupied = mean_curve(&runs.iter().map(|r| &r.occupied).collect::<Vec<_>>());
        let mut failed: BTreeMap<&str, usize> = BTreeMap::new();
        for r in runs {
            for (k, v) in &r.failed {
                *failed.entry(k).or_default() += v;
            }
        }
        let failed: Vec<String> = failed
            .iter()
            .map(|(k, v)| format!("{k}:{:.0}", *v as f64 / runs.len() as f64))
            .collect();
        println!(
            "{policy}\t{}\t{}\t{}\t{}\t{}\t{}\t{:.0}",
            runs.len(),
            fmt(at(&requested, 90)),
            fmt(at(&requested, 100)),
            fmt(at(&requested, 130)),
            fmt(at(&occupied, 130)),
            failed.join(" "),
            runs.iter().map(|r| r.plan_millis).sum::<f64>() / runs.len() as f64
        );
        series.push((format!("MIG {policy}"), requested, colors[i % colors.len()]));
    }
    if let Some(path) = &args.fgd {
        let fgd = parse_fgd_results(&read(path)?);
        let workload = args
            .fgd_workload
            .clone()
            .unwrap_or_else(|| name(&args.pods).trim_end_matches(".csv").to_string());
        for (policy, color) in [("05-BestFit", "#9ca3af"), ("06-FGD", "#111827")] {
            let curve = fgd.get(&(workload.clone(), policy.to_string()));
            if curve.is_none() {
                eprintln!(
                    "warning: {} has no {policy} runs for workload {workload:?}",
                    path.display()
                );
            }
            if let Some(curve) = curve {
                println!(
                    "FGD paper {policy} (GPU sharing, no MIG)\t10\t{}\t{}\t{}\t-\t-\t-",
                    fmt(at(curve, 90)),
                    fmt(at(curve, 100)),
                    fmt(at(curve, 130))
                );
                series.push((format!("paper: {policy}"), curve.clone(), color));
            }
        }
    }
    if let Some(dir) = &args.out {
        write_curves(dir, &reports, &series)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `curves.csv` (every run's curves) and `allocation.svg` (the mean curves) in `dir`.
fn write_curves(
    dir: &std::path::Path,
    reports: &[InflationReport],
    series: &[(String, Vec<Option<f64>>, &str)],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut csv = String::from("policy,seed,metric");
    for k in 0..=130 {
        let _ = write!(csv, ",{k}");
    }
    csv.push('\n');
    for r in reports {
        for (metric, curve) in [("requested", &r.requested), ("occupied", &r.occupied)] {
            let _ = write!(csv, "{},{},{metric}", r.policy, r.seed);
            for v in curve {
                let _ = write!(csv, ",{}", v.map_or(String::new(), |x| format!("{x:.3}")));
            }
            csv.push('\n');
        }
    }
    std::fs::write(dir.join("curves.csv"), csv)?;
    std::fs::write(dir.join("allocation.svg"), svg(series))?;
    eprintln!("wrote {}/curves.csv and allocation.svg", dir.display());
    Ok(())
}
