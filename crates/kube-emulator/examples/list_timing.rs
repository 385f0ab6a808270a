//! Where list time goes at scale: `cargo run --release -p kube-emulator --example list_timing`.

use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DynamicObject, ListParams};
use kube::discovery::ApiResource;
use kube::{Api, Client};
use kube_emulator::{Config, Running};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let s = Running::start(
        "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
        Config::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let pods = (0..20_000).map(|i| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("pod-{i:05}"), "namespace": format!("ns-{}", i % 20), "labels": {"app": "infer"}},
               "spec": {"nodeName": format!("node-{:05}", i % 1250), "containers": [{"name": "c", "image": "x", "resources": {"limits": {"nvidia.com/mig-1g.10gb": "1"}}}]},
               "status": {"phase": "Running"}})
    });
    let t = Instant::now();
    s.seed(pods).unwrap_or_else(|e| panic!("{e}"));
    println!("seed 20000 pods: {:?}", t.elapsed());
    let client = Client::try_from(kube::Config::new(
        s.url().parse().unwrap_or_else(|e| panic!("{e}")),
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    for (label, page) in [("typed, pages of 500", 500u32), ("typed, one page", 0)] {
        let api: Api<Pod> = Api::all(client.clone());
        let t = Instant::now();
        let mut token: Option<String> = None;
        let mut n = 0;
        loop {
            let mut lp = ListParams::default();
            if page > 0 {
                lp = lp.limit(page);
            }
            if let Some(tok) = &token {
                lp = lp.continue_token(tok);
            }
            let l = api.list(&lp).await.unwrap_or_else(|e| panic!("{e}"));
            n += l.items.len();
            token = l.metadata.continue_;
            if token.is_none() {
                break;
            }
        }
        println!("{label}: {n} pods in {:?}", t.elapsed());
    }
    let ar = ApiResource::erase::<Pod>(&());
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let t = Instant::now();
    let l = api
        .list(&ListParams::default().limit(500))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "dynamic, first page of 500: {} in {:?}",
        l.items.len(),
        t.elapsed()
    );
}
