//! Helpers for tests that run programs as processes: spawn and kill, plain blocking HTTP, wait,
//! and the tools a test needs (absent in CI: a failure, never a skip).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

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
    let (status, body) = crate::harness::response(&out);
    (status != 0).then_some((status, body))
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
        absent(name, "scripts/test installs it");
    }
    present
}

/// `what` a test needs is not here: a failure in CI, a loud skip elsewhere (`how` says how to get
/// it).
pub fn absent(what: &str, how: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} is required in CI ({how})"
    );
    eprintln!("skipped: no {what} on this machine ({how})");
}
