//! `mig-autoscaler`: one binary, one subcommand per role. Wiring only; the work lives in the crates.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod agent_cmd;
mod catalog_cmd;
mod controller_cmd;
mod demand_sets_cmd;
mod demo_cmd;
mod emulator_cmd;
mod inflation_cmd;
mod plan_cmd;
mod simulate_cmd;

/// `0.1.0 (commit 0123456789ab, 2026-12-03T19:00:00+00:00)`, from the build script.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("MIG_AUTOSCALER_COMMIT"),
    ", ",
    env!("MIG_AUTOSCALER_COMMIT_DATE"),
    ")"
);

/// Repartitions NVIDIA MIG GPUs in a Kubernetes cluster automatically.
#[derive(Parser)]
#[command(name = "mig-autoscaler", version, long_version = LONG_VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect the MIG geometry catalog: models, valid layouts, layout checks, mig-parted configs.
    Catalog {
        #[command(subcommand)]
        command: catalog_cmd::CatalogCommand,
    },
    /// Run the controller: watch the cluster, plan in batches, serve the plan API and metrics, and
    /// (mode auto) grant reconfigurations to node agents under disruption budgets.
    Controller(controller_cmd::ControllerArgs),
    /// Run the node agent: report this node's GPUs; run granted reconfigurations (taint, drain,
    /// relabel, await mig-manager, verify, untaint).
    Agent(agent_cmd::AgentArgs),
    /// Run the whole system on an embedded demo cluster (emulated API, scheduler, kubelets,
    /// mig-manager; real controller and agents; a workload) and serve the web view.
    Demo(demo_cmd::DemoArgs),
    /// Replay a GPU-cluster trace through MIG policies (static, greedy, ILP) and compare them.
    Simulate(simulate_cmd::SimulateArgs),
    /// Plan ParvaGPU's published demand sets on idle GPUs and compare the GPUs used with its own
    /// deployments.
    DemandSets(demand_sets_cmd::DemandSetsArgs),
    /// FGD's allocation-rate experiment (arrivals only, workload inflated to 130%, seeds 42–51)
    /// with MIG instances: static layouts, on-demand creation and the planner.
    Inflation(inflation_cmd::InflationArgs),
    /// Serve an in-process Kubernetes API with a default MIG fleet (test equipment, for kubectl and clients).
    Emulator(emulator_cmd::EmulatorArgs),
    /// Plan target MIG layouts for a cluster snapshot (dry run: reads a file, touches nothing).
    Plan(plan_cmd::PlanArgs),
    /// Print the version, the git commit and its date (also `--version` and the `build_info` metric).
    Version,
    /// Print a shell completion script: `source <(mig-autoscaler completion bash)`, or save it
    /// where your shell loads completions (zsh: a `_mig-autoscaler` file on `$fpath`).
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    mig_protocol::build::set(mig_protocol::build::BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        commit: env!("MIG_AUTOSCALER_COMMIT"),
        date: env!("MIG_AUTOSCALER_COMMIT_DATE"),
    });
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Version => {
            println!("mig-autoscaler {}", mig_protocol::build::get());
            Ok(ExitCode::SUCCESS)
        }
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "mig-autoscaler",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Catalog { command } => catalog_cmd::run(command),
        Command::Plan(args) => plan_cmd::run(args),
        Command::Emulator(args) => emulator_cmd::run(args),
        Command::Controller(args) => controller_cmd::run(args),
        Command::Agent(args) => agent_cmd::run(args),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Simulate(args) => simulate_cmd::run(args),
        Command::DemandSets(args) => demand_sets_cmd::run(args),
        Command::Inflation(args) => inflation_cmd::run(args),
    };
    match result {
        Ok(code) => code,
        // `mig-autoscaler catalog layouts ... | head` closes stdout early: that is not an error.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Whether `e` is a write to a closed pipe, directly or through serde_json's writer.
fn broken_pipe(e: &anyhow::Error) -> bool {
    let broken = Some(std::io::ErrorKind::BrokenPipe);
    e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().map(std::io::Error::kind) == broken
            || cause
                .downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind)
                == broken
    })
}
