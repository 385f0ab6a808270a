//! Helpers for tests that run the binary as a process; the generic ones are the testbed's
//! (`mig_testbed::process`).

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use mig_testbed::process::*;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mig-autoscaler");

/// `mig-autoscaler emulator` with `nodes` nodes, and the kubeconfig it wrote into `dir`.
pub fn emulator(dir: &Path, nodes: usize) -> (Killed, PathBuf) {
    let kubeconfig = dir.join("kubeconfig");
    let child = Command::new(BIN)
        .args([
            "emulator",
            "--listen",
            "127.0.0.1:0",
            "--nodes",
            &nodes.to_string(),
            "--kubeconfig-out",
        ])
        .arg(&kubeconfig)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !kubeconfig.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the emulator wrote no kubeconfig"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (Killed(child), kubeconfig)
}
