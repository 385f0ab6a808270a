//! `mig-autoscaler simulate`: replay a GPU-cluster trace through MIG policies (docs/evaluation.md).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use mig_sim::{
    PolicyKind, Report, SimConfig, TracePod, parse_dlrm, parse_openb, quantile, simulate, static_candidates,
};

const ALL_BALANCED: &str = "1g.10gb@0,1g.10gb@1,2g.20gb@2,3g.40gb@4";
const PROFILES: [&str; 5] = ["1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"];

/// Arguments of `simulate`.
#[derive(Args)]
pub struct SimulateArgs {
    /// An Alibaba GPU v2023 ("openb") pod list with times, e.g.
    /// ../shared/traces/alibaba-gpu-v2023/openb_pod_list_default.csv.
    #[arg(long)]
    trace: PathBuf,
    /// `openb` (Alibaba GPU v2023 pod list) or `dlrm` (Alibaba v2025 DLRM instances; needs
    /// `--sizes-from`).
    #[arg(long, default_value = "openb")]
    format: String,
    /// For `dlrm`: a ParvaGPU deployment CSV whose instance sizes the apps are mapped onto, e.g.
    /// ../shared/traces/parvagpu-sc24-a100-profiles/deployment/SLO6/SLO6_ParvaGPU_deploy.csv.
    #[arg(long)]
    sizes_from: Option<PathBuf>,
    /// Nodes of the simulated cluster.
    #[arg(long, default_value_t = 8)]
    nodes: usize,
    /// GPUs per node.
    #[arg(long, default_value_t = 8)]
    gpus_per_node: usize,
    /// GPU model.
    #[arg(long, default_value = "NVIDIA-A100-SXM4-80GB")]
    product: String,
    /// Replay from this trace time (seconds); earlier pods still running then start at it.
    /// Default: the start of the trace's observation window (the earliest deletion time).
    #[arg(long)]
    window_start: Option<f64>,
    /// Replay this many days of the trace (after scaling).
    #[arg(long, default_value_t = 34.0)]
    days: f64,
    /// Multiply every time and duration by this (0.5: twice as dense).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Plan at most every this many seconds while pods wait.
    #[arg(long, default_value_t = 60.0)]
    batch: f64,
    /// Reconfiguration delays to sweep, seconds (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "120")]
    reconfig_delay: Vec<f64>,
    /// Policies: static-balanced, static-best, greedy, ilp (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "static-balanced,static-best,greedy,ilp"
    )]
    policies: Vec<String>,
    /// Write summary.csv and waits.svg here.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn workload(args: &SimulateArgs) -> Result<(Vec<TracePod>, f64)> {
    let text = std::fs::read_to_string(&args.trace)
        .with_context(|| format!("cannot read {}", args.trace.display()))?;
    let name = args
        .trace
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let (pods, start) = match args.format.as_str() {
        "openb" => {
            let pods = parse_openb(&name, &text)?;
            let start = args.window_start.unwrap_or_else(|| {
                pods.iter()
                    .map(|p| p.arrival + p.duration)
                    .fold(f64::INFINITY, f64::min)
            });
            (pods, start)
        }
        "dlrm" => {
            let path = args
                .sizes_from
                .as_ref()
                .context("--format dlrm needs --sizes-from (a ParvaGPU deployment CSV)")?;
            let deploy =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let set = mig_sim::demand_sets::parse_parvagpu_deploy(&path.display().to_string(), &deploy)?;
            let sizes: Vec<u8> = set.instances.iter().map(|(_, g)| *g).collect();
            (
                parse_dlrm(&name, &text, &sizes)?,
                args.window_start.unwrap_or(0.0),
            )
        }
        other => anyhow::bail!("unknown --format {other:?}: use openb or dlrm"),
    };
    let horizon = args.days * 86_400.0;
    let pods: Vec<TracePod> = pods
        .into_iter()
        .filter(|p| p.arrival + p.duration > start)
        .map(|mut p| {
            let end = p.arrival + p.duration;
            p.arrival = (p.arrival.max(start) - start) * args.time_scale;
            p.duration = (end - start) * args.time_scale - p.arrival;
            p
        })
        .filter(|p| p.arrival <= horizon)
        .collect();
    Ok((pods, horizon))
}

fn row(r: &Report, delay: f64) -> String {
    format!(
        "{},{delay},{},{},{:.1},{:.1},{:.1},{:.1},{:.4},{:.4},{},{},{:.1},{:.1}",
        r.policy,
        r.pods,
        r.started,
        r.wait_quantile(0.5),
        r.wait_quantile(0.95),
        r.wait_quantile(0.99),
        r.mean_wait(),
        r.allocation,
        r.demand,
        r.reconfigurations,
        r.plan_millis.len(),
        quantile(&r.plan_millis, 0.5),
        quantile(&r.plan_millis, 0.99),
    )
}

/// A bar chart of wait p50/p95/p99 per policy (one group per policy and delay).
fn svg(rows: &[(String, f64, f64, f64)]) -> String {
    let max = rows.iter().map(|r| r.3).fold(1.0, f64::max);
    let (w, h, bar) = (160.0 * rows.len() as f64 + 80.0, 320.0, 36.0);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<text x="10" y="16" font-size="13">Pod wait (s): p50, p95, p99 per policy</text>"#
    );
    for (i, (label, p50, p95, p99)) in rows.iter().enumerate() {
        let x0 = 60.0 + 160.0 * i as f64;
        for (j, (v, color)) in [(p50, "#60a5fa"), (p95, "#f59e0b"), (p99, "#ef4444")]
            .iter()
            .enumerate()
        {
            let bh = 240.0 * **v / max;
            let x = x0 + j as f64 * (bar + 4.0);
            let _ = write!(
                s,
                r#"<rect x="{x}" y="{}" width="{bar}" height="{bh}" fill="{color}"/>"#,
                270.0 - bh
            );
            let _ = write!(s, r#"<text x="{x}" y="{}">{:.0}</text>"#, 266.0 - bh, v);
        }
        let _ = write!(s, r#"<text x="{x0}" y="290">{label}</text>"#);
    }
    s.push_str("</svg>\n");
    s
}

/// Run the simulation and print (and write) the comparison.
pub fn run(args: SimulateArgs) -> Result<ExitCode> {
    let (pods, horizon) = workload(&args)?;
    eprintln!(
        "{} pods over {:.1} days on {} x {} {}",
        pods.len(),
        horizon / 86_400.0,
        args.nodes,
        args.gpus_per_node,
        args.product
    );
    let header = "policy,reconfig_delay_s,pods,started,wait_p50_s,wait_p95_s,wait_p99_s,wait_mean_s,allocation,demand,reconfigurations,plans,plan_ms_p50,plan_ms_p99";
    let mut csv = format!("{header}\n");
    let mut by_profile = String::from("policy,reconfig_delay_s,profile,pods,wait_mean_s,wait_p95_s\n");
    let mut bars = Vec::new();
    println!("{}", header.replace(',', "\t"));
    for delay in &args.reconfig_delay {
        let config = SimConfig {
            nodes: args.nodes,
            gpus_per_node: args.gpus_per_node,
            product: args.product.clone(),
            initial_layout: ALL_BALANCED.into(),
            batch: args.batch,
            reconfig_delay: *delay,
            horizon,
        };
        for policy in &args.policies {
            let report = match policy.as_str() {
                "static-balanced" => simulate(&config, &PolicyKind::Static(ALL_BALANCED.into()), &pods)?,
                "static-best" => {
                    // The best fixed layout in hindsight: lowest mean wait over the same run.
                    let mut best: Option<Report> = None;
                    for layout in static_candidates(&args.product, &PROFILES)? {
                        let r = simulate(&config, &PolicyKind::Static(layout), &pods)?;
                        if best.as_ref().is_none_or(|b| r.mean_wait() < b.mean_wait()) {
                            best = Some(r);
                        }
                    }
                    best.context("no static candidate")?
                }
                "greedy" => simulate(&config, &PolicyKind::Greedy, &pods)?,
                "ilp" => simulate(&config, &PolicyKind::Ilp, &pods)?,
                other => {
                    anyhow::bail!("unknown policy {other:?}: use static-balanced, static-best, greedy, ilp")
                }
            };
            for (profile, (n, mean, p95)) in report.waits_by_profile() {
                by_profile.push_str(&format!(
                    "{},{delay},{profile},{n},{mean:.1},{p95:.1}\n",
                    report.policy
                ));
            }
            let line = row(&report, *delay);
            println!("{}", line.replace(',', "\t"));
            csv.push_str(&line);
            csv.push('\n');
            bars.push((
                format!("{} {}s", policy, delay),
                report.wait_quantile(0.5),
                report.wait_quantile(0.95),
                report.wait_quantile(0.99),
            ));
        }
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join("summary.csv"), csv)?;
        std::fs::write(dir.join("waits.svg"), svg(&bars))?;
        std::fs::write(dir.join("waits-by-profile.csv"), by_profile)?;
        eprintln!(
            "wrote {}/summary.csv, waits-by-profile.csv and waits.svg",
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
