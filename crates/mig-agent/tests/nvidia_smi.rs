//! Parsing NVML's command-line output into the agent's report.

#![allow(clippy::unwrap_used)]

use mig_agent::GpuError;
use mig_agent::source::parse_nvidia_smi;
use mig_catalog::{Catalog, NamedInstance};

#[test]
fn instances_land_on_their_gpus_at_their_placements() {
    let gpus = parse_nvidia_smi(
        include_str!("fixtures/h100-query.csv"),
        include_str!("fixtures/h100-lgi.txt"),
    )
    .unwrap();
    assert_eq!(gpus.len(), 3);
    let g0: Vec<NamedInstance> = gpus[0].instances.iter().map(|i| i.named()).collect();
    assert_eq!(
        g0,
        vec![
            NamedInstance::new("1g.10gb", 0),
            NamedInstance::new("1g.10gb+me", 1),
            NamedInstance::new("3g.40gb", 4)
        ]
    );
    assert_eq!(gpus[1].instances.len(), 1);
    assert!(!gpus[2].mig_enabled);
    // The catalog knows the NVML name and calls the reported layouts valid.
    for g in &gpus[..2] {
        let model = Catalog::embedded().lookup(&g.product).unwrap();
        let text: Vec<String> = g
            .instances
            .iter()
            .map(|i| format!("{}@{}", i.profile, i.start))
            .collect();
        let layout = model.parse_layout(&text.join(",")).unwrap();
        model.validate(&layout).unwrap();
    }
}

#[test]
fn malformed_output_is_an_error_not_a_panic() {
    assert!(parse_nvidia_smi("0, NVIDIA H100 80GB HBM3\n", "").is_err());
    assert!(parse_nvidia_smi("zero, NVIDIA H100 80GB HBM3, Enabled\n", "").is_err());
    let e = parse_nvidia_smi(
        "0, NVIDIA H100 80GB HBM3, Enabled\n",
        "|   3  MIG 1g.10gb   19   9   0:1 |\n",
    )
    .unwrap_err();
    assert!(matches!(&e, GpuError::Output(w) if w.contains("GPU 3")), "{e}");
    let e = parse_nvidia_smi(
        "0, NVIDIA H100 80GB HBM3, Enabled\n",
        "|   0  MIG 1g.10gb   19   9   x:1 |\n",
    )
    .unwrap_err();
    assert!(
        matches!(&e, GpuError::Output(w) if w.contains("placement")),
        "{e}"
    );
    assert!(parse_nvidia_smi("", "").unwrap().is_empty());
}

/// `NvidiaSmiGpus` against a stand-in `nvidia-smi` (a shell script printing recorded output): the
/// profiles it reads for the cross-check agree with the catalog; a failing command is an error.
#[test]
fn profiles_are_read_with_lgip_and_lgipp_and_agree_with_the_catalog() {
    use mig_agent::GpuSource;
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../mig-catalog/tests/fixtures");
    let here = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let (dir, source) = stand_in(
        "profiles",
        &format!(
            "'mig -lgi') cat {here}/h100-lgi.txt ;;\n\
             'mig -lgip -i 0') cat {fixtures}/h100-80gb.lgip.txt ;;\n\
             'mig -lgipp -i 0') cat {fixtures}/h100-80gb.lgipp.txt ;;"
        ),
    );
    let gpus = source.gpus().unwrap();
    let observed = source.profiles(&gpus[0]).unwrap().unwrap();
    assert_eq!(observed.origin, "nvidia-smi");
    let model = Catalog::embedded().lookup(&gpus[0].product).unwrap();
    assert_eq!(mig_catalog::nvml::compare(model, &observed), vec![]);
    // MIG off: nothing to check. GPU 1's rows are not recorded: the command fails, an error.
    assert!(source.profiles(&gpus[2]).unwrap().is_none());
    let e = source.profiles(&gpus[1]).unwrap_err();
    assert!(
        matches!(&e, GpuError::Failed { words, .. } if words.contains("unexpected")),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The nvml backend's commands against a stand-in `nvidia-smi` that logs its arguments: instances
/// to destroy are found by placement in `-lgi` (their GPU-instance IDs are not the placement),
/// compute instances go before their GPU instance, and creations name the placement explicitly
/// (`PROFILE_ID:START`, profile IDs from the catalog). A refusal by the driver is an error with its
/// words; so is an instance that is not there.
#[test]
fn nvml_backend_destroys_by_instance_id_and_creates_at_explicit_placements() {
    use mig_agent::{GpuSource, InstanceChange};
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("fake-nvidia-smi-apply-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let here = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let log = dir.join("calls.log");
    let script = dir.join("nvidia-smi");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$*\" >> {log}\ncase \"$*\" in\n\
             '--query-gpu=name --format=csv,noheader -i 0') echo 'NVIDIA H100 80GB HBM3' ;;\n\
             'mig -lgi -i 0') cat {here}/h100-lgi.txt ;;\n\
             'mig -i 0 -gi 9 -dgi') echo 'Unable to destroy GPU instance ID 9: In use by another client' >&2; exit 1 ;;\n\
             'mig -i 0 -gi '*) echo ok ;;\n\
             'mig -i 0 -cgi '*) echo ok ;;\n\
             *) echo \"unexpected: $*\" >&2; exit 3 ;;\n\
             esac\n",
            log = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let source = mig_agent::NvidiaSmiGpus::new(script.display().to_string());
    // 3g.40gb@4 (GPU-instance ID 2 in the fixture) becomes 2g.20gb@4 + 1g.10gb@6.
    source
        .apply(&InstanceChange {
            gpu: 0,
            destroy: vec![NamedInstance::new("3g.40gb", 4)],
            create: vec![NamedInstance::new("2g.20gb", 4), NamedInstance::new("1g.10gb", 6)],
        })
        .unwrap();
    let calls = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        vec![
            "--query-gpu=name --format=csv,noheader -i 0",
            "mig -lgi -i 0",
            "mig -i 0 -gi 2 -dci",
            "mig -i 0 -gi 2 -dgi",
            "mig -i 0 -cgi 14:4 -C",
            "mig -i 0 -cgi 19:6 -C",
        ]
    );
    // 1g.10gb@0 is ID 9, which the driver says is in use: an error with its words, nothing created.
    std::fs::remove_file(&log).unwrap();
    let e = source
        .apply(&InstanceChange {
            gpu: 0,
            destroy: vec![NamedInstance::new("1g.10gb", 0)],
            create: vec![NamedInstance::new("1g.10gb", 0)],
        })
        .unwrap_err();
    assert!(
        matches!(&e, GpuError::Failed { words, .. } if words.contains("In use by another client")),
        "{e}"
    );
    assert!(!std::fs::read_to_string(&log).unwrap().contains("-cgi"));
    // No such instance.
    let e = source
        .apply(&InstanceChange {
            gpu: 0,
            destroy: vec![NamedInstance::new("2g.20gb", 2)],
            create: vec![],
        })
        .unwrap_err();
    assert!(
        matches!(&e, GpuError::Refused(w) if w.contains("no instance 2g.20gb@2")),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Without pods per instance (nvidia-smi knows processes, not pods), a pod on the node is put on
/// every instance of the profile it requests, on every GPU: nothing it may be using looks free.
#[test]
fn pods_are_attributed_by_profile_when_the_source_cannot_tell() {
    use std::collections::BTreeMap;
    let mut gpus = parse_nvidia_smi(
        include_str!("fixtures/h100-query.csv"),
        include_str!("fixtures/h100-lgi.txt"),
    )
    .unwrap();
    let pods: Vec<(String, BTreeMap<String, i64>)> = vec![
        ("ml/a".into(), [("nvidia.com/mig-1g.10gb".to_string(), 1)].into()),
        ("ml/b".into(), [("nvidia.com/mig-7g.80gb".to_string(), 1)].into()),
        ("ml/c".into(), [("nvidia.com/mig-2g.20gb".to_string(), 1)].into()),
    ];
    mig_agent::source::attribute_by_profile(&mut gpus, &pods);
    let on: Vec<(u32, String, u8, Vec<String>)> = gpus
        .iter()
        .flat_map(|g| {
            g.instances
                .iter()
                .map(move |i| (g.index, i.profile.clone(), i.start, i.pods.clone()))
        })
        .collect();
    assert_eq!(
        on,
        vec![
            (0, "1g.10gb".into(), 0, vec!["ml/a".to_string()]),
            (0, "1g.10gb+me".into(), 1, vec![]),
            (0, "3g.40gb".into(), 4, vec![]),
            (1, "7g.80gb".into(), 0, vec!["ml/b".to_string()]),
        ]
    );
    // Idempotent: attributing again adds nothing.
    let before = gpus.clone();
    mig_agent::source::attribute_by_profile(&mut gpus, &pods);
    assert_eq!(gpus, before);
}

/// A stand-in `nvidia-smi` answering with `cases` (shell `case` arms) and the fixtures.
fn stand_in(name: &str, cases: &str) -> (std::path::PathBuf, mig_agent::NvidiaSmiGpus) {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("fake-nvidia-smi-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let here = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let script = dir.join("nvidia-smi");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \"$*\" in\n\
             --query-gpu*) cat {here}/h100-query.csv ;;\n\
             {cases}\n\
             *) echo \"unexpected: $*\" >&2; exit 3 ;;\n\
             esac\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, mig_agent::NvidiaSmiGpus::new(script.display().to_string()))
}

/// Unknown is never empty: `-lgi` failing for GPU 1 makes GPU 1 unknown (not a GPU without
/// instances, which a plan would fill and a rollback would "return" to), and GPU 0 is still read.
/// A GPU in MIG mode with no instances is a valid, empty answer.
#[test]
fn a_failed_instance_read_marks_that_gpu_unknown_and_the_others_are_still_read() {
    use mig_agent::GpuSource;
    let here = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let (dir, source) = stand_in(
        "fails",
        &format!(
            "'mig -lgi') echo 'Failed to display GPU instances: Unknown Error' >&2; exit 255 ;;\n\
             'mig -lgi -i 0') grep -v '^|   1 ' {here}/h100-lgi.txt ;;\n\
             'mig -lgi -i 1') echo 'Unable to list GPU instances: Unknown Error' >&2; exit 255 ;;"
        ),
    );
    let gpus = source.gpus().unwrap();
    assert_eq!(gpus[0].instances.len(), 3);
    assert_eq!(gpus[0].unknown, None);
    assert!(gpus[1].instances.is_empty());
    let why = gpus[1].unknown.as_deref().unwrap();
    assert!(
        why.contains("mig -lgi -i 1") && why.contains("Unknown Error"),
        "{why}"
    );
    assert_eq!(gpus[2].unknown, None, "MIG off: nothing to read");
    // GPU 0's instance IDs are still known (for dcgm-exporter's series).
    assert_eq!(source.instance_ids().get(&(0, 2)), Some(&4));
    let _ = std::fs::remove_dir_all(dir);

    let (dir, source) = stand_in(
        "none",
        &format!(
            "'mig -lgi') grep -v '^|   1 ' {here}/h100-lgi.txt ;;\n\
             'mig -lgi -i 0') grep -v '^|   1 ' {here}/h100-lgi.txt ;;\n\
             'mig -lgi -i 1') echo 'No GPU instances found: Not Found'; exit 6 ;;"
        ),
    );
    let gpus = source.gpus().unwrap();
    assert_eq!(gpus[0].instances.len(), 3);
    assert!(
        gpus[1].instances.is_empty() && gpus[1].unknown.is_none(),
        "{:?}",
        gpus[1]
    );
    let _ = std::fs::remove_dir_all(dir);

    // Rows that do not fit what --query-gpu said (a GPU it did not list) are not trusted either.
    let (dir, source) = stand_in(
        "misfit",
        "'mig -lgi'*) echo '|   7  MIG 7g.80gb   0   0   0:8 |' ;;",
    );
    let gpus = source.gpus().unwrap();
    assert!(
        gpus[0].unknown.as_deref().unwrap().contains("GPU 7"),
        "{:?}",
        gpus[0]
    );
    assert!(gpus[1].unknown.is_some());
    let _ = std::fs::remove_dir_all(dir);
}

/// A hung driver call is killed after the timeout (and whatever it started with it): the GPUs it
/// was reading are unknown, and the agent goes on.
#[test]
fn a_hanging_nvidia_smi_is_killed_and_its_gpus_are_unknown() {
    use mig_agent::GpuSource;
    let (dir, mut source) = stand_in("hangs", "'mig -lgi'*) sleep 60 ;;");
    source.timeout = std::time::Duration::from_millis(300);
    let started = std::time::Instant::now();
    let gpus = source.gpus().unwrap();
    // Three reads (all GPUs, then GPU 0 and GPU 1), each killed after 0.3 s; never the 60 s.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    for g in &gpus[..2] {
        assert!(g.unknown.as_deref().unwrap().contains("timed out"), "{g:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
