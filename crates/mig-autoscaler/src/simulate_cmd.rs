//! `mig-autoscaler simulate`: replay a GPU-cluster trace through MIG policies (docs/evaluation.md).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use mig_controller::settings::{Amount, Dur, Mode};
use mig_planner::DrainPolicy;
use mig_sim::{
    PolicyKind, Report, SimConfig, TracePod, parse_dlrm, parse_openb, quantile, report_from_starts, simulate,
    static_candidates,
};

use mig_testbed::System;

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
    /// Policies: static-balanced, static-best, greedy, ilp, the reference ideal (slices pooled per
    /// GPU without placement rules, repartitioning free and instant), and system: the slow path,
    /// the whole system (kube-emulator, agents, controller over HTTP) in real time scaled by
    /// --system-scale (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "static-balanced,static-best,greedy,ilp,ideal"
    )]
    policies: Vec<String>,
    /// What the planner may evict to change a GPU: `never` (only idle GPUs change),
    /// `idle-or-low-priority` or `allowed`. Evicted pods requeue and start over.
    #[arg(long, default_value = "never")]
    drain: String,
    /// Most evictions per plan (default: unbounded).
    #[arg(long)]
    max_evictions: Option<u32>,
    /// How layouts reach the GPUs: `mig-manager` (a changed GPU is rebuilt whole) or `nvml`
    /// (instances in use stay; only the free rest of a GPU changes).
    #[arg(long, default_value = "mig-manager")]
    backend: String,
    /// Reservations by attrition: most GPUs earmarked at once for large waiting pods (0: none;
    /// default: the planner's, 8).
    #[arg(long)]
    reserve_max_gpus: Option<u32>,
    /// Reservations by attrition: most nodes holding one at once (default: the planner's, 4).
    #[arg(long)]
    reserve_max_nodes: Option<u32>,
    /// Reservations by attrition: seconds after which one is chosen again (default: the
    /// planner's, 21600).
    #[arg(long)]
    reserve_max_age: Option<u64>,
    /// With policy `system`: wall seconds per simulated second (0.01: a simulated hour in 36 s).
    /// Batching, mig-manager's delay, the replay and the agent and controller ticks (5 simulated
    /// seconds, 10–100 ms wall) scale with it.
    #[arg(long, default_value_t = 0.01)]
    system_scale: f64,
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
            let start = args
                .window_start
                .unwrap_or_else(|| mig_sim::trace::observation_start(&pods));
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
    let pods: Vec<TracePod> = mig_sim::trace::window(pods, start, args.time_scale)
        .into_iter()
        .filter(|p| p.arrival <= horizon)
        .collect();
    Ok((pods, horizon))
}

fn row(r: &Report, delay: f64) -> String {
    format!(
        "{},{delay},{},{},{:.1},{:.1},{:.1},{:.1},{:.4},{:.4},{},{},{:.1},{:.1},{},{:.1},{},{:.1}",
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
        r.evictions,
        r.lost_slice_hours,
        r.reservations,
        r.reserved_gpus,
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
    let drain: DrainPolicy = serde_json::from_value(serde_json::json!(args.drain)).map_err(|_| {
        anyhow::anyhow!(
            "unknown --drain {:?}: use never, idle-or-low-priority or allowed",
            args.drain
        )
    })?;
    let backend: mig_planner::Backend = serde_json::from_value(serde_json::json!(args.backend))
        .map_err(|_| anyhow::anyhow!("unknown --backend {:?}: use mig-manager or nvml", args.backend))?;
    let defaults = mig_planner::ReservationPolicy::default();
    let header = "policy,reconfig_delay_s,pods,started,wait_p50_s,wait_p95_s,wait_p99_s,wait_mean_s,allocation,demand,reconfigurations,plans,plan_ms_p50,plan_ms_p99,evictions,lost_slice_hours,reservations,reserved_gpus_mean";
    let mut csv = format!("{header}\n");
    let mut by_profile =
        String::from("policy,reconfig_delay_s,profile,pods,wait_mean_s,wait_p95_s,wait_p99_s\n");
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
            drain,
            max_evictions: args.max_evictions,
            backend,
            reservations: mig_planner::ReservationPolicy {
                max_gpus: args.reserve_max_gpus.unwrap_or(defaults.max_gpus),
                max_nodes: args.reserve_max_nodes.unwrap_or(defaults.max_nodes),
                max_age_seconds: args.reserve_max_age.unwrap_or(defaults.max_age_seconds),
                ..defaults.clone()
            },
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
                "ideal" => simulate(&config, &PolicyKind::Ideal, &pods)?,
                "system" => slow_path(&config, &pods, args.system_scale)?,
                other => {
                    anyhow::bail!(
                        "unknown policy {other:?}: use static-balanced, static-best, greedy, ilp, ideal, system"
                    )
                }
            };
            for (profile, w) in report.waits_by_profile() {
                by_profile.push_str(&format!(
                    "{},{delay},{profile},{},{:.1},{:.1},{:.1}\n",
                    report.policy, w.pods, w.mean, w.p95, w.p99
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

/// The slow path: the same workload through the whole system (kube-emulator's scheduler, kubelets
/// and mig-manager, an agent per node, the controller in `auto`, all over HTTP), `scale` wall
/// seconds per simulated second. The controller batches as the simulator does (quiet = maxWait =
/// resync = `batch`), mig-manager takes `reconfig_delay`, no node budget or cooldown, drain policy
/// `never`; agent and controller ticks (5 simulated seconds, 10–100 ms wall) and the sequence's
/// phases are overhead the fast path does not have.
fn slow_path(config: &SimConfig, pods: &[TracePod], scale: f64) -> Result<Report> {
    anyhow::ensure!(scale > 0.0, "--system-scale must be positive");
    anyhow::ensure!(
        config.drain == DrainPolicy::Never,
        "policy system runs with --drain never only (the replay does not count evictions yet)"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let wall = |secs: f64| Dur(Duration::from_secs_f64((secs * scale).max(0.001)));
        let delay_ms = (config.reconfig_delay * scale * 1000.0).round() as u64;
        let mut spec = kube_emulator::fleet::spec(
            config.nodes,
            config.gpus_per_node,
            &[config.product.as_str()],
            delay_ms,
        );
        spec.device_plugin_pods = config.backend == mig_planner::Backend::Nvml;
        let listen = "127.0.0.1:0".parse()?;
        // Agent and controller ticks and the replay's look: 5 simulated seconds, 10–100 ms wall.
        let tick = Duration::from_secs_f64((5.0 * scale).clamp(0.01, 0.1));
        let mut settings = crate::demo_cmd::demo_settings(Mode::Auto, listen);
        settings.tick = Dur(tick);
        settings.batching.quiet = wall(config.batch);
        settings.batching.max_wait = wall(config.batch);
        settings.batching.resync = wall(config.batch);
        settings.budgets.node_cooldown = Dur::millis(0);
        settings.budgets.max_nodes_reconfiguring = Amount::Percent(100);
        settings.planner.backend = config.backend;
        // The controller's clock is the wall clock: a reservation's age too is wall seconds.
        settings.planner.reservations = mig_planner::ReservationPolicy {
            max_age_seconds: ((config.reservations.max_age_seconds as f64 * scale) as u64).max(1),
            ..config.reservations.clone()
        };
        let system = System::start(listen, &spec, settings, tick, 0).await?;
        let since = std::time::Instant::now();
        while !system.controller.shared.ready.load(Ordering::SeqCst) {
            anyhow::ensure!(
                since.elapsed() < Duration::from_secs(30),
                "the controller never synced"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = system
            .replayer()
            .run(pods, scale, config.horizon, tick, Duration::from_secs(5))
            .await;
        // What the controller decided, for reading the slow path's figures against the fast path.
        let counters: Vec<String> = system
            .controller
            .shared
            .metrics
            .encode()
            .lines()
            .filter(|l| {
                l.starts_with("mig_autoscaler_decisions_total{")
                    || l.starts_with("mig_autoscaler_reconfigurations_total{")
                    || l.starts_with("mig_autoscaler_reservations_total{")
            })
            .filter(|l| l.rsplit(' ').next().is_some_and(|v| v != "0"))
            .map(|l| l.trim_start_matches("mig_autoscaler_").to_string())
            .collect();
        eprintln!("system: {}", counters.join(", "));
        let made = system.controller.shared.metrics.reservation_count("made");
        system.stop().await;
        let mut report = report_from_starts(
            "system",
            config,
            pods,
            &seen.starts,
            seen.end,
            seen.reconfigurations,
        )?;
        report.reservations = made as usize;
        Ok(report)
    })
}
