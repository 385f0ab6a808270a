//! The emulator against the real kube-rs client, watcher and reflector, over HTTP.

#![allow(clippy::unwrap_used)] // Tests fail loudly on unexpected input.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use kube_emulator::{Config, Faults, Running};
use serde_json::json;

async fn start(config: Config) -> (Running, Client) {
    let server = Running::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    let mut config = kube::Config::new(server.url().parse().unwrap());
    // kube-rs retries 429/503/504 by default, which would hide a PDB's 429 for minutes; the agent
    // must see it at once to report the blocking budget.
    config.default_retry = false;
    let client = Client::try_from(config).unwrap();
    (server, client)
}

fn node(name: &str, labels: &[(&str, &str)]) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
    }))
    .unwrap()
}

fn pod(name: &str, labels: &[(&str, &str)], node: Option<&str>) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
        "spec": {"containers": [{"name": "c", "image": "x"}], "nodeName": node},
        "status": {"phase": if node.is_some() { "Running" } else { "Pending" }},
    }))
    .unwrap()
}

fn code(e: kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("not an API error: {other:?}"),
    }
}

#[tokio::test]
async fn crud_selectors_patches_and_conflicts() {
    let (server, client) = start(Config::default()).await;
    let nodes: Api<Node> = Api::all(client.clone());
    let pp = PostParams::default();
    let a = nodes
        .create(&pp, &node("gpu-a", &[("pool", "a100")]))
        .await
        .unwrap();
    nodes
        .create(&pp, &node("gpu-b", &[("pool", "h100")]))
        .await
        .unwrap();
    assert_eq!(
        code(nodes.create(&pp, &node("gpu-a", &[])).await.unwrap_err()),
        409,
        "AlreadyExists"
    );
    assert!(a.metadata.uid.is_some() && a.metadata.creation_timestamp.is_some());

    let selected = nodes
        .list(&ListParams::default().labels("pool in (h100, b200)"))
        .await
        .unwrap();
    assert_eq!(
        selected
            .items
            .iter()
            .map(|n| n.metadata.name.clone().unwrap())
            .collect::<Vec<_>>(),
        ["gpu-b"]
    );
    assert_eq!(
        nodes
            .list(&ListParams::default().labels("!pool"))
            .await
            .unwrap()
            .items
            .len(),
        0
    );

    // Merge patch of a label, JSON patch of a taint, strategic merge of an annotation.
    let p = PatchParams::default();
    nodes
        .patch(
            "gpu-a",
            &p,
            &Patch::Merge(json!({"metadata": {"labels": {"nvidia.com/mig.config": "all-balanced"}}})),
        )
        .await
        .unwrap();
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/spec", "value": {}},
        {"op": "add", "path": "/spec/taints", "value": [{"key": "mig-autoscaler.io/reconfiguring", "effect": "NoSchedule"}]}
    ]))
    .unwrap();
    nodes.patch("gpu-a", &p, &Patch::Json::<()>(ops)).await.unwrap();
    let got = nodes
        .patch(
            "gpu-a",
            &p,
            &Patch::Strategic(json!({"metadata": {"annotations": {"mig-autoscaler.io/phase": "draining"}}})),
        )
        .await
        .unwrap();
    assert_eq!(got.labels()["nvidia.com/mig.config"], "all-balanced");
    assert_eq!(
        got.spec.as_ref().unwrap().taints.as_ref().unwrap()[0].key,
        "mig-autoscaler.io/reconfiguring"
    );
    assert_eq!(got.annotations()["mig-autoscaler.io/phase"], "draining");

    // Replace with a stale resourceVersion: 409 Conflict; with the current one: fine.
    let mut stale = a.clone();
    stale.metadata.labels = Some(BTreeMap::new());
    assert_eq!(code(nodes.replace("gpu-a", &pp, &stale).await.unwrap_err()), 409);
    let mut fresh = got.clone();
    fresh
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("x".into(), "y".into());
    let replaced = nodes.replace("gpu-a", &pp, &fresh).await.unwrap();
    assert!(replaced.metadata.resource_version > got.metadata.resource_version);

    nodes.delete("gpu-a", &DeleteParams::default()).await.unwrap();
    assert_eq!(code(nodes.get("gpu-a").await.unwrap_err()), 404);
    server.stop().await;
}

#[tokio::test]
async fn field_selectors_and_pagination() {
    let (server, client) = start(Config::default()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ml");
    for i in 0..5 {
        pods.create(
            &PostParams::default(),
            &pod(&format!("p{i}"), &[], if i % 2 == 0 { Some("n1") } else { None }),
        )
        .await
        .unwrap();
    }
    let on_n1 = pods
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .unwrap();
    assert_eq!(on_n1.items.len(), 3);
    let pending = pods
        .list(&ListParams::default().fields("status.phase=Pending"))
        .await
        .unwrap();
    assert_eq!(pending.items.len(), 2);
    let page = pods.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    let token = page.metadata.continue_.clone().unwrap();
    let rest = pods
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 3);
    assert!(rest.metadata.continue_.is_none());
    let all: Api<Pod> = Api::all(client);
    assert_eq!(all.list(&ListParams::default()).await.unwrap().items.len(), 5);
    server.stop().await;
}

#[tokio::test]
async fn eviction_honours_pod_disruption_budgets() {
    let (server, client) = start(Config::default()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ml");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "ml");
    pods.create(
        &PostParams::default(),
        &pod("guarded", &[("app", "infer")], Some("n1")),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("free", &[("app", "batch")], Some("n1")),
    )
    .await
    .unwrap();
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "infer"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "infer"}}},
        "status": {"observedGeneration": 1, "disruptionsAllowed": 0, "currentHealthy": 1, "desiredHealthy": 1, "expectedPods": 1}
    }))
    .unwrap();
    pdbs.create(&PostParams::default(), &pdb).await.unwrap();

    let err = pods.evict("guarded", &EvictParams::default()).await.unwrap_err();
    let kube::Error::Api(status) = err else { panic!() };
    assert_eq!(status.code, 429);
    assert!(status.message.contains("disruption budget"), "{}", status.message);
    assert!(
        pods.get("guarded").await.is_ok(),
        "a refused eviction deletes nothing"
    );

    // A UID precondition naming another pod of that name: 409, nothing evicted. (Sent as the real
    // Eviction body: kube's EvictParams serializes `delete_options`, which a real server ignores.)
    let stale = json!({
        "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "free"},
        "deleteOptions": {"preconditions": {"uid": "some-older-pod"}},
    });
    let refused = pods
        .create_subresource::<_, serde_json::Value>("eviction", "free", &PostParams::default(), &stale)
        .await;
    assert_eq!(code(refused.unwrap_err()), 409);
    assert!(pods.get("free").await.is_ok());
    pods.evict("free", &EvictParams::default()).await.unwrap();
    assert_eq!(code(pods.get("free").await.unwrap_err()), 404);

    // A spec change makes the status stale (generation 2, observed 1): as on the real server, no
    // eviction passes until the disruption controller has looked again, whatever the status says.
    pdbs.patch(
        "infer",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"minAvailable": 0}})),
    )
    .await
    .unwrap();
    pdbs.patch_status(
        "infer",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"disruptionsAllowed": 1}})),
    )
    .await
    .unwrap();
    assert_eq!(pdbs.get("infer").await.unwrap().metadata.generation, Some(2));
    let err = pods.evict("guarded", &EvictParams::default()).await.unwrap_err();
    assert_eq!(code(err), 429, "a stale budget lets nothing through");
    pdbs.patch_status(
        "infer",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"observedGeneration": 2}})),
    )
    .await
    .unwrap();
    assert_eq!(
        pdbs.get("infer").await.unwrap().metadata.generation,
        Some(2),
        "status writes keep it"
    );
    pods.evict("guarded", &EvictParams::default()).await.unwrap();
    assert_eq!(
        pdbs.get("infer")
            .await
            .unwrap()
            .status
            .unwrap()
            .disruptions_allowed,
        Some(0)
    );
    server.stop().await;
}

#[tokio::test]
async fn watcher_reaches_init_done_and_follows_changes() {
    let (server, client) = start(Config::default()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ml");
    for i in 0..3 {
        pods.create(&PostParams::default(), &pod(&format!("p{i}"), &[], None))
            .await
            .unwrap();
    }
    let mut events = watcher(pods.clone(), watcher::Config::default().timeout(5)).boxed();
    let mut initial = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::Init => {}
            watcher::Event::InitApply(_) => initial += 1,
            watcher::Event::InitDone => break,
            other => panic!("before InitDone: {other:?}"),
        }
    }
    assert_eq!(initial, 3);
    pods.create(&PostParams::default(), &pod("late", &[], None))
        .await
        .unwrap();
    pods.delete("p0", &DeleteParams::default()).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::Apply(p) => seen.push(format!("apply {}", p.metadata.name.unwrap())),
            watcher::Event::Delete(p) => seen.push(format!("delete {}", p.metadata.name.unwrap())),
            _ => {}
        }
    }
    assert_eq!(seen, ["apply late", "delete p0"]);
    server.stop().await;
}

async fn converged(reader: &reflector::Store<Pod>, pods: &Api<Pod>) -> bool {
    let mut want: Vec<String> = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect();
    let mut have: Vec<String> = reader
        .state()
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    want.sort();
    have.sort();
    want == have
}

#[tokio::test]
async fn reflector_relists_after_410_and_converges_under_faults() {
    let (server, client) = start(Config {
        retention: 8,
        bookmark_interval: Duration::from_millis(200),
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ml");
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(pods.clone(), watcher::Config::default().timeout(2)).default_backoff(),
    );
    let task = tokio::spawn(stream.applied_objects().for_each(|_| async {}));
    reader.wait_until_ready().await.unwrap();
    let lists_before = server.state.list_requests();

    // A forced 410 and more changes than the retention window while watches keep being dropped and
    // a third of the other requests fail: the reflector must relist and still converge.
    server.state.set_faults(Faults {
        error_rate: 0.0,
        latency: Duration::ZERO,
        drop_watch_after: Some(3),
        force_gone: 2,
        ..Default::default()
    });
    for i in 0..40 {
        pods.create(&PostParams::default(), &pod(&format!("w{i}"), &[], None))
            .await
            .unwrap();
        if i % 3 == 0 {
            pods.delete(&format!("w{}", i / 2), &DeleteParams::default())
                .await
                .ok();
        }
    }
    server.state.set_faults(Faults {
        error_rate: 0.3,
        latency: Duration::ZERO,
        drop_watch_after: Some(5),
        force_gone: 1,
        ..Default::default()
    });
    for i in 40..60 {
        // The writer retries through injected 500s.
        for _ in 0..20 {
            if pods
                .create(&PostParams::default(), &pod(&format!("w{i}"), &[], None))
                .await
                .is_ok()
            {
                break;
            }
        }
    }
    server.state.set_faults(Faults::default());
    let mut ok = false;
    for _ in 0..100 {
        if converged(&reader, &pods).await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ok,
        "reflector store never converged: {} objects",
        reader.state().len()
    );
    // The test itself lists once per convergence check; the watcher's relists come on top.
    assert!(
        server.state.list_requests() > lists_before + 3,
        "the watcher never relisted after 410"
    );
    task.abort();
    server.stop().await;
}
