//! Reading the Alibaba GPU v2023 ("openb") pod lists into MIG pods, by a stated mapping.
//!
//! The trace has no MIG hardware; its `gpu_milli` is a share of a whole GPU. Our mapping (also in
//! docs/evaluation.md): a single-GPU pod needs `s = ceil(gpu_milli × 7 / 1000)` compute sevenths,
//! rounded up to a real A100/H100-80GB profile size {1, 2, 3, 4, 7} (1g.10gb, 2g.20gb, 3g.40gb,
//! 4g.40gb, 7g.80gb); a pod of `n ≥ 2` GPUs needs `n` × 7g.80gb on one node; CPU-only pods are
//! dropped. Times are seconds; a pod lives `deletion_time − creation_time`.

/// A pod of the workload.
#[derive(Clone, Debug, PartialEq)]
pub struct TracePod {
    /// Name in the trace.
    pub name: String,
    /// Arrival, seconds from the trace origin.
    pub arrival: f64,
    /// How long it runs once started, seconds.
    pub duration: f64,
    /// MIG profile (A100/H100-80GB names).
    pub profile: &'static str,
    /// Instances of that profile, all on one node.
    pub count: u32,
    /// GPU share asked for in the trace, in thousandths of a GPU (`num_gpu × gpu_milli`).
    pub gpu_milli: u32,
}

impl TracePod {
    /// What the pod asks for, for reports: `3g.40gb`, or `8×7g.80gb` for several instances.
    pub fn label(&self) -> String {
        if self.count > 1 {
            format!("{}×{}", self.count, self.profile)
        } else {
            self.profile.to_string()
        }
    }
}

/// A line or field that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{file} line {line}: {message}")]
pub struct TraceError {
    /// File name.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// The A100/H100-80GB profile of an instance of `size` compute slices (1, 2, 3, 4 or 7).
pub fn profile_for_size(size: u8) -> Option<&'static str> {
    match size {
        1 => Some("1g.10gb"),
        2 => Some("2g.20gb"),
        3 => Some("3g.40gb"),
        4 => Some("4g.40gb"),
        7 => Some("7g.80gb"),
        _ => None,
    }
}

/// The profile for a single-GPU share in thousandths: sevenths rounded up to a real size.
pub fn profile_for_milli(gpu_milli: u32) -> &'static str {
    let sevenths = (gpu_milli.min(1000) * 7).div_ceil(1000).max(1);
    profile_for_size(sevenths as u8).unwrap_or("7g.80gb") // 5 and 6 sevenths: no such profile
}

/// The start of a trace's observation window: its earliest departure (pods created long before it,
/// still running then, are what the trace saw at that moment).
pub fn observation_start(pods: &[TracePod]) -> f64 {
    let start = pods
        .iter()
        .map(|p| p.arrival + p.duration)
        .fold(f64::INFINITY, f64::min);
    if start.is_finite() { start } else { 0.0 }
}

/// The pods still alive at `start`, with times from `start` multiplied by `scale`: pods created
/// earlier arrive at 0 with what is left of their lives.
pub fn window(pods: Vec<TracePod>, start: f64, scale: f64) -> Vec<TracePod> {
    pods.into_iter()
        .filter(|p| p.arrival + p.duration > start)
        .map(|mut p| {
            let end = p.arrival + p.duration;
            p.arrival = (p.arrival.max(start) - start) * scale;
            p.duration = (end - start) * scale - p.arrival;
            p
        })
        .collect()
}

/// Parse an openb pod list (`name,cpu_milli,memory_mib,num_gpu,gpu_milli,...,creation_time,deletion_time,...`).
pub fn parse_openb(file: &str, text: &str) -> Result<Vec<TracePod>, TraceError> {
    let mut lines = text.lines().enumerate();
    let header: Vec<&str> = lines
        .next()
        .map(|(_, h)| h.trim().split(',').collect())
        .ok_or_else(|| TraceError {
            file: file.into(),
            line: 1,
            message: "empty file".into(),
        })?;
    let col = |name: &str| {
        header.iter().position(|h| *h == name).ok_or_else(|| TraceError {
            file: file.into(),
            line: 1,
            message: format!("no column {name:?} (an openb pod list with times is needed)"),
        })
    };
    let (c_name, c_num, c_milli, c_create, c_delete) = (
        col("name")?,
        col("num_gpu")?,
        col("gpu_milli")?,
        col("creation_time")?,
        col("deletion_time")?,
    );
    let mut pods = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.trim().split(',').collect();
        let err = |message: String| TraceError {
            file: file.into(),
            line: i + 1,
            message,
        };
        let num = |c: usize, what: &str| -> Result<f64, TraceError> {
            f.get(c)
                .ok_or_else(|| err(format!("missing {what}")))?
                .parse::<f64>()
                .map_err(|_| err(format!("{what} {:?} is not a number", f[c])))
        };
        let num_gpu = num(c_num, "num_gpu")? as u32;
        if num_gpu == 0 {
            continue;
        }
        let milli = num(c_milli, "gpu_milli")? as u32;
        let arrival = num(c_create, "creation_time")?;
        let departure = num(c_delete, "deletion_time")?;
        if departure < arrival {
            return Err(err(format!(
                "deletion_time {departure} before creation_time {arrival}"
            )));
        }
        let (profile, count) = if num_gpu == 1 {
            (profile_for_milli(milli), 1)
        } else {
            ("7g.80gb", num_gpu)
        };
        pods.push(TracePod {
            name: f[c_name].to_string(),
            arrival,
            duration: departure - arrival,
            profile,
            count,
            gpu_milli: milli.min(1000) * num_gpu,
        });
    }
    pods.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    Ok(pods)
}

/// Parse Alibaba's DLRM trace (`disaggregated_DLRM_trace.csv`, v2025): the GPU (`HN`) instances,
/// each one whole GPU in the trace. An empty `creation_time` means the instance existed before the
/// trace (it arrives at 0); an empty `deletion_time` that it outlived it (it runs to the last time in
/// the file). The trace has no fractional sizes, so the MIG size is an assumption the caller makes:
/// every instance of an app gets `sizes[h % sizes.len()]` compute slices, `h` a stable hash
/// (FNV-1a) of the app name, so an app's instances share one size and the sizes follow the mix of
/// `sizes` (docs/evaluation.md uses ParvaGPU's SLO6 deployment).
pub fn parse_dlrm(file: &str, text: &str, sizes: &[u8]) -> Result<Vec<TracePod>, TraceError> {
    let err = |line: usize, message: String| TraceError {
        file: file.into(),
        line,
        message,
    };
    if sizes.is_empty() {
        return Err(err(0, "no instance sizes to map apps to".into()));
    }
    let mut lines = text.lines().enumerate();
    let header: Vec<&str> = lines
        .next()
        .map(|(_, h)| h.trim().split(',').collect())
        .unwrap_or_default();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| err(1, format!("no column {name:?} (the DLRM trace is needed)")))
    };
    let (c_name, c_role, c_app, c_gpu, c_create, c_delete) = (
        col("instance_sn")?,
        col("role")?,
        col("app_name")?,
        col("gpu_request")?,
        col("creation_time")?,
        col("deletion_time")?,
    );
    let mut rows = Vec::new();
    let mut end = 0.0f64;
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.trim().split(',').collect();
        let get = |c: usize| f.get(c).copied().unwrap_or("");
        let time = |c: usize, what: &str| -> Result<Option<f64>, TraceError> {
            match get(c) {
                "" => Ok(None),
                v => v
                    .parse::<f64>()
                    .map(Some)
                    .map_err(|_| err(i + 1, format!("{what} {v:?} is not a number"))),
            }
        };
        let (created, deleted) = (time(c_create, "creation_time")?, time(c_delete, "deletion_time")?);
        end = end.max(created.unwrap_or(0.0)).max(deleted.unwrap_or(0.0));
        if get(c_role) != "HN" {
            continue;
        }
        let gpus: f64 = get(c_gpu)
            .parse()
            .map_err(|_| err(i + 1, format!("gpu_request {:?} is not a number", get(c_gpu))))?;
        if gpus <= 0.0 {
            continue;
        }
        if let (Some(c), Some(d)) = (created, deleted)
            && d < c
        {
            return Err(err(i + 1, format!("deletion_time {d} before creation_time {c}")));
        }
        let app = get(c_app);
        let h = app.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let size = sizes[(h % sizes.len() as u64) as usize];
        let profile = profile_for_size(size).unwrap_or("7g.80gb");
        rows.push((
            format!("{app}/{}", get(c_name)),
            created,
            deleted,
            profile,
            gpus as u32,
        ));
    }
    let mut pods: Vec<TracePod> = rows
        .into_iter()
        .map(|(name, created, deleted, profile, count)| {
            let arrival = created.unwrap_or(0.0);
            TracePod {
                name,
                arrival,
                duration: deleted.unwrap_or(end) - arrival,
                profile,
                count,
                gpu_milli: 1000 * count,
            }
        })
        .collect();
    pods.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    Ok(pods)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dlrm_instances_keep_their_app_size_and_open_ends() {
        let text = "instance_sn,role,app_name,cpu_request,cpu_limit,gpu_request,gpu_limit,rdma_request,rdma_limit,memory_request,memory_limit,disk_request,disk_limit,max_instance_per_node,creation_time,scheduled_time,deletion_time\n\
                    i0,HN,app_a,8,8,1,1,0,0,40,40,0,0,2,,,500\n\
                    i1,HN,app_a,8,8,1,1,0,0,40,40,0,0,2,100,101,\n\
                    i2,CN,app_a,8,8,0,0,0,0,40,40,0,0,2,50,51,900\n\
                    i3,HN,app_b,8,8,1,1,0,0,40,40,0,0,2,200,201,300\n";
        let pods = parse_dlrm("d.csv", text, &[1, 3, 7]).unwrap();
        assert_eq!(pods.len(), 3, "CPU-only instances are dropped");
        assert_eq!((pods[0].arrival, pods[0].duration), (0.0, 500.0), "pre-existing");
        assert_eq!(
            (pods[1].arrival, pods[1].duration),
            (100.0, 800.0),
            "runs to the trace's last time"
        );
        assert_eq!(pods[0].profile, pods[1].profile, "one size per app");
        assert!(parse_dlrm("d.csv", text, &[]).is_err());
        let bad = text.replace("200,201,300", "200,201,100");
        assert!(
            parse_dlrm("d.csv", &bad, &[1])
                .unwrap_err()
                .to_string()
                .contains("line 5")
        );
    }

    #[test]
    fn the_mapping_rounds_up_to_real_profiles() {
        assert_eq!(profile_for_milli(100), "1g.10gb");
        assert_eq!(profile_for_milli(142), "1g.10gb"); // 0.994 sevenths
        assert_eq!(profile_for_milli(143), "2g.20gb"); // 1.001 sevenths
        assert_eq!(profile_for_milli(470), "4g.40gb"); // 3.29 sevenths -> 4
        assert_eq!(profile_for_milli(571), "4g.40gb");
        assert_eq!(profile_for_milli(572), "7g.80gb"); // 4.004 sevenths -> 5 -> no 5g: 7g
        assert_eq!(profile_for_milli(810), "7g.80gb");
        assert_eq!(profile_for_milli(1000), "7g.80gb");
    }

    #[test]
    fn pods_parse_and_cpu_only_pods_are_dropped() {
        let text = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time\n\
                    a,1,1,1,320,,LS,Running,10,70,10\nb,1,1,0,0,,BE,Running,5,9,5\nc,1,1,8,1000,,LS,Running,0,100,0\n";
        let pods = parse_openb("t.csv", text).unwrap();
        assert_eq!(pods.len(), 2);
        assert_eq!(
            (pods[0].name.as_str(), pods[0].profile, pods[0].count),
            ("c", "7g.80gb", 8)
        );
        assert_eq!((pods[1].profile, pods[1].duration), ("3g.40gb", 60.0));
        let e = parse_openb(
            "t.csv",
            "name,num_gpu,gpu_milli,creation_time,deletion_time\nx,1,z,0,1\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
