//! `mig-autoscaler controller`: run the cluster-level controller until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use mig_controller::{Mode, Settings};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line (the cluster default).
    Json,
}

/// How the long-running commands log: to stderr, plain or JSON, colour only on a terminal.
#[derive(Args, Clone, Debug)]
pub struct LogArgs {
    /// Log format: `plain` or `json` (one object per line, nothing else on stderr).
    #[arg(long, value_enum, default_value = "plain", env = "MIG_AUTOSCALER_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log level of mig-autoscaler: error, warn, info, debug or trace. The HTTP and TLS libraries
    /// stay at warn; RUST_LOG, when set, replaces this filter entirely.
    #[arg(long, default_value = "info", env = "MIG_AUTOSCALER_LOG_LEVEL", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log_level: String,
}

/// Libraries whose debug output drowns ours (every request, every frame).
const QUIET_LIBRARIES: &str = "hyper=warn,hyper_util=warn,h2=warn,tower=warn,tower_http=warn,rustls=warn";

/// Arguments of `controller`. Flags override the settings file; environment variables (in
/// brackets) override defaults the same way flags do.
#[derive(Args)]
pub struct ControllerArgs {
    /// Kubeconfig to use; default: in-cluster service account, else ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Settings file (YAML or JSON; see docs/controller.md). Unknown keys are errors.
    #[arg(long, env = "MIG_AUTOSCALER_CONFIG")]
    config: Option<PathBuf>,
    /// `dry-run` (plan, explain, never write to nodes) or `auto` (also grant reconfigurations).
    #[arg(long, env = "MIG_AUTOSCALER_MODE")]
    mode: Option<Mode>,
    /// Listen address for the API, metrics and probes.
    #[arg(long, env = "MIG_AUTOSCALER_LISTEN")]
    listen: Option<String>,
    /// This replica's identity in the leader lease and Events (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Namespace of the leader lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    #[command(flatten)]
    log: LogArgs,
    /// Print the effective settings as YAML and exit.
    #[arg(long)]
    print_settings: bool,
}

/// Settings from the file, then flags and environment.
fn settings(args: &ControllerArgs) -> Result<Settings> {
    let mut s = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            Settings::from_yaml(&text).with_context(|| format!("settings file {}", path.display()))?
        }
        None => Settings::default(),
    };
    if let Some(m) = args.mode {
        s.mode = m;
    }
    if let Some(l) = &args.listen {
        s.http.listen = l.clone();
    }
    if let Some(ns) = &args.lease_namespace {
        s.lease.namespace = ns.clone();
    }
    s.validate()?;
    Ok(s)
}

/// Logging to stderr as `log` says (RUST_LOG, when set, is the filter); ANSI colours only when
/// stderr is a terminal.
pub fn init_logging(log: &LogArgs) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{},{QUIET_LIBRARIES}", log.log_level))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match log.log_format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A client from a kubeconfig, or inferred. It does not retry 429/503/504 itself: the controller's
/// rounds and the agent's ticks retry every write, and a PodDisruptionBudget's 429 on an eviction
/// must be reported, not waited out in the client's backoff.
/// Also the API server's URL, for log lines about connection errors.
pub async fn client(kubeconfig: Option<&PathBuf>) -> Result<(kube::Client, String)> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given and none found (in-cluster or ~/.kube/config)")?,
    };
    config.default_retry = false;
    let url = config.cluster_url.to_string();
    tracing::info!(api_server = %url, "Kubernetes API");
    Ok((kube::Client::try_from(config)?, url))
}

/// Run until the first SIGTERM/Ctrl-C (graceful: lease released); a second one exits at once.
pub fn run(args: ControllerArgs) -> Result<ExitCode> {
    let mut settings = settings(&args)?;
    if args.print_settings {
        print!("{}", serde_yaml::to_string(&settings)?);
        return Ok(ExitCode::SUCCESS);
    }
    // What-if plans run in a child of this same binary, killed when their request ends.
    settings.http.what_if_program = Some(std::env::current_exe().context("cannot find this program's path")?);
    init_logging(&args.log);
    let identity = args.identity.clone().unwrap_or_else(|| {
        std::env::var("HOSTNAME").unwrap_or_else(|_| format!("mig-autoscaler-{}", std::process::id()))
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let (client, api_server) = client(args.kubeconfig.as_ref()).await?;
        settings.api_server = Some(api_server);
        let running = mig_controller::start(client, settings.clone(), identity.clone()).await?;
        tracing::info!(addr = %running.addr, mode = settings.mode.as_str(), identity, "controller started");
        if args.log.log_format == LogFormat::Plain {
            eprintln!(
                "mig-autoscaler controller ({}) serving http://{}/api/v1/plan",
                settings.mode.as_str(),
                running.addr
            );
        }
        shutdown_signal().await;
        tracing::info!("shutting down: releasing the lease; a second signal exits at once");
        tokio::select! {
            _ = running.stop() => {}
            _ = shutdown_signal() => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The first SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
