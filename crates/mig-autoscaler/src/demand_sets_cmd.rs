//! `mig-autoscaler demand-sets`: plan ParvaGPU's published demand sets on idle GPUs and compare the
//! GPUs used with ParvaGPU's own deployments (docs/evaluation.md).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use mig_planner::SolverKind;
use mig_sim::demand_sets::{DemandSet, fits_one_gpu, pack, parse_parvagpu_deploy};

/// Arguments of `demand-sets`.
#[derive(Args)]
pub struct DemandSetsArgs {
    /// ParvaGPU's data folder (with `deployment/SLO<i>/SLO<i>_ParvaGPU_deploy.csv`), e.g.
    /// ../shared/traces/parvagpu-sc24-a100-profiles.
    #[arg(long)]
    parvagpu: PathBuf,
    /// GPU model the instances are planned on.
    #[arg(long, default_value = "NVIDIA-A100-SXM4-80GB")]
    product: String,
    /// Idle GPUs offered to the planner, as a multiple of ParvaGPU's count (rounded up to whole
    /// nodes of 8).
    #[arg(long, default_value_t = 2.0)]
    headroom: f64,
    /// Write demand-sets.csv here.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn read_sets(dir: &std::path::Path) -> Result<Vec<DemandSet>> {
    let mut sets = Vec::new();
    for i in 1.. {
        let name = format!("SLO{i}");
        let path = dir
            .join("deployment")
            .join(&name)
            .join(format!("{name}_ParvaGPU_deploy.csv"));
        if !path.exists() {
            break;
        }
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut set = parse_parvagpu_deploy(&format!("{name}_ParvaGPU_deploy.csv"), &text)?;
        set.name = name;
        sets.push(set);
    }
    anyhow::ensure!(
        !sets.is_empty(),
        "no deployment/SLO1/SLO1_ParvaGPU_deploy.csv under {}",
        dir.display()
    );
    Ok(sets)
}

fn sizes(layouts: &[Vec<u8>]) -> String {
    layouts
        .iter()
        .map(|l| l.iter().map(u8::to_string).collect::<Vec<_>>().join("+"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Plan every demand set with HiGHS and with greedy; print (and write) the comparison.
pub fn run(args: DemandSetsArgs) -> Result<ExitCode> {
    let sets = read_sets(&args.parvagpu)?;
    let header = "scenario,instances,compute_slices,lower_bound,parvagpu_gpus,parvagpu_layouts_valid,solver,gpus_offered,gpus_used,placed,plan_ms,layouts";
    let mut csv = format!("{header}\n");
    println!("{}", header.replace(',', "\t"));
    for set in &sets {
        let mut valid = 0;
        for gpu in &set.parva_gpus {
            if fits_one_gpu(&args.product, gpu)? {
                valid += 1;
            }
        }
        let offered = ((set.parva_gpus.len() as f64 * args.headroom).ceil() as usize).div_ceil(8) * 8;
        for kind in [SolverKind::Highs, SolverKind::Greedy] {
            let r = pack(set, &args.product, offered.max(8), kind)?;
            let mut line = String::new();
            let _ = write!(
                line,
                "{},{},{},{},{},{valid}/{},{},{},{},{},{:.1},{}",
                r.name,
                r.instances,
                r.compute_slices,
                r.lower_bound,
                r.parva_gpus,
                set.parva_gpus.len(),
                r.solver,
                offered.max(8),
                r.gpus_used,
                r.placed,
                r.millis,
                sizes(&r.layouts)
            );
            println!("{}", line.replace(',', "\t"));
            csv.push_str(&line);
            csv.push('\n');
        }
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join("demand-sets.csv"), csv)?;
        eprintln!("wrote {}/demand-sets.csv", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}
