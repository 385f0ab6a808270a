//! `mig-autoscaler catalog ...`: the catalog from the command line.
//!
//! Exit codes (scripts rely on them): 0 success / valid; 1 the layout or config is not valid;
//! 2 bad input (unknown GPU, unparsable layout, unreadable file).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use mig_catalog::migparted::{MigPartedConfig, Verdict};
use mig_catalog::nvml::{ObservedGpu, cross_check};
use mig_catalog::{Catalog, GpuModel, Layout};
use serde::Serialize;

/// Catalog subcommands.
#[derive(Subcommand)]
pub enum CatalogCommand {
    /// List the known GPU models with their product labels and PCI ids.
    Models {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print every valid non-empty layout of a GPU model.
    Layouts {
        /// GPU: product label (nvidia.com/gpu.product), NVML name, PCI device id or model key.
        #[arg(long)]
        gpu: String,
        /// Only layouts to which no further instance can be added.
        #[arg(long)]
        maximal: bool,
        /// Print a JSON array (one element per layout: an array of {profile, start, size, profile_id}).
        #[arg(long)]
        json: bool,
    },
    /// Check a layout: exit 0 if valid, 1 with the reasons on stderr if not, 2 on bad input.
    Check {
        /// GPU: product label, NVML name, PCI device id or model key.
        #[arg(long)]
        gpu: String,
        /// Layout in canonical form, e.g. "3g.40gb@0,2g.20gb@4,1g.10gb@6".
        #[arg(long)]
        layout: String,
        /// Driver branch (e.g. 535) to also check driver gates.
        #[arg(long)]
        driver: Option<u32>,
    },
    /// Say, for each config of a mig-parted file (or ConfigMap), whether it is realisable on a GPU.
    MigPartedCheck {
        /// GPU: product label, NVML name, PCI device id or model key.
        #[arg(long)]
        gpu: String,
        /// mig-parted config YAML, or a ConfigMap holding one.
        #[arg(long)]
        config: PathBuf,
    },
    /// Compare the catalog with a GPU's NVML profiles recorded as `nvidia-smi mig -lgip` and `-lgipp`
    /// output (or as JSON). Exit 1 on a blocking mismatch.
    NvmlCheck {
        /// JSON recording (mig_catalog::nvml::ObservedGpu).
        #[arg(long, conflicts_with_all = ["lgip", "lgipp", "name"])]
        recorded: Option<PathBuf>,
        /// Output of `nvidia-smi mig -lgip`.
        #[arg(long, requires_all = ["lgipp", "name"])]
        lgip: Option<PathBuf>,
        /// Output of `nvidia-smi mig -lgipp`.
        #[arg(long)]
        lgipp: Option<PathBuf>,
        /// NVML device name (`nvidia-smi --query-gpu=name --format=csv,noheader`).
        #[arg(long)]
        name: Option<String>,
        /// GPU index in the recording.
        #[arg(long, default_value_t = 0)]
        index: u32,
    },
}

/// Run a catalog subcommand.
pub fn run(cmd: CatalogCommand) -> Result<ExitCode> {
    let catalog = Catalog::embedded();
    match cmd {
        CatalogCommand::Models { json } => models(catalog, json),
        CatalogCommand::Layouts { gpu, maximal, json } => layouts(catalog.lookup(&gpu)?, maximal, json),
        CatalogCommand::Check { gpu, layout, driver } => check(catalog.lookup(&gpu)?, &layout, driver),
        CatalogCommand::MigPartedCheck { gpu, config } => mig_parted_check(catalog.lookup(&gpu)?, &config),
        CatalogCommand::NvmlCheck {
            recorded,
            lgip,
            lgipp,
            name,
            index,
        } => {
            let observed = match (recorded, lgip, lgipp, name) {
                (Some(path), ..) => serde_json::from_str::<ObservedGpu>(&read(&path)?)
                    .with_context(|| format!("{} is not a recorded GPU (JSON)", path.display()))?,
                (None, Some(lgip), Some(lgipp), Some(name)) => {
                    ObservedGpu::from_nvidia_smi(&name, index, &read(&lgip)?, &read(&lgipp)?)?
                }
                _ => anyhow::bail!("give --recorded FILE, or --lgip FILE --lgipp FILE --name NAME"),
            };
            let report = cross_check(catalog, &observed)?;
            for m in &report.mismatches {
                let level = if m.is_blocking() { "MISMATCH" } else { "note" };
                println!("{level}: {m}");
            }
            if report.is_consistent() {
                println!(
                    "catalog agrees with NVML on {} for every profile it plans with",
                    report.model
                );
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "catalog disagrees with NVML on {}: the agent will refuse to act on this GPU",
                    report.model
                );
                Ok(ExitCode::from(1))
            }
        }
    }
}

fn read(path: &PathBuf) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn models(catalog: &Catalog, json: bool) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &catalog.models)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<[String; 6]> = catalog
        .models
        .iter()
        .map(|m| {
            let ids: Vec<String> = m
                .skus
                .iter()
                .map(|s| format!("0x{:04X}", s.pci_device_id >> 16))
                .collect();
            let mut labels: Vec<&str> = m.product_labels().collect();
            if labels.is_empty() {
                labels.push("-");
            }
            let profiles: Vec<&str> = m.profiles.iter().map(|p| p.name.as_str()).collect();
            [
                m.key.clone(),
                m.architecture.to_string(),
                format!("{}c/{}m", m.compute_slices, m.memory_slices),
                m.layouts().len().to_string(),
                format!("{} ({})", labels.join(", "), ids.join(",")),
                profiles.join(" "),
            ]
        })
        .collect();
    let header = [
        "MODEL",
        "ARCH",
        "SLICES",
        "LAYOUTS",
        "PRODUCT LABELS (PCI IDS)",
        "PROFILES",
    ];
    let width = |c: usize| {
        rows.iter()
            .map(|r| r[c].chars().count())
            .chain([header[c].len()])
            .max()
            .unwrap_or(0)
    };
    let w: Vec<usize> = (0..5).map(width).collect();
    let line = |r: [&str; 6]| {
        format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:<w4$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4]
        )
    };
    writeln!(out, "{}", line(header))?;
    for r in &rows {
        writeln!(out, "{}", line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct JsonInstance<'a> {
    profile: &'a str,
    start: u8,
    size: u8,
    profile_id: u32,
}

fn json_layout<'a>(model: &'a GpuModel, layout: &Layout) -> Vec<JsonInstance<'a>> {
    layout
        .instances()
        .iter()
        .filter_map(|i| {
            let p = model.profile(i.profile)?;
            Some(JsonInstance {
                profile: &p.name,
                start: i.start,
                size: p.memory_slices,
                profile_id: p.profile_id,
            })
        })
        .collect()
}

fn layouts(model: &GpuModel, maximal: bool, json: bool) -> Result<ExitCode> {
    let chosen: Vec<&Layout> = if maximal {
        model.maximal_layouts().collect()
    } else {
        model.layouts().iter().collect()
    };
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<_> = chosen.iter().map(|l| json_layout(model, l)).collect();
        serde_json::to_writer(&mut out, &v)?;
        writeln!(out)?;
    } else {
        for l in chosen {
            writeln!(out, "{}", model.format_layout(l))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check(model: &GpuModel, text: &str, driver: Option<u32>) -> Result<ExitCode> {
    let layout = model.parse_layout(text)?;
    match model.validate_with_driver(&layout, driver) {
        Ok(()) => {
            println!("valid on {}: {}", model.key, model.format_layout(&layout));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("invalid on {}: {}", model.key, model.format_layout(&layout));
            for v in &e.violations {
                eprintln!("  [{}] {v}", v.rule());
            }
            Ok(ExitCode::from(1))
        }
    }
}

fn mig_parted_check(model: &GpuModel, path: &PathBuf) -> Result<ExitCode> {
    let config =
        MigPartedConfig::from_yaml(&read(path)?).with_context(|| format!("reading {}", path.display()))?;
    let mut all_ok = true;
    for v in config.check_on(model) {
        match v.verdict {
            Verdict::Realisable { layouts } => {
                let shown: Vec<String> = layouts
                    .iter()
                    .map(|(_, l)| {
                        l.as_ref()
                            .map_or_else(|| "MIG off".to_string(), |l| model.format_layout(l))
                    })
                    .collect();
                println!("{:<28} realisable      {}", v.name, shown.join(" | "));
            }
            Verdict::NotApplicable => println!(
                "{:<28} not-applicable  (device-filter excludes {})",
                v.name, model.key
            ),
            Verdict::Unrealisable { reasons } => {
                all_ok = false;
                println!("{:<28} unrealisable    {}", v.name, reasons.join("; "));
            }
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
