//! Helpers for tests that run the binary as a process: spawn, plain HTTP, wait.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mig-autoscaler");

/// A child process killed when dropped.
pub struct Killed(pub Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh temporary directory for this test process.
pub fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mig-autoscaler-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A free `127.0.0.1:PORT`.
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// `GET path` over plain HTTP/1.1: (status, body), chunked bodies decoded.
pub fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Some((status, body.to_string()));
    }
    let (mut rest, mut text) = (body, String::new());
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        text.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    Some((status, text))
}

/// The body of `GET path` once it answers 200, or panic after `secs`.
pub fn wait_for(addr: &str, path: &str, secs: u64) -> String {
    let started = Instant::now();
    loop {
        if let Some((200, body)) = get(addr, path) {
            return body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(secs),
            "{addr}{path} never answered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

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

/// Send SIGTERM and wait for a clean exit.
#[cfg(unix)]
pub fn terminate(child: &mut Killed) -> std::process::ExitStatus {
    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let started = Instant::now();
    loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            return s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a tool the test needs is here; in CI its absence is a failure, not a skip.
pub fn tool(name: &str) -> bool {
    let present = Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required in CI (scripts/test installs it)"
        );
        eprintln!("skipped: no {name} on this machine (scripts/test installs it)");
    }
    present
}
