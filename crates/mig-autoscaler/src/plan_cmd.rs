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
    /// Output: `table`; `wide` (also what each priority got, every GPU, each node's phases);
    /// `json` or `yaml` (the whole Plan).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// The same as `-o json`.
    #[arg(long, conflicts_with = "output")]
    json: bool,
    /// Print the snapshot's JSON Schema and exit.
    #[arg(long)]
    print_schema: bool,
}

/// How `plan` prints the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// Changes, pods, evictions, warnings.
    Table,
    /// The table, what each priority got, every GPU and each node's phases.
    Wide,
    /// The whole Plan as JSON.
    Json,
    /// The whole Plan as YAML.
    Yaml,
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
    match if args.json { Output::Json } else { args.output } {
        Output::Table => print!("{}", plan.render_table()),
        Output::Wide => print!("{}", plan.render_wide()),
        Output::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&plan)?),
    }
    Ok(ExitCode::SUCCESS)
}
