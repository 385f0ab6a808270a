//! The `mig-autoscaler catalog` command-line contract, and an independent brute-force enumeration of

#![allow(clippy::unwrap_used)] // Tests fail loudly on unexpected input.
//! valid layouts compared with what the CLI prints.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mig-autoscaler"))
        .args(args)
        .output()
        .expect("run mig-autoscaler")
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../mig-catalog/tests/fixtures")
        .join(name)
}

fn text(path: &PathBuf) -> String {
    std::fs::read_to_string(path).unwrap()
}

type Placed = Vec<(String, u64)>;

/// Brute force from first principles: every subset of every (profile, start) pair that nvidia-smi
/// lists, kept when no memory slice is used twice, no profile exceeds its instance total, and at most
/// one `+me` instance is present. Profiles and placements come from recorded `-lgip`/`-lgipp` text,
/// not from the catalog.
fn brute_force(key: &str, max_override: &[(&str, u32)]) -> BTreeSet<Placed> {
    let mut names = std::collections::HashMap::new();
    let mut totals = std::collections::HashMap::new();
    for line in text(&fixture(&format!("{key}.lgip.txt"))).lines() {
        let cells: Vec<&str> = line
            .trim_matches(|c| c == '|' || c == ' ')
            .split_whitespace()
            .collect();
        if cells.len() > 4 && cells[1] == "MIG" {
            let id: u32 = cells[3].parse().unwrap();
            names.insert(id, cells[2].to_string());
            totals.insert(
                cells[2].to_string(),
                cells[4].split('/').nth(1).unwrap().parse::<u32>().unwrap(),
            );
        }
    }
    for (name, max) in max_override {
        totals.insert(name.to_string(), *max);
    }
    // (name, start, slice mask)
    let mut candidates: Vec<(String, u64, u32)> = Vec::new();
    for line in text(&fixture(&format!("{key}.lgipp.txt"))).lines() {
        let id: u32 = line
            .split("ID")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let (set, size) = line.split_once('{').unwrap().1.split_once('}').unwrap();
        let size: u32 = size.trim_start_matches(':').trim().parse().unwrap();
        for s in set.split(',') {
            let start: u32 = s.parse().unwrap();
            candidates.push((names[&id].clone(), u64::from(start), ((1 << size) - 1) << start));
        }
    }
    let n = candidates.len();
    assert!(n <= 26, "{key}: {n} candidates is too many to brute-force");
    let profile_names: Vec<&String> = names.values().collect();
    let which: Vec<usize> = candidates
        .iter()
        .map(|c| profile_names.iter().position(|p| **p == c.0).unwrap())
        .collect();
    let limit: Vec<u32> = profile_names.iter().map(|p| totals[*p]).collect();
    let is_me: Vec<bool> = candidates.iter().map(|c| c.0.contains("+me")).collect();
    let mut out = BTreeSet::new();
    'subsets: for subset in 1u32..(1 << n) {
        let mut used = 0u32;
        let mut me = 0;
        let mut per = [0u32; 16];
        for (i, (_, _, mask)) in candidates.iter().enumerate() {
            if subset & (1 << i) == 0 {
                continue;
            }
            if used & mask != 0 {
                continue 'subsets;
            }
            used |= mask;
            per[which[i]] += 1;
            if per[which[i]] > limit[which[i]] {
                continue 'subsets;
            }
            if is_me[i] {
                me += 1;
                if me > 1 {
                    continue 'subsets;
                }
            }
        }
        let mut placed: Placed = candidates
            .iter()
            .enumerate()
            .filter(|(i, _)| subset & (1 << i) != 0)
            .map(|(_, (name, start, _))| (name.clone(), *start))
            .collect();
        placed.sort();
        out.insert(placed);
    }
    out
}

fn printed(label: &str, maximal: bool) -> BTreeSet<Placed> {
    let mut args = vec!["catalog", "layouts", "--gpu", label, "--json"];
    if maximal {
        args.push("--maximal");
    }
    let out = cli(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layouts = v.as_array().unwrap();
    let set: BTreeSet<Placed> = layouts
        .iter()
        .map(|l| {
            let mut p: Placed = l
                .as_array()
                .unwrap()
                .iter()
                .map(|i| {
                    (
                        i["profile"].as_str().unwrap().to_string(),
                        i["start"].as_u64().unwrap(),
                    )
                })
                .collect();
            p.sort();
            p
        })
        .collect();
    assert_eq!(set.len(), layouts.len(), "{label}: duplicate layouts printed");
    set
}

fn maximal_of(all: &BTreeSet<Placed>) -> BTreeSet<Placed> {
    all.iter()
        .filter(|l| {
            !all.iter()
                .any(|o| o.len() == l.len() + 1 && l.iter().all(|x| o.contains(x)))
        })
        .cloned()
        .collect()
}

#[test]
fn printed_layouts_match_brute_force() {
    // A30 instance totals from the MIG User Guide's A30 table (NVML's own A30 counts are wrong).
    let a30_max = [
        ("1g.6gb", 4),
        ("1g.6gb+me", 1),
        ("2g.12gb", 2),
        ("2g.12gb+me", 1),
        ("4g.24gb", 1),
    ];
    for (label, key, max) in [
        ("NVIDIA-A100-SXM4-40GB", "a100-40gb", &[][..]),
        ("NVIDIA-H100-80GB-HBM3", "h100-80gb", &[][..]),
        ("NVIDIA-A30", "a30-24gb", &a30_max[..]),
    ] {
        let expected = brute_force(key, max);
        let got = printed(label, false);
        assert_eq!(got.len(), expected.len(), "{label}");
        assert_eq!(got, expected, "{label}");
        assert_eq!(printed(label, true), maximal_of(&expected), "{label} --maximal");
    }
}

#[test]
fn check_exit_codes() {
    let ok = cli(&[
        "catalog",
        "check",
        "--gpu",
        "NVIDIA-H100-80GB-HBM3",
        "--layout",
        "3g.40gb@0,2g.20gb@4,1g.10gb@6",
    ]);
    assert_eq!(ok.status.code(), Some(0));
    let bad = cli(&[
        "catalog",
        "check",
        "--gpu",
        "NVIDIA-H100-80GB-HBM3",
        "--layout",
        "4g.40gb@0,2g.20gb@2",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("[overlap]") && stderr.contains("[2, 3]"),
        "{stderr}"
    );
    let gate = cli(&[
        "catalog",
        "check",
        "--gpu",
        "a100-40gb",
        "--layout",
        "4g.20gb@0,3g.20gb@4",
        "--driver",
        "470",
    ]);
    assert_eq!(gate.status.code(), Some(1));
    let unknown = cli(&["catalog", "check", "--gpu", "NVIDIA-L4", "--layout", "1g.10gb@0"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("NVIDIA-H100-80GB-HBM3"),
        "names known models"
    );
    let unparsable = cli(&["catalog", "check", "--gpu", "NVIDIA-A30", "--layout", "2g.12gb@x"]);
    assert_eq!(unparsable.status.code(), Some(2));
    let unknown_profile = cli(&["catalog", "check", "--gpu", "NVIDIA-A30", "--layout", "3g.24gb@0"]);
    assert_eq!(unknown_profile.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown_profile.stderr).contains("unknown profile"));
}

#[test]
fn models_lists_every_model() {
    let out = cli(&["catalog", "models"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for key in [
        "a30-24gb",
        "a100-40gb",
        "h100-80gb",
        "h200-141gb",
        "b200-180gb",
        "gh200-144gb",
        "h20-96gb",
    ] {
        assert!(stdout.contains(key), "{key}");
    }
    // A table: every column starts where its header does, however long the product labels.
    let header = stdout.lines().next().unwrap();
    let at = |title: &str| header.find(title).unwrap();
    for line in stdout.lines().skip(1) {
        let cut = |c: usize| line[..c].ends_with("  ") && !line[c..].starts_with(' ');
        assert!(
            cut(at("PRODUCT LABELS")) && cut(at("PROFILES")),
            "misaligned: {line}"
        );
    }
    let json = cli(&["catalog", "models", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 10);
}

#[test]
fn mig_parted_and_nvml_checks() {
    let cfg = fixture("default-mig-parted-config.yaml");
    let out = cli(&[
        "catalog",
        "mig-parted-check",
        "--gpu",
        "NVIDIA-H100-80GB-HBM3",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "the fixture has unrealisable configs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("all-balanced") && l.contains(" realisable")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("all-1g.5gb ") && l.contains("unrealisable")),
        "{stdout}"
    );

    let (lgip, lgipp) = (fixture("h100-80gb.lgip.txt"), fixture("h100-80gb.lgipp.txt"));
    let args = [
        "catalog",
        "nvml-check",
        "--lgip",
        lgip.to_str().unwrap(),
        "--lgipp",
        lgipp.to_str().unwrap(),
    ];
    let ok = cli(&[&args[..], &["--name", "NVIDIA H100 80GB HBM3"]].concat());
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // The same capture claimed by an A30, whose profile ids mean other profiles.
    let wrong = cli(&[&args[..], &["--name", "NVIDIA A30"]].concat());
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stdout).contains("MISMATCH"));
    let missing = cli(&["catalog", "nvml-check", "--recorded", "/nonexistent.json"]);
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn plan_prints_a_table_or_json_and_rejects_bad_snapshots_with_a_path() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples/snapshot-small.json");
    let table = cli(&["plan", "--snapshot", example.to_str().unwrap()]);
    assert_eq!(
        table.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let stdout = String::from_utf8_lossy(&table.stdout);
    assert!(
        stdout.contains("ml/train-3g: fits on gpu-a100-1") && stdout.contains("after repartition"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ml/h200-only: waits: no GPU in the cluster offers 3g.71gb"),
        "{stdout}"
    );

    let json = cli(&["plan", "--snapshot", example.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["pods"].as_array().unwrap().len(), 4);
    assert_eq!(v["nodes"][0]["phases"][0]["phase"], "Tainting");
    // -o json is --json; -o yaml is the same Plan in YAML.
    let o_json = cli(&["plan", "--snapshot", example.to_str().unwrap(), "-o", "json"]);
    let same: serde_json::Value = serde_json::from_slice(&o_json.stdout).unwrap();
    assert_eq!(same["id"], v["id"]);
    let yaml = cli(&["plan", "--snapshot", example.to_str().unwrap(), "-o", "yaml"]);
    assert_eq!(yaml.status.code(), Some(0));
    let from_yaml: serde_json::Value = serde_yaml::from_slice(&yaml.stdout).unwrap();
    assert_eq!(from_yaml["id"], v["id"]);
    assert_eq!(from_yaml["pods"], v["pods"]);
    // -o wide: the table and more.
    let wide = cli(&["plan", "--snapshot", example.to_str().unwrap(), "-o", "wide"]);
    let wide = String::from_utf8_lossy(&wide.stdout);
    for line in stdout.lines().skip(1) {
        assert!(wide.contains(line), "{line:?} missing from {wide}");
    }
    for section in ["BY PRIORITY", "ALL GPUS", "NODE PHASES"] {
        assert!(wide.contains(section), "{section}: {wide}");
    }
    assert!(wide.contains("(kept)"), "unchanged GPUs listed: {wide}");
    assert!(wide.contains("Tainting -> "), "{wide}");
    let unknown = cli(&["plan", "--snapshot", example.to_str().unwrap(), "-o", "xml"]);
    assert_eq!(unknown.status.code(), Some(2));

    let dir = std::env::temp_dir().join(format!("mig-autoscaler-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"nodes": [{"name": "n", "gpus": [{"index": "zero", "product": "x"}]}]}"#,
    )
    .unwrap();
    let out = cli(&["plan", "--snapshot", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("$.nodes[0].gpus[0].index"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let policy = dir.join("policy.json");
    std::fs::write(
        &policy,
        r#"{"backend": "nvml", "budgets": {"maxNodesChanged": 0}}"#,
    )
    .unwrap();
    let out = cli(&[
        "plan",
        "--snapshot",
        example.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["disruption"]["nodesChanged"], 0,
        "the policy file replaces the snapshot's policy"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `simulate` on the synthetic openb trace, one day, 2 × 2 GPUs, and `extra`.
fn simulate_synthetic(extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_mig-autoscaler"))
        .args(["simulate", "--trace"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../mig-sim/tests/fixtures/synthetic-openb.csv"
        ))
        .args([
            "--nodes",
            "2",
            "--gpus-per-node",
            "2",
            "--window-start",
            "0",
            "--days",
            "1",
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn simulate_compares_policies_on_a_small_trace_and_writes_its_files() {
    let dir = std::env::temp_dir().join(format!("mig-autoscaler-simulate-{}", std::process::id()));
    let out = simulate_synthetic(&["--reconfig-delay", "30,300", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 10, "5 policies x 2 delays:\n{csv}");
    let started = |policy: &str, delay: &str| -> u32 {
        rows.iter()
            .find(|r| r[0].starts_with(policy) && r[1] == delay)
            .unwrap()[3]
            .parse()
            .unwrap()
    };
    // all-balanced has no 4g or 7g: those pods never start; repartitioning starts them.
    assert!(
        started("ilp", "30") > started("static[1g.10gb@0+1g.10gb@1+2g.20gb@2+3g.40gb@4]", "30"),
        "{csv}"
    );
    // The ideal reference starts at least as many as any policy here.
    for policy in ["ilp", "greedy", "static["] {
        assert!(started("ideal", "30") >= started(policy, "30"), "{policy}: {csv}");
    }
    assert!(
        std::fs::read_to_string(dir.join("waits.svg"))
            .unwrap()
            .starts_with("<svg")
    );
    let by_profile = std::fs::read_to_string(dir.join("waits-by-profile.csv")).unwrap();
    assert!(
        by_profile.lines().any(|l| l.starts_with("ilp,30,7g.80gb,")),
        "{by_profile}"
    );
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_mig-autoscaler"))
        .args(["simulate", "--trace", "/nonexistent.csv"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    for (args, says) in [
        (["--drain", "sometimes"], "unknown --drain \"sometimes\""),
        (["--policies", "fifo"], "unknown policy \"fifo\""),
    ] {
        let bad = simulate_synthetic(&args);
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(!bad.status.success() && stderr.contains(says), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn demand_sets_and_inflation_run_on_the_shared_data_and_write_their_files() {
    let shared = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/traces");
    let dir = std::env::temp_dir().join(format!("mig-autoscaler-sets-{}", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mig-autoscaler"))
        .args(["demand-sets", "--parvagpu"])
        .arg(format!("{shared}/parvagpu-sc24-a100-profiles"))
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = std::fs::read_to_string(dir.join("demand-sets.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        1 + 6 * 2,
        "6 scenarios x (ILP, greedy):\n{csv}"
    );
    assert!(
        csv.lines().nth(1).unwrap().starts_with("SLO1,6,10,2,2,2/2,highs"),
        "{csv}"
    );

    // The inflation experiment on a small synthetic cluster (the real one is run for the report).
    let nodes = dir.join("nodes.csv");
    std::fs::write(
        &nodes,
        "sn,cpu_milli,memory_mib,gpu,model\na,1,1,8,G2\nb,1,1,4,G2\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mig-autoscaler"))
        .args(["inflation", "--pods"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../mig-sim/tests/fixtures/synthetic-openb.csv"
        ))
        .arg("--nodes")
        .arg(&nodes)
        .arg("--fgd")
        .arg(format!(
            "{shared}/fgd-atc23-expected-results/analysis_allo_discrete.csv"
        ))
        .args(["--fgd-workload", "openb_pod_list_default"])
        .args(["--seeds", "42,43", "--batch", "4", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let curves = std::fs::read_to_string(dir.join("curves.csv")).unwrap();
    assert_eq!(
        curves.lines().count(),
        1 + 4 * 2 * 2,
        "4 policies x 2 seeds x 2 metrics"
    );
    assert!(
        curves
            .lines()
            .any(|l| l.starts_with("static-balanced,42,requested,"))
    );
    let svg = std::fs::read_to_string(dir.join("allocation.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("paper: 06-FGD"), "{svg}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_mig-autoscaler"))
        .args([
            "inflation",
            "--pods",
            "/nonexistent.csv",
            "--nodes",
            "/nonexistent.csv",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_mig-autoscaler"))
        .args(["demand-sets", "--parvagpu", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(dir);
}

/// The slow path (the whole system on kube-emulator, over HTTP) and the fast path (the planner
/// called directly) on the same small trace, on both backends: the same pods start, as many GPUs
/// change, and waits agree within the system's own overhead (agent and controller ticks, the
/// sequence's phases; with nvml also the device plugin's restart). nvml, which may change a GPU
/// around its running pods, waits less than mig-manager on this trace. These runs have no
/// reservations: a reservation's choice and expiry depend on when each path looks, which makes
/// the number of changes differ by more than ticks do (a fresh-clone CI saw 14 against 10); with
/// them (the default) both paths still start every pod, reserve, and wait alike.
#[test]
fn simulate_slow_and_fast_paths_agree_on_a_small_trace() {
    let run = |backend: &str, reservations: &str| -> (Vec<f64>, Vec<f64>, String) {
        let out = simulate_synthetic(&[
            "--reconfig-delay",
            "30",
            "--policies",
            "ilp,system",
            "--system-scale",
            "0.002",
            "--backend",
            backend,
            "--reserve-max-gpus",
            reservations,
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let row = |policy: &str| -> Vec<f64> {
            let line = stdout
                .lines()
                .find(|l| l.starts_with(&format!("{policy}\t")))
                .unwrap_or_else(|| panic!("no {policy} row: {stdout}"));
            line.split('\t').skip(1).map(|v| v.parse().unwrap()).collect()
        };
        // Columns after the policy: delay, pods, started, p50, p95, p99, mean, allocation, demand,
        // reconfigurations, plans, plan ms p50 and p99, evictions, lost slice-hours,
        // reservations made, GPUs reserved.
        (row("ilp"), row("system"), stdout)
    };
    let mut fast_means = Vec::new();
    for backend in ["mig-manager", "nvml"] {
        let (fast, slow, stdout) = run(backend, "0");
        assert_eq!(slow[2], fast[2], "{backend} started: {stdout}");
        assert_eq!(slow[2], slow[1], "{backend}: every pod starts: {stdout}");
        assert!(
            slow[9] >= 1.0 && (slow[9] - fast[9]).abs() <= 2.0,
            "{backend} reconfigurations: {stdout}"
        );
        let ratio = slow[6] / fast[6];
        assert!(
            (0.67..=1.5).contains(&ratio),
            "{backend} mean waits {} vs {}: {stdout}",
            slow[6],
            fast[6]
        );
        assert_eq!(
            (fast[15], slow[15]),
            (0.0, 0.0),
            "{backend}: reservations are off: {stdout}"
        );
        fast_means.push(fast[6]);
    }
    assert!(
        fast_means[1] < fast_means[0],
        "nvml {} vs mig-manager {}",
        fast_means[1],
        fast_means[0]
    );
    let (fast, slow, stdout) = run("mig-manager", "8");
    assert_eq!(
        (slow[2], fast[2]),
        (slow[1], fast[1]),
        "every pod starts: {stdout}"
    );
    assert!(fast[15] >= 1.0 && slow[15] >= 1.0, "both reserve: {stdout}");
    let ratio = slow[6] / fast[6];
    assert!(
        (0.67..=1.5).contains(&ratio),
        "mean waits {} vs {}: {stdout}",
        slow[6],
        fast[6]
    );
}

#[test]
fn simulate_reads_the_dlrm_format_with_sizes_from_a_parvagpu_deployment() {
    let dir = std::env::temp_dir().join(format!("mig-autoscaler-dlrm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("dlrm.csv");
    let mut text = String::from(
        "instance_sn,role,app_name,cpu_request,cpu_limit,gpu_request,gpu_limit,rdma_request,rdma_limit,memory_request,memory_limit,disk_request,disk_limit,max_instance_per_node,creation_time,scheduled_time,deletion_time\n",
    );
    for i in 0..30 {
        let app = format!("app_{}", i % 7);
        let created = if i < 5 {
            String::new()
        } else {
            (i * 100).to_string()
        };
        text.push_str(&format!(
            "instance_{i},HN,{app},8,8,1,1,0,0,40,40,0,0,2,{created},,{}\n",
            i * 100 + 5_000
        ));
        text.push_str(&format!(
            "cpu_{i},CN,{app},8,8,0,0,0,0,40,40,0,0,2,{},,{}\n",
            i * 10,
            i * 10 + 50
        ));
    }
    std::fs::write(&trace, text).unwrap();
    let sizes = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/traces/parvagpu-sc24-a100-profiles/deployment/SLO6/SLO6_ParvaGPU_deploy.csv"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mig-autoscaler"))
        .args(["simulate", "--format", "dlrm", "--trace"])
        .arg(&trace)
        .args([
            "--sizes-from",
            sizes,
            "--nodes",
            "2",
            "--gpus-per-node",
            "2",
            "--days",
            "1",
        ])
        .args(["--policies", "static-balanced,ilp"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ilp = stdout.lines().find(|l| l.starts_with("ilp")).unwrap();
    let cols: Vec<&str> = ilp.split('\t').collect();
    assert_eq!(cols[2], "30", "30 GPU instances, CPU-only ones dropped: {stdout}");
    assert_eq!(
        cols[3], "30",
        "every instance starts on 4 repartitioned GPUs: {stdout}"
    );
    let no_sizes = std::process::Command::new(env!("CARGO_BIN_EXE_mig-autoscaler"))
        .args(["simulate", "--format", "dlrm", "--trace"])
        .arg(&trace)
        .output()
        .unwrap();
    assert_eq!(no_sizes.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_sizes.stderr).contains("--sizes-from"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn version_names_the_commit_and_its_date() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let out = cli(&["version"]);
    assert!(out.status.success());
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        version.starts_with(&format!(
            "mig-autoscaler {} (commit {commit}, ",
            env!("CARGO_PKG_VERSION")
        )),
        "{version}"
    );
    let date = version.rsplit(", ").next().unwrap().trim_end_matches(')');
    assert!(
        commit == "unknown" || date.parse::<jiff::Timestamp>().is_ok(),
        "{version}"
    );
    let long = cli(&["--version"]);
    assert_eq!(String::from_utf8_lossy(&long.stdout).trim(), version);
}

/// Issue 19: `catalog layouts --json | head` is not an error. The JSON (2,318 layouts, far more
/// than a pipe holds) is written with serde_json's writer, whose error wraps the closed pipe; it
/// used to exit 2 with "error: Broken pipe (os error 32)".
#[test]
fn a_reader_that_stops_early_is_not_an_error() {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_mig-autoscaler"))
        .args(["catalog", "layouts", "--gpu", "a100-80gb", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // The read end is closed here (dropped), as `head` closes it.
    let out = child.wait_with_output().unwrap();
    assert!(first.starts_with(b"["), "{first:?}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Issue 19: shell completion. The scripts name the subcommands and their flags; bash's is valid
/// bash (`bash -n`), and an unknown shell is refused (exit 2).
#[test]
fn completion_scripts_name_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = cli(&["completion", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["controller", "simulate", "plan", "snapshot"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
        if shell == "bash" {
            let dir = std::env::temp_dir().join(format!("mig-autoscaler-completion-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join("completion.bash");
            std::fs::write(&file, script.as_bytes()).unwrap();
            let checked = Command::new("bash").arg("-n").arg(&file).output().unwrap();
            assert!(
                checked.status.success(),
                "{}",
                String::from_utf8_lossy(&checked.stderr)
            );
        }
    }
    assert_eq!(cli(&["completion", "tcsh"]).status.code(), Some(2));
}
