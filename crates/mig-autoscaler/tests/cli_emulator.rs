//! `mig-autoscaler emulator` in standalone mode, driven by kubectl (a real client we did not write).

#![allow(clippy::unwrap_used)] // Tests fail loudly on unexpected input.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

/// The emulator with 3 nodes; its temporary directory goes with it.
struct Emulator {
    _process: common::Killed,
    dir: PathBuf,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start() -> (Emulator, PathBuf) {
    let dir = common::dir("emulator");
    let (process, kubeconfig) = common::emulator(&dir, 3);
    (
        Emulator {
            _process: process,
            dir,
        },
        kubeconfig,
    )
}

fn kubectl_present() -> bool {
    Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kubectl_gets_labels_taints_drains_and_watches() {
    if !kubectl_present() {
        // scripts/bootstrap installs Debian's kubernetes-client; CI must have it.
        assert!(std::env::var_os("CI").is_none(), "kubectl is missing in CI");
        eprintln!("skipping: kubectl not installed (scripts/bootstrap installs it)");
        return;
    }
    let (_emulator, kc) = start();
    let names = kubectl(&kc, &["get", "nodes", "-o", "name"]);
    assert_eq!(
        names.lines().collect::<Vec<_>>(),
        ["node/gpu-node-0", "node/gpu-node-1", "node/gpu-node-2"]
    );
    let product = kubectl(
        &kc,
        &[
            "get",
            "node",
            "gpu-node-1",
            "-o",
            "jsonpath={.metadata.labels.nvidia\\.com/gpu\\.product}",
        ],
    );
    assert_eq!(product, "NVIDIA-H100-80GB-HBM3");
    let mig = kubectl(
        &kc,
        &[
            "get",
            "node",
            "gpu-node-0",
            "-o",
            "jsonpath={.status.allocatable.nvidia\\.com/mig-3g\\.40gb}",
        ],
    );
    assert_eq!(mig, "8", "all-balanced has one 3g.40gb per GPU, 8 GPUs");

    kubectl(
        &kc,
        &[
            "label",
            "node",
            "gpu-node-0",
            "nvidia.com/mig.config=all-1g.10gb",
            "--overwrite",
        ],
    );
    assert_eq!(
        kubectl(
            &kc,
            &[
                "get",
                "nodes",
                "-l",
                "nvidia.com/mig.config=all-1g.10gb",
                "-o",
                "name"
            ]
        )
        .trim(),
        "node/gpu-node-0"
    );
    kubectl(
        &kc,
        &[
            "taint",
            "node",
            "gpu-node-2",
            "mig-autoscaler.io/reconfiguring=true:NoSchedule",
        ],
    );
    let taints = kubectl(
        &kc,
        &[
            "get",
            "node",
            "gpu-node-2",
            "-o",
            "jsonpath={.spec.taints[0].key}",
        ],
    );
    assert_eq!(taints, "mig-autoscaler.io/reconfiguring");
    let drain = kubectl(
        &kc,
        &["drain", "gpu-node-2", "--dry-run=client", "--ignore-daemonsets"],
    );
    assert!(drain.contains("drained (dry run)"), "{drain}");
    let state = kubectl(
        &kc,
        &[
            "get",
            "node",
            "gpu-node-1",
            "-o",
            "jsonpath={.metadata.labels.nvidia\\.com/mig\\.config\\.state}",
        ],
    );
    assert_eq!(state, "success");

    // A watch sees a change made while it runs.
    let mut watch = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["get", "nodes", "-w", "-o", "name", "--request-timeout=5s"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    kubectl(&kc, &["label", "node", "gpu-node-1", "seen=yes"]);
    std::thread::sleep(Duration::from_millis(500));
    let _ = watch.kill();
    let out = watch.wait_with_output().unwrap();
    let lines = String::from_utf8_lossy(&out.stdout);
    assert!(
        lines.lines().filter(|l| *l == "node/gpu-node-1").count() >= 2,
        "initial listing and the change: {lines}"
    );
}
