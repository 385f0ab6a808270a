//! A real Kubernetes control plane for the real-server tier: etcd, kube-apiserver and (on request)
//! kube-scheduler as built by
//! `scripts/control-plane`, started in a temporary directory on free ports, with RBAC, bound
//! service-account tokens and admission (ValidatingAdmissionPolicy) as a cluster has them.
//!
//! The admin authenticates with a static token in `system:masters`; everyone else with the
//! service-account tokens the server issues (`TokenRequest`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube::Client;

use crate::process::{Killed, free_addr};

/// The admin's static bearer token (group `system:masters`).
const ADMIN_TOKEN: &str = "mig-autoscaler-test-admin";

/// The directory holding etcd, kube-apiserver, kube-scheduler, kubectl and helm, if built:
/// `$MIG_AUTOSCALER_K8S_BIN`, else what `scripts/control-plane --check` says. In CI their absence
/// is a failure; elsewhere the caller skips, loudly.
pub fn binaries() -> Option<PathBuf> {
    let dir = std::env::var_os("MIG_AUTOSCALER_K8S_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/control-plane");
            let out = Command::new(script).arg("--check").output().ok()?;
            out.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
        .filter(|d| d.join("kube-apiserver").exists());
    if dir.is_none() {
        crate::process::absent(
            "real control plane",
            "scripts/control-plane builds it; scripts/test runs it",
        );
    }
    dir
}

/// etcd and kube-apiserver, stopped when dropped.
pub struct ControlPlane {
    /// Where the binaries are.
    pub bin: PathBuf,
    /// Its files: etcd data, keys, certificates, kubeconfig.
    pub dir: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    // Killed as they drop, in this order: the scheduler, the API server, etcd.
    scheduler: Option<Killed>,
    _apiserver: Killed,
    _etcd: Killed,
}

impl ControlPlane {
    /// Start etcd and kube-apiserver from `bin`; waits until the API server is ready.
    pub fn start(bin: &Path) -> ControlPlane {
        let dir = crate::process::dir(&format!("control-plane-{}", free_addr().replace([':', '.'], "-")));
        let etcd_client = free_addr();
        let etcd_peer = free_addr();
        let etcd = daemon(
            bin,
            &dir,
            "etcd",
            &[
                "--name=default".into(),
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls=http://{etcd_client}"),
                format!("--advertise-client-urls=http://{etcd_client}"),
                format!("--listen-peer-urls=http://{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://{etcd_peer}"),
                format!("--initial-cluster=default=http://{etcd_peer}"),
                "--unsafe-no-fsync".into(),
                "--log-level=error".into(),
            ],
        );
        let key = dir.join("sa.key");
        let public = dir.join("sa.pub");
        openssl(&["genrsa", "-out", key.to_str().unwrap(), "2048"]);
        openssl(&[
            "rsa",
            "-in",
            key.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ]);
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin,\"system:masters\"\n"),
        )
        .unwrap();
        let listen = free_addr();
        let port = listen.rsplit(':').next().unwrap().to_string();
        let apiserver = daemon(
            bin,
            &dir,
            "kube-apiserver",
            &[
                format!("--etcd-servers=http://{etcd_client}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                // No `kubernetes` Service endpoints (loopback addresses are refused for them).
                "--endpoint-reconciler-type=none".into(),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", dir.join("certs").display()),
                format!("--token-auth-file={}", dir.join("tokens.csv").display()),
                "--authorization-mode=RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-account-key-file={}", public.display()),
                format!("--service-account-signing-key-file={}", key.display()),
                "--service-cluster-ip-range=10.96.0.0/24".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                "--v=0".into(),
            ],
        );
        let url = format!("https://{listen}");
        let mut plane = ControlPlane {
            bin: bin.to_path_buf(),
            dir,
            url,
            scheduler: None,
            _apiserver: apiserver,
            _etcd: etcd,
        };
        plane.write_kubeconfig();
        plane.wait_ready();
        plane
    }

    /// Start the real kube-scheduler (as the admin, no leader election, no serving port), which
    /// binds pending pods to Nodes whose allocatable covers them; it stops with the control plane.
    pub fn start_scheduler(&mut self) {
        let kubeconfig = format!("--kubeconfig={}", self.kubeconfig().display());
        self.scheduler = Some(daemon(
            &self.bin,
            &self.dir,
            "kube-scheduler",
            &[
                kubeconfig,
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                "--v=1".into(),
            ],
        ));
    }

    /// An admin kubeconfig (for kubectl and helm).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    fn write_kubeconfig(&self) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: real\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: real\n  context:\n    cluster: real\n    user: admin\ncurrent-context: real\n",
            self.url
        );
        std::fs::write(self.kubeconfig(), text).unwrap();
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            for (name, process) in [
                ("kube-apiserver", &mut self._apiserver),
                ("etcd", &mut self._etcd),
            ] {
                if let Ok(Some(status)) = process.0.try_wait() {
                    let log =
                        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    panic!("{name} exited ({status}); the end of its log, last line first: {tail:#?}");
                }
            }
            let ready = self
                .kubectl(&["get", "--raw", "/readyz"])
                .is_ok_and(|out| out.trim() == "ok");
            if ready {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "kube-apiserver not ready after 90 s; its log: {}",
                self.dir.join("kube-apiserver.log").display()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `kubectl ARGS` as the admin: its stdout, or its stderr in the error.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, ToolError> {
        self.run("kubectl", args)
    }

    /// `helm ARGS` as the admin.
    pub fn helm(&self, args: &[&str]) -> Result<String, ToolError> {
        self.run("helm", args)
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<String, ToolError> {
        let command = format!("{tool} {}", args.join(" "));
        let out = Command::new(self.bin.join(tool))
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"))
            .output()
            .map_err(|source| ToolError::Start {
                command: command.clone(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ToolError::Failed {
                command,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }

    /// A client as the admin.
    pub fn admin(&self) -> Client {
        self.client_with_token(ADMIN_TOKEN)
    }

    /// A client that authenticates with `token`, retrying nothing itself.
    pub fn client_with_token(&self, token: &str) -> Client {
        Client::try_from(self.config(token)).unwrap()
    }

    /// A client acting as `user` in `groups` (the admin impersonating them): what the API server
    /// decides for that identity, without a token of its own.
    pub fn client_as(&self, user: &str, groups: &[&str]) -> Client {
        let mut config = self.config(ADMIN_TOKEN);
        config.auth_info.impersonate = Some(user.to_string());
        config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
        Client::try_from(config).unwrap()
    }

    fn config(&self, token: &str) -> kube::Config {
        let mut config = kube::Config::new(self.url.parse().unwrap());
        config.accept_invalid_certs = true;
        config.default_retry = false;
        config.auth_info.token = Some(token.to_string().into());
        config
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The processes stop as their fields drop, after this; their files go unless a test failed.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `bin/name ARGS`, its stderr into `dir/name.log`; killed when dropped.
fn daemon(bin: &Path, dir: &Path, name: &str, args: &[String]) -> Killed {
    Killed(
        Command::new(bin.join(name))
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}")),
    )
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `kubectl` or `helm` could not be started, or failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// Not started.
    #[error("{command}: {source}")]
    Start {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// It ran and failed; `stderr` is what it said.
    #[error("{command}: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its stderr.
        stderr: String,
    },
}
