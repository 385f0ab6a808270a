//! The built-in layout view, drawn by a real browser (Debian chromium, headless) against the demo:
//! every instance the API reports is drawn at its placement, actual and target, and the plan's
//! problems (here a node without an agent) are listed.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{Killed, free_addr, get};

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// `(node, gpu, layout, profile, start, size)` of every drawn slice.
fn drawn(dom: &str) -> BTreeSet<(String, String, String, String, String, String)> {
    let attr = |tag: &str, name: &str| {
        tag.split(&format!("{name}=\""))
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_default()
            .to_string()
    };
    dom.split("<div class=\"slice")
        .skip(1)
        .map(|rest| {
            let tag = rest.split('>').next().unwrap_or_default();
            (
                attr(tag, "data-node"),
                attr(tag, "data-gpu"),
                attr(tag, "data-layout"),
                attr(tag, "data-profile"),
                attr(tag, "data-start"),
                attr(tag, "data-size"),
            )
        })
        .collect()
}

#[test]
fn the_layout_view_draws_what_the_api_reports() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is required in CI (scripts/bootstrap installs it)"
        );
        eprintln!("skipped: no chromium on this machine (scripts/test installs it)");
        return;
    };
    let addr = free_addr();
    // Dry run with one pod: the plan proposes a change and then stays put.
    let _demo = Killed(
        Command::new(env!("CARGO_BIN_EXE_mig-autoscaler"))
            .args([
                "demo",
                "--listen",
                &addr,
                "--mode",
                "dry-run",
                "--nodes",
                "2",
                "--gpus-per-node",
                "2",
            ])
            .args(["--arrival-seconds", "100000", "--duration", "120"])
            .args(["--without-agent", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let layouts: serde_json::Value = loop {
        if let Some((200, body)) = get(&addr, "/api/v1/layouts") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["gpus"].as_array().unwrap().iter().any(|g| g["changed"] == true) {
                break v;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no plan with a change"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let dir = std::env::temp_dir().join(format!("mig-autoscaler-chromium-{}", std::process::id()));
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", dir.display()))
        .arg(format!("http://{addr}/"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        dom.contains(&format!("data-plan=\"{}\"", layouts["planId"].as_str().unwrap())),
        "the page shows another plan or none:\n{dom}"
    );

    let mut want = BTreeSet::new();
    for g in layouts["gpus"].as_array().unwrap() {
        for (which, key) in [("actual", "actualInstances"), ("target", "targetInstances")] {
            for i in g[key].as_array().unwrap() {
                want.insert((
                    g["node"].as_str().unwrap().to_string(),
                    g["gpu"].to_string(),
                    which.to_string(),
                    i["profile"].as_str().unwrap().to_string(),
                    i["start"].to_string(),
                    i["size"].to_string(),
                ));
            }
        }
    }
    assert_eq!(drawn(&dom), want, "drawn slices differ from the API's layouts");
    // The changed GPU is marked, and the pending pod is listed with where it fits.
    assert!(dom.contains("class=\"gpu changed\""));
    assert!(dom.contains("data-pod=\"default/job-0001"), "{dom}");
    assert!(dom.contains("after repartition"));
    // The node without an agent is named above the layouts.
    assert!(
        dom.contains("data-reason=\"NoAgentReport\"") && dom.contains("no agent report"),
        "{dom}"
    );
}

/// The demo's output, run to its end with `args` on a free address.
struct DemoRun {
    addr: String,
    stdout: String,
    stderr: String,
}

impl DemoRun {
    fn new(args: &[&str]) -> DemoRun {
        let addr = free_addr();
        let out = Command::new(env!("CARGO_BIN_EXE_mig-autoscaler"))
            .args(["demo", "--listen", &addr])
            .args(args)
            .output()
            .unwrap();
        let run = DemoRun {
            addr,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(out.status.success(), "{}", run.stderr);
        run
    }

    fn summary(&self) -> &str {
        self.stdout
            .lines()
            .find(|l| l.starts_with("summary:"))
            .unwrap_or_else(|| panic!("no summary: {}", self.stdout))
    }

    /// The number after `after` in the summary line.
    fn count(&self, after: &str) -> f64 {
        let summary = self.summary();
        summary
            .split(after)
            .nth(1)
            .unwrap_or_else(|| panic!("{after:?} not in {summary}"))
            .trim()
            .split([' ', ',', ')', ';'])
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }
}

#[test]
fn the_demo_in_auto_mode_reconfigures_nodes_and_runs_pods() {
    let run = DemoRun::new(&[
        "--nodes",
        "2",
        "--gpus-per-node",
        "2",
        "--arrival-seconds",
        "0.5",
        "--duration",
        "20",
        "--seed",
        "7",
    ]);
    assert!(
        run.stdout
            .contains(&format!("layout view   http://{}/", run.addr)),
        "{}",
        run.stdout
    );
    let summary = run.summary();
    assert!(run.count("reconfigurations done") >= 1.0, "{summary}");
    assert!(run.count("(") >= 1.0, "no pod runs: {summary}");
}

#[test]
fn the_demo_replays_a_trace() {
    let trace = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../mig-sim/tests/fixtures/synthetic-openb.csv"
    );
    // 40 pods (from the trace's observation window) in 4 s on 8 GPUs: the cluster fills, and a grant
    // may be superseded by a pod bound in the moment before the taint; 20 s leaves time for the
    // re-plan to finish.
    let run = DemoRun::new(&[
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--trace",
        trace,
        "--time-scale",
        "0.002",
        "--duration",
        "20",
    ]);
    assert!(run.stdout.contains("40 pods from"), "{}", run.stdout);
    let (summary, stderr) = (run.summary(), &run.stderr);
    assert!(
        run.count("reconfigurations done") >= 1.0,
        "the trace's 4g/7g pods need repartitioning: {summary}\n{stderr}"
    );
    // Nothing in the demo fails: a rollback here is a bug (a stale plan ends `superseded`).
    assert_eq!(run.count("rolled back"), 0.0, "{summary}\n{stderr}");
}
