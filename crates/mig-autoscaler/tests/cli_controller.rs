//! `mig-autoscaler controller` as a process: settings errors, and a run against `mig-autoscaler
//! emulator` that becomes ready, serves a plan, and exits cleanly on SIGTERM.

#![allow(clippy::unwrap_used)] // Tests fail loudly on unexpected input.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::io::Read;

use common::{BIN, Killed, dir, emulator, free_addr, get, terminate, wait_for};

#[test]
fn bad_settings_are_refused_with_their_path() {
    let d = dir("bad-settings");
    let f = d.join("settings.yaml");
    std::fs::write(&f, "mode: auto\nbudgets:\n  maxNodesReconfiguring: 150%\n").unwrap();
    let out = Command::new(BIN)
        .args(["controller", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("budgets.maxNodesReconfiguring"), "{err}");

    let out = Command::new(BIN)
        .args(["controller", "--mode", "sometimes", "--print-settings"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use dry-run or auto"));

    let out = Command::new(BIN)
        .args(["controller", "--mode", "auto", "--print-settings"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mode: auto"), "{text}");
    assert!(
        text.contains("maxNodesReconfiguring: '1'") || text.contains("maxNodesReconfiguring: \"1\""),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[cfg(unix)]
#[test]
fn runs_against_the_emulator_and_stops_on_sigterm() {
    let d = dir("controller-run");
    let (_emulator, kubeconfig) = emulator(&d, 2);
    let addr = free_addr();
    let mut controller = Killed(
        Command::new(BIN)
            .args(["controller", "--kubeconfig"])
            .arg(&kubeconfig)
            .args([
                "--listen",
                &addr,
                "--identity",
                "cli-test",
                "--lease-namespace",
                "default",
                "--log-format",
                "json",
                "--log-level",
                "debug",
            ])
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Read the logs as they come: at debug a full pipe would stop the controller mid-write.
    let mut stderr = controller.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut logs = String::new();
        stderr.read_to_string(&mut logs).unwrap();
        logs
    });
    let started = Instant::now();
    loop {
        if let Some((200, body)) = get(&addr, "/api/v1/plan") {
            assert!(body.contains("\"mode\":\"dry-run\""), "{body}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no plan served");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get(&addr, "/readyz").unwrap().0, 200);
    let status = terminate(&mut controller);
    assert!(status.success());
    let logs = reader.join().unwrap();
    assert!(
        logs.lines()
            .any(|l| l.starts_with('{') && l.contains("controller started")),
        "{logs}"
    );
    // JSON logs are JSON only: no plain line, no colour codes (stderr is a pipe here), and at
    // debug the HTTP libraries stay quiet.
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        let target = v["target"].as_str().unwrap_or_default();
        assert!(
            !["hyper", "h2", "tower", "rustls"]
                .iter()
                .any(|lib| target.starts_with(lib)),
            "{line}"
        );
    }
    assert!(!logs.contains('\u{1b}'), "ANSI codes in a pipe: {logs}");
    let _ = std::fs::remove_dir_all(d);
}

#[cfg(unix)]
#[test]
fn the_agent_reports_what_nvidia_smi_says_and_stops_on_sigterm() {
    use std::os::unix::fs::PermissionsExt;
    let d = dir("agent-run");
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../mig-agent/tests/fixtures");
    // Profiles for the start-up cross-check: the recorded H100 output, renumbered to the GPU asked.
    let profiles = concat!(env!("CARGO_MANIFEST_DIR"), "/../mig-catalog/tests/fixtures");
    let fake = d.join("nvidia-smi");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\ncase \"$1 $2\" in\n\
             'mig -lgi') cat {fixtures}/h100-lgi.txt ;;\n\
             'mig -lgip') sed \"s/^|   0 /|   $4 /\" {profiles}/h100-80gb.lgip.txt ;;\n\
             'mig -lgipp') sed \"s/^GPU  0 /GPU  $4 /\" {profiles}/h100-80gb.lgipp.txt ;;\n\
             *) cat {fixtures}/h100-query.csv ;;\n\
             esac\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_emulator, kubeconfig) = emulator(&d, 1);
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    let api = text
        .split("server: http://")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let (_, nodes) = get(&api, "/api/v1/nodes").unwrap();
    let node = nodes
        .split("\"name\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let addr = free_addr();
    let mut agent = Killed(
        Command::new(BIN)
            .args(["agent", "--node", &node, "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--listen", &addr, "--tick-seconds", "0.2", "--nvidia-smi"])
            .arg(&fake)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    loop {
        let (_, body) = get(&api, &format!("/api/v1/nodes/{node}")).unwrap();
        // The report is a JSON string inside the node's JSON.
        if body.contains("mig-autoscaler.io/gpus")
            && body.contains(r#"\"profile\":\"1g.10gb+me\",\"start\":1"#)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no report on the node: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get(&addr, "/readyz").unwrap().0, 200);
    let (_, metrics) = get(&addr, "/metrics").unwrap();
    assert!(
        metrics.contains("mig_autoscaler_agent_phase{kind=\"Idle\"} 1"),
        "{metrics}"
    );
    let status = terminate(&mut agent);
    assert!(status.success());
    let _ = std::fs::remove_dir_all(d);
}

/// POST `body` to `path` over plain HTTP/1.1 and read the answer: (status, body).
fn post(addr: &str, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    mig_testbed::harness::response(&out)
}

/// The children of process `pid` whose command line has `word`.
fn children_with(pid: u32, word: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            let cmdline = std::fs::read_to_string(format!("/proc/{child}/cmdline")).unwrap_or_default();
            if cmdline.split('\0').any(|a| a == word) {
                out.push(child);
            }
        }
    }
    out
}

/// A what-if plan runs in a child process that is killed when its request ends: an abandoned plan
/// holds neither a CPU nor the what-if slot (in-process, it ran on to its time limit and every
/// other what-if got 429 meanwhile).
#[cfg(target_os = "linux")]
#[test]
fn an_abandoned_what_if_plan_is_killed_and_frees_its_slot() {
    let d = dir("controller-what-if");
    let (_emulator, kubeconfig) = emulator(&d, 1);
    let addr = common::free_addr();
    let config = d.join("settings.yaml");
    std::fs::write(
        &config,
        "http:\n  requestTimeout: 1s\nplanner:\n  solver:\n    timeLimitMs: 120000\n    exactNodeLimit: 1000\n    mipGap: 0\n",
    )
    .unwrap();
    let controller = Killed(
        Command::new(BIN)
            .args(["controller", "--kubeconfig"])
            .arg(&kubeconfig)
            .arg("--config")
            .arg(&config)
            .args(["--listen", &addr, "--lease-namespace", "default"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::wait_for(&addr, "/readyz", 30);
    // 200 GPUs on 25 nodes in the exact per-node model with more pods than fit, for the pure-Rust
    // solver asked to prove optimality (gap 0; the controller's own settings allow both, since a
    // posted policy never asks for more than they do): it runs to its time limit (5 s in a
    // release build, docs/performance.md), far past the request's.
    let mut snapshot = mig_planner::synthetic::fleet(&mig_planner::synthetic::FleetSpec {
        gpus: 200,
        pending: 800,
        busy_gpu_share: 0.6,
        seed: 7,
    });
    snapshot.policy.solver.kind = mig_planner::SolverKind::Microlp;
    snapshot.policy.solver.time_limit_ms = 120_000;
    snapshot.policy.solver.exact_node_limit = 1000;
    snapshot.policy.solver.mip_gap = 0.0;
    let body = serde_json::to_vec(&snapshot).unwrap();
    let pid = controller.0.id();
    let watcher = std::thread::spawn(move || {
        // The planner's child, seen while the request runs.
        let started = Instant::now();
        loop {
            let found = children_with(pid, "plan");
            if !found.is_empty() || started.elapsed() > Duration::from_secs(5) {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let (status, answer) = post(&addr, "/api/v1/plan", &body);
    assert_eq!(
        status, 408,
        "the plan should outlast the 1 s request timeout: {answer}"
    );
    let planners = watcher.join().unwrap();
    assert_eq!(planners.len(), 1, "one planner child while the request ran");
    // Killed once the request ended, and the slot free: a small what-if is planned at once.
    let started = Instant::now();
    while !children_with(pid, "plan").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the planner outlived its request"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let small = serde_json::to_vec(&mig_planner::synthetic::fleet(
        &mig_planner::synthetic::FleetSpec {
            gpus: 8,
            pending: 2,
            busy_gpu_share: 0.5,
            seed: 1,
        },
    ))
    .unwrap();
    let (status, answer) = post(&addr, "/api/v1/plan", &small);
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"solver\""), "{answer}");
    drop(controller);
    let _ = std::fs::remove_dir_all(d);
}

#[cfg(unix)]
#[test]
fn a_listen_address_in_use_is_named() {
    let d = dir("controller-taken");
    let (_emulator, kubeconfig) = emulator(&d, 1);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .args(["controller", "--kubeconfig"])
        .arg(&kubeconfig)
        .args([
            "--listen",
            &addr,
            "--identity",
            "t",
            "--lease-namespace",
            "default",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr} (http.listen)")),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(d);
}

/// An API server that does not answer is named in the controller's connection errors.
#[cfg(unix)]
#[test]
fn connection_errors_name_the_api_server() {
    let d = dir("controller-no-api");
    // A port nobody listens on.
    let url = format!("http://{}", free_addr());
    let kubeconfig = d.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"{url}\"}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\n\
             current-context: x\n"
        ),
    )
    .unwrap();
    let addr = free_addr();
    let mut controller = Killed(
        Command::new(BIN)
            .args(["controller", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--listen", &addr, "--identity", "t"])
            .args(["--lease-namespace", "default", "--log-format", "json"])
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The HTTP server answers (not ready) while the watches fail and are retried.
    wait_for(&addr, "/healthz", 30);
    std::thread::sleep(Duration::from_secs(2));
    terminate(&mut controller);
    let mut logs = String::new();
    controller
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(
        logs.lines()
            .any(|l| l.contains("watch error") && l.contains(&format!("{url}/"))),
        "{logs}"
    );
    let _ = std::fs::remove_dir_all(d);
}
