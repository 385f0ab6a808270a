//! kube-emulator at cluster scale (issue: emulator): 1,250 nodes and 20,000 pods listed and then
//! watched by kube-rs reflectors over HTTP. Run: `cargo bench -p kube-emulator --bench emulator_scale`.

#![allow(missing_docs)] // criterion_group! generates an undocumented function.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use kube_emulator::{Config, Running};
use serde_json::json;

fn objects(nodes: usize, pods: usize) -> Vec<serde_json::Value> {
    let mut v: Vec<serde_json::Value> = (0..nodes)
        .map(|i| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{i:05}"), "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}, "spec": {}, "status": {}}))
        .collect();
    v.extend((0..pods).map(|i| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("pod-{i:05}"), "namespace": format!("ns-{}", i % 20), "labels": {"app": "infer"}},
               "spec": {"nodeName": format!("node-{:05}", i % nodes), "containers": [{"name": "c", "image": "x", "resources": {"limits": {"nvidia.com/mig-1g.10gb": "1"}}}]},
               "status": {"phase": "Running"}})
    }));
    v
}

fn scale(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let server = rt.block_on(async {
        let s = Running::start(
            "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
            Config::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        s.seed(objects(1_250, 20_000)).unwrap_or_else(|e| panic!("{e}"));
        s
    });
    let url = server.url();
    let mut group = c.benchmark_group("emulator");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    group.bench_function("reflectors-1250-nodes-20000-pods-synced", |b| {
        b.iter(|| {
            rt.block_on(async {
                let client =
                    Client::try_from(kube::Config::new(url.parse().unwrap_or_else(|e| panic!("{e}"))))
                        .unwrap_or_else(|e| panic!("{e}"));
                let (nodes, nw) = reflector::store::<Node>();
                let (pods, pw) = reflector::store::<Pod>();
                let n = tokio::spawn(
                    reflector(
                        nw,
                        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
                    )
                    .applied_objects()
                    .for_each(|_| async {}),
                );
                let p = tokio::spawn(
                    reflector(pw, watcher(Api::<Pod>::all(client), watcher::Config::default()))
                        .applied_objects()
                        .for_each(|_| async {}),
                );
                nodes.wait_until_ready().await.unwrap_or_else(|e| panic!("{e}"));
                pods.wait_until_ready().await.unwrap_or_else(|e| panic!("{e}"));
                assert_eq!((nodes.state().len(), pods.state().len()), (1_250, 20_000));
                n.abort();
                p.abort();
            })
        })
    });
    group.finish();
}

criterion_group!(benches, scale);
criterion_main!(benches);
