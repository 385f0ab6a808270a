//! `mig-autoscaler demo`: the whole system on an embedded cluster: kube-emulator with a default
//! fleet and its simulated scheduler, kubelets and mig-manager; a node agent per node; the
//! controller in `auto`; and a workload of MIG pods that arrive and finish. Serves the web view,
//! the API and the metrics until Ctrl-C or `--duration`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use mig_controller::settings::{Amount, Dur, Mode, Settings};
use serde_json::json;

use crate::controller_cmd::shutdown_signal;
use mig_testbed::System;

/// Arguments of `demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Where the web view, plan API and metrics listen.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where the embedded Kubernetes API listens (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    api_listen: SocketAddr,
    /// Write a kubeconfig for the embedded cluster here (for kubectl).
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Nodes (A100-80GB and H100-80GB alternating, all on NVIDIA's all-balanced config).
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// GPUs per node.
    #[arg(long, default_value_t = 8)]
    gpus_per_node: usize,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<f64>,
    /// Mean seconds between pod arrivals.
    #[arg(long, default_value_t = 3.0)]
    arrival_seconds: f64,
    /// Seed of the workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Replay this Alibaba GPU v2023 ("openb") pod list instead of the built-in workload (pods
    /// mapped to MIG profiles as `simulate` does; docs/evaluation.md).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// With --trace: multiply the trace's times and lifetimes by this (0.001: 1000x faster).
    #[arg(long, default_value_t = 0.001)]
    time_scale: f64,
    /// `auto` (default) or `dry-run`.
    #[arg(long, default_value = "auto")]
    mode: Mode,
    /// `mig-manager` (default: NVIDIA's mig-manager rebuilds changed GPUs whole) or `nvml` (the
    /// agents create and destroy instances at placements around running pods).
    #[arg(long, default_value = "mig-manager")]
    backend: String,
    /// Run no agent on the last N nodes, to see how a node without an agent report is shown
    /// (a `NoAgentReport` problem; its GPUs are neither counted nor changed).
    #[arg(long, default_value_t = 0)]
    without_agent: usize,
}

/// Profiles of the demo workload, with weights (inference-heavy: many small, some large).
const MIX: [(&str, u64); 5] = [
    ("1g.10gb", 30),
    ("2g.20gb", 20),
    ("3g.40gb", 25),
    ("4g.40gb", 10),
    ("7g.80gb", 15),
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() % 1_000_000) as f64 / 1_000_000.0
    }
}

/// Settings that make the demo move within minutes (a production cluster keeps the defaults).
pub fn demo_settings(mode: Mode, listen: SocketAddr) -> Settings {
    let mut s = Settings {
        mode,
        ..Default::default()
    };
    s.batching.quiet = Dur::secs(2);
    s.batching.max_wait = Dur::secs(10);
    s.batching.resync = Dur::secs(5);
    s.budgets.max_nodes_reconfiguring = Amount::Percent(50);
    s.budgets.node_cooldown = Dur::secs(20);
    s.lease.duration = Dur::secs(6);
    s.lease.retry = Dur::secs(1);
    s.http.listen = listen.to_string();
    s
}

/// Run the demo.
pub fn run(args: DemoArgs) -> Result<ExitCode> {
    crate::controller_cmd::init_logging(&crate::controller_cmd::LogArgs {
        log_format: crate::controller_cmd::LogFormat::Plain,
        log_level: "info".into(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let backend: mig_planner::Backend = serde_json::from_value(serde_json::json!(args.backend))
            .map_err(|_| anyhow::anyhow!("unknown --backend {:?}: use mig-manager or nvml", args.backend))?;
        let mut spec = kube_emulator::fleet::default_spec(args.nodes, args.gpus_per_node);
        spec.device_plugin_pods = backend == mig_planner::Backend::Nvml;
        let mut settings = demo_settings(args.mode, args.listen);
        settings.planner.backend = backend;
        let system = System::start(
            args.api_listen,
            &spec,
            settings,
            Duration::from_millis(500),
            args.without_agent,
        )
        .await?;
        if let Some(path) = &args.kubeconfig_out {
            std::fs::write(path, system.server.kubeconfig())
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        let (client, server, controller) = (system.client.clone(), &system.server, &system.controller);
        let web = format!("http://{}", controller.addr);
        println!(
            "mig-autoscaler demo: {} nodes x {} GPUs, mode {}",
            args.nodes,
            args.gpus_per_node,
            args.mode.as_str()
        );
        println!("  layout view   {web}/");
        println!("  plan API      {web}/api/v1/plan   (also /api/v1/layouts, /api/v1/pods/NS/NAME/explain)");
        println!("  metrics       {web}/metrics");
        println!(
            "  Kubernetes    {}{}",
            server.url(),
            args.kubeconfig_out
                .as_ref()
                .map(|p| format!("   (kubeconfig: {})", p.display()))
                .unwrap_or_default()
        );
        println!("Ctrl-C stops.");

        let trace = match &args.trace {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                // From the trace's observation window, as `simulate` replays it: pods created
                // before it and still running arrive first.
                let pods = mig_sim::parse_openb(&path.display().to_string(), &text)?;
                let start = mig_sim::trace::observation_start(&pods);
                let pods = mig_sim::trace::window(pods, start, 1.0);
                println!(
                    "  workload      {} pods from {}, time x{}",
                    pods.len(),
                    path.display(),
                    args.time_scale
                );
                Some(pods)
            }
            None => None,
        };
        let workload = match trace {
            Some(pods) => {
                let replayer = system.replayer();
                let scale = args.time_scale;
                tokio::spawn(async move {
                    let forever = Duration::from_secs(u64::MAX / 4);
                    replayer
                        .run(&pods, scale, f64::INFINITY, Duration::from_millis(250), forever)
                        .await;
                })
            }
            None => tokio::spawn(workload(client.clone(), args.seed, args.arrival_seconds)),
        };
        match args.duration {
            Some(secs) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs_f64(secs.max(0.0))) => {}
                    _ = shutdown_signal() => {}
                }
            }
            None => shutdown_signal().await,
        }
        workload.abort();
        let summary = summary(&client, &controller.shared.metrics.encode()).await;
        println!("{summary}");
        system.stop().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// Pods arrive (weighted profiles, about every `arrival` seconds) and finish 20–120 s after they
/// start running, as inference and batch jobs would.
async fn workload(client: Client, seed: u64, arrival: f64) {
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let mut rng = Rng(seed.max(1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut lifetimes: BTreeMap<String, (Duration, Option<Instant>)> = BTreeMap::new();
    let mut n = 0u64;
    let mut next_arrival = Instant::now();
    loop {
        let now = Instant::now();
        let listed = pods
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let pending = listed
            .iter()
            .filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_none()))
            .count();
        if now >= next_arrival && pending < 12 {
            let total: u64 = MIX.iter().map(|(_, w)| w).sum();
            let mut pick = rng.next() % total;
            let profile = MIX
                .iter()
                .find(|(_, w)| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .map_or("1g.10gb", |(p, _)| p);
            n += 1;
            let name = format!("job-{n:04}-{}", profile.replace('.', "-"));
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default", "labels": {"app": "mig-demo"}},
                "spec": {"containers": [{"name": "work", "image": "nvcr.io/nvidia/cuda:12.4.0-base-ubuntu22.04",
                    "resources": {"limits": {format!("nvidia.com/mig-{profile}"): "1"}}}]},
            }))
            .unwrap_or_default();
            if pods.create(&PostParams::default(), &pod).await.is_ok() {
                lifetimes.insert(name, (Duration::from_secs_f64(20.0 + 100.0 * rng.unit()), None));
            }
            next_arrival = now + Duration::from_secs_f64(arrival.max(0.1) * (0.5 + rng.unit()));
        }
        for p in &listed {
            let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            if let Some((life, since)) = lifetimes.get_mut(&p.name_any()) {
                if running && since.is_none() {
                    *since = Some(now);
                }
                if since.is_some_and(|s| now.duration_since(s) >= *life) {
                    let _ = pods
                        .delete(
                            &p.name_any(),
                            &DeleteParams {
                                grace_period_seconds: Some(0),
                                ..DeleteParams::default()
                            },
                        )
                        .await;
                    lifetimes.remove(&p.name_any());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn summary(client: &Client, metrics: &str) -> String {
    let pods = Api::<Pod>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let running = pods
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .count();
    let value = |series: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("0")
            .to_string()
    };
    format!(
        "summary: {} pods now ({running} running, {} pending); reconfigurations done {}, rolled back {}, superseded {}; grants {}",
        pods.len(),
        pods.len() - running,
        value("mig_autoscaler_reconfigurations_total{result=\"Done\"}"),
        value("mig_autoscaler_reconfigurations_total{result=\"RolledBack\"}"),
        value("mig_autoscaler_reconfigurations_total{result=\"Superseded\"}"),
        value("mig_autoscaler_grants_total{result=\"written\"}"),
    )
}
