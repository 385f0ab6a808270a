//! Where the agent learns the node's GPUs: a trait, with NVML through its own command line
//! (`nvidia-smi`) as the production source (the emulator's simulated GPUs are `mig-testbed`'s).
//!
//! Why not nvml-wrapper: the workspace forbids `unsafe`, and nvml-wrapper's safe API does not list
//! GPU instances with their placements (`nvmlDeviceGetGpuInstances` and `nvmlGpuInstanceGetInfo`
//! are only in its raw `-sys` bindings). `nvidia-smi mig -lgi` prints exactly those, read-only.

use std::collections::BTreeMap;
use std::time::Duration;

use mig_catalog::nvml::{ObservedGpu, ObservedPlacement, ObservedProfile};
use mig_catalog::{Catalog, GpuModel};
use mig_planner::snapshot::{Gpu, GpuInstance};

use crate::error::GpuError;
use crate::sequence::InstanceChange;

/// A source of the node's GPUs.
pub trait GpuSource: Send + Sync {
    /// Every GPU with its GPU instances at their placements, and the pods using each where known.
    fn gpus(&self) -> Result<Vec<Gpu>, GpuError>;

    /// The MIG profiles and possible placements the driver reports for GPU `gpu` (checked against
    /// the catalog before the agent acts); `None` where the source cannot tell.
    fn profiles(&self, gpu: &Gpu) -> Result<Option<ObservedGpu>, GpuError> {
        let _ = gpu;
        Ok(None)
    }

    /// Whether [`GpuSource::gpus`] says which pods use each instance. When it does not (NVML knows
    /// processes, not pods), the agent attributes the node's pods by profile with
    /// [`attribute_by_profile`].
    fn knows_pods(&self) -> bool {
        false
    }

    /// `(GPU index, GPU-instance ID)` → placement start, as of the last [`GpuSource::gpus`]: how
    /// DCGM's series (labelled with GPU-instance IDs) are joined to placements. Empty where
    /// unknown.
    fn instance_ids(&self) -> BTreeMap<(u32, u32), u8> {
        BTreeMap::new()
    }

    /// nvml backend: destroy `change.destroy`, then create `change.create` at exactly their
    /// placements, on GPU `change.gpu`. Must refuse to destroy an instance in use.
    fn apply(&self, change: &InstanceChange) -> Result<(), GpuError> {
        let _ = change;
        Err(GpuError::Unsupported)
    }
}

/// What NVML would report for a GPU of `model`: the catalog's own profiles and placements (the
/// emulator's GPUs follow the catalog).
pub fn observed_from_catalog(model: &GpuModel, origin: &str) -> ObservedGpu {
    ObservedGpu {
        name: model
            .skus
            .iter()
            .find_map(|s| s.nvml_name.clone())
            .unwrap_or_else(|| model.key.clone()),
        pci_device_id: None,
        origin: origin.to_string(),
        profiles: model
            .profiles
            .iter()
            .map(|p| ObservedProfile {
                profile_id: p.profile_id,
                name: Some(format!("MIG {}", p.name)),
                slice_count: u32::from(p.compute_slices),
                instance_count: u32::from(p.max_instances),
                memory_mib: None,
                placements: p
                    .starts
                    .iter()
                    .map(|s| ObservedPlacement {
                        start: u32::from(*s),
                        size: u32::from(p.memory_slices),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// For a source that cannot say which pod uses which instance: every instance of a profile that a
/// pod on the node requests is reported as used by that pod (`pods`: `namespace/name` → MIG
/// resource requests, for the pods bound to the node and not finished). Conservative on purpose:
/// the planner then never rebuilds a GPU that may hold a running pod, nor destroys an instance that
/// may be in use; the price is that a profile in use pins every instance of it on the node, and
/// that such a pod, seen on several GPUs, is never drained.
pub fn attribute_by_profile(gpus: &mut [Gpu], pods: &[(String, BTreeMap<String, i64>)]) {
    for g in gpus {
        let Ok(model) = Catalog::embedded().lookup(&g.product) else {
            continue;
        };
        for i in &mut g.instances {
            let Some(resource) = model
                .profile_by_name(&i.profile)
                .and_then(|p| model.profile(p))
                .map(|p| p.resource_name())
            else {
                continue;
            };
            for (key, requests) in pods {
                if requests.get(&resource).is_some_and(|n| *n > 0) && !i.pods.contains(key) {
                    i.pods.push(key.clone());
                }
            }
        }
    }
}

/// The GPUs as NVIDIA's own NVML command line reports them: `nvidia-smi --query-gpu` for models and
/// MIG mode, `nvidia-smi mig -lgi` for GPU instances at their placements. Read-only commands.
///
/// Pods per instance are not known here (that needs the kubelet's pod-resources socket), so the
/// report carries none; the agent attributes the node's pods by profile (see docs/agent.md).
///
/// Unknown is never empty: a GPU in MIG mode whose instances cannot be read (the command fails,
/// hangs past [`NvidiaSmiGpus::timeout`], or prints rows that do not fit) is reported with
/// [`Gpu::unknown`] set, never as a GPU without instances.
pub struct NvidiaSmiGpus {
    /// The command (`nvidia-smi`, or a path).
    pub command: String,
    /// How long one call may run before it is killed (a hung driver must not hang the agent).
    pub timeout: Duration,
    /// The GPU-instance IDs seen by the last `gpus()`.
    ids: std::sync::Mutex<BTreeMap<(u32, u32), u8>>,
}

/// Default for [`NvidiaSmiGpus::timeout`].
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

impl NvidiaSmiGpus {
    /// Read GPUs with `command` (`nvidia-smi`, or a path).
    pub fn new(command: impl Into<String>) -> NvidiaSmiGpus {
        NvidiaSmiGpus {
            command: command.into(),
            timeout: COMMAND_TIMEOUT,
            ids: Default::default(),
        }
    }

    fn run(&self, args: &[&str]) -> Result<String, GpuError> {
        run(&self.command, args, self.timeout)
    }

    /// `nvidia-smi mig -lgi [-i N]`; a GPU in MIG mode without instances is a valid, empty answer.
    fn lgi(&self, gpu: Option<u32>) -> Result<Vec<LgiRow>, GpuError> {
        let index = gpu.map(|i| i.to_string());
        let mut args = vec!["mig", "-lgi"];
        if let Some(i) = &index {
            args.extend(["-i", i.as_str()]);
        }
        match self.run(&args) {
            Ok(text) => lgi_rows(&text),
            Err(GpuError::Failed { words, .. }) if words.contains("No GPU instances found") => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
}

impl Default for NvidiaSmiGpus {
    fn default() -> Self {
        NvidiaSmiGpus::new("nvidia-smi")
    }
}

/// Run `command args`, killing it (and whatever it started) after `timeout`. Blocking: call it off
/// the async runtime. The error carries the command's words (stdout and stderr).
pub fn run(command: &str, args: &[&str], timeout: Duration) -> Result<String, GpuError> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let shown = format!("{command} {}", args.join(" "));
    let spawn = || {
        std::process::Command::new(command)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
    };
    // A binary being replaced (or, in tests, just written while another thread forks) is briefly
    // "text file busy": try again a few times before calling it a failure.
    let mut spawned = spawn();
    for _ in 0..5 {
        match &spawned {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
                spawned = spawn();
            }
            _ => break,
        }
    }
    let mut child = spawned.map_err(|source| GpuError::Spawn {
        command: command.to_string(),
        source,
    })?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(p) = pipe {
                let _ = p.take(16 << 20).read_to_end(&mut out);
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(None) => {
                // The whole process group: a wrapper script's children hold the pipes too.
                let pid = rustix::process::Pid::from_child(&child);
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                let _ = child.kill();
                let _ = child.wait();
                return Err(GpuError::TimedOut {
                    command: shown,
                    timeout,
                });
            }
            Err(source) => {
                return Err(GpuError::Wait {
                    command: shown,
                    source,
                });
            }
        }
    };
    let out = stdout.join().unwrap_or_default();
    let err = stderr.join().unwrap_or_default();
    if !status.success() {
        let words = [err.trim(), out.trim()]
            .into_iter()
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(GpuError::Failed {
            command: shown,
            status,
            words,
        });
    }
    Ok(out)
}

/// One GPU instance as `nvidia-smi mig -lgi` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LgiRow {
    /// GPU index.
    pub gpu: u32,
    /// Profile name (`3g.40gb`).
    pub profile: String,
    /// GPU instance ID (what `-gi` takes; not the placement).
    pub gi_id: u32,
    /// Placement start.
    pub start: u8,
}

/// Parse `nvidia-smi mig -lgi`: rows like `|   0  MIG 3g.40gb   9   2   4:4   |` (GPU, name, profile
/// ID, instance ID, placement start:size); other lines are ignored.
pub fn lgi_rows(lgi: &str) -> Result<Vec<LgiRow>, GpuError> {
    let bad = |what: String| GpuError::Output(format!("-lgi: {what}"));
    let mut rows = Vec::new();
    for line in lgi.lines() {
        let cells: Vec<&str> = line
            .trim_matches(|c| c == '|' || c == ' ')
            .split_whitespace()
            .collect();
        let Some(mig) = cells.iter().position(|c| *c == "MIG") else {
            continue;
        };
        let (Some(gpu), Some(profile), Some(placement)) = (cells.first(), cells.get(mig + 1), cells.last())
        else {
            continue;
        };
        let gpu = gpu
            .parse::<u32>()
            .map_err(|_| bad(format!("GPU index {gpu:?} in {line:?}")))?;
        let start = placement
            .split_once(':')
            .and_then(|(s, _)| s.parse::<u8>().ok())
            .ok_or_else(|| bad(format!("placement {placement:?} in {line:?}")))?;
        let gi_id = cells
            .len()
            .checked_sub(2)
            .and_then(|i| cells.get(i))
            .and_then(|c| c.parse::<u32>().ok())
            .ok_or_else(|| bad(format!("no instance ID in {line:?}")))?;
        rows.push(LgiRow {
            gpu,
            profile: profile.to_string(),
            gi_id,
            start,
        });
    }
    Ok(rows)
}

/// Parse `nvidia-smi --query-gpu=index,name,mig.mode.current --format=csv,noheader` and
/// `nvidia-smi mig -lgi` into GPUs. The NVML name (`NVIDIA H100 80GB HBM3`) is the product; the
/// catalog resolves NVML names.
pub fn parse_nvidia_smi(query: &str, lgi: &str) -> Result<Vec<Gpu>, GpuError> {
    let mut gpus = parse_query(query)?;
    place_rows(&mut gpus, lgi_rows(lgi)?)?;
    Ok(gpus)
}

/// Put `-lgi` rows on their GPUs (which must be in MIG mode), sorted by placement.
fn place_rows(gpus: &mut [Gpu], rows: Vec<LgiRow>) -> Result<(), GpuError> {
    for row in rows {
        let g = gpus
            .iter_mut()
            .find(|g| g.index == row.gpu && g.mig_enabled)
            .ok_or_else(|| {
                GpuError::Output(format!(
                    "-lgi lists GPU {}, which --query-gpu did not (in MIG mode)",
                    row.gpu
                ))
            })?;
        g.instances.push(GpuInstance {
            profile: row.profile,
            start: row.start,
            pods: Vec::new(),
            utilization: None,
        });
    }
    for g in gpus.iter_mut() {
        g.instances.sort_by_key(|i| i.start);
    }
    Ok(())
}

/// Parse `nvidia-smi --query-gpu=index,name,mig.mode.current --format=csv,noheader` (no instances).
pub fn parse_query(query: &str) -> Result<Vec<Gpu>, GpuError> {
    let mut gpus = Vec::new();
    for (n, line) in query.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [index, name, mode] = fields.as_slice() else {
            return Err(GpuError::Output(format!(
                "--query-gpu line {}: expected index, name, mig.mode.current: {line:?}",
                n + 1
            )));
        };
        gpus.push(Gpu {
            index: index
                .parse()
                .map_err(|_| GpuError::Output(format!("--query-gpu line {}: GPU index {index:?}", n + 1)))?,
            product: name.to_string(),
            mig_enabled: mode.eq_ignore_ascii_case("enabled"),
            unknown: None,
            instances: Vec::new(),
        });
    }
    Ok(gpus)
}

impl GpuSource for NvidiaSmiGpus {
    /// One `-lgi` for every GPU; if that fails or does not fit, one per GPU in MIG mode, so that a
    /// GPU the driver cannot read is reported unknown and the others are still served.
    fn gpus(&self) -> Result<Vec<Gpu>, GpuError> {
        let query = self.run(&["--query-gpu=index,name,mig.mode.current", "--format=csv,noheader"])?;
        let mut gpus = parse_query(&query)?;
        let mut ids = BTreeMap::new();
        if gpus.iter().any(|g| g.mig_enabled) {
            let whole = self.lgi(None).and_then(|rows| {
                let mut placed = gpus.clone();
                place_rows(&mut placed, rows.clone())?;
                Ok((placed, rows))
            });
            match whole {
                Ok((placed, rows)) => {
                    gpus = placed;
                    ids.extend(rows.iter().map(|r| ((r.gpu, r.gi_id), r.start)));
                }
                Err(e) => {
                    tracing::warn!(command = %self.command, error = %e, "reading every GPU's instances at once failed; reading them one GPU at a time");
                    for g in gpus.iter_mut().filter(|g| g.mig_enabled) {
                        let read = self.lgi(Some(g.index)).and_then(|rows| {
                            let mut one = [g.clone()];
                            place_rows(&mut one, rows.clone())?;
                            let [placed] = one;
                            Ok((placed, rows))
                        });
                        match read {
                            Ok((placed, rows)) => {
                                *g = placed;
                                ids.extend(rows.iter().map(|r| ((r.gpu, r.gi_id), r.start)));
                            }
                            Err(e) => g.unknown = Some(e.to_string()),
                        }
                    }
                }
            }
        }
        *self.ids.lock().unwrap_or_else(|e| e.into_inner()) = ids;
        Ok(gpus)
    }

    fn instance_ids(&self) -> BTreeMap<(u32, u32), u8> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `nvidia-smi mig -i N -gi ID -dci` then `-dgi` for each instance to destroy (found by
    /// placement in `-lgi`), then `nvidia-smi mig -i N -cgi PROFILE_ID:START -C` for each to
    /// create: explicit placements, so the driver never picks the slot. The driver refuses to
    /// destroy an instance a process uses; the planner and the sequence never ask for one a pod
    /// holds. Profile IDs come from the catalog, which was checked against this driver at start.
    fn apply(&self, change: &InstanceChange) -> Result<(), GpuError> {
        let index = change.gpu.to_string();
        let product = self.run(&["--query-gpu=name", "--format=csv,noheader", "-i", &index])?;
        let model = Catalog::embedded().lookup(product.trim())?;
        let profile_id = |name: &str| {
            model
                .profile_by_name(name)
                .and_then(|p| model.profile(p))
                .map(|p| p.profile_id)
                .ok_or_else(|| GpuError::Refused(format!("{} has no profile {name}", model.key)))
        };
        if !change.destroy.is_empty() {
            let rows = self.lgi(Some(change.gpu))?;
            for named in &change.destroy {
                let id = profile_id(&named.profile)?;
                let row = rows
                    .iter()
                    .find(|r| {
                        r.gpu == change.gpu
                            && r.start == named.start
                            && model
                                .profile_by_name(&r.profile)
                                .and_then(|p| model.profile(p))
                                .map(|p| p.profile_id)
                                == Some(id)
                    })
                    .ok_or_else(|| GpuError::Refused(format!("GPU {index} has no instance {named}")))?;
                let gi = row.gi_id.to_string();
                // Compute instances first; with none left this fails harmlessly.
                let _ = self.run(&["mig", "-i", &index, "-gi", &gi, "-dci"]);
                self.run(&["mig", "-i", &index, "-gi", &gi, "-dgi"])?;
            }
        }
        for named in &change.create {
            let tuple = format!("{}:{}", profile_id(&named.profile)?, named.start);
            self.run(&["mig", "-i", &index, "-cgi", &tuple, "-C"])?;
        }
        Ok(())
    }

    /// `nvidia-smi mig -lgip -i N` and `-lgipp -i N` (read-only), parsed by the catalog.
    fn profiles(&self, gpu: &Gpu) -> Result<Option<ObservedGpu>, GpuError> {
        if !gpu.mig_enabled {
            return Ok(None); // no MIG profiles are listed with MIG off
        }
        let index = gpu.index.to_string();
        let lgip = self.run(&["mig", "-lgip", "-i", &index])?;
        let lgipp = self.run(&["mig", "-lgipp", "-i", &index])?;
        let mut observed = ObservedGpu::from_nvidia_smi(&gpu.product, gpu.index, &lgip, &lgipp)?;
        observed.origin = "nvidia-smi".into();
        Ok(Some(observed))
    }
}
