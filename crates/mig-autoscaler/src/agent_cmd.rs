//! `mig-autoscaler agent`: the node agent (one per MIG node, a DaemonSet).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use mig_agent::{AgentSettings, FailurePolicy, NvidiaSmiGpus};

use crate::controller_cmd::{LogArgs, client, init_logging, shutdown_signal};

/// What to do when a reconfiguration fails.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnFailure {
    /// Return to the previous `nvidia.com/mig.config`, then untaint.
    Rollback,
    /// Leave the node tainted with a Warning Event for a person.
    StayTainted,
}

/// How target layouts reach the GPUs.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BackendArg {
    /// Set `nvidia.com/mig.config` and let NVIDIA's mig-manager apply it (a changed GPU is rebuilt whole).
    MigManager,
    /// Destroy and create instances at explicit placements with NVML (`nvidia-smi mig`); in-use
    /// instances the target keeps are not touched. The controller's `planner.backend` must say `nvml` too.
    Nvml,
}

/// Arguments of `agent`.
#[derive(Args)]
pub struct AgentArgs {
    /// This node's name (downward API `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Kubeconfig; default: in-cluster service account, else ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Listen address for /metrics, /healthz, /readyz.
    #[arg(long, default_value = "0.0.0.0:8081", env = "MIG_AUTOSCALER_AGENT_LISTEN")]
    listen: SocketAddr,
    /// How often to look at the node, seconds.
    #[arg(long, default_value_t = 1.0)]
    tick_seconds: f64,
    /// After a failed start-up catalog check, check again this many seconds later.
    #[arg(long, default_value_t = 60.0)]
    catalog_retry_seconds: f64,
    /// On a failed or timed-out phase.
    #[arg(long, value_enum, default_value = "rollback")]
    on_failure: OnFailure,
    /// How target layouts reach the GPUs (the same as the controller's `planner.backend`).
    #[arg(
        long,
        value_enum,
        default_value = "mig-manager",
        env = "MIG_AUTOSCALER_BACKEND"
    )]
    backend: BackendArg,
    /// nvml backend: `key=value` labels of the device-plugin pods (to see when the plugin, paused
    /// with `nvidia.com/gpu.deploy.device-plugin` after a change, is gone from the node).
    #[arg(long, default_value = mig_agent::agent::DEVICE_PLUGIN_SELECTOR)]
    device_plugin_selector: String,
    /// Per-instance utilization and pods from dcgm-exporter: the pod on this node with these
    /// `key=value` labels, at its pod IP (empty: do not read dcgm-exporter).
    #[arg(long, default_value = mig_agent::agent::DCGM_EXPORTER_SELECTOR)]
    dcgm_exporter_selector: String,
    /// dcgm-exporter's metrics port.
    #[arg(long, default_value_t = 9400)]
    dcgm_exporter_port: u16,
    /// Read dcgm-exporter at this URL instead (e.g. `http://$(HOST_IP):9400/metrics`).
    #[arg(long)]
    dcgm_exporter_url: Option<String>,
    /// How often dcgm-exporter is read, seconds.
    #[arg(long, default_value_t = 15.0)]
    dcgm_interval_seconds: f64,
    /// The nvidia-smi to read GPUs with.
    #[arg(long, default_value = "nvidia-smi")]
    nvidia_smi: String,
    /// One nvidia-smi call taking longer than this is killed, and the GPUs it read are unknown.
    #[arg(long, default_value_t = 20.0)]
    nvidia_smi_timeout_seconds: f64,
    /// The GPU operator's namespace: device-plugin and dcgm-exporter pods are trusted only there,
    /// and only when a DaemonSet owns them.
    #[arg(long, default_value = mig_agent::agent::OPERATOR_NAMESPACE)]
    operator_namespace: String,
    /// A grant older than this when first seen is refused (never started).
    #[arg(long, default_value_t = 600.0)]
    max_grant_age_seconds: f64,
    /// While a reconfiguration runs, rewrite its state this often (the controller's
    /// `budgets.agentTimeout` must be well above it).
    #[arg(long, default_value_t = 15.0)]
    heartbeat_seconds: f64,
    /// /healthz fails when no step has finished for this long.
    #[arg(long, default_value_t = 300.0)]
    stall_seconds: f64,
    /// Write the node report at least this often, changed or not (the controller's
    /// `reportTimeout` must be well above it).
    #[arg(long, default_value_t = 300.0)]
    report_refresh_seconds: f64,
    #[command(flatten)]
    log: LogArgs,
}

/// Run until SIGTERM/Ctrl-C; a step in progress always finishes (and its phase is persisted).
pub fn run(args: AgentArgs) -> Result<ExitCode> {
    init_logging(&args.log);
    for (flag, v) in [
        ("--tick-seconds", args.tick_seconds),
        ("--catalog-retry-seconds", args.catalog_retry_seconds),
        ("--dcgm-interval-seconds", args.dcgm_interval_seconds),
        ("--nvidia-smi-timeout-seconds", args.nvidia_smi_timeout_seconds),
        ("--max-grant-age-seconds", args.max_grant_age_seconds),
        ("--stall-seconds", args.stall_seconds),
        ("--heartbeat-seconds", args.heartbeat_seconds),
        ("--report-refresh-seconds", args.report_refresh_seconds),
    ] {
        if !(v > 0.0 && v.is_finite()) {
            anyhow::bail!("{flag} must be positive");
        }
    }
    let mut settings = AgentSettings::new(args.node.clone());
    settings.tick = std::time::Duration::from_secs_f64(args.tick_seconds);
    settings.catalog_retry = std::time::Duration::from_secs_f64(args.catalog_retry_seconds);
    settings.listen = Some(args.listen);
    settings.device_plugin_selector = args.device_plugin_selector.clone();
    settings.operator_namespace = args.operator_namespace.clone();
    settings.stall_after = std::time::Duration::from_secs_f64(args.stall_seconds);
    settings.heartbeat = std::time::Duration::from_secs_f64(args.heartbeat_seconds);
    settings.report_refresh = std::time::Duration::from_secs_f64(args.report_refresh_seconds);
    settings.sequence.max_grant_age =
        jiff::SignedDuration::try_from(std::time::Duration::from_secs_f64(args.max_grant_age_seconds))?;
    settings.dcgm_interval = std::time::Duration::from_secs_f64(args.dcgm_interval_seconds);
    settings.dcgm = match (&args.dcgm_exporter_url, args.dcgm_exporter_selector.trim()) {
        (Some(url), _) => Some(mig_agent::agent::DcgmEndpoint::Url(url.clone())),
        (None, "") => None,
        (None, selector) => Some(mig_agent::agent::DcgmEndpoint::Pod {
            selector: selector.to_string(),
            port: args.dcgm_exporter_port,
        }),
    };
    settings.sequence.backend = match args.backend {
        BackendArg::MigManager => mig_planner::snapshot::Backend::MigManager,
        BackendArg::Nvml => mig_planner::snapshot::Backend::Nvml,
    };
    settings.sequence.on_failure = match args.on_failure {
        OnFailure::Rollback => FailurePolicy::Rollback,
        OnFailure::StayTainted => FailurePolicy::StayTainted,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let (client, api_server) = client(args.kubeconfig.as_ref()).await?;
        settings.api_server = Some(api_server);
        let mut source = NvidiaSmiGpus::new(args.nvidia_smi.clone());
        source.timeout = std::time::Duration::from_secs_f64(args.nvidia_smi_timeout_seconds);
        let source = Arc::new(source);
        let running = mig_agent::start(client, settings, source)
            .await
            .with_context(|| format!("cannot start the agent on {}", args.listen))?;
        tracing::info!(node = %args.node, addr = ?running.addr, "agent started");
        shutdown_signal().await;
        tracing::info!("shutting down after the current step");
        running.stop().await;
        Ok(ExitCode::SUCCESS)
    })
}
