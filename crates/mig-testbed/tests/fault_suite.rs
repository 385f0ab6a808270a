//! End-to-end fault suite: the real controller and real agents, kube-emulator's scheduler, kubelet
//! and mig-manager, over real HTTP. Every scenario ends with the same invariants: no pod lost, no
//! node left tainted (unless the failure policy says so), no invalid layout on any GPU.
//! Figures go to docs/reliability.md.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use kube_emulator::{Faults, NodeSpec};
use mig_agent::{AgentSettings, FailurePolicy};
use mig_controller::settings::{Amount, Mode};
use mig_planner::snapshot::Backend;
use mig_protocol::{
    DEVICE_PLUGIN_DEPLOY_LABEL, GRANT_ANNOTATION, Grant, NodeState, Phase, STATE_ANNOTATION, TAINT_KEY,
};
use mig_testbed::EmulatedGpus;
use mig_testbed::harness::*;
use serde_json::json;

fn agent_settings(node: &str) -> AgentSettings {
    let mut s = AgentSettings::new(node);
    s.tick = Duration::from_millis(100);
    s
}

async fn start_agent(env: &Env, node: &str, settings: AgentSettings) -> mig_agent::Running {
    let source = Arc::new(EmulatedGpus::new(env.cluster.hardware(), node));
    mig_agent::start(agent_client(&env.server, node), settings, source)
        .await
        .unwrap()
}

async fn agents(env: &Env, names: &[String], f: impl Fn(&str) -> AgentSettings) -> Vec<mig_agent::Running> {
    let mut out = Vec::new();
    for n in names {
        out.push(start_agent(env, n, f(n)).await);
    }
    out
}

fn names(spec: &[NodeSpec]) -> Vec<String> {
    spec.iter().map(|n| n.name.clone()).collect()
}

async fn pod_phase(env: &Env, name: &str) -> Option<String> {
    Api::<Pod>::namespaced(env.client.clone(), "default")
        .get(name)
        .await
        .ok()
        .and_then(|p| p.status?.phase)
}

async fn node_state(env: &Env, node: &str) -> Option<NodeState> {
    let n = Api::<Node>::all(env.client.clone()).get(node).await.ok()?;
    n.annotations()
        .get(STATE_ANNOTATION)
        .and_then(|s| serde_json::from_str(s).ok())
}

/// The node's GPU report, as its agent wrote it.
async fn node_report(env: &Env, node: &str) -> Option<mig_protocol::NodeReport> {
    let n = Api::<Node>::all(env.client.clone()).get(node).await.ok()?;
    n.annotations()
        .get(mig_protocol::REPORT_ANNOTATION)
        .and_then(|r| serde_json::from_str(r).ok())
}

/// The invariants every scenario ends with.
async fn check_invariants(env: &Env, expected_pods: &[&str], allow_tainted: bool) -> usize {
    // No invalid layout on any GPU.
    let nodes: Vec<Node> = Api::<Node>::all(env.client.clone())
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    for n in &nodes {
        for g in env.cluster.gpus(&n.name_any()) {
            g.model
                .validate(&g.layout)
                .unwrap_or_else(|e| panic!("invalid layout on {}: {e}", n.name_any()));
        }
    }
    // No pod lost.
    let pods: Vec<String> = Api::<Pod>::namespaced(env.client.clone(), "default")
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    for p in expected_pods {
        assert!(pods.iter().any(|x| x == p), "pod {p} was lost");
    }
    // No node left tainted (unless allowed).
    let tainted = nodes
        .iter()
        .filter(|n| {
            n.spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key == TAINT_KEY))
        })
        .count();
    if !allow_tainted {
        assert_eq!(tainted, 0, "a node was left tainted");
    }
    // No device plugin left stopped (the nvml backend pauses it to restart it).
    for n in &nodes {
        let label = n.labels().get(DEVICE_PLUGIN_DEPLOY_LABEL);
        assert!(
            label.is_none_or(|v| v == "true"),
            "{}: device plugin left {label:?}",
            n.name_any()
        );
    }
    tainted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_a_3g_pod_on_idle_1g_layouts_is_repartitioned_and_bound() {
    let spec = nodes(2, 2, SEVEN_1G);
    let env = bare_env(spec.clone()).await;
    let _agents = agents(&env, &names(&spec), agent_settings).await;
    let c = controller(&env, fast_settings(Mode::Auto), "replica-a").await;
    let t0 = Instant::now();
    create_pod(&env.client, &mig_pod("wants-3g", "3g.40gb", "1")).await;
    eventually(20, "the pod runs", || async {
        pod_phase(&env, "wants-3g").await.as_deref() == Some("Running")
    })
    .await;
    eprintln!("s1: pending -> running in {:?}", t0.elapsed());
    check_invariants(&env, &["wants-3g"], false).await;
    let done = futures::future::join_all(names(&spec).iter().map(|n| node_state(&env, n))).await;
    assert_eq!(
        done.iter().flatten().filter(|s| s.phase == Phase::Done).count(),
        1
    );
    c.stop().await;
}

async fn running_pod_on(env: &Env, name: &str, profile: &str, labels: serde_json::Value) {
    let mut pod = mig_pod(name, profile, "1");
    pod.metadata.labels = serde_json::from_value(labels).unwrap();
    create_pod(&env.client, &pod).await;
    eventually(10, "the running pod is bound", || async {
        pod_phase(env, name).await.as_deref() == Some("Running")
    })
    .await;
}

async fn pdb(env: &Env, allowed: i32) {
    let p: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "protect", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "protected"}}, "maxUnavailable": 0},
        "status": {"observedGeneration": 1, "disruptionsAllowed": allowed, "currentHealthy": 1, "desiredHealthy": 1, "expectedPods": 1},
    }))
    .unwrap();
    Api::<PodDisruptionBudget>::namespaced(env.client.clone(), "default")
        .create(&PostParams::default(), &p)
        .await
        .unwrap();
}

/// A grant written by hand, as a stale or buggy controller might: GPU 0 to one 7g, evicting
/// `evictions` (`namespace/name`), granted now, with one of our config names.
fn hand_grant(id: &str, evictions: &[&str]) -> Grant {
    Grant {
        id: id.into(),
        plan_id: id.into(),
        mig_config: Some(format!("mig-autoscaler-{id}")),
        targets: [(0, "7g.80gb@0".to_string())].into(),
        evictions: evictions.iter().map(|e| e.to_string()).collect(),
        granted_at: jiff::Timestamp::now().to_string(),
        granted_by: "test".into(),
        recent_evictions: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_a_pdb_allowing_no_disruption_is_never_overridden() {
    // One GPU as two 3g; one holds a protected pod. A 7g pod could run only if it were evicted.
    let spec = nodes(1, 1, "3g.40gb@0,3g.40gb@4");
    let env = bare_env(spec.clone()).await;
    running_pod_on(&env, "protected", "3g.40gb", json!({"app": "protected"})).await;
    pdb(&env, 0).await;
    let _agents = agents(&env, &names(&spec), |n| {
        let mut s = agent_settings(n);
        s.sequence.drain_timeout = jiff::SignedDuration::from_millis(1500);
        s
    })
    .await;
    let mut settings = fast_settings(Mode::Auto);
    settings.planner.drain = mig_planner::DrainPolicy::Allowed;
    let c = controller(&env, settings, "replica-a").await;
    create_pod(&env.client, &mig_pod("wants-7g", "7g.80gb", "1")).await;

    // The plan waits and says why.
    eventually(10, "an event naming the PDB", || async {
        events(&env.client, "default")
            .await
            .iter()
            .any(|(who, r, note, _)| {
                who == "wants-7g" && r == "WaitingForMigCapacity" && note.contains("PDB")
            })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pod_phase(&env, "protected").await.as_deref(), Some("Running"));
    assert_eq!(c.shared.metrics.eviction_count("evicted"), 0);

    // Even a grant that names the pod (written by hand, as a buggy or stale controller might) gets
    // 429s, never an eviction: the drain times out and the node is rolled back and untainted.
    write_grant(&env, "gpu-node-0", &hand_grant("by-hand", &["default/protected"])).await;
    eventually(10, "rolled back after the drain timeout", || async {
        node_state(&env, "gpu-node-0")
            .await
            .is_some_and(|s| s.grant_id == "by-hand" && s.phase == Phase::RolledBack)
    })
    .await;
    assert!(c.shared.metrics.eviction_count("blocked") >= 1);
    assert_eq!(c.shared.metrics.eviction_count("evicted"), 0);
    let ev = events(&env.client, "default").await;
    assert!(
        ev.iter().any(|(who, r, n, t)| who == "gpu-node-0"
            && r == "EvictionBlockedByPDB"
            && t == "Warning"
            && n.contains("default/protected")),
        "{ev:?}"
    );
    assert_eq!(pod_phase(&env, "protected").await.as_deref(), Some("Running"));
    check_invariants(&env, &["protected", "wants-7g"], false).await;
    c.stop().await;
}

/// What hits the node when its state first shows a phase.
#[derive(Clone, Copy, Debug)]
enum Blow {
    /// The controller and the agent are killed (task aborted, no cleanup, lease not released).
    Kill,
    /// The agent is killed and the node reboots (its pods die, its GPUs lose every instance and
    /// mig-manager applies the node's label again).
    Reboot,
}

/// Agent settings for `backend`.
fn on_backend(node: &str, backend: Backend) -> AgentSettings {
    let mut s = agent_settings(node);
    s.sequence.backend = backend;
    s
}

/// One node, one GPU of seven 1g. With `drain`, a running 1g pod (`victim`) must be evicted for a
/// higher-priority 7g pod; without, the 7g goes on the idle GPU. `blow` strikes when the node's
/// state first shows `phase`; the controller and the agent are then restarted. Returns the phase
/// seen and the time from the restart to the 7g pod running. With the nvml backend the emulated
/// device plugin must be restarted to advertise the new instance.
async fn strike_at(phase: Phase, blow: Blow, drain: bool, backend: Backend) -> (Phase, Duration) {
    let spec = nodes(1, 1, SEVEN_1G);
    let env = bare_env_with(spec.clone(), backend == Backend::Nvml).await;
    if drain {
        // A batch pod that stops within a second of its SIGTERM (the default grace is 30 s).
        let mut victim = mig_pod("victim", "1g.10gb", "1");
        victim.spec.as_mut().unwrap().termination_grace_period_seconds = Some(1);
        create_pod(&env.client, &victim).await;
        eventually(10, "the victim runs", || async {
            pod_phase(&env, "victim").await.as_deref() == Some("Running")
        })
        .await;
    }
    let agent = start_agent(&env, "gpu-node-0", on_backend("gpu-node-0", backend)).await;
    let mut settings = fast_settings(Mode::Auto);
    settings.planner.backend = backend;
    if drain {
        settings.planner.drain = mig_planner::DrainPolicy::Allowed;
    }
    let c = controller(&env, settings.clone(), "replica-a").await;
    let mut wants = mig_pod("wants-7g", "7g.80gb", "1");
    if drain {
        wants.spec.as_mut().unwrap().priority = Some(1000);
    }
    create_pod(&env.client, &wants).await;
    let t0 = Instant::now();
    let seen = loop {
        if let Some(s) = node_state(&env, "gpu-node-0").await
            && s.phase == phase
        {
            break s.phase;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "never saw {phase:?}");
        tokio::time::sleep(Duration::from_millis(3)).await;
    };
    agent.kill();
    let c = match blow {
        Blow::Kill => {
            c.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            controller(&env, settings, "replica-b").await
        }
        Blow::Reboot => {
            env.cluster.reboot("gpu-node-0");
            tokio::time::sleep(Duration::from_millis(300)).await;
            c
        }
    };
    let agent = start_agent(&env, "gpu-node-0", on_backend("gpu-node-0", backend)).await;
    let t1 = Instant::now();
    eventually(30, "the 7g pod runs after the restart", || async {
        pod_phase(&env, "wants-7g").await.as_deref() == Some("Running")
    })
    .await;
    let recovered = t1.elapsed();
    eventually(5, "the sequence ended", || async {
        node_state(&env, "gpu-node-0")
            .await
            .is_some_and(|s| s.phase.is_terminal())
    })
    .await;
    check_invariants(&env, &["wants-7g"], false).await;
    if drain {
        // Evicted through the Eviction API (or killed by the reboot), never left behind.
        assert_eq!(pod_phase(&env, "victim").await, None, "{phase:?} {blow:?}");
    }
    c.stop().await;
    agent.stop().await;
    (seen, recovered)
}

const PHASES: [Phase; 7] = [
    Phase::Tainting,
    Phase::Draining,
    Phase::Relabeling,
    Phase::AwaitingMigManager,
    Phase::Verifying,
    Phase::Untainting,
    Phase::Done,
];

/// The phases of an nvml-backend sequence.
const NVML_PHASES: [Phase; 6] = [
    Phase::Tainting,
    Phase::Draining,
    Phase::Applying,
    Phase::Verifying,
    Phase::Untainting,
    Phase::Done,
];

/// [`strike_at`] at each of `phases`; prints the recovery times as `label`.
async fn strike_each(label: &str, phases: &[Phase], blow: Blow, drain: bool, backend: Backend) {
    let mut rows = Vec::new();
    for phase in phases {
        let (seen, took) = strike_at(*phase, blow, drain, backend).await;
        rows.push(format!("{seen:?}: recovered in {took:?}"));
    }
    eprintln!("{label}: {rows:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_killing_controller_and_agent_at_every_phase_completes_the_sequence() {
    strike_each("s3", &PHASES, Blow::Kill, false, Backend::MigManager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3b_kills_at_every_phase_of_a_sequence_that_evicts() {
    strike_each("s3b", &PHASES, Blow::Kill, true, Backend::MigManager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s10_a_node_rebooting_mid_sequence_ends_reconfigured_and_untainted() {
    // Every phase between the taint and its removal.
    strike_each("s10", &PHASES[1..6], Blow::Reboot, true, Backend::MigManager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3c_kills_at_every_phase_of_an_nvml_sequence() {
    strike_each("s3c", &NVML_PHASES, Blow::Kill, true, Backend::Nvml).await;
}

/// The emulated device-plugin pod of `node` (its uid changes when it is restarted).
async fn device_plugin_uid(env: &Env, node: &str) -> Option<String> {
    Api::<Pod>::namespaced(env.client.clone(), "gpu-operator")
        .get(&format!("nvidia-device-plugin-{node}"))
        .await
        .ok()
        .and_then(|p| p.metadata.uid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s11_nvml_backend_repartitions_around_a_running_pod_without_evicting_it() {
    // One GPU of seven 1g, one of them running `keep`; draining is not allowed. mig-manager would
    // have to rebuild the GPU whole, so a 3g pod could never run here; the nvml backend destroys
    // only free 1g instances, creates the 3g at its placement and restarts the device plugin.
    let spec = nodes(1, 1, SEVEN_1G);
    let env = bare_env_with(spec.clone(), true).await;
    running_pod_on(&env, "keep", "1g.10gb", json!({})).await;
    let keep_uid = Api::<Pod>::namespaced(env.client.clone(), "default")
        .get("keep")
        .await
        .unwrap()
        .metadata
        .uid;
    let keep_at = env.cluster.gpus("gpu-node-0")[0].used.clone();
    let plugin_before = device_plugin_uid(&env, "gpu-node-0").await;
    assert!(plugin_before.is_some());
    let agent = start_agent(&env, "gpu-node-0", on_backend("gpu-node-0", Backend::Nvml)).await;
    let mut settings = fast_settings(Mode::Auto);
    settings.planner.backend = Backend::Nvml;
    let c = controller(&env, settings, "replica-a").await;
    let t0 = Instant::now();
    create_pod(&env.client, &mig_pod("wants-3g", "3g.40gb", "1")).await;
    eventually(20, "the 3g pod runs", || async {
        pod_phase(&env, "wants-3g").await.as_deref() == Some("Running")
    })
    .await;
    eprintln!("s11: pending -> running in {:?}", t0.elapsed());
    check_invariants(&env, &["wants-3g", "keep"], false).await;
    // `keep` was never evicted and still holds the same instance.
    let keep_now = Api::<Pod>::namespaced(env.client.clone(), "default")
        .get("keep")
        .await
        .unwrap();
    assert_eq!(keep_now.metadata.uid, keep_uid);
    assert!(keep_now.metadata.deletion_timestamp.is_none());
    let gpu = env.cluster.gpus("gpu-node-0")[0].clone();
    for (instance, pod) in &keep_at {
        assert!(gpu.layout.contains(instance), "keep's instance was destroyed");
        assert_eq!(gpu.used.get(instance), Some(pod));
    }
    assert_eq!(c.shared.metrics.eviction_count("evicted"), 0);
    // The device plugin was restarted (check_invariants: and runs again).
    assert_ne!(device_plugin_uid(&env, "gpu-node-0").await, plugin_before);
    let state = node_state(&env, "gpu-node-0").await.unwrap();
    assert_eq!(state.phase, Phase::Done, "{state:?}");
    assert_eq!(state.previous_layouts.get(&0).map(String::as_str), Some(SEVEN_1G));
    let ev = events(&env.client, "default").await;
    assert!(ev.iter().any(|e| e.1 == "ReconfigurationSucceeded"), "{ev:?}");
    c.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s11b_nvml_refusing_to_create_instances_is_rolled_back_visibly_then_converges() {
    // NVML destroys the free 1g instances but refuses every creation: after the phase timeout the
    // agent rolls back (creates the seven 1g again), with a Warning; once NVML works again the
    // controller plans anew and the pod runs.
    let spec = nodes(1, 1, SEVEN_1G);
    let env = bare_env_with(spec.clone(), true).await;
    env.cluster.fail_next_applies(u32::MAX);
    let mut s = on_backend("gpu-node-0", Backend::Nvml);
    s.sequence.phase_timeout = jiff::SignedDuration::from_secs(1);
    let agent = start_agent(&env, "gpu-node-0", s).await;
    let mut settings = fast_settings(Mode::Auto);
    settings.planner.backend = Backend::Nvml;
    let c = controller(&env, settings, "replica-a").await;
    create_pod(&env.client, &mig_pod("wants-3g", "3g.40gb", "1")).await;
    eventually(20, "the agent rolls back", || async {
        node_state(&env, "gpu-node-0")
            .await
            .is_some_and(|s| s.phase == Phase::RollingBack)
    })
    .await;
    let partial = env.cluster.gpus("gpu-node-0")[0].clone();
    assert!(
        partial.layout.len() < 7,
        "the destroys happened: {:?}",
        partial.layout
    );
    env.cluster.fail_next_applies(0);
    eventually(20, "rolled back", || async {
        events(&env.client, "default")
            .await
            .iter()
            .any(|e| e.1 == "ReconfigurationRolledBack")
    })
    .await;
    let ev = events(&env.client, "default").await;
    let rolling = ev
        .iter()
        .find(|e| e.1 == "ReconfigurationRollingBack")
        .unwrap_or_else(|| panic!("{ev:?}"));
    assert_eq!(rolling.3, "Warning");
    assert!(rolling.2.contains("GPU 0 → 1g.10gb@0"), "{rolling:?}");
    eventually(20, "the 3g pod runs once NVML works", || async {
        pod_phase(&env, "wants-3g").await.as_deref() == Some("Running")
    })
    .await;
    check_invariants(&env, &["wants-3g"], false).await;
    c.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_mig_manager_failure_follows_the_policy_visibly() {
    for policy in [FailurePolicy::Rollback, FailurePolicy::StayTainted] {
        let spec = nodes(1, 1, SEVEN_1G);
        let env = bare_env(spec.clone()).await;
        env.cluster.fail_next_applies(1);
        let agent = start_agent(&env, "gpu-node-0", {
            let mut s = agent_settings("gpu-node-0");
            s.sequence.on_failure = policy;
            s
        })
        .await;
        let c = controller(&env, fast_settings(Mode::Auto), "replica-a").await;
        create_pod(&env.client, &mig_pod("wants-7g", "7g.80gb", "1")).await;
        match policy {
            FailurePolicy::Rollback => {
                // Rolled back, then granted again: the second apply succeeds.
                eventually(20, "the pod runs on the second attempt", || async {
                    pod_phase(&env, "wants-7g").await.as_deref() == Some("Running")
                })
                .await;
                let ev = events(&env.client, "default").await;
                assert!(
                    ev.iter().any(|(w, r, _, t)| w == "gpu-node-0"
                        && r == "ReconfigurationRollingBack"
                        && t == "Warning"),
                    "{ev:?}"
                );
                eventually(5, "the controller counted the rollback", || async {
                    let (_, scrape) = http(c.addr, "GET", "/metrics", b"").await;
                    sample(
                        &scrape,
                        "mig_autoscaler_reconfigurations_total{result=\"RolledBack\"}",
                    ) == Some(1.0)
                        && sample(&scrape, "mig_autoscaler_reconfigurations_total{result=\"Done\"}")
                            == Some(1.0)
                })
                .await;
                check_invariants(&env, &["wants-7g"], false).await;
            }
            FailurePolicy::StayTainted => {
                eventually(10, "Failed and tainted", || async {
                    node_state(&env, "gpu-node-0")
                        .await
                        .is_some_and(|s| s.phase == Phase::Failed)
                })
                .await;
                tokio::time::sleep(Duration::from_millis(800)).await;
                // Still failed, still tainted, never granted again; said loudly.
                assert_eq!(node_state(&env, "gpu-node-0").await.unwrap().phase, Phase::Failed);
                assert_eq!(check_invariants(&env, &["wants-7g"], true).await, 1);
                let (_, scrape) = http(c.addr, "GET", "/metrics", b"").await;
                // Stuck for a person: frozen, but it holds no budget (a failure wedges nothing).
                assert_eq!(
                    sample(&scrape, "mig_autoscaler_nodes_reconfiguring"),
                    Some(0.0),
                    "{scrape}"
                );
                assert_eq!(
                    sample(&scrape, "mig_autoscaler_nodes_stuck"),
                    Some(1.0),
                    "{scrape}"
                );
                assert_eq!(
                    sample(
                        &scrape,
                        "mig_autoscaler_reconfigurations_total{result=\"Failed\"}"
                    ),
                    Some(1.0)
                );
                let ev = events(&env.client, "default").await;
                assert!(
                    ev.iter().any(|(w, r, _, t)| w == "gpu-node-0"
                        && r == "ReconfigurationFailed"
                        && t == "Warning"),
                    "{ev:?}"
                );
            }
        }
        c.stop().await;
        agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_api_faults_do_not_stop_convergence() {
    let spec = nodes(3, 1, SEVEN_1G);
    let env = bare_env(spec.clone()).await;
    env.server.state.set_faults(Faults {
        error_rate: 0.15,
        latency: Duration::from_millis(2),
        drop_watch_after: Some(25),
        force_gone: 4,
        ..Default::default()
    });
    let _agents = agents(&env, &names(&spec), agent_settings).await;
    let c = controller(&env, fast_settings(Mode::Auto), "replica-a").await;
    let profiles = ["3g.40gb", "7g.80gb", "4g.40gb"];
    for (i, p) in profiles.iter().enumerate() {
        // Creating may meet an injected 500: retry as any client would.
        let pod = mig_pod(&format!("p{i}"), p, "1");
        eventually(5, "pod created", || async {
            Api::<Pod>::namespaced(env.client.clone(), "default")
                .create(&PostParams::default(), &pod)
                .await
                .is_ok()
                || Api::<Pod>::namespaced(env.client.clone(), "default")
                    .get(&format!("p{i}"))
                    .await
                    .is_ok()
        })
        .await;
    }
    eventually(
        40,
        "every pod runs despite 5xx, dropped watches and 410s",
        || async {
            let mut all = true;
            for i in 0..profiles.len() {
                all &= pod_phase(&env, &format!("p{i}")).await.as_deref() == Some("Running");
            }
            all
        },
    )
    .await;
    env.server.state.set_faults(Faults::default());
    eventually(5, "every sequence ended", || async {
        let mut ended = true;
        for n in names(&spec) {
            ended &= node_state(&env, &n).await.is_none_or(|s| s.phase.is_terminal());
        }
        ended
    })
    .await;
    check_invariants(&env, &["p0", "p1", "p2"], false).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_a_budget_of_one_node_holds_with_real_agents() {
    let spec = nodes(4, 1, SEVEN_1G);
    let env = bare_env(spec.clone()).await;
    let _agents = agents(&env, &names(&spec), agent_settings).await;
    let mut s = fast_settings(Mode::Auto);
    s.budgets.max_nodes_reconfiguring = Amount::Count(1);
    let c = controller(&env, s, "replica-a").await;
    // Watch every node's flight; count nodes in flight at once.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let monitor = tokio::spawn(mig_testbed::harness::max_in_flight(env.client.clone(), stop_rx));
    let mut names_created = Vec::new();
    for (i, p) in ["7g.80gb", "3g.40gb", "4g.40gb", "2g.20gb", "7g.80gb", "3g.40gb"]
        .iter()
        .enumerate()
    {
        let name = format!("b{i}");
        create_pod(&env.client, &mig_pod(&name, p, "1")).await;
        names_created.push(name);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    eventually(40, "every pod runs", || async {
        let mut all = true;
        for n in &names_created {
            all &= pod_phase(&env, n).await.as_deref() == Some("Running");
        }
        all
    })
    .await;
    stop_tx.send(true).unwrap();
    let max = monitor.await.unwrap();
    eprintln!("s6: max nodes in flight {max}");
    assert_eq!(max, 1, "budget of 1 node exceeded or never used");
    let refs: Vec<&str> = names_created.iter().map(String::as_str).collect();
    check_invariants(&env, &refs, false).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7_garbage_in_our_annotations_is_reported_and_left_alone() {
    let spec = nodes(2, 1, SEVEN_1G);
    let env = bare_env(spec.clone()).await;
    let agents = agents(&env, &names(&spec), agent_settings).await;
    let api = Api::<Node>::all(env.client.clone());
    api.patch(
        "gpu-node-0",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {GRANT_ANNOTATION: "{\"planId\": 7"}}})),
    )
    .await
    .unwrap();
    api.patch(
        "gpu-node-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {STATE_ANNOTATION: "[]"}}})),
    )
    .await
    .unwrap();
    // The controller reports them (the agents only count them and do nothing there).
    let c = controller(&env, fast_settings(Mode::DryRun), "replica-a").await;
    eventually(10, "warnings for both nodes", || async {
        let ev = events(&env.client, "default").await;
        ["gpu-node-0", "gpu-node-1"].iter().all(|n| {
            ev.iter()
                .any(|(w, r, _, t)| w == n && r == "MalformedAnnotation" && t == "Warning")
        })
    })
    .await;
    eventually(10, "both agents count the unreadable annotations", || async {
        agents
            .iter()
            .all(|a| a.shared.metrics.count("errors", "annotation") >= 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Left as they were: not overwritten, no taint, no relabel.
    let n0 = api.get("gpu-node-0").await.unwrap();
    assert_eq!(
        n0.annotations().get(GRANT_ANNOTATION).map(String::as_str),
        Some("{\"planId\": 7")
    );
    let n1 = api.get("gpu-node-1").await.unwrap();
    assert_eq!(
        n1.annotations().get(STATE_ANNOTATION).map(String::as_str),
        Some("[]")
    );
    assert_eq!(
        n0.labels().get("nvidia.com/mig.config").map(String::as_str),
        Some("all-1g.10gb")
    );
    check_invariants(&env, &[], false).await;
    c.stop().await;
}

/// A GPU source whose driver disagrees with the catalog while `lying`: it reports 3g.40gb
/// placeable only at 4. Counts the profile reads (each an `nvidia-smi` run on a real node).
struct DriverDisagrees {
    inner: EmulatedGpus,
    lying: std::sync::atomic::AtomicBool,
    reads: std::sync::atomic::AtomicUsize,
}

impl mig_agent::GpuSource for DriverDisagrees {
    fn knows_pods(&self) -> bool {
        true
    }
    fn gpus(&self) -> Result<Vec<mig_planner::snapshot::Gpu>, mig_agent::GpuError> {
        self.inner.gpus()
    }

    fn profiles(
        &self,
        gpu: &mig_planner::snapshot::Gpu,
    ) -> Result<Option<mig_catalog::nvml::ObservedGpu>, mig_agent::GpuError> {
        use std::sync::atomic::Ordering::SeqCst;
        self.reads.fetch_add(1, SeqCst);
        let mut observed = self.inner.profiles(gpu)?.unwrap();
        for p in &mut observed.profiles {
            if p.name.as_deref() == Some("MIG 3g.40gb") && self.lying.load(SeqCst) {
                p.placements.retain(|x| x.start == 4);
            }
        }
        Ok(Some(observed))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s8_an_agent_whose_driver_disagrees_with_the_catalog_refuses_to_act() {
    let spec = nodes(1, 1, SEVEN_1G);
    let env = bare_env(spec.clone()).await;
    let node = &spec[0].name;
    let source = Arc::new(DriverDisagrees {
        inner: EmulatedGpus::new(env.cluster.hardware(), node),
        lying: true.into(),
        reads: 0.into(),
    });
    let mut settings = agent_settings(node);
    settings.catalog_retry = Duration::from_millis(500);
    let started = Instant::now();
    let agent = mig_agent::start(agent_client(&env.server, node), settings, source.clone())
        .await
        .unwrap();
    // The catalog's own picture passes the same check (the emulator follows the catalog).
    let honest = EmulatedGpus::new(env.cluster.hardware(), node);
    let gpu = mig_agent::GpuSource::gpus(&honest).unwrap().remove(0);
    let observed = mig_agent::GpuSource::profiles(&honest, &gpu).unwrap().unwrap();
    let model = mig_catalog::Catalog::embedded().lookup(&gpu.product).unwrap();
    assert!(mig_catalog::nvml::compare(model, &observed).is_empty());

    let c = controller(&env, fast_settings(Mode::Auto), "replica-a").await;
    create_pod(&env.client, &mig_pod("wants-3g", "3g.40gb", "1")).await;
    eventually(10, "a CatalogMismatch warning naming the placements", || async {
        events(&env.client, "default")
            .await
            .iter()
            .any(|(w, r, note, t)| {
                w == node && r == "CatalogMismatch" && t == "Warning" && note.contains("3g.40gb")
            })
    })
    .await;
    assert!(!agent.shared.is_ready());
    assert!(agent.shared.metrics.count("errors", "catalog") >= 1);
    assert!(
        agent
            .shared
            .metrics
            .encode()
            .contains("mig_autoscaler_agent_ready 0")
    );
    // It still reports, but never starts a sequence: no state, no taint, no relabel, the pod waits.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = Api::<Node>::all(env.client.clone()).get(node).await.unwrap();
    assert!(n.annotations().contains_key(mig_protocol::REPORT_ANNOTATION));
    assert!(node_state(&env, node).await.is_none());
    assert_eq!(
        n.labels().get("nvidia.com/mig.config").map(String::as_str),
        Some("all-1g.10gb")
    );
    assert_ne!(pod_phase(&env, "wants-3g").await.as_deref(), Some("Running"));
    check_invariants(&env, &["wants-3g"], false).await;
    // The check is retried on its own slower timer (500 ms), not every tick (100 ms).
    let reads = source.reads.load(std::sync::atomic::Ordering::SeqCst) as f64;
    let secs = started.elapsed().as_secs_f64();
    assert!(
        reads >= 2.0 && reads <= secs / 0.5 + 2.0 && reads < secs / 0.1 / 2.0,
        "{reads} profile reads in {secs:.1} s"
    );

    // The driver is fixed (say, updated): the next check passes without a restart, and the pod runs.
    source.lying.store(false, std::sync::atomic::Ordering::SeqCst);
    eventually(10, "the agent is ready and the pod runs", || async {
        agent.shared.is_ready() && pod_phase(&env, "wants-3g").await.as_deref() == Some("Running")
    })
    .await;
    check_invariants(&env, &["wants-3g"], false).await;
    c.stop().await;
}

/// A driver whose profile table cannot be read, with pages of words (a real nvidia-smi can print
/// that much on a failure).
struct VerboseDriver(EmulatedGpus);

impl mig_agent::GpuSource for VerboseDriver {
    fn knows_pods(&self) -> bool {
        true
    }
    fn gpus(&self) -> Result<Vec<mig_planner::snapshot::Gpu>, mig_agent::GpuError> {
        self.0.gpus()
    }
    fn profiles(
        &self,
        _gpu: &mig_planner::snapshot::Gpu,
    ) -> Result<Option<mig_catalog::nvml::ObservedGpu>, mig_agent::GpuError> {
        Err(mig_agent::GpuError::Output(format!(
            "unexpected output: {}",
            "Unable to determine the device handle for GPU 0000:3B:00.0: Unknown Error. ".repeat(60)
        )))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s8b_an_agent_warns_even_when_the_driver_says_pages() {
    // The Warning quotes the driver; the API server refuses an Event note over 1 kB, so a note is
    // cut to fit rather than lost (the emulator refuses long notes as the real server does).
    let spec = nodes(1, 1, SEVEN_1G);
    let env = bare_env(spec.clone()).await;
    let node = &spec[0].name;
    let source = Arc::new(VerboseDriver(EmulatedGpus::new(env.cluster.hardware(), node)));
    let agent = mig_agent::start(agent_client(&env.server, node), agent_settings(node), source)
        .await
        .unwrap();
    eventually(10, "a CatalogMismatch warning quoting the driver", || async {
        events(&env.client, "default")
            .await
            .iter()
            .any(|(w, r, note, _)| {
                w == node && r == "CatalogMismatch" && note.contains("Unknown Error") && note.len() <= 1024
            })
    })
    .await;
    assert!(!agent.shared.is_ready());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s9_a_pod_bound_after_the_plan_is_never_evicted_and_the_next_plan_counts_it() {
    // A stale grant: made before `late` was bound to the GPU it rebuilds (kube-scheduler binds up
    // to the moment our taint lands). The agent must stop before relabeling, untaint, and evict
    // nothing it was not granted; the controller's next plan then sees `late` and goes around it
    // at once: a superseded sequence changed nothing and starts no cooldown.
    let spec = nodes(1, 2, SEVEN_1G);
    let env = bare_env(spec.clone()).await;
    let node = spec[0].name.clone();
    running_pod_on(&env, "late", "1g.10gb", json!({})).await;
    let on: u32 = env
        .cluster
        .gpus(&node)
        .iter()
        .find(|g| g.used.values().any(|p| p == "default/late"))
        .map(|g| g.index)
        .unwrap();
    let grant = Grant {
        id: "stale-1".into(),
        plan_id: "stale".into(),
        mig_config: Some("mig-autoscaler-stale".into()),
        targets: [(on, "7g.80gb@0".to_string())].into(),
        evictions: vec![],
        granted_at: jiff::Timestamp::now().to_string(),
        granted_by: "replica-a".into(),
        recent_evictions: vec![],
    };
    let api = Api::<Node>::all(env.client.clone());
    let grant_json = serde_json::to_string(&grant).unwrap();
    api.patch(
        &node,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {GRANT_ANNOTATION: grant_json}}})),
    )
    .await
    .unwrap();
    let agent = start_agent(&env, &node, agent_settings(&node)).await;
    eventually(10, "the stale grant is superseded", || async {
        node_state(&env, &node)
            .await
            .is_some_and(|s| s.phase == Phase::Superseded)
    })
    .await;
    let state = node_state(&env, &node).await.unwrap();
    let why = state.message.unwrap_or_default();
    assert!(
        why.contains(&format!("default/late started on GPU {on}")),
        "{why}"
    );
    let n = api.get(&node).await.unwrap();
    assert_eq!(
        n.labels().get("nvidia.com/mig.config").map(String::as_str),
        Some("all-1g.10gb"),
        "relabeled over a running pod"
    );
    assert_eq!(pod_phase(&env, "late").await.as_deref(), Some("Running"));
    check_invariants(&env, &["late"], false).await;
    let ev = events(&env.client, "default").await;
    assert!(
        ev.iter().any(|(w, r, note, t)| w == &node
            && r == "ReconfigurationSuperseded"
            && t == "Normal"
            && note.contains("default/late")),
        "{ev:?}"
    );

    // The controller plans afresh: the 7g goes to the other GPU and `late` keeps running.
    let mut settings = fast_settings(Mode::Auto);
    settings.budgets.node_cooldown = mig_controller::settings::Dur::secs(600);
    let c = controller(&env, settings, "replica-a").await;
    create_pod(&env.client, &mig_pod("wants-7g", "7g.80gb", "1")).await;
    eventually(20, "the 7g pod runs", || async {
        pod_phase(&env, "wants-7g").await.as_deref() == Some("Running")
    })
    .await;
    assert_eq!(pod_phase(&env, "late").await.as_deref(), Some("Running"));
    let late_gpu = env
        .cluster
        .gpus(&node)
        .iter()
        .find(|g| g.used.values().any(|p| p == "default/late"))
        .map(|g| g.index);
    assert_eq!(late_gpu, Some(on), "late was moved");
    check_invariants(&env, &["late", "wants-7g"], false).await;
    c.stop().await;
    agent.stop().await;
}

/// What a real node's source sees: the instances, not the pods using them (nvidia-smi).
struct PodBlind(EmulatedGpus);

impl mig_agent::GpuSource for PodBlind {
    fn gpus(&self) -> Result<Vec<mig_planner::snapshot::Gpu>, mig_agent::GpuError> {
        let mut gpus = self.0.gpus()?;
        for i in gpus.iter_mut().flat_map(|g| g.instances.iter_mut()) {
            i.pods.clear();
        }
        Ok(gpus)
    }

    fn instance_ids(&self) -> std::collections::BTreeMap<(u32, u32), u8> {
        self.0.instance_ids()
    }

    fn apply(&self, change: &mig_agent::InstanceChange) -> Result<(), mig_agent::GpuError> {
        self.0.apply(change)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s12_without_pods_per_instance_a_gpu_that_may_hold_a_pod_is_never_rebuilt() {
    // Two nodes of seven 1g; `keep` runs on one. The agents cannot tell which instance `keep`
    // uses, so they report it on every 1g instance of its node: the 3g pod must be made room for
    // on the other node, and mig-manager is never asked to rebuild a GPU in use.
    let spec = nodes(2, 1, SEVEN_1G);
    let env = bare_env(spec.clone()).await;
    running_pod_on(&env, "keep", "1g.10gb", json!({})).await;
    let busy = names(&spec)
        .into_iter()
        .find(|n| !env.cluster.gpus(n)[0].used.is_empty())
        .unwrap();
    let mut agents = Vec::new();
    for n in names(&spec) {
        let source = Arc::new(PodBlind(EmulatedGpus::new(env.cluster.hardware(), &n)));
        agents.push(
            mig_agent::start(agent_client(&env.server, &n), agent_settings(&n), source)
                .await
                .unwrap(),
        );
    }
    let c = controller(&env, fast_settings(Mode::Auto), "replica-a").await;
    create_pod(&env.client, &mig_pod("wants-3g", "3g.40gb", "1")).await;
    eventually(20, "the 3g pod runs", || async {
        pod_phase(&env, "wants-3g").await.as_deref() == Some("Running")
    })
    .await;
    check_invariants(&env, &["wants-3g", "keep"], false).await;
    // The busy node was never granted; nothing failed or rolled back anywhere.
    assert!(node_state(&env, &busy).await.is_none(), "{busy} was reconfigured");
    let ev = events(&env.client, "default").await;
    assert!(
        !ev.iter()
            .any(|e| e.1.contains("RolledBack") || e.1.contains("Failed")),
        "{ev:?}"
    );
    // Its report shows `keep` on each of its 1g instances.
    let report = node_report(&env, &busy).await.unwrap();
    assert!(
        report.gpus[0]
            .instances
            .iter()
            .all(|i| i.pods == vec!["default/keep".to_string()]),
        "{report:?}"
    );
    c.stop().await;
    for a in agents {
        a.stop().await;
    }
}

/// A stand-in dcgm-exporter for `node`: one `DCGM_FI_PROF_GR_ENGINE_ACTIVE` series per instance,
/// labelled as the real one (GPU-instance ID = placement + 1, as the emulated source numbers them),
/// with the pod using it. Returns its metrics URL.
async fn dcgm_exporter(env: &Env, node: &str) -> String {
    let cluster = env.cluster.clone();
    let node = node.to_string();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let gpus = cluster.gpus(&node);
            async move {
                let mut out = String::from("# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge\n");
                for g in &gpus {
                    for i in g.layout.instances() {
                        let (ns, pod) = g
                            .used
                            .get(i)
                            .and_then(|k| k.split_once('/'))
                            .unwrap_or(("", ""));
                        out += &format!(
                            "DCGM_FI_PROF_GR_ENGINE_ACTIVE{{gpu=\"{}\",GPU_I_ID=\"{}\",GPU_I_PROFILE=\"{}\",namespace=\"{ns}\",pod=\"{pod}\"}} {}\n",
                            g.index,
                            u32::from(i.start) + 1,
                            g.model.profile_name(i.profile),
                            if pod.is_empty() { 0.0 } else { 0.42 }
                        );
                    }
                }
                out
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s13_dcgm_exporter_says_which_instance_a_pod_uses_so_nvml_repartitions_around_it() {
    // As s12 (the source cannot tell pods), one node of seven 1g with `keep` on one, but a
    // dcgm-exporter on the node names the instance `keep` uses: only that one is busy, and the
    // nvml backend makes room for a 3g on the same GPU, around `keep`.
    let spec = nodes(1, 1, SEVEN_1G);
    let env = bare_env_with(spec.clone(), true).await;
    running_pod_on(&env, "keep", "1g.10gb", json!({})).await;
    let keep_at = env.cluster.gpus("gpu-node-0")[0].used.clone();
    let mut s = on_backend("gpu-node-0", Backend::Nvml);
    s.dcgm = Some(mig_agent::agent::DcgmEndpoint::Url(
        dcgm_exporter(&env, "gpu-node-0").await,
    ));
    s.dcgm_interval = Duration::from_millis(200);
    let source = Arc::new(PodBlind(EmulatedGpus::new(env.cluster.hardware(), "gpu-node-0")));
    let agent = mig_agent::start(agent_client(&env.server, "gpu-node-0"), s, source)
        .await
        .unwrap();
    // The report names `keep` on its one instance, with the utilization dcgm-exporter gave.
    eventually(10, "the report carries dcgm-exporter's view", || async {
        let Some(report) = node_report(&env, "gpu-node-0").await else {
            return false;
        };
        let busy: Vec<_> = report.gpus[0]
            .instances
            .iter()
            .filter(|i| !i.pods.is_empty())
            .collect();
        busy.len() == 1
            && busy[0].pods == vec!["default/keep".to_string()]
            && busy[0].utilization == Some(0.4)
    })
    .await;
    let mut settings = fast_settings(Mode::Auto);
    settings.planner.backend = Backend::Nvml;
    let c = controller(&env, settings, "replica-a").await;
    create_pod(&env.client, &mig_pod("wants-3g", "3g.40gb", "1")).await;
    eventually(20, "the 3g pod runs on the same GPU", || async {
        pod_phase(&env, "wants-3g").await.as_deref() == Some("Running")
    })
    .await;
    check_invariants(&env, &["wants-3g", "keep"], false).await;
    let gpu = env.cluster.gpus("gpu-node-0")[0].clone();
    for (instance, pod) in &keep_at {
        assert_eq!(
            gpu.used.get(instance),
            Some(pod),
            "keep moved or lost its instance"
        );
    }
    assert_eq!(c.shared.metrics.eviction_count("evicted"), 0);
    assert_eq!(agent.shared.metrics.count("errors", "dcgm"), 0);
    c.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s13b_an_unreachable_dcgm_exporter_is_counted_and_pods_are_attributed_safely() {
    let spec = nodes(1, 1, SEVEN_1G);
    let env = bare_env(spec.clone()).await;
    running_pod_on(&env, "keep", "1g.10gb", json!({})).await;
    let mut s = agent_settings("gpu-node-0");
    // Nothing listens on port 1.
    s.dcgm = Some(mig_agent::agent::DcgmEndpoint::Url(
        "http://127.0.0.1:1/metrics".into(),
    ));
    s.dcgm_interval = Duration::from_millis(200);
    let source = Arc::new(PodBlind(EmulatedGpus::new(env.cluster.hardware(), "gpu-node-0")));
    let agent = mig_agent::start(agent_client(&env.server, "gpu-node-0"), s, source)
        .await
        .unwrap();
    eventually(10, "the failed reads are counted", || async {
        agent.shared.metrics.count("errors", "dcgm") >= 2
    })
    .await;
    // Without it, `keep` is reported on every 1g instance (no utilization known).
    let report = node_report(&env, "gpu-node-0").await.unwrap();
    assert!(
        report.gpus[0]
            .instances
            .iter()
            .all(|i| i.pods == vec!["default/keep".to_string()] && i.utilization.is_none()),
        "{report:?}"
    );
    assert!(agent.shared.is_ready());
    agent.stop().await;
}

/// A dcgm-exporter that lies: it names `default/keep` on the last 1g instance (utilization 0.8),
/// wherever `keep` really runs. Believed, it would make every other instance `keep` may use look
/// free. Returns its port.
async fn lying_exporter() -> u16 {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            let mut out = String::from("# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge\n");
            for start in 0..7u32 {
                let (ns, pod, util) = if start == 6 {
                    ("default", "keep", 0.8)
                } else {
                    ("", "", 0.0)
                };
                out += &format!(
                    "DCGM_FI_PROF_GR_ENGINE_ACTIVE{{gpu=\"0\",GPU_I_ID=\"{}\",GPU_I_PROFILE=\"1g.10gb\",namespace=\"{ns}\",pod=\"{pod}\"}} {util}\n",
                    start + 1
                );
            }
            out
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

/// A pod on `node` labelled as the GPU operator's dcgm-exporter, at 127.0.0.1.
async fn exporter_pod(env: &Env, namespace: &str, name: &str, owned: bool) {
    let mut metadata =
        json!({"name": name, "namespace": namespace, "labels": {"app": "nvidia-dcgm-exporter"}});
    if owned {
        metadata["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet",
            "name": "nvidia-dcgm-exporter", "uid": "u1", "controller": true}]);
    }
    let pod: Pod = serde_json::from_value(json!({
        "metadata": metadata,
        "spec": {"nodeName": "gpu-node-0", "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1"},
    }))
    .unwrap();
    let api = Api::<Pod>::namespaced(env.client.clone(), namespace);
    api.create(&PostParams::default(), &pod).await.unwrap();
    // Status is not taken on create: as a kubelet would, through the status subresource.
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "127.0.0.1"}})),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s13c_a_tenant_pod_labelled_as_dcgm_exporter_is_not_believed() {
    // As s13b (the source cannot tell pods; `keep` is attributed to every 1g instance), but a
    // tenant runs a pod labelled `app=nvidia-dcgm-exporter` on the node that serves lies.
    let spec = nodes(1, 1, SEVEN_1G);
    let env = bare_env(spec.clone()).await;
    running_pod_on(&env, "keep", "1g.10gb", json!({})).await;
    let port = lying_exporter().await;
    exporter_pod(&env, "tenant", "nvidia-dcgm-exporter-x", true).await;
    let mut s = agent_settings("gpu-node-0");
    s.dcgm = Some(mig_agent::agent::DcgmEndpoint::Pod {
        selector: mig_agent::agent::DCGM_EXPORTER_SELECTOR.into(),
        port,
    });
    s.dcgm_interval = Duration::from_millis(100);
    let source = Arc::new(PodBlind(EmulatedGpus::new(env.cluster.hardware(), "gpu-node-0")));
    let agent = mig_agent::start(agent_client(&env.server, "gpu-node-0"), s, source)
        .await
        .unwrap();
    let keep_everywhere = |report: &mig_protocol::NodeReport| {
        report.gpus[0]
            .instances
            .iter()
            .all(|i| i.pods == vec!["default/keep".to_string()] && i.utilization.is_none())
    };
    eventually(10, "the agent reports", || async {
        node_report(&env, "gpu-node-0").await.is_some()
    })
    .await;
    // Several dcgm intervals: the tenant's exporter (its own namespace, even with an owner
    // reference) is never read, so `keep` still pins every instance it may use.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let report = node_report(&env, "gpu-node-0").await.unwrap();
    assert!(
        keep_everywhere(&report),
        "a tenant's exporter was believed: {report:?}"
    );
    // The same endpoint as the operator's pod (its namespace, a DaemonSet's) is read: the trust
    // is in who runs it, not in what it serves.
    exporter_pod(&env, "gpu-operator", "nvidia-dcgm-exporter-y", true).await;
    eventually(10, "the operator's exporter is read", || async {
        node_report(&env, "gpu-node-0")
            .await
            .is_some_and(|r| r.gpus[0].instances.iter().any(|i| i.utilization == Some(0.8)))
    })
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s14_a_compromised_agent_can_change_only_what_its_own_agent_would() {
    // The agent's credentials on gpu-node-0, used by an attacker (the emulator enforces the
    // chart's per-node admission policy for agent identities, as the API server would).
    let spec = nodes(2, 1, SEVEN_1G);
    let env = bare_env(spec.clone()).await;
    let rogue: Api<Node> = Api::all(agent_client(&env.server, "gpu-node-0"));
    let pp = PatchParams::default();
    let denied = agent_attacks("gpu-node-0", "gpu-node-1");
    for (what, node, patch) in denied {
        match rogue.patch(&node, &pp, &Patch::Merge(patch)).await {
            Err(kube::Error::Api(s)) if s.code == 403 => {
                assert!(
                    s.message.contains("mig-autoscaler agent"),
                    "{what}: {}",
                    s.message
                )
            }
            other => panic!("{what} was not refused: {other:?}"),
        }
    }
    // No eviction at all (the controller evicts).
    running_pod_on(&env, "tenant", "1g.10gb", json!({})).await;
    let eviction = json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "tenant", "namespace": "default"}});
    let evicted = Api::<Pod>::namespaced(agent_client(&env.server, "gpu-node-0"), "default")
        .create_subresource::<_, serde_json::Value>("eviction", "tenant", &PostParams::default(), &eviction)
        .await;
    assert!(
        matches!(&evicted, Err(kube::Error::Api(s)) if s.code == 403),
        "an agent evicted a pod: {evicted:?}"
    );
    assert_eq!(pod_phase(&env, "tenant").await.as_deref(), Some("Running"));
    // What its own agent writes still goes through.
    for patch in agent_writes(&node_of(&env, "gpu-node-0").await) {
        rogue
            .patch("gpu-node-0", &pp, &Patch::Merge(patch.clone()))
            .await
            .unwrap_or_else(|e| panic!("{patch}: {e}"));
    }
}

async fn node_of(env: &Env, node: &str) -> Node {
    Api::<Node>::all(env.client.clone()).get(node).await.unwrap()
}

fn our_taint(n: &Node) -> bool {
    n.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TAINT_KEY))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s15_an_agent_gone_for_good_wedges_nothing() {
    // Three nodes, budget one node. gpu-node-0: its agent dies while draining (nothing changed
    // yet). gpu-node-1: its agent died while mig-manager applied (GPUs may be half-changed).
    // gpu-node-2: healthy and free, where a 7g pod can go.
    let spec = nodes(3, 1, "3g.40gb@0,3g.40gb@4");
    let env = bare_env(spec.clone()).await;
    running_pod_on(&env, "protected", "3g.40gb", json!({"app": "protected"})).await;
    pdb(&env, 0).await;
    let protected_on = env
        .cluster
        .gpus("gpu-node-0")
        .first()
        .is_some_and(|g| !g.used.is_empty());
    assert!(
        protected_on,
        "the scheduler put `protected` on gpu-node-0 (first fit)"
    );
    let settings = |n: &str| {
        let mut s = agent_settings(n);
        s.sequence.drain_timeout = jiff::SignedDuration::from_mins(10);
        s.heartbeat = Duration::from_millis(200);
        s
    };
    let a0 = start_agent(&env, "gpu-node-0", settings("gpu-node-0")).await;
    let a2 = start_agent(&env, "gpu-node-2", settings("gpu-node-2")).await;
    let mut cs = fast_settings(Mode::Auto);
    cs.budgets.agent_timeout = mig_controller::settings::Dur::secs(2);
    let c = controller(&env, cs, "replica-a").await;

    // gpu-node-0: a grant that must evict `protected` (the PDB answers 429): the agent drains,
    // alive, beyond the agent timeout: its heartbeats keep the grant.
    write_grant(
        &env,
        "gpu-node-0",
        &hand_grant("drain-forever", &["default/protected"]),
    )
    .await;
    eventually(10, "gpu-node-0 drains", || async {
        node_state(&env, "gpu-node-0")
            .await
            .is_some_and(|s| s.phase == Phase::Draining)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let n0 = node_of(&env, "gpu-node-0").await;
    assert!(
        n0.annotations().contains_key(GRANT_ANNOTATION) && our_taint(&n0),
        "a live agent's sequence was released"
    );
    // The agent dies for good: the grant is withdrawn and the taint removed.
    a0.kill();
    eventually(15, "gpu-node-0 released", || async {
        let n = node_of(&env, "gpu-node-0").await;
        !n.annotations().contains_key(GRANT_ANNOTATION) && !our_taint(&n)
    })
    .await;

    // gpu-node-1: no agent at all; the Node says it died awaiting mig-manager, tainted.
    let g1 = hand_grant("half-changed", &[]);
    let s1 = NodeState {
        grant_id: g1.id.clone(),
        phase: Phase::AwaitingMigManager,
        since: g1.granted_at.clone(),
        attempt: 1,
        message: None,
        previous_config: None,
        previous_layouts: Default::default(),
        restarting_device_plugin: false,
        heartbeat: None,
    };
    Api::<Node>::all(env.client.clone())
        .patch("gpu-node-1", &PatchParams::default(), &Patch::Merge(json!({
            "metadata": {"annotations": {GRANT_ANNOTATION: serde_json::to_string(&g1).unwrap(), STATE_ANNOTATION: serde_json::to_string(&s1).unwrap()}},
            "spec": {"taints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}]},
        })))
        .await
        .unwrap();
    eventually(15, "an AgentGone event for gpu-node-1", || async {
        events(&env.client, "default")
            .await
            .iter()
            .any(|(who, r, n, _)| who == "gpu-node-1" && r == "AgentGone" && n.contains("half-changed"))
    })
    .await;
    // It stays tainted and granted for a person, but holds no budget: a 7g pod gets gpu-node-2.
    create_pod(&env.client, &mig_pod("wants-7g", "7g.80gb", "1")).await;
    eventually(30, "the 7g pod runs", || async {
        pod_phase(&env, "wants-7g").await.as_deref() == Some("Running")
    })
    .await;
    let n1 = node_of(&env, "gpu-node-1").await;
    assert!(our_taint(&n1) && n1.annotations().contains_key(GRANT_ANNOTATION));
    assert_eq!(pod_phase(&env, "protected").await.as_deref(), Some("Running"));
    c.stop().await;
    a2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2b_a_pdb_allowing_one_disruption_loses_one_pod_at_most() {
    // Three running 1g pods under one PDB that allows one disruption; a grant (by hand: a stale
    // or buggy controller) evicts all three to make a 7g.
    let spec = nodes(1, 1, SEVEN_1G);
    let env = bare_env(spec.clone()).await;
    let names3 = ["guarded-0", "guarded-1", "guarded-2"];
    for n in names3 {
        running_pod_on(&env, n, "1g.10gb", json!({"app": "protected"})).await;
    }
    pdb(&env, 1).await;
    let _agents = agents(&env, &names(&spec), |n| {
        let mut s = agent_settings(n);
        s.sequence.drain_timeout = jiff::SignedDuration::from_millis(1500);
        s
    })
    .await;
    let c = controller(&env, fast_settings(Mode::Auto), "replica-a").await;
    let evictions: Vec<String> = names3.iter().map(|n| format!("default/{n}")).collect();
    let evictions: Vec<&str> = evictions.iter().map(String::as_str).collect();
    write_grant(&env, "gpu-node-0", &hand_grant("evict-three", &evictions)).await;
    eventually(10, "rolled back after the drain timeout", || async {
        node_state(&env, "gpu-node-0")
            .await
            .is_some_and(|s| s.grant_id == "evict-three" && s.phase == Phase::RolledBack)
    })
    .await;
    // Running and not on its way out (an evicted pod terminates through its grace period).
    let mut running = 0;
    for n in names3 {
        let pod = Api::<Pod>::namespaced(env.client.clone(), "default")
            .get(n)
            .await
            .ok();
        if pod.is_some_and(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.and_then(|s| s.phase).as_deref() == Some("Running")
        }) {
            running += 1;
        }
    }
    assert_eq!(
        c.shared.metrics.eviction_count("evicted"),
        1,
        "exactly the one disruption allowed"
    );
    assert!(c.shared.metrics.eviction_count("blocked") >= 2);
    assert_eq!(running, 2, "two of the three still run");
    assert!(
        !our_taint(&node_of(&env, "gpu-node-0").await),
        "rolled back and untainted"
    );
    c.stop().await;
}

/// A GPU source whose driver stops answering for a GPU right after the first change to it (as a
/// `nvidia-smi` that fails or hangs): that GPU is then reported unknown, the others as ever.
struct FailsAfterFirstChange {
    inner: EmulatedGpus,
    broken: std::sync::Mutex<Option<u32>>,
}

impl mig_agent::GpuSource for FailsAfterFirstChange {
    fn knows_pods(&self) -> bool {
        true
    }

    fn gpus(&self) -> Result<Vec<mig_planner::snapshot::Gpu>, mig_agent::GpuError> {
        let mut gpus = self.inner.gpus()?;
        if let Some(bad) = *self.broken.lock().unwrap() {
            for g in gpus.iter_mut().filter(|g| g.index == bad) {
                g.instances.clear();
                g.unknown = Some(format!(
                    "nvidia-smi mig -lgi -i {bad}: timed out after 20 s and was killed"
                ));
            }
        }
        Ok(gpus)
    }

    fn instance_ids(&self) -> std::collections::BTreeMap<(u32, u32), u8> {
        self.inner.instance_ids()
    }

    fn apply(&self, change: &mig_agent::InstanceChange) -> Result<(), mig_agent::GpuError> {
        let mut broken = self.broken.lock().unwrap();
        if broken.is_some_and(|b| b == change.gpu) {
            return Err(mig_agent::GpuError::TimedOut {
                command: format!("nvidia-smi mig -i {} -cgi", change.gpu),
                timeout: std::time::Duration::from_secs(20),
            });
        }
        self.inner.apply(change)?;
        *broken = Some(change.gpu);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s16_a_gpu_that_stops_answering_mid_sequence_is_left_alone_and_the_rest_still_served() {
    // nvml backend, one node of two GPUs of seven 1g, `keep` on one 1g; a 3g pod. Right after the
    // agent changes a GPU, the driver stops answering for that GPU.
    let spec = nodes(1, 2, SEVEN_1G);
    let env = bare_env_with(spec.clone(), true).await;
    running_pod_on(&env, "keep", "1g.10gb", json!({})).await;
    let keep_at: Vec<_> = env
        .cluster
        .gpus("gpu-node-0")
        .iter()
        .map(|g| g.used.clone())
        .collect();
    let mut s = on_backend("gpu-node-0", Backend::Nvml);
    s.sequence.phase_timeout = jiff::SignedDuration::from_secs(1);
    let source = Arc::new(FailsAfterFirstChange {
        inner: EmulatedGpus::new(env.cluster.hardware(), "gpu-node-0"),
        broken: std::sync::Mutex::new(None),
    });
    let agent = mig_agent::start(agent_client(&env.server, "gpu-node-0"), s, source.clone())
        .await
        .unwrap();
    let mut settings = fast_settings(Mode::Auto);
    settings.planner.backend = Backend::Nvml;
    let c = controller(&env, settings, "replica-a").await;
    create_pod(&env.client, &mig_pod("wants-3g", "3g.40gb", "1")).await;

    // The sequence waits on the unknown GPU, times out, the rollback waits too and times out:
    // `Failed`, tainted, nothing destroyed on a GPU nobody can read.
    eventually(20, "Failed on the unknown GPU", || async {
        node_state(&env, "gpu-node-0").await.is_some_and(|s| {
            s.phase == Phase::Failed && s.message.as_deref().is_some_and(|m| m.contains("unknown"))
        })
    })
    .await;
    let bad = source.broken.lock().unwrap().unwrap();
    let report = node_report(&env, "gpu-node-0").await.unwrap();
    for g in &report.gpus {
        // The rest of the node is still read and reported.
        assert_eq!(g.unknown.is_some(), g.index == bad, "{g:?}");
    }
    assert_eq!(check_invariants(&env, &["keep", "wants-3g"], true).await, 1);
    // `keep` never moved.
    for (g, before) in env.cluster.gpus("gpu-node-0").iter().zip(&keep_at) {
        for (instance, pod) in before {
            assert_eq!(g.used.get(instance), Some(pod), "keep moved or lost its instance");
        }
    }
    assert_eq!(c.shared.metrics.eviction_count("evicted"), 0);
    // The node is stuck for a person and holds no budget.
    eventually(5, "the controller counts it stuck", || async {
        let (_, scrape) = http(c.addr, "GET", "/metrics", b"").await;
        sample(&scrape, "mig_autoscaler_nodes_stuck") == Some(1.0)
            && sample(&scrape, "mig_autoscaler_nodes_reconfiguring") == Some(0.0)
    })
    .await;
    c.stop().await;
    agent.stop().await;
}

/// An idle agent rewrites its report every `report_refresh` (5 minutes) of its clock, so the
/// controller never takes a live agent for a stopped one; once the agent stops, the controller
/// names the node stale and leaves it alone. Agent and controller share one ManualClock: 35
/// minutes pass without the test waiting for any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s17_an_idle_agent_keeps_its_report_fresh_and_a_stopped_one_goes_stale() {
    use mig_controller::settings::Dur;
    use mig_protocol::{Clock, ManualClock};
    let env = bare_env(nodes(1, 1, SEVEN_1G)).await;
    let clock = ManualClock::new();
    let source = Arc::new(EmulatedGpus::new(env.cluster.hardware(), "gpu-node-0"));
    let agent = mig_agent::agent::start_with_clock(
        agent_client(&env.server, "gpu-node-0"),
        agent_settings("gpu-node-0"),
        source,
        clock.clone(),
    )
    .await
    .unwrap();
    let mut s = fast_settings(Mode::DryRun);
    s.batching.resync = Dur::secs(60);
    s.lease.duration = Dur::secs(3600);
    let c = controller_with_clock(&env, s, "replica-a", clock.clone()).await;
    let observed = || async {
        node_report(&env, "gpu-node-0")
            .await
            .and_then(|r| r.observed_at.parse::<jiff::Timestamp>().ok())
    };
    eventually(10, "the agent's first report", || async {
        observed().await.is_some()
    })
    .await;
    let first = observed().await.unwrap();
    let stale = |p: &mig_controller::state::Published| {
        p.problems
            .iter()
            .any(|x| x.object == "Node/gpu-node-0" && x.reason == "NoAgentReport")
    };
    let plan_now = || async {
        let at = clock.now();
        loop {
            if let Some(p) = c.shared.latest()
                && p.computed_at.parse::<jiff::Timestamp>().is_ok_and(|t| t >= at)
            {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // Twenty minutes of an idle node, four at a time: the report moves, and is never stale.
    for _ in 0..5 {
        clock.advance(Duration::from_secs(240));
        let p = tokio::time::timeout(Duration::from_secs(30), plan_now())
            .await
            .unwrap();
        assert!(
            !stale(&p),
            "a live agent's report taken for stale: {:?}",
            p.problems
        );
    }
    let refreshed = observed().await.unwrap();
    assert!(
        refreshed.duration_since(first) >= jiff::SignedDuration::from_mins(5),
        "the report was not refreshed: first {first}, now {refreshed}"
    );
    // The agent stops: within reportTimeout (15 min) and a plan, the node is named stale.
    agent.stop().await;
    let mut named = false;
    for _ in 0..5 {
        clock.advance(Duration::from_secs(300));
        let p = tokio::time::timeout(Duration::from_secs(30), plan_now())
            .await
            .unwrap();
        if stale(&p) {
            named = true;
            break;
        }
    }
    assert!(named, "a stopped agent's node was never named stale");
    c.stop().await;
}
