//! `mig-autoscaler emulator`: serve the in-process Kubernetes API standalone, for kubectl and any client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use kube_emulator::{Config, Running};

/// Arguments of `emulator`.
#[derive(Args)]
pub struct EmulatorArgs {
    /// Address to listen on (port 0: any free port; the kubeconfig says which).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Write a kubeconfig for this server here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Cluster spec (YAML or JSON: nodes with GPUs and initial layouts); default: a fleet of
    /// A100-80GB and H100-80GB nodes on all-balanced.
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// Nodes of the default fleet (A100-80GB and H100-80GB, alternating).
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// GPUs per node.
    #[arg(long, default_value_t = 8)]
    gpus_per_node: usize,
}

/// Run `emulator` until Ctrl-C.
pub fn run(args: EmulatorArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let server = Running::start(args.listen, Config::default())
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let spec = match &args.cluster {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                serde_yaml::from_str::<kube_emulator::ClusterSpec>(&text)
                    .with_context(|| format!("{} is not a cluster spec", path.display()))?
            }
            None => kube_emulator::fleet::default_spec(args.nodes, args.gpus_per_node),
        };
        server
            .seed([kube_emulator::fleet::default_mig_parted_config_map()])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let cluster =
            kube_emulator::Cluster::new(server.state.clone(), &spec).map_err(|e| anyhow::anyhow!("{e}"))?;
        let _actors = cluster.spawn();
        if let Some(path) = &args.kubeconfig_out {
            // Written whole, then renamed: a reader never sees half a file.
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, server.kubeconfig())
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        }
        println!("kube-emulator serving the Kubernetes API on {}", server.url());
        if let Some(path) = &args.kubeconfig_out {
            println!(
                "kubeconfig: {} (kubectl --kubeconfig {} get nodes)",
                path.display(),
                path.display()
            );
        }
        tokio::signal::ctrl_c().await?;
        server.stop().await;
        Ok(ExitCode::SUCCESS)
    })
}
