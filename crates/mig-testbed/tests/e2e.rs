//! The controller against kube-emulator (real HTTP, kube-rs), the test playing the node agent.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use mig_controller::settings::{Amount, Mode};
use mig_protocol::{GRANT_ANNOTATION, Grant};
use mig_testbed::harness::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_plans_explains_and_never_writes() {
    let env = env(nodes(2, 2, SEVEN_1G), AgentBehaviour::default()).await;
    let config_before = config_yaml(&env.client).await;
    let c = controller(&env, fast_settings(Mode::DryRun), "replica-a").await;
    create_pod(&env.client, &mig_pod("wants-3g", "3g.40gb", "1")).await;

    eventually(10, "a plan that fits the pod after a repartition", || async {
        let (status, p) = get_json(c.addr, "/api/v1/plan").await;
        status == 200 && p["plan"]["pods"][0]["outcome"]["needsRepartition"] == json!(true)
    })
    .await;
    let (_, p) = get_json(c.addr, "/api/v1/plan").await;
    assert_eq!(p["mode"], "dry-run");
    let node = p["plan"]["pods"][0]["outcome"]["node"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(p["decisions"][&node], "dry-run", "{p:#}");
    // The pod was created within `demandWindow`: the GPU that changes for it keeps its spare
    // slices shaped like that demand (a second 3g.40gb rather than 1g slices).
    assert_eq!(
        p["plan"]["spare"],
        json!([{"profile": "3g.40gb", "free": 1, "recentDemand": 1}]),
        "{p:#}"
    );

    // The API answers what the plan says.
    let (status, e) = get_json(c.addr, "/api/v1/pods/default/wants-3g/explain").await;
    assert_eq!(status, 200);
    assert_eq!(e["planId"], p["plan"]["id"]);
    assert!(
        e["explanation"]
            .as_str()
            .unwrap()
            .contains(&format!("fits on node {node} after a repartition")),
        "{e}"
    );
    let (status, l) = get_json(c.addr, "/api/v1/layouts").await;
    assert_eq!(status, 200);
    let changed: Vec<_> = l["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["changed"] == json!(true))
        .collect();
    assert_eq!(changed.len(), 1, "{l:#}");
    assert_eq!(changed[0]["node"], json!(node));
    assert!(changed[0]["target"].as_str().unwrap().contains("3g.40gb"));
    let (status, _) = get_json(c.addr, "/api/v1/pods/default/nobody/explain").await;
    assert_eq!(status, 404);
    let (status, body) = http(c.addr, "DELETE", "/api/v1/plan", b"").await;
    assert_eq!(status, 405);
    assert!(
        body.contains("method DELETE is not allowed on /api/v1/plan"),
        "{body}"
    );

    // Events on the pod and the node.
    eventually(5, "events for the pod and the node", || async {
        let ev = events(&env.client, "default").await;
        ev.iter().any(|(who, reason, note, _)| {
            who == "wants-3g" && reason == "WaitingForRepartition" && note.contains("dry-run")
        }) && ev
            .iter()
            .any(|(who, reason, _, _)| *who == node && reason == "LayoutChangePlanned")
    })
    .await;

    // Metrics say the same.
    let (_, scrape) = http(c.addr, "GET", "/metrics", b"").await;
    assert_eq!(
        sample(&scrape, "mig_autoscaler_pending_pods{profile=\"3g.40gb\"}"),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        sample(&scrape, "mig_autoscaler_pending_pods{profile=\"1g.10gb\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &scrape,
            &format!(
                "mig_autoscaler_gpu_instances{{node=\"{node}\",gpu=\"{}\",profile=\"3g.40gb\",side=\"target\"}}",
                changed[0]["gpu"]
            )
        ),
        Some(2.0),
        "{scrape}"
    );
    assert_eq!(
        sample(
            &scrape,
            &format!(
                "mig_autoscaler_gpu_instances{{node=\"{node}\",gpu=\"0\",profile=\"1g.10gb\",side=\"actual\"}}"
            )
        ),
        Some(7.0)
    );
    // Bounded cardinality: per GPU only the profiles it has on either side (4 series for the
    // changed GPU: 1g and 3g, actual and target; 2 for each of the three unchanged ones), and
    // pending pods only for the profiles of the models in the cluster.
    let instance_series = scrape
        .lines()
        .filter(|l| l.starts_with("mig_autoscaler_gpu_instances{"))
        .count();
    assert_eq!(instance_series, 4 + 3 * 2, "{scrape}");
    assert_eq!(
        sample(&scrape, "mig_autoscaler_pending_pods{profile=\"1g.5gb\"}"),
        None,
        "a profile of the A100 40GB, which this cluster does not have"
    );
    assert!(sample(&scrape, "mig_autoscaler_decisions_total{decision=\"dry-run\"}").unwrap() >= 1.0);
    assert_eq!(
        sample(&scrape, "mig_autoscaler_decisions_total{decision=\"granted\"}"),
        Some(0.0)
    );
    assert_eq!(sample(&scrape, "mig_autoscaler_leader"), Some(1.0));
    assert_eq!(sample(&scrape, "mig_autoscaler_caches_synced"), Some(1.0));
    assert_eq!(
        sample(&scrape, "mig_autoscaler_plan_pods{outcome=\"fits\"}"),
        Some(1.0)
    );
    assert!(sample(&scrape, "mig_autoscaler_plan_duration_seconds_count").unwrap() >= 1.0);

    // Nothing written, however long we wait.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(c.shared.writes.lock().unwrap().is_empty());
    for n in Api::<Node>::all(env.client.clone())
        .list(&Default::default())
        .await
        .unwrap()
    {
        assert!(
            grant_of(&n).is_none(),
            "dry-run wrote a grant on {}",
            n.name_any()
        );
        assert_eq!(
            n.labels().get("nvidia.com/mig.config").map(String::as_str),
            Some("all-1g.10gb")
        );
    }
    assert_eq!(config_yaml(&env.client).await, config_before);
    assert!(!pod_running(&env.client, "wants-3g").await);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_grants_and_the_pod_runs() {
    let env = env(nodes(2, 2, SEVEN_1G), AgentBehaviour::default()).await;
    let c = controller(&env, fast_settings(Mode::Auto), "replica-a").await;
    let t0 = Instant::now();
    create_pod(&env.client, &mig_pod("wants-3g", "3g.40gb", "1")).await;
    eventually(15, "the pod runs", || pod_running(&env.client, "wants-3g")).await;
    let took = t0.elapsed();
    eprintln!("pending -> running: {took:?}");

    let nodes: Vec<Node> = Api::<Node>::all(env.client.clone())
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    let granted: Vec<&Node> = nodes.iter().filter(|n| grant_of(n).is_some()).collect();
    assert_eq!(granted.len(), 1, "exactly one node reconfigured");
    let g = grant_of(granted[0]).unwrap();
    assert_eq!(g.granted_by, "replica-a");
    assert!(g.evictions.is_empty());
    let config = g.mig_config.clone().unwrap();
    assert!(
        config_yaml(&env.client).await.contains(&config),
        "the ConfigMap holds the node's config"
    );
    assert_eq!(granted[0].labels().get("nvidia.com/mig.config"), Some(&config));

    eventually(5, "the metrics count the ended reconfiguration", || async {
        let (_, scrape) = http(c.addr, "GET", "/metrics", b"").await;
        sample(&scrape, "mig_autoscaler_reconfigurations_total{result=\"Done\"}") == Some(1.0)
            && sample(&scrape, "mig_autoscaler_grants_total{result=\"written\"}") == Some(1.0)
            && sample(&scrape, "mig_autoscaler_decisions_total{decision=\"granted\"}") == Some(1.0)
            && sample(&scrape, "mig_autoscaler_nodes_reconfiguring") == Some(0.0)
            && sample(&scrape, "mig_autoscaler_pending_pods{profile=\"3g.40gb\"}") == Some(0.0)
    })
    .await;
    // Recent actions show the grant and how it ended.
    let (_, actions) = get_json(c.addr, "/api/v1/actions").await;
    let said = |words: &str| {
        actions["actions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["what"].as_str().unwrap_or_default().contains(words))
    };
    assert!(
        said("granted plan") && said("reconfiguration ended Done"),
        "{actions:#}"
    );
    let ev = events(&env.client, "default").await;
    assert!(
        ev.iter()
            .any(|(who, r, _, _)| *who == granted[0].name_any() && r == "ReconfigurationGranted"),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|(who, r, n, _)| who == "wants-3g"
            && r == "WaitingForRepartition"
            && n.contains("waiting for repartition of node")),
        "{ev:?}"
    );
    c.stop().await;
}

/// Watch every node change; after each, count nodes with a grant in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_budget_holds_over_a_long_randomized_run() {
    let agent = AgentBehaviour {
        min_ms: 100,
        max_ms: 700,
        seed: 0x9e3779b97f4a7c15,
        ..Default::default()
    };
    let env = env(nodes(6, 1, SEVEN_1G), agent).await;
    let mut s = fast_settings(Mode::Auto);
    s.budgets.max_nodes_reconfiguring = Amount::Percent(30); // of 6 nodes: 1.8, rounded up to 2
    let c = controller(&env, s, "replica-a").await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let monitor = tokio::spawn(max_in_flight(env.client.clone(), stop_rx));

    // Waves of pods of random sizes; finished pods go away and free their instances.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "default");
    let profiles = ["2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb", "1g.10gb"];
    let mut rng: u64 = 42;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut created = Vec::new();
    for wave in 0..8 {
        for i in 0..3 {
            let name = format!("w{wave}-{i}");
            create_pod(&env.client, &mig_pod(&name, profiles[(next() % 5) as usize], "1")).await;
            created.push(name);
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        // Finish a random running pod.
        let running: Vec<Pod> = pods
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .collect();
        if !running.is_empty() {
            let victim = &running[(next() as usize) % running.len()];
            let _ = pods.delete(&victim.name_any(), &Default::default()).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_tx.send(true).unwrap();
    let max = monitor.await.unwrap();
    let (_, scrape) = http(c.addr, "GET", "/metrics", b"").await;
    let done = sample(&scrape, "mig_autoscaler_reconfigurations_total{result=\"Done\"}").unwrap();
    let deferred = sample(
        &scrape,
        "mig_autoscaler_decisions_total{decision=\"node-budget\"}",
    )
    .unwrap()
        + sample(&scrape, "mig_autoscaler_decisions_total{decision=\"in-flight\"}").unwrap();
    eprintln!("max nodes in flight {max}, reconfigurations {done}, deferrals {deferred}");
    assert!(max <= 2, "the budget of 2 nodes was exceeded: {max}");
    assert!(done >= 3.0, "the run must actually reconfigure: {done}");
    assert_eq!(max, 2, "the run should use the whole budget at some point");
    c.stop().await;
}

/// The controller's node watch lags the API server by 2 s (the probe saw 20 s): a grant it just
/// wrote is not in its cache at the next rounds. The budget of one node must hold all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_node_watch_never_spends_the_node_budget_twice() {
    // Each reconfiguration takes the stand-in agent 3 s after mig-manager: long enough to overlap.
    let agent = AgentBehaviour {
        min_ms: 3000,
        max_ms: 3001,
        seed: 7,
        ..Default::default()
    };
    let env = env(nodes(3, 1, SEVEN_1G), agent).await;
    env.server.state.set_faults(kube_emulator::Faults {
        watch_delay: Duration::from_secs(2),
        watch_delay_resources: vec!["nodes".into()],
        ..Default::default()
    });
    let mut s = fast_settings(Mode::Auto);
    s.budgets.max_nodes_reconfiguring = Amount::Count(1);
    let c = controller(&env, s, "replica-a").await;
    // The monitor's watch lags too, but it sees every change in order.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let monitor = tokio::spawn(max_in_flight(env.client.clone(), stop_rx));
    // A 7g pod per node: every node must change, one at a time.
    for i in 0..3 {
        create_pod(&env.client, &mig_pod(&format!("big-{i}"), "7g.80gb", "1")).await;
    }
    eventually(90, "all three 7g pods running", || async {
        let mut all = true;
        for i in 0..3 {
            all &= pod_running(&env.client, &format!("big-{i}")).await;
        }
        all
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // let the monitor's lagging watch catch up
    stop_tx.send(true).unwrap();
    let max = monitor.await.unwrap();
    eprintln!("max nodes in flight with a 2 s node-watch lag: {max}");
    assert_eq!(max, 1, "the budget of 1 node was exceeded (or never used): {max}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_writes_and_a_killed_leader_hands_over_within_the_lease() {
    let env = env(nodes(3, 1, SEVEN_1G), AgentBehaviour::default()).await;
    let s = fast_settings(Mode::Auto);
    let lease_duration = s.lease.duration.0;
    let retry = s.lease.retry.0;
    let a = controller(&env, s.clone(), "replica-a").await;
    let b = controller(&env, s, "replica-b").await;
    eventually(5, "a leader", || async {
        a.shared.lease.is_leader() || b.shared.lease.is_leader()
    })
    .await;
    // Sample: never two leaders.
    for _ in 0..60 {
        assert!(!(a.shared.lease.is_leader() && b.shared.lease.is_leader()));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (leader, follower) = if a.shared.lease.is_leader() {
        (a, b)
    } else {
        (b, a)
    };
    create_pod(&env.client, &mig_pod("first", "3g.40gb", "1")).await;
    eventually(15, "first runs", || pod_running(&env.client, "first")).await;
    // The follower serves the read-only API but never writes.
    let (status, p) = get_json(follower.addr, "/api/v1/plan").await;
    assert_eq!(status, 200);
    assert_eq!(p["leader"], json!(false));
    assert!(follower.shared.writes.lock().unwrap().is_empty());

    let follower_shared = follower.shared.clone();
    let leader_shared = leader.shared.clone();
    let killed = Instant::now();
    leader.kill();
    eventually(10, "the follower takes over", || async {
        follower_shared.lease.is_leader()
    })
    .await;
    let handover = killed.elapsed();
    eprintln!("handover after kill: {handover:?} (lease {lease_duration:?}, retry {retry:?})");
    assert!(
        handover <= lease_duration + 2 * retry,
        "handover took {handover:?}"
    );

    create_pod(&env.client, &mig_pod("second", "7g.80gb", "1")).await;
    eventually(15, "second runs", || pod_running(&env.client, "second")).await;
    assert!(
        !follower_shared.writes.lock().unwrap().is_empty(),
        "the new leader acted"
    );

    // Every write of each replica fell inside its own terms, and the terms never overlap.
    let ta = leader_shared.lease.terms();
    let tb = follower_shared.lease.terms();
    for (s1, e1) in &ta {
        for (s2, e2) in &tb {
            assert!(e1 <= s2 || e2 <= s1, "terms overlap: {ta:?} {tb:?}");
        }
    }
    for (shared, terms) in [(&leader_shared, &ta), (&follower_shared, &tb)] {
        for (at, what) in shared.writes.lock().unwrap().iter() {
            assert!(
                terms.iter().any(|(s, e)| s <= at && at <= e),
                "write {what} outside a term"
            );
        }
    }
    follower.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_releases_the_lease_at_once() {
    let env = env(nodes(1, 1, SEVEN_1G), AgentBehaviour::default()).await;
    let mut s = fast_settings(Mode::DryRun);
    s.lease.duration = mig_controller::settings::Dur::secs(30); // a kill would take 30 s
    let a = controller(&env, s.clone(), "replica-a").await;
    eventually(5, "a leads", || async { a.shared.lease.is_leader() }).await;
    let b = controller(&env, s, "replica-b").await;
    let stopped = Instant::now();
    a.stop().await;
    eventually(5, "b leads", || async { b.shared.lease.is_leader() }).await;
    assert!(stopped.elapsed() < Duration::from_secs(3));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_api_plans_posted_snapshots_and_rejects_bad_ones() {
    let env = env(nodes(1, 1, SEVEN_1G), AgentBehaviour::default()).await;
    let mut s = fast_settings(Mode::DryRun);
    s.http.max_body_bytes = 64 * 1024;
    let c = controller(&env, s, "replica-a").await;
    eventually(5, "ready", || async {
        http(c.addr, "GET", "/readyz", b"").await.0 == 200
    })
    .await;
    assert_eq!(http(c.addr, "GET", "/healthz", b"").await.0, 200);

    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/examples/snapshot-small.json"
    ))
    .unwrap();
    let (status, body) = http(c.addr, "POST", "/api/v1/plan", text.as_bytes()).await;
    assert_eq!(status, 200, "{body}");
    let got: mig_planner::Plan = serde_json::from_str(&body).unwrap(); // plans read back
    let snapshot = mig_planner::Snapshot::from_json(&text).unwrap();
    let want = mig_planner::plan(&snapshot, &snapshot.policy);
    assert_eq!(got.id, want.id);
    assert_eq!(got.gpus, want.gpus);
    assert_eq!(got.pods, want.pods);

    let (status, body) = http(
        c.addr,
        "POST",
        "/api/v1/plan",
        br#"{"nodes": [{"name": "n", "gpus": [{"index": "zero"}]}]}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(e["path"].as_str().unwrap().contains("nodes[0].gpus[0]"), "{e}");
    assert!(!e["error"].as_str().unwrap().is_empty());

    // A posted policy reserves no more than the controller's own (4 nodes at most by default):
    // ten nodes whose one GPU each runs a 1g pod, ten 7g pods waiting, bounds of 1,000 asked for.
    let busy_nodes: Vec<serde_json::Value> = (0..10)
        .map(|i| {
            json!({"name": format!("n{i}"), "gpus": [{"index": 0, "product": "NVIDIA-H100-80GB-HBM3",
            "instances": [{"profile": "1g.10gb", "start": 0, "pods": [format!("ml/r{i}")]}]}]})
        })
        .collect();
    let waiting: Vec<serde_json::Value> = (0..10)
        .map(|i| json!({"namespace": "ml", "name": format!("big{i}"), "requests": {"nvidia.com/mig-7g.80gb": 1}}))
        .collect();
    let hungry = json!({
        "nodes": busy_nodes,
        "pendingPods": waiting,
        "policy": {"reservations": {"maxGpus": 1000, "maxNodes": 1000}},
    });
    let (status, body) = http(c.addr, "POST", "/api/v1/plan", hungry.to_string().as_bytes()).await;
    assert_eq!(status, 200, "{body}");
    let got: mig_planner::Plan = serde_json::from_str(&body).unwrap();
    assert_eq!(got.reservations.len(), 4, "{}", got.render_table());

    let big = vec![b' '; 100 * 1024];
    assert_eq!(http(c.addr, "POST", "/api/v1/plan", &big).await.0, 413);
    let (status, body) = http(c.addr, "GET", "/api/v1/nothing", b"").await;
    assert_eq!(status, 404);
    assert!(body.contains("\"error\""));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_and_annotations_give_events_and_metrics_not_panics() {
    let env = env(nodes(2, 1, SEVEN_1G), AgentBehaviour::default()).await;
    let c = controller(&env, fast_settings(Mode::Auto), "replica-a").await;
    // Garbage in our grant annotation on one node.
    let nodes: Api<Node> = Api::all(env.client.clone());
    nodes
        .patch(
            "gpu-node-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {GRANT_ANNOTATION: "{garbage"}}})),
        )
        .await
        .unwrap();
    // A real API server rejects these at admission; kube-emulator does not, and its scheduler would
    // bind them, so a selector nothing matches keeps them pending for the controller to see.
    for (name, count) in [("half", "1.5"), ("negative", "-1")] {
        let mut pod = mig_pod(name, "1g.10gb", count);
        pod.spec.as_mut().unwrap().node_selector = Some([("pool".to_string(), "none".to_string())].into());
        create_pod(&env.client, &pod).await;
    }
    create_pod(&env.client, &mig_pod("unknown-profile", "9g.99gb", "1")).await;
    create_pod(&env.client, &mig_pod("fine", "7g.80gb", "1")).await;

    eventually(15, "the valid pod runs on the readable node", || {
        pod_running(&env.client, "fine")
    })
    .await;
    let p: Pod = Api::namespaced(env.client.clone(), "default")
        .get("fine")
        .await
        .unwrap();
    assert_eq!(p.spec.unwrap().node_name.as_deref(), Some("gpu-node-1"));
    eventually(5, "warning events", || async {
        let ev = events(&env.client, "default").await;
        ["half", "negative"].iter().all(|n| {
            ev.iter()
                .any(|(who, r, _, t)| who == n && r == "InvalidMigRequest" && t == "Warning")
        }) && ev.iter().any(|(who, r, note, _)| {
            who == "gpu-node-0" && r == "MalformedAnnotation" && note.contains(GRANT_ANNOTATION)
        }) && ev.iter().any(|(who, r, note, _)| {
            who == "unknown-profile" && r == "WaitingForMigCapacity" && note.contains("9g.99gb")
        })
    })
    .await;
    let (_, scrape) = http(c.addr, "GET", "/metrics", b"").await;
    assert!(
        sample(
            &scrape,
            "mig_autoscaler_input_problems_total{reason=\"InvalidMigRequest\"}"
        )
        .unwrap()
            >= 2.0
    );
    assert!(
        sample(
            &scrape,
            "mig_autoscaler_input_problems_total{reason=\"MalformedAnnotation\"}"
        )
        .unwrap()
            >= 1.0
    );
    let (status, e) = get_json(c.addr, "/api/v1/pods/default/half/explain").await;
    assert_eq!(status, 200);
    assert_eq!(e["status"], "invalid");
    assert!(
        e["explanation"].as_str().unwrap().contains("not a whole number"),
        "{e}"
    );
    // The garbage was left alone, not overwritten.
    let n0 = nodes.get("gpu-node-0").await.unwrap();
    assert_eq!(
        n0.annotations().get(GRANT_ANNOTATION).map(String::as_str),
        Some("{garbage")
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_removes_stale_taints_and_withdraws_grants_no_agent_started() {
    let env = bare_env(nodes(2, 1, SEVEN_1G)).await;
    let api: Api<Node> = Api::all(env.client.clone());
    // Our taint with nothing in flight (a crash between phases), and a user's taint that must stay.
    api.patch(
        "gpu-node-0",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"taints": [
            {"key": "mig-autoscaler.io/reconfiguring", "value": "true", "effect": "NoSchedule"},
            {"key": "example.com/maintenance", "value": "true", "effect": "NoSchedule"}]}})),
    )
    .await
    .unwrap();
    // A grant from an hour ago that no agent ever started.
    let old = Grant {
        id: "old-1".into(),
        plan_id: "old".into(),
        granted_at: (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1)).to_string(),
        granted_by: "gone-replica".into(),
        ..Default::default()
    };
    write_grant(&env, "gpu-node-1", &old).await;
    let mut s = fast_settings(Mode::Auto);
    s.budgets.grant_timeout = mig_controller::settings::Dur::secs(60);
    let c = controller(&env, s, "replica-a").await;
    eventually(10, "taint removed and grant withdrawn", || async {
        let n0 = api.get("gpu-node-0").await.unwrap();
        let n1 = api.get("gpu-node-1").await.unwrap();
        let taints: Vec<String> = n0
            .spec
            .unwrap()
            .taints
            .unwrap_or_default()
            .into_iter()
            .map(|t| t.key)
            .collect();
        taints == vec!["example.com/maintenance".to_string()]
            && !n1.annotations().contains_key(GRANT_ANNOTATION)
    })
    .await;
    // Events are recorded after the writes they report: wait for them too.
    eventually(5, "StaleTaintRemoved and GrantWithdrawn events", || async {
        let ev = events(&env.client, "default").await;
        ev.iter()
            .any(|(w, r, _, _)| w == "gpu-node-0" && r == "StaleTaintRemoved")
            && ev
                .iter()
                .any(|(w, r, _, t)| w == "gpu-node-1" && r == "GrantWithdrawn" && t == "Warning")
    })
    .await;
    c.stop().await;
}

/// The controller's timeouts run on its clock, not on the machine's: with production-sized
/// timeouts, a grant no agent starts is withdrawn when the controller's clock passes
/// `grantTimeout`, and not a moment of its clock before; the test waits for no timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_withdraws_a_grant_when_its_clock_passes_the_grant_timeout() {
    use mig_protocol::{Clock, ManualClock};
    let env = bare_env(nodes(1, 1, "7g.80gb@0")).await;
    let clock = ManualClock::new();
    let api: Api<Node> = Api::all(env.client.clone());
    let grant = Grant {
        id: "never-started".into(),
        plan_id: "p".into(),
        granted_at: clock.now().to_string(),
        granted_by: "replica-a".into(),
        ..Default::default()
    };
    write_grant(&env, "gpu-node-0", &grant).await;
    let mut s = fast_settings(Mode::Auto);
    s.budgets.grant_timeout = mig_controller::settings::Dur::secs(600);
    s.batching.resync = mig_controller::settings::Dur::secs(60);
    // The lease outlives every step of the clock: the replica leads throughout.
    s.lease.duration = mig_controller::settings::Dur::secs(3600);
    let c = controller_with_clock(&env, s, "replica-a", clock.clone()).await;
    let planned_at = |at: jiff::Timestamp| {
        let shared = c.shared.clone();
        move || {
            let shared = shared.clone();
            async move {
                shared.lease.is_leader()
                    && shared
                        .latest()
                        .and_then(|p| p.computed_at.parse::<jiff::Timestamp>().ok())
                        .is_some_and(|t| t >= at)
            }
        }
    };
    let granted = || async {
        api.get("gpu-node-0")
            .await
            .unwrap()
            .annotations()
            .contains_key(GRANT_ANNOTATION)
    };
    // Nine minutes on the controller's clock (a plan at that time proves its rounds saw it).
    clock.advance(Duration::from_secs(540));
    eventually(30, "a plan at +9 min", planned_at(clock.now())).await;
    assert!(
        granted().await,
        "withdrawn before grantTimeout on the controller's clock"
    );
    // Eleven: withdrawn, with its Event.
    clock.advance(Duration::from_secs(120));
    eventually(30, "the grant withdrawn at +11 min", || async {
        !granted().await
    })
    .await;
    eventually(5, "a GrantWithdrawn Event", || async {
        events(&env.client, "default")
            .await
            .iter()
            .any(|(w, r, _, _)| w == "gpu-node-0" && r == "GrantWithdrawn")
    })
    .await;
    c.stop().await;
}

/// A connection from `ip` (another loopback address than the test's own 127.0.0.1).
async fn connect_from(ip: &str, to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the server closes `s` (or answers it) within `secs`.
async fn closed_within(s: &mut tokio::net::TcpStream, secs: u64) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 512];
    tokio::time::timeout(Duration::from_secs(secs), s.read(&mut buf))
        .await
        .is_ok()
}

/// The probe's attacks on the API: idle and half-sent connections by the thousand, and a snapshot
/// far larger than any cluster the controller plans. The API stays responsive to others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_sheds_idle_connections_and_oversized_snapshots_and_stays_responsive() {
    use tokio::io::AsyncWriteExt;
    let env = env(nodes(1, 1, SEVEN_1G), AgentBehaviour::default()).await;
    let mut s = fast_settings(Mode::DryRun);
    s.http.max_connections_per_client = 16;
    s.http.header_read_timeout = mig_controller::settings::Dur::millis(500);
    s.http.max_snapshot_gpus = 8;
    let c = controller(&env, s, "replica-a").await;

    // A half-sent request is closed once its headers are late (it used to stay open for good).
    let mut half = connect_from("127.0.0.2", c.addr).await;
    half.write_all(b"GET /api/v1/plan HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut half, 10).await,
        "a half-sent request kept its connection"
    );

    // 3,000 idle connections from one client: beyond its 16, each is closed at once.
    let mut idle = Vec::new();
    for _ in 0..3000 {
        idle.push(connect_from("127.0.0.3", c.addr).await);
    }
    let mut open = 0;
    for s in idle.iter_mut() {
        if !closed_within(s, 0).await {
            open += 1;
        }
    }
    // (A connection read at once may not have been judged yet: give the rest a moment.)
    let mut still_open = 0;
    for s in idle.iter_mut().rev().take(100) {
        if !closed_within(s, 1).await {
            still_open += 1;
        }
    }
    assert!(
        open <= 16 + 100 && still_open == 0,
        "open {open}, of the last 100 still open {still_open}"
    );
    // Meanwhile others are served.
    let (status, _) = http(c.addr, "GET", "/healthz", b"").await;
    assert_eq!(status, 200);
    let (_, scrape) = http(c.addr, "GET", "/metrics", b"").await;
    let refused = sample(&scrape, "mig_autoscaler_http_refused_total{limit=\"per-client\"}").unwrap();
    assert!(refused >= 2900.0, "{refused}");
    drop(idle);

    // A snapshot over the GPU bound: 413 with the numbers, before any planning.
    let snapshot = json!({"nodes": [{"name": "n", "gpus": (0..9).map(|i| json!({"index": i, "product": H100})).collect::<Vec<_>>()}]});
    let (status, body) = http(c.addr, "POST", "/api/v1/plan", snapshot.to_string().as_bytes()).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("9 GPUs") && body.contains("maxSnapshotGpus"),
        "{body}"
    );
    c.stop().await;
}

/// Set in the child processes of [`the_api_survives_20000_idle_connections`]: the connections each
/// holds (`addr,second octet`). One process cannot hold them all (20,000 file descriptors here).
const HOLD_ENV: &str = "MIG_E2E_HOLD_CONNECTIONS";

/// Holder role: 10,000 idle connections to `addr`, 100 from each of 127.0.`octet`.1–100; prints
/// `held <open> <failed>` and keeps them until its stdin closes.
async fn hold_connections(spec: &str) {
    let (addr, octet) = spec.split_once(',').unwrap();
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let (mut held, mut failed) = (Vec::new(), 0);
    for host in 1..=100 {
        for _ in 0..100 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket
                .bind(format!("127.0.{octet}.{host}:0").parse().unwrap())
                .unwrap();
            match tokio::time::timeout(Duration::from_secs(5), socket.connect(addr)).await {
                Ok(Ok(s)) => held.push(s),
                _ => failed += 1,
            }
        }
    }
    println!("held {} {failed}", held.len());
    let _ = tokio::task::spawn_blocking(|| std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1])).await;
    drop(held);
}

/// The probe's flood: 20,000 idle connections from 200 addresses (it used to exhaust the file
/// descriptors at about 20,000 and `/healthz` never answered again). Connections over the limits
/// are closed at once, the ones kept go after the header-read timeout, and the API answers
/// throughout (at worst after one timeout, while every slot is held). Two child processes (this
/// test binary in its holder role) hold the connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_survives_20000_idle_connections() {
    if let Ok(spec) = std::env::var(HOLD_ENV) {
        return hold_connections(&spec).await;
    }
    use std::io::BufRead;
    let env = env(nodes(1, 1, SEVEN_1G), AgentBehaviour::default()).await;
    let mut s = fast_settings(Mode::DryRun);
    s.http.header_read_timeout = mig_controller::settings::Dur::secs(5);
    let c = controller(&env, s, "replica-a").await;
    let flood = Instant::now();
    let mut holders = Vec::new();
    let mut held = 0;
    for octet in [1, 2] {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "the_api_survives_20000_idle_connections",
                "--nocapture",
            ])
            .env(HOLD_ENV, format!("{},{octet}", c.addr))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Its report, then the rest of its output read to the end (the harness writes after it).
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines().map_while(Result::ok);
            let _ = tx.send(lines.find(|l| l.starts_with("held ")));
            lines.for_each(drop);
        });
        let line = rx.await.unwrap().expect("a holder reports what it holds");
        let counts: Vec<usize> = line.split(' ').skip(1).map(|n| n.parse().unwrap()).collect();
        assert_eq!(counts[0] + counts[1], 10_000, "{line}");
        held += counts[0];
        holders.push(child);
    }
    assert!(held >= 19_000, "only {held} connections were made");
    // The server keeps 1,024 at most at a time, each until its headers are late (5 s).
    let periods = (flood.elapsed().as_secs_f64() / 5.0).ceil() + 1.0;
    let kept_at_most = 1024.0 * periods;
    // All 20,000 made and still held by their clients: the API answers.
    eventually(30, "the API answers while the connections are held", || async {
        http(c.addr, "GET", "/healthz", b"").await.0 == 200
    })
    .await;
    let (status, scrape) = http(c.addr, "GET", "/metrics", b"").await;
    assert_eq!(status, 200);
    let total = sample(&scrape, "mig_autoscaler_http_refused_total{limit=\"total\"}").unwrap();
    let per_client = sample(&scrape, "mig_autoscaler_http_refused_total{limit=\"per-client\"}").unwrap();
    assert!(
        total + per_client >= held as f64 - kept_at_most,
        "refused {total} over the total limit, {per_client} per client, of {held} ({periods} periods)"
    );
    assert!(total > 0.0 && per_client > 0.0, "both limits were reached");
    for mut h in holders {
        drop(h.stdin.take());
        assert!(h.wait().unwrap().success());
    }
    c.stop().await;
}

/// The agent's clock runs an hour behind: the end of its reconfiguration reads as an hour ago. The
/// node's cooldown must still start when the controller saw it end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_clock_behind_does_not_shorten_its_cooldown() {
    let agent = AgentBehaviour {
        clock_behind_s: 3600,
        ..Default::default()
    };
    let env = env(nodes(1, 1, SEVEN_1G), agent).await;
    let mut s = fast_settings(Mode::Auto);
    s.budgets.node_cooldown = mig_controller::settings::Dur::secs(600);
    let c = controller(&env, s, "replica-a").await;
    create_pod(&env.client, &mig_pod("first", "7g.80gb", "1")).await;
    eventually(20, "first runs", || pod_running(&env.client, "first")).await;
    // The 7g pod finishes; a 3g pod needs the GPU changed again.
    Api::<Pod>::namespaced(env.client.clone(), "default")
        .delete("first", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    create_pod(&env.client, &mig_pod("second", "3g.40gb", "1")).await;
    eventually(20, "the change is deferred for the cooldown", || async {
        let (_, p) = get_json(c.addr, "/api/v1/plan").await;
        p["decisions"]["gpu-node-0"]
            .as_str()
            .is_some_and(|d| d.contains("node cooldown"))
    })
    .await;
    assert!(!pod_running(&env.client, "second").await);
    c.stop().await;
}

/// A request with a bearer token: (status, body).
async fn http_as(addr: std::net::SocketAddr, token: Option<&str>, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = if method == "POST" { "{\"nodes\": []}" } else { "" };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

/// Every endpoint but the probes asks who calls (TokenReview) and whether they may
/// (SubjectAccessReview on the non-resource URL), as kube-rbac-proxy does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_lets_in_only_callers_the_api_server_vouches_for() {
    let env = env(nodes(1, 1, SEVEN_1G), AgentBehaviour::default()).await;
    let reader = "system:serviceaccount:monitoring:grafana";
    let planner = "system:serviceaccount:platform:what-if";
    env.server.state.add_token(
        "reader-token",
        kube_emulator::UserInfo {
            username: reader.into(),
            node_name: None,
        },
    );
    env.server.state.add_token(
        "planner-token",
        kube_emulator::UserInfo {
            username: planner.into(),
            node_name: None,
        },
    );
    env.server.state.add_token(
        "tenant-token",
        kube_emulator::UserInfo {
            username: "system:serviceaccount:team-a:job".into(),
            node_name: None,
        },
    );
    for path in ["/", "/api/v1/*", "/metrics"] {
        env.server.state.allow_path(reader, "get", path);
    }
    env.server.state.allow_path(planner, "create", "/api/v1/plan");
    let mut s = fast_settings(Mode::DryRun);
    s.http.auth = mig_controller::settings::HttpAuth::Kubernetes;
    let c = controller(&env, s, "replica-a").await;
    eventually(10, "a plan", || async { c.shared.latest().is_some() }).await;

    let cases = [
        (None, "GET", "/healthz", 200),
        (None, "GET", "/readyz", 200),
        (None, "GET", "/api/v1/plan", 401),
        (Some("forged"), "GET", "/api/v1/plan", 401),
        (Some("tenant-token"), "GET", "/api/v1/plan", 403),
        (Some("tenant-token"), "GET", "/metrics", 403),
        (Some("reader-token"), "GET", "/api/v1/plan", 200),
        (Some("reader-token"), "GET", "/api/v1/layouts", 200),
        (Some("reader-token"), "GET", "/metrics", 200),
        (Some("reader-token"), "GET", "/", 200),
        (Some("reader-token"), "POST", "/api/v1/plan", 403),
        (Some("planner-token"), "POST", "/api/v1/plan", 200),
    ];
    for (token, method, path, want) in cases {
        let (status, body) = http_as(c.addr, token, method, path).await;
        assert_eq!(status, want, "{token:?} {method} {path}: {body}");
    }
    // Denials say what to do.
    let (_, body) = http_as(c.addr, Some("tenant-token"), "GET", "/api/v1/plan").await;
    assert!(body.contains("may not get /api/v1/plan"), "{body}");
    c.stop().await;
}

/// The latest plan of `c` computed at `at` or later on its clock.
async fn plan_at(
    c: &mig_controller::Running,
    at: jiff::Timestamp,
) -> std::sync::Arc<mig_controller::state::Published> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(p) = c.shared.latest()
            && p.computed_at.parse::<jiff::Timestamp>().is_ok_and(|t| t >= at)
        {
            return p;
        }
        assert!(Instant::now() < deadline, "no plan at {at} within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The problems of `plan` about Node `node` with reason `NoAgentReport`.
fn no_report(plan: &mig_controller::state::Published, node: &str) -> Vec<String> {
    plan.problems
        .iter()
        .filter(|p| p.object == format!("Node/{node}") && p.reason == "NoAgentReport")
        .map(|p| p.message.clone())
        .collect()
}

/// Where `plan` fits pod `default/name` (`None`: it waits), and why it waits.
fn fits_on(plan: &mig_controller::state::Published, name: &str) -> (Option<String>, String) {
    let pod = plan.plan.pods.iter().find(|p| p.name == name).unwrap();
    match &pod.outcome {
        mig_planner::PodOutcome::Fits { node, .. } => (Some(node.clone()), String::new()),
        mig_planner::PodOutcome::Waits { reason } => (None, reason.clone()),
    }
}

/// A node with MIG GPUs whose agent never reported, or stopped reporting, is named (a problem in
/// the plan, a Warning Event, a metric, the waiting pod's explanation) and left alone: the planner
/// neither counts nor changes its GPUs. A report is stale when the controller has not seen it
/// change for `reportTimeout` on the controller's own clock (a ManualClock here; no test waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_without_a_live_agent_report_are_named_and_left_alone() {
    use mig_controller::settings::Dur;
    use mig_protocol::{Clock, ManualClock};
    let env = bare_env(nodes(3, 1, SEVEN_1G)).await;
    let clock = ManualClock::new();
    // Agents report on gpu-node-0 and -1; gpu-node-2 (MIG GPUs, a mig-parted config label) has none.
    for n in ["gpu-node-0", "gpu-node-1"] {
        write_report(&env, n, &clock.now().to_string()).await;
    }
    create_pod(&env.client, &mig_pod("big", "7g.80gb", "1")).await;
    let mut s = fast_settings(Mode::DryRun);
    s.batching.resync = Dur::secs(60);
    s.lease.duration = Dur::secs(3600);
    s.report_timeout = Dur::secs(900);
    let c = controller_with_clock(&env, s, "replica-a", clock.clone()).await;
    let unreported = |scrape: &str, report: &str| {
        sample(
            scrape,
            &format!("mig_autoscaler_nodes_unreported{{report=\"{report}\"}}"),
        )
    };

    // A node that never reported: named, not counted; the pod is planned elsewhere.
    let p = plan_at(&c, clock.now()).await;
    let missing = no_report(&p, "gpu-node-2");
    assert!(
        missing.iter().any(|m| m.contains("no agent report")),
        "{:?}",
        p.problems
    );
    assert!(no_report(&p, "gpu-node-0").is_empty() && no_report(&p, "gpu-node-1").is_empty());
    let (node, _) = fits_on(&p, "big");
    assert!(
        matches!(node.as_deref(), Some("gpu-node-0" | "gpu-node-1")),
        "{node:?}"
    );
    assert!(p.plan.gpus.iter().all(|g| g.node != "gpu-node-2"));
    let (_, scrape) = http(c.addr, "GET", "/metrics", b"").await;
    assert_eq!(unreported(&scrape, "missing"), Some(1.0));
    assert_eq!(unreported(&scrape, "stale"), Some(0.0));
    eventually(10, "a NoAgentReport Warning on gpu-node-2", || async {
        events(&env.client, "default")
            .await
            .iter()
            .any(|(w, r, _, t)| w == "gpu-node-2" && r == "NoAgentReport" && t == "Warning")
    })
    .await;

    // 16 minutes on: gpu-node-0's agent refreshed its report, gpu-node-1's stopped. Only gpu-node-0
    // is planned on; gpu-node-1 is named stale and none of its GPUs changes.
    clock.advance(Duration::from_secs(960));
    write_report(&env, "gpu-node-0", &clock.now().to_string()).await;
    let mut planned = None;
    for _ in 0..10 {
        clock.advance(Duration::from_secs(61));
        let p = plan_at(&c, clock.now()).await;
        if no_report(&p, "gpu-node-0").is_empty() {
            planned = Some(p);
            break;
        }
    }
    let p = planned.expect("a plan that saw gpu-node-0's refreshed report");
    assert!(
        no_report(&p, "gpu-node-1")
            .iter()
            .any(|m| m.contains("agent report unchanged for")),
        "{:?}",
        p.problems
    );
    assert_eq!(fits_on(&p, "big").0.as_deref(), Some("gpu-node-0"));
    assert!(
        p.plan
            .gpus
            .iter()
            .filter(|g| g.node != "gpu-node-0")
            .all(|g| !g.changed),
        "{:?}",
        p.plan.gpus
    );
    let (_, scrape) = http(c.addr, "GET", "/metrics", b"").await;
    assert_eq!(unreported(&scrape, "stale"), Some(1.0));

    // Another 16 minutes and no agent reports: the pod waits, told which nodes were not counted.
    clock.advance(Duration::from_secs(960));
    let p = plan_at(&c, clock.now()).await;
    let (node, why) = fits_on(&p, "big");
    assert_eq!(node, None);
    assert!(why.contains("3 MIG node(s) not counted"), "{why}");
    assert!(why.contains("gpu-node-2 (no agent report)"), "{why}");
    let (status, e) = get_json(c.addr, "/api/v1/pods/default/big/explain").await;
    assert_eq!(status, 200);
    assert!(
        e["explanation"]
            .as_str()
            .unwrap_or_default()
            .contains("not counted"),
        "{e}"
    );
    c.stop().await;
}

/// Issue 16: the simulated nodes that are API clients (kubelet, device plugin and mig-manager over
/// HTTP, as the real tier runs them against kube-apiserver) serve the whole loop on the emulator
/// too, with the emulator's in-process actors off and a client scheduler binding through
/// `pods/binding`; the agents are the real ones, each with its node's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_nodes_as_api_clients_serve_the_whole_loop() {
    use kube_emulator::{ClusterSpec, Config, Running};
    use mig_testbed::nodes::{Scheduler, SimulatedNodes};

    let server = Running::start("127.0.0.1:0".parse().unwrap(), Config::default())
        .await
        .unwrap();
    server.state.set_kubelets(true); // the simulated kubelets end terminating pods
    chart_admission(&server);
    server
        .seed([kube_emulator::fleet::default_mig_parted_config_map()])
        .unwrap();
    let admin = client_for(&server);
    let spec = ClusterSpec {
        nodes: nodes(2, 1, SEVEN_1G),
        mig_parted_config_map: "gpu-operator/default-mig-parted-config".into(),
        mig_manager_delay_ms: 100,
        device_plugin_pods: false,
    };
    let simulated = SimulatedNodes::register(admin.clone(), &spec).await.unwrap();
    let hardware = simulated.hardware();
    let tasks = [
        simulated.spawn(Duration::from_millis(50)),
        Scheduler::new(admin.clone()).spawn(Duration::from_millis(50)),
    ];
    let agents = spec
        .nodes
        .iter()
        .map(|n| (n.name.clone(), agent_client(&server, &n.name)))
        .collect();
    let system =
        SystemOnNodes::start(hardware.clone(), agents, admin.clone(), fast_settings(Mode::Auto)).await;
    let node = a_3g_pod_runs_after_a_repartition(&admin, &hardware, 30).await;
    // Nothing else changed: the other node keeps its seven 1g slices.
    let other = spec.nodes.iter().find(|n| n.name != node).unwrap();
    assert_eq!(hardware.gpus(&other.name)[0].layout.len(), 7);
    pods_live_and_end_as_on_a_real_server(&admin, &node).await;
    system.stop().await;
    for t in tasks {
        t.abort();
    }
}

/// Reservations by attrition on the mig-manager backend, end to end (see the scenario).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_pod_gets_the_gpu_that_empties_first_and_nothing_else_lands_there() {
    let env = env(nodes(2, 1, SEVEN_1G), AgentBehaviour::default()).await;
    let c = controller(&env, fast_settings(Mode::Auto), "replica-a").await;
    a_large_pod_gets_a_reserved_gpu_and_runs_there(&env.client, c.addr, 30).await;
    c.stop().await;
}

/// Reservations survive a change of leader and are swept when stale: a reservation and its taint
/// left on a node for a pod that no longer exists (a crash, an old controller) are removed by the
/// first leader; a reservation made by one leader is read back by the next, which keeps its age
/// and does not announce it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_are_read_back_by_a_new_leader_and_stale_ones_swept() {
    use mig_protocol::{RESERVATIONS_ANNOTATION, RESERVED_TAINT};
    let env = env(nodes(2, 1, SEVEN_1G), AgentBehaviour::default()).await;
    for (name, node) in [("a", "gpu-node-0"), ("c", "gpu-node-1")] {
        create_pod(&env.client, &only_on(mig_pod(name, "1g.10gb", "1"), node)).await;
    }
    eventually(10, "the 1g pods run", || async {
        pod_running(&env.client, "a").await && pod_running(&env.client, "c").await
    })
    .await;
    let api: Api<Node> = Api::all(env.client.clone());
    let stale = json!([{"pod": "default/ghost", "gpus": [{"gpu": 0, "profile": "7g.80gb", "start": 0}], "since": "2026-01-01T00:00:00Z"}]);
    api.patch(
        "gpu-node-0",
        &PatchParams::default(),
        &Patch::Merge(json!({
            "metadata": {"annotations": {RESERVATIONS_ANNOTATION: stale.to_string()}},
            "spec": {"taints": [
                {"key": RESERVED_TAINT, "value": "attrition", "effect": "NoSchedule"},
                {"key": "example.com/maintenance", "value": "true", "effect": "NoSchedule"}]},
        })),
    )
    .await
    .unwrap();
    let mut s = fast_settings(Mode::Auto);
    s.lease.duration = mig_controller::settings::Dur::secs(30);
    let a = controller(&env, s.clone(), "replica-a").await;
    let taint_keys = |n: &Node| -> Vec<String> {
        n.spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|t| t.key)
            .collect()
    };
    eventually(10, "the stale reservation and its taint are gone", || async {
        let n0 = api.get("gpu-node-0").await.unwrap();
        !n0.annotations().contains_key(RESERVATIONS_ANNOTATION)
            && taint_keys(&n0) == vec!["example.com/maintenance".to_string()]
    })
    .await;
    eventually(5, "ReservationReleased for the ghost", || async {
        events(&env.client, "default")
            .await
            .iter()
            .any(|(w, r, note, _)| {
                w == "gpu-node-0" && r == "ReservationReleased" && note.contains("default/ghost")
            })
    })
    .await;

    create_pod(&env.client, &mig_pod("big", "7g.80gb", "1")).await;
    let since = || async {
        let mut found = None;
        for n in ["gpu-node-0", "gpu-node-1"] {
            let n = api.get(n).await.unwrap();
            let written: Vec<mig_protocol::NodeReservation> = n
                .annotations()
                .get(RESERVATIONS_ANNOTATION)
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default();
            found = found.or(written
                .iter()
                .find(|r| r.pod == "default/big")
                .map(|r| r.since.clone()));
        }
        found
    };
    eventually(10, "a reservation for big", || async { since().await.is_some() }).await;
    let made = since().await.unwrap();
    let announced = || async {
        events(&env.client, "default")
            .await
            .iter()
            .filter(|(w, r, _, _)| w == "big" && r == "GpusReserved")
            .count()
    };
    eventually(5, "GpusReserved for big", || async { announced().await == 1 }).await;

    let b = controller(&env, s, "replica-b").await;
    a.stop().await;
    eventually(5, "b leads", || async { b.shared.lease.is_leader() }).await;
    eventually(5, "b has planned", || async {
        get_json(b.addr, "/api/v1/plan").await.1["leader"] == json!(true)
    })
    .await;
    let (_, p) = get_json(b.addr, "/api/v1/plan").await;
    let r = &p["plan"]["reservations"][0];
    assert_eq!(
        (r["pod"].as_str(), r["new"].as_bool()),
        (Some("default/big"), Some(false)),
        "{p:#}"
    );
    assert_eq!(
        since().await,
        Some(made),
        "the reservation keeps the time it was made"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(announced().await, 1, "announced again by the new leader");
    b.stop().await;
}

/// The same on the nvml backend with the real node agents. Before the reserved node was tainted on
/// nvml too (only the reserved GPU's free instances were withdrawn), this failed: when the pod on
/// the reserved GPU ended, the waiting 1g pod took its freed instance at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nvml_a_reserved_node_takes_no_new_pods_until_its_large_pod_runs() {
    let spec = kube_emulator::ClusterSpec {
        nodes: nodes(2, 1, SEVEN_1G),
        mig_parted_config_map: "gpu-operator/default-mig-parted-config".into(),
        mig_manager_delay_ms: 50,
        device_plugin_pods: true,
    };
    let mut settings = fast_settings(Mode::Auto);
    settings.planner.backend = mig_planner::Backend::Nvml;
    let system = mig_testbed::System::start(
        "127.0.0.1:0".parse().unwrap(),
        &spec,
        settings,
        Duration::from_millis(50),
        0,
    )
    .await
    .unwrap();
    a_large_pod_gets_a_reserved_gpu_and_runs_there(&system.client, system.controller.addr, 30).await;
    system.stop().await;
}
