//! `mig-autoscaler plan`: plan a snapshot from a file, without touching any cluster.
//!
//! Exit codes: 0 a plan was printed; 2 the snapshot or policy could not be read (with the JSON path).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use mig_planner::{Policy, Snapshot};

/// Arguments of `plan`.
#[derive(Args)]
pub struct PlanArgs {
    /// Cluster snapshot (JSON; schema in docs/snapshot.schema.json); `-` reads standard input.
    #[arg(long, required_unless_present = "print_schema")]
    snapshot: Option<PathBuf>,
    /// Policy (JSON); replaces the snapshot's own `policy`.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Print the Plan as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Print the snapshot's JSON Schema and exit.
    #[arg(long)]
    print_schema: bool,
}

fn read(path: &PathBuf) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Run `plan`.
pub fn run(args: PlanArgs) -> Result<ExitCode> {
    if args.print_schema {
        println!("{}", serde_json::to_string_pretty(&Snapshot::json_schema())?);
        return Ok(ExitCode::SUCCESS);
    }
    let Some(path) = &args.snapshot else {
        anyhow::bail!("--snapshot FILE is required")
    };
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read the snapshot from standard input")?
    } else {
        read(path)?
    };
    let snapshot = Snapshot::from_json(&text).with_context(|| format!("snapshot {}", path.display()))?;
    let policy = match &args.policy {
        Some(p) => Policy::from_json(&read(p)?).with_context(|| format!("policy {}", p.display()))?,
        None => snapshot.policy.clone(),
    };
    let plan = mig_planner::plan(&snapshot, &policy);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", plan.render_table());
    }
    Ok(ExitCode::SUCCESS)
}
