//! The real-server tier: the chart, its RBAC and its admission policy on a real etcd +
//! kube-apiserver (built by scripts/control-plane), not on our emulator.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::authorization::v1::SelfSubjectRulesReview;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use mig_testbed::harness::{agent_attacks, agent_writes};
use mig_testbed::real::{ControlPlane, ToolError, binaries};
use serde_json::json;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/helm/mig-autoscaler");
const NAMESPACE: &str = "mig-autoscaler";
/// The chart's copy of the GPU operator's mig-parted config.
const MIG_PARTED_CONFIG: &str = "gpu-operator/mig-autoscaler-mig-parted-config";

/// A control plane with the chart installed by helm (defaults), or `None` to skip (not in CI).
fn installed() -> Option<ControlPlane> {
    let plane = ControlPlane::start(&binaries()?);
    plane.kubectl(&["create", "namespace", "gpu-operator"]).unwrap();
    plane
        .helm(&[
            "install",
            "mig-autoscaler",
            CHART,
            "--namespace",
            NAMESPACE,
            "--create-namespace",
        ])
        .unwrap();
    Some(plane)
}

/// A client acting as service account `sa` of our namespace (user and groups as its token would
/// authenticate).
fn as_service_account(plane: &ControlPlane, sa: &str) -> Client {
    plane.client_as(
        &format!("system:serviceaccount:{NAMESPACE}:{sa}"),
        &[
            "system:serviceaccounts",
            &format!("system:serviceaccounts:{NAMESPACE}"),
            "system:authenticated",
        ],
    )
}

/// Every (apiGroup/resource, verb, resourceName) `client`'s user may do in `namespace`, from the
/// API server's own rules review.
async fn rules(client: &Client, namespace: &str) -> BTreeSet<String> {
    let review: SelfSubjectRulesReview =
        serde_json::from_value(json!({"spec": {"namespace": namespace}})).unwrap();
    let got = Api::<SelfSubjectRulesReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    let status = got.status.unwrap();
    let mut out = BTreeSet::new();
    for r in status.resource_rules {
        let names = r.resource_names.unwrap_or_default();
        for g in r.api_groups.unwrap_or_default() {
            for res in r.resources.clone().unwrap_or_default() {
                for v in &r.verbs {
                    let target = if g.is_empty() {
                        res.clone()
                    } else {
                        format!("{g}/{res}")
                    };
                    if names.is_empty() {
                        out.insert(format!("{v} {target}"));
                    }
                    for n in &names {
                        out.insert(format!("{v} {target}/{n}"));
                    }
                }
            }
        }
    }
    for r in status.non_resource_rules {
        for u in r.non_resource_urls.unwrap_or_default() {
            for v in &r.verbs {
                out.insert(format!("{v} url {u}"));
            }
        }
    }
    out
}

/// The objects of a multi-document YAML, by kind and name, without helm's bookkeeping.
fn objects(yaml: &str) -> std::collections::BTreeMap<(String, String), serde_json::Value> {
    let mut out = std::collections::BTreeMap::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let mut v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        if v.is_null() {
            continue;
        }
        for path in ["/metadata/labels", "/spec/template/metadata/labels"] {
            if let Some(l) = v.pointer_mut(path).and_then(|l| l.as_object_mut()) {
                for helm_own in [
                    "app.kubernetes.io/managed-by",
                    "helm.sh/chart",
                    "app.kubernetes.io/version",
                ] {
                    l.remove(helm_own);
                }
            }
        }
        if let Some(m) = v
            .pointer_mut("/spec/template/metadata")
            .and_then(|m| m.as_object_mut())
        {
            m.remove("annotations");
        }
        let key = (
            v["kind"].as_str().unwrap().to_string(),
            v["metadata"]["name"].as_str().unwrap().to_string(),
        );
        out.insert(key, v);
    }
    out
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// What the chart grants each identity beyond what every authenticated user has, per namespace:
/// docs/install.md ("Permissions, and why") in the API server's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_the_chart_and_each_identity_has_exactly_the_documented_permissions() {
    let Some(plane) = installed() else { return };
    // Lint and the Kubernetes-version guard, by the real helm.
    plane.helm(&["lint", "--strict", CHART]).unwrap();
    for version in ["1.30.0", "1.33.0", "1.37.0"] {
        plane
            .helm(&["template", "x", CHART, "--kube-version", version])
            .unwrap_or_else(|e| panic!("{version}: {e}"));
    }
    let old = plane
        .helm(&["template", "x", CHART, "--kube-version", "1.29.0"])
        .unwrap_err();
    assert!(
        matches!(&old, ToolError::Failed { stderr, .. } if stderr.contains("perNodeAdmissionPolicy needs Kubernetes >= 1.30")),
        "{old}"
    );
    // deploy/manifests is the chart with its defaults, as helm renders it (but for helm's own
    // labels and the settings checksum).
    let rendered = plane
        .helm(&["template", "mig-autoscaler", CHART, "--namespace", NAMESPACE])
        .unwrap();
    let manifests = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/manifests/mig-autoscaler.yaml"
    ))
    .unwrap();
    assert_eq!(objects(&rendered), objects(&manifests));

    let everyone_default = rules(&as_service_account(&plane, "nobody"), "default").await;
    let everyone_ours = rules(&as_service_account(&plane, "nobody"), NAMESPACE).await;
    let everyone_operator = rules(&as_service_account(&plane, "nobody"), "gpu-operator").await;
    let granted = |all: BTreeSet<String>, base: &BTreeSet<String>| -> BTreeSet<String> {
        all.difference(base).cloned().collect()
    };
    let controller = as_service_account(&plane, "mig-autoscaler-controller");
    let cluster_wide = set(&[
        "get nodes",
        "list nodes",
        "watch nodes",
        "patch nodes",
        "get pods",
        "list pods",
        "watch pods",
        "create pods/eviction",
        "get policy/poddisruptionbudgets",
        "list policy/poddisruptionbudgets",
        "watch policy/poddisruptionbudgets",
        "create events.k8s.io/events",
        "patch events.k8s.io/events",
        "create authentication.k8s.io/tokenreviews",
        "create authorization.k8s.io/subjectaccessreviews",
    ]);
    assert_eq!(
        granted(rules(&controller, "default").await, &everyone_default),
        cluster_wide,
        "controller, cluster-wide"
    );
    let mut in_ours = cluster_wide.clone();
    in_ours.extend(set(&[
        "create coordination.k8s.io/leases",
        "get coordination.k8s.io/leases/mig-autoscaler",
        "update coordination.k8s.io/leases/mig-autoscaler",
        "patch coordination.k8s.io/leases/mig-autoscaler",
    ]));
    assert_eq!(
        granted(rules(&controller, NAMESPACE).await, &everyone_ours),
        in_ours,
        "controller, in its namespace"
    );
    let mut in_operator = cluster_wide.clone();
    in_operator.extend(set(&[
        "get configmaps/mig-autoscaler-mig-parted-config",
        "list configmaps/mig-autoscaler-mig-parted-config",
        "watch configmaps/mig-autoscaler-mig-parted-config",
        "update configmaps/mig-autoscaler-mig-parted-config",
    ]));
    assert_eq!(
        granted(rules(&controller, "gpu-operator").await, &everyone_operator),
        in_operator,
        "controller, in the GPU operator's namespace"
    );
    let agent = as_service_account(&plane, "mig-autoscaler-agent");
    let agent_all = set(&[
        "get nodes",
        "list nodes",
        "patch nodes",
        "get pods",
        "list pods",
        "create events.k8s.io/events",
        "patch events.k8s.io/events",
    ]);
    for (ns, base) in [
        ("default", &everyone_default),
        (NAMESPACE, &everyone_ours),
        ("gpu-operator", &everyone_operator),
    ] {
        assert_eq!(granted(rules(&agent, ns).await, base), agent_all, "agent in {ns}");
    }
}

/// Node `name`, as the GPU operator leaves a MIG node (no kubelet runs it here).
fn node(name: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"nvidia.com/mig.config": "all-1g.10gb"}},
    }))
    .unwrap()
}

/// The token of the agent pod on `node`: bound to the pod, so it names the node.
async fn agent_token(admin: &Client, node: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("agent-{node}")},
        "spec": {
            "serviceAccountName": "mig-autoscaler-agent",
            "nodeName": node,
            "containers": [{"name": "agent", "image": "mig-autoscaler"}],
        },
    }))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {
            "audiences": [],
            "expirationSeconds": 3600,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod.metadata.name, "uid": pod.metadata.uid},
        },
    }))
    .unwrap();
    let sa: Api<ServiceAccount> = Api::namespaced(admin.clone(), NAMESPACE);
    let issued = sa
        .create_token_request("mig-autoscaler-agent", &PostParams::default(), &request)
        .await
        .unwrap();
    issued.status.unwrap().token.unwrap()
}

/// The chart's per-node admission policy, type-checked and enforced by the real API server: an
/// agent's own token (bound to its pod, naming its node) is refused what fault-suite s14 shows the
/// emulator refusing, and allowed what an agent writes; it cannot evict at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_confines_an_agent_to_its_own_node() {
    let Some(plane) = installed() else { return };
    let admin = plane.admin();
    let nodes: Api<Node> = Api::all(admin.clone());
    for n in ["gpu-a", "gpu-b"] {
        nodes.create(&PostParams::default(), &node(n)).await.unwrap();
    }
    // The policy compiled cleanly (no type-checking warnings on it).
    let policy = plane
        .kubectl(&[
            "get",
            "validatingadmissionpolicy",
            "mig-autoscaler-agent-own-node",
            "-o",
            "jsonpath={.status.typeChecking}",
        ])
        .unwrap();
    assert!(!policy.contains("warning"), "type checking: {policy}");

    let token = agent_token(&admin, "gpu-a").await;
    let rogue: Api<Node> = Api::all(plane.client_with_token(&token));
    let pp = PatchParams::default();
    // A new policy takes effect once the API server has loaded it (within seconds): wait for it
    // with a dry run of the first attack (admission runs on dry runs; nothing is written).
    let attacks = agent_attacks("gpu-a", "gpu-b");
    let started = std::time::Instant::now();
    let dry = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    while rogue
        .patch(&attacks[0].1, &dry, &Patch::Merge(&attacks[0].2))
        .await
        .is_ok()
    {
        assert!(started.elapsed().as_secs() < 30, "the policy never took effect");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    eprintln!(
        "the admission policy took effect {:?} after helm install returned",
        started.elapsed()
    );
    for (what, node, patch) in attacks {
        match rogue.patch(&node, &pp, &Patch::Merge(&patch)).await {
            Err(kube::Error::Api(s)) if s.code == 403 => assert!(
                s.message.contains("mig-autoscaler agent"),
                "{what}: refused, but not by our policy: {}",
                s.message
            ),
            other => panic!("{what} was not refused: {other:?}"),
        }
    }
    for patch in agent_writes(&nodes.get("gpu-a").await.unwrap()) {
        rogue
            .patch("gpu-a", &pp, &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("{patch}: {e}"));
    }
    // No eviction at all (RBAC).
    let eviction = json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "agent-gpu-a", "namespace": NAMESPACE}});
    let evicted = Api::<Pod>::namespaced(plane.client_with_token(&token), NAMESPACE)
        .create_subresource::<_, serde_json::Value>(
            "eviction",
            "agent-gpu-a",
            &PostParams::default(),
            &eviction,
        )
        .await;
    assert!(
        matches!(&evicted, Err(kube::Error::Api(s)) if s.code == 403),
        "an agent evicted a pod: {evicted:?}"
    );
}

/// The chart's mig-parted ConfigMap (a copy of the GPU operator's), and the default
/// ServiceAccount pods get (no controller-manager runs here to make it).
async fn workloads_and_mig_parted_config(admin: &Client) {
    let mut config_map: k8s_openapi::api::core::v1::ConfigMap =
        serde_json::from_value(kube_emulator::fleet::default_mig_parted_config_map()).unwrap();
    config_map.metadata.name = Some(MIG_PARTED_CONFIG.rsplit('/').next().unwrap().into());
    let default_sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
    Api::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &default_sa)
        .await
        .unwrap();
    Api::namespaced(admin.clone(), "gpu-operator")
        .create(&PostParams::default(), &config_map)
        .await
        .unwrap();
}

/// A pod's phase, `None` once it is gone.
async fn phase(pods: &Api<Pod>, name: &str) -> Option<String> {
    pods.get_opt(name).await.unwrap().and_then(|p| p.status?.phase)
}

/// Who holds the controller's Lease, as `kubectl` says.
fn lease_holder(plane: &ControlPlane) -> String {
    plane
        .kubectl(&[
            "get",
            "lease",
            "mig-autoscaler",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .unwrap()
}

/// The controller's identity as the chart's ServiceAccount token would authenticate it.
fn controller_identity(plane: &ControlPlane) -> Client {
    as_service_account(plane, "mig-autoscaler-controller")
}

/// The controller, with only the chart's permissions, on the real server: its reflectors sync,
/// it takes the Lease, plans a pending 3g pod onto a node of seven 1g slices (as an agent's
/// report describes it), explains it with an Event `kubectl describe` shows, and in dry-run
/// writes nothing to the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_plans_in_dry_run_with_only_the_charts_permissions() {
    use mig_controller::settings::Mode;
    use mig_planner::snapshot::Gpu;
    use mig_protocol::{NodeReport, REPORT_ANNOTATION};
    use mig_testbed::harness::{H100, SEVEN_1G, fast_settings, get_json, mig_pod};

    let Some(plane) = installed() else { return };
    let admin = plane.admin();
    workloads_and_mig_parted_config(&admin).await;
    // A node as its agent reports it: one H100 as seven 1g.10gb.
    let catalog = mig_catalog::Catalog::embedded();
    let model = catalog.lookup(H100).unwrap();
    let report = NodeReport {
        observed_at: jiff::Timestamp::now().to_string(),
        gpus: vec![Gpu::from_layout(
            model,
            H100,
            0,
            &model.parse_layout(SEVEN_1G).unwrap(),
            |_| vec![],
        )],
        backend: None,
    };
    let mut n = node("gpu-a");
    n.metadata.annotations = Some(
        [(
            REPORT_ANNOTATION.to_string(),
            serde_json::to_string(&report).unwrap(),
        )]
        .into(),
    );
    let nodes: Api<Node> = Api::all(admin.clone());
    nodes.create(&PostParams::default(), &n).await.unwrap();
    // A new Node gets node.kubernetes.io/not-ready until a kubelet reports it Ready (none runs
    // here; the planner rightly places nothing on it): as if it had.
    nodes
        .patch(
            "gpu-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": null}})),
        )
        .await
        .unwrap();
    let before = nodes.get("gpu-a").await.unwrap().metadata.resource_version;
    Api::<Pod>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &mig_pod("wants-3g", "3g.40gb", "1"))
        .await
        .unwrap();

    let mut settings = fast_settings(Mode::DryRun);
    settings.mig_parted_config_map = MIG_PARTED_CONFIG.into();
    let c = mig_controller::start(controller_identity(&plane), settings, "replica-a".into())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let plan = loop {
        let (status, plan) = get_json(c.addr, "/api/v1/plan").await;
        // A plan from before the replica took the Lease says leader false: wait for one after.
        if status == 200 && plan["decisions"]["gpu-a"] == "dry-run" && plan["leader"] == true {
            break plan;
        }
        assert!(
            started.elapsed().as_secs() < 30,
            "no dry-run plan for gpu-a by the leader: {status} {plan}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(plan["leader"].as_bool().unwrap(), "{plan}");
    assert_eq!(lease_holder(&plane), "replica-a");
    // The Event as users read it.
    let started = std::time::Instant::now();
    loop {
        let described = plane
            .kubectl(&["describe", "pod", "wants-3g", "-n", "default"])
            .unwrap();
        if described.contains("WaitingForRepartition") && described.contains("gpu-a") {
            break;
        }
        assert!(
            started.elapsed().as_secs() < 20,
            "no Event in kubectl describe: {described}\nevents: {:?}",
            plane.kubectl(&["get", "events.events.k8s.io", "-A", "-o", "yaml"])
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Dry-run: the node is as it was.
    assert_eq!(
        nodes.get("gpu-a").await.unwrap().metadata.resource_version,
        before
    );
    c.stop().await;
}

/// Nodes simulated as API clients of the real server (kubelet, device plugin, mig-manager), with
/// the real kube-scheduler binding pods to them.
struct Simulated {
    hardware: std::sync::Arc<kube_emulator::Hardware>,
    /// Each node's agent client: the token of an agent pod bound to that node, so the chart's
    /// admission policy confines it.
    agents: Vec<(String, Client)>,
    kubelets: tokio::task::JoinHandle<()>,
}

impl Drop for Simulated {
    fn drop(&mut self) {
        self.kubelets.abort();
    }
}

/// `nodes` registered on `plane` and running, with the real kube-scheduler; with
/// `device_plugin_pods`, device-plugin pods as the GPU operator runs them (nvml backend).
async fn simulated(
    plane: &mut ControlPlane,
    nodes: Vec<kube_emulator::NodeSpec>,
    device_plugin_pods: bool,
) -> Simulated {
    plane.start_scheduler();
    let admin = plane.admin();
    workloads_and_mig_parted_config(&admin).await;
    let spec = kube_emulator::ClusterSpec {
        nodes,
        mig_parted_config_map: MIG_PARTED_CONFIG.into(),
        mig_manager_delay_ms: 200,
        device_plugin_pods,
    };
    let simulated = mig_testbed::nodes::SimulatedNodes::register(admin.clone(), &spec)
        .await
        .unwrap();
    let hardware = simulated.hardware();
    let kubelets = simulated.spawn(std::time::Duration::from_millis(100));
    let mut agents = Vec::new();
    for n in &spec.nodes {
        let token = agent_token(&admin, &n.name).await;
        agents.push((n.name.clone(), plane.client_with_token(&token)));
    }
    Simulated {
        hardware,
        agents,
        kubelets,
    }
}

/// `nodes` on `plane` (mig-manager backend) with an agent each and the controller in automatic
/// mode under the chart's identity.
async fn auto_system(
    plane: &mut ControlPlane,
    nodes: Vec<kube_emulator::NodeSpec>,
) -> (Simulated, mig_testbed::harness::SystemOnNodes) {
    let cluster = simulated(plane, nodes, false).await;
    let system = mig_testbed::harness::SystemOnNodes::start(
        cluster.hardware.clone(),
        cluster.agents.clone(),
        controller_identity(plane),
        auto_settings(),
    )
    .await;
    (cluster, system)
}

/// Automatic mode, fast, with the chart's mig-parted ConfigMap.
fn auto_settings() -> mig_controller::settings::Settings {
    let mut settings = mig_testbed::harness::fast_settings(mig_controller::settings::Mode::Auto);
    settings.mig_parted_config_map = MIG_PARTED_CONFIG.into();
    settings
}

/// Issue 16: the whole loop on the real control plane. A 3g pod waits on two nodes of seven 1g
/// slices; the controller (the chart's identity, automatic) plans and grants, the agent of the
/// chosen node (its own bound token, confined by the admission policy) taints, relabels and
/// verifies, the simulated mig-manager applies, the real kube-scheduler binds the pod once the
/// device plugin advertises a 3g, and the simulated kubelet runs it. `kubectl describe` shows the
/// pod's and the node's Events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_scheduler_runs_a_3g_pod_after_the_agents_repartition() {
    use mig_testbed::harness::{SEVEN_1G, a_3g_pod_runs_after_a_repartition, nodes};

    let Some(mut plane) = installed() else { return };
    let (cluster, system) = auto_system(&mut plane, nodes(2, 1, SEVEN_1G)).await;
    let admin = plane.admin();
    let node = a_3g_pod_runs_after_a_repartition(&admin, &cluster.hardware, 60).await;
    let other = cluster.agents.iter().find(|(n, _)| *n != node).unwrap();
    assert_eq!(
        cluster.hardware.gpus(&other.0)[0].layout.len(),
        7,
        "the other node was changed"
    );
    // The Events as users read them.
    let pod = plane
        .kubectl(&["describe", "pod", "wants-3g", "-n", "default"])
        .unwrap();
    assert!(pod.contains("WaitingForRepartition"), "{pod}");
    assert!(
        pod.contains(&format!("Successfully assigned default/wants-3g to {node}")),
        "kube-scheduler's own Event is missing: {pod}"
    );
    let described = plane.kubectl(&["describe", "node", &node]).unwrap();
    for reason in ["ReconfigurationGranted", "ReconfigurationSucceeded"] {
        assert!(described.contains(reason), "no {reason} in: {described}");
    }
    mig_testbed::harness::pods_live_and_end_as_on_a_real_server(&admin, &node).await;
    system.stop().await;
}

/// The node budget on the real server, whose watch caches lag as real ones do: three nodes of
/// seven 1g, three 7g pods waiting, a budget of one node. A watch of the server never sees two
/// nodes in flight, and every pod runs in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_budget_holds_on_the_real_server() {
    use mig_testbed::harness::{
        SEVEN_1G, SystemOnNodes, create_pod, eventually, max_in_flight, mig_pod, nodes,
    };

    let Some(mut plane) = installed() else { return };
    let cluster = simulated(&mut plane, nodes(3, 1, SEVEN_1G), false).await;
    let admin = plane.admin();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let monitor = tokio::spawn(max_in_flight(admin.clone(), stop_rx));
    let settings = auto_settings();
    assert_eq!(
        settings.budgets.max_nodes_reconfiguring,
        mig_controller::settings::Amount::Count(1)
    );
    let system = SystemOnNodes::start(
        cluster.hardware.clone(),
        cluster.agents.clone(),
        controller_identity(&plane),
        settings,
    )
    .await;
    for i in 0..3 {
        create_pod(&admin, &mig_pod(&format!("wants-7g-{i}"), "7g.80gb", "1")).await;
    }
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    eventually(90, "the three 7g pods run", || async {
        let running = pods
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        running == 3
    })
    .await;
    stop_tx.send(true).unwrap();
    let max = monitor.await.unwrap();
    assert_eq!(max, 1, "nodes in flight at once, as the server's watch saw them");
    for (node, _) in &cluster.agents {
        let gpu = &cluster.hardware.gpus(node)[0];
        assert_eq!(gpu.model.format_layout(&gpu.layout), "7g.80gb@0", "{node}");
    }
    system.stop().await;
}

/// The PodDisruptionBudget's status as kube-controller-manager's disruption controller writes it
/// (it does not run here): one healthy pod, one disruption allowed, computed for the budget's
/// current generation, or (`caught_up` false) for the one before, as while the controller has not
/// yet looked at an edit of the budget.
async fn disruption_controller_says(admin: &Client, caught_up: bool) {
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), "default");
    let generation = pdbs.get("protect").await.unwrap().metadata.generation.unwrap();
    let observed = if caught_up { generation } else { generation - 1 };
    let status = json!({"status": {"observedGeneration": observed, "disruptionsAllowed": 1,
        "currentHealthy": 1, "desiredHealthy": 0, "expectedPods": 1}});
    pdbs.patch_status("protect", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// Eviction, PDBs, Lease failover and kills mid-sequence on the real server. One node of seven 1g,
/// one of them running a pod a PDB covers; a higher-priority 7g pod can run only if it goes. Two
/// controller replicas. The budget's status says one disruption is allowed, but for the budget's
/// previous generation (just edited, not yet seen by the disruption controller): the planner plans
/// the eviction and the real server refuses it (429). The leader says so (Event, metric) and keeps
/// asking. Then the leader and the agent are killed mid-drain (no cleanup, Lease not released);
/// the other replica takes the Lease, a new agent resumes the sequence, and once the disruption
/// controller has caught up the pod is evicted through the Eviction API, the GPU is rebuilt, and
/// kube-scheduler binds the 7g pod. Nothing is left tainted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdb_refusal_waits_and_a_killed_leader_and_agent_hand_over_mid_drain() {
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use mig_protocol::TAINT_KEY;
    use mig_testbed::harness::{SEVEN_1G, events, eventually, mig_pod, nodes};
    use std::time::Duration;

    let Some(mut plane) = installed() else { return };
    let cluster = simulated(&mut plane, nodes(1, 1, SEVEN_1G), false).await;
    let admin = plane.admin();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    // The protected pod, scheduled by kube-scheduler and run by the simulated kubelet.
    let mut victim = mig_pod("victim", "1g.10gb", "1");
    victim.metadata.labels = Some([("app".to_string(), "protected".to_string())].into());
    victim.spec.as_mut().unwrap().termination_grace_period_seconds = Some(1);
    pods.create(&PostParams::default(), &victim).await.unwrap();
    eventually(20, "the protected pod runs", || async {
        phase(&pods, "victim").await.as_deref() == Some("Running")
    })
    .await;
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "protect"},
        "spec": {"selector": {"matchLabels": {"app": "protected"}}, "maxUnavailable": 1},
    }))
    .unwrap();
    Api::<PodDisruptionBudget>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &pdb)
        .await
        .unwrap();
    disruption_controller_says(&admin, false).await;
    let high: k8s_openapi::api::scheduling::v1::PriorityClass =
        serde_json::from_value(json!({"metadata": {"name": "high"}, "value": 1000})).unwrap();
    Api::all(admin.clone())
        .create(&PostParams::default(), &high)
        .await
        .unwrap();

    let (node, agent_client) = cluster.agents[0].clone();
    let start_agent = || {
        let mut s = mig_agent::AgentSettings::new(node.clone());
        s.tick = Duration::from_millis(100);
        s.sequence.drain_timeout = jiff::SignedDuration::from_secs(120);
        let source = std::sync::Arc::new(mig_testbed::EmulatedGpus::new(
            cluster.hardware.clone(),
            node.clone(),
        ));
        mig_agent::start(agent_client.clone(), s, source)
    };
    let agent = start_agent().await.unwrap();
    let mut settings = auto_settings();
    settings.planner.drain = mig_planner::DrainPolicy::Allowed;
    let mut replicas = BTreeMap::new();
    for name in ["replica-a", "replica-b"] {
        let c = mig_controller::start(controller_identity(&plane), settings.clone(), name.into())
            .await
            .unwrap();
        replicas.insert(name, c);
    }
    let mut wants = mig_pod("wants-7g", "7g.80gb", "1");
    wants.spec.as_mut().unwrap().priority_class_name = Some("high".into());
    pods.create(&PostParams::default(), &wants).await.unwrap();

    // The real server refuses the eviction; the leader says so and keeps the node draining.
    eventually(30, "an EvictionBlockedByPDB Event naming the pod", || async {
        events(&admin, "default")
            .await
            .iter()
            .any(|(who, reason, note, kind)| {
                *who == node
                    && reason == "EvictionBlockedByPDB"
                    && kind == "Warning"
                    && note.contains("default/victim")
            })
    })
    .await;
    let holder = || lease_holder(&plane);
    let leader = holder();
    let follower = if leader == "replica-a" {
        "replica-b"
    } else {
        "replica-a"
    };
    assert!(replicas[leader.as_str()].shared.metrics.eviction_count("blocked") >= 1);
    assert_eq!(phase(&pods, "victim").await.as_deref(), Some("Running"));

    let state: mig_protocol::NodeState = serde_json::from_str(
        &Api::<Node>::all(admin.clone())
            .get(&node)
            .await
            .unwrap()
            .metadata
            .annotations
            .unwrap()[mig_protocol::STATE_ANNOTATION],
    )
    .unwrap();
    assert_eq!(state.phase, mig_protocol::Phase::Draining, "{state:?}");
    // Kill the leader and the agent mid-drain; a new agent starts.
    replicas.remove(leader.as_str()).unwrap().kill();
    agent.kill();
    let agent = start_agent().await.unwrap();
    eventually(30, "the other replica holds the Lease", || async {
        holder() == follower
    })
    .await;
    // The disruption controller catches up: the eviction goes through, the 7g pod runs.
    disruption_controller_says(&admin, true).await;
    eventually(60, "the 7g pod runs", || async {
        phase(&pods, "wants-7g").await.as_deref() == Some("Running")
    })
    .await;
    assert_eq!(
        phase(&pods, "victim").await,
        None,
        "the protected pod was evicted, not left"
    );
    let survivor = replicas.remove(follower).unwrap();
    assert!(survivor.shared.metrics.eviction_count("evicted") >= 1);
    let n = Api::<Node>::all(admin.clone()).get(&node).await.unwrap();
    let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
    assert!(taints.iter().all(|t| t.key != TAINT_KEY), "{taints:?}");
    let gpu = &cluster.hardware.gpus(&node)[0];
    assert_eq!(gpu.model.format_layout(&gpu.layout), "7g.80gb@0");
    survivor.stop().await;
    agent.stop().await;
}

/// The uid of the device-plugin pod on `node`, once it runs.
async fn running_device_plugin(admin: &Client, node: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), kube_emulator::cluster::DEVICE_PLUGIN_NAMESPACE);
    let name = kube_emulator::cluster::device_plugin_pod_name(node);
    let running = || async {
        pods.get_opt(&name).await.unwrap().filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
    };
    mig_testbed::harness::eventually(20, "the device plugin runs", || async {
        running().await.is_some()
    })
    .await;
    running().await.and_then(|p| p.metadata.uid).unwrap()
}

/// Issue 16: the nvml backend on the real server, as the fault suite's s11 on the emulator. One
/// GPU of seven 1g, one of them running `keep`; draining is not allowed, so only the nvml backend
/// can make a 3g here. The agent (its bound token, confined by the admission policy) turns the
/// GPU operator's device plugin off with `nvidia.com/gpu.deploy.device-plugin`, waits until its
/// pod is gone, destroys only free 1g instances, creates the 3g and turns the plugin on again; the
/// new plugin advertises the 3g, kube-scheduler binds the pod and the kubelet runs it. `keep` is
/// never evicted and keeps its instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nvml_backend_repartitions_around_a_running_pod_on_the_real_server() {
    use mig_testbed::harness::{SEVEN_1G, SystemOnNodes, create_pod, eventually, mig_pod, nodes};

    let Some(mut plane) = installed() else { return };
    let cluster = simulated(&mut plane, nodes(1, 1, SEVEN_1G), true).await;
    let admin = plane.admin();
    let node = cluster.agents[0].0.clone();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let plugin_before = running_device_plugin(&admin, &node).await;
    create_pod(&admin, &mig_pod("keep", "1g.10gb", "1")).await;
    eventually(20, "keep runs", || async {
        phase(&pods, "keep").await.as_deref() == Some("Running")
    })
    .await;
    let keep_uid = pods.get("keep").await.unwrap().metadata.uid;
    let keep_at = cluster.hardware.gpus(&node)[0].used.clone();
    assert_eq!(keep_at.len(), 1, "{keep_at:?}");

    let mut settings = auto_settings();
    settings.planner.backend = mig_planner::Backend::Nvml;
    let system = SystemOnNodes::start(
        cluster.hardware.clone(),
        cluster.agents.clone(),
        controller_identity(&plane),
        settings,
    )
    .await;
    create_pod(&admin, &mig_pod("wants-3g", "3g.40gb", "1")).await;
    eventually(60, "the 3g pod runs", || async {
        phase(&pods, "wants-3g").await.as_deref() == Some("Running")
    })
    .await;

    let keep = pods.get("keep").await.unwrap();
    assert_eq!(keep.metadata.uid, keep_uid, "keep was replaced");
    assert!(
        keep.metadata.deletion_timestamp.is_none(),
        "keep is being deleted"
    );
    let gpu = cluster.hardware.gpus(&node)[0].clone();
    for (instance, pod) in &keep_at {
        assert!(gpu.layout.contains(instance), "keep's instance was destroyed");
        assert_eq!(gpu.used.get(instance), Some(pod));
    }
    assert!(
        gpu.model.format_layout(&gpu.layout).contains("3g.40gb"),
        "{}",
        gpu.model.format_layout(&gpu.layout)
    );
    assert_eq!(system.controller.shared.metrics.eviction_count("evicted"), 0);
    assert_ne!(
        running_device_plugin(&admin, &node).await,
        plugin_before,
        "the device plugin was not restarted"
    );
    let n = Api::<Node>::all(admin.clone()).get(&node).await.unwrap();
    let labels = n.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get(kube_emulator::cluster::DEVICE_PLUGIN_DEPLOY_LABEL)
            .map(String::as_str),
        Some("true"),
        "the device plugin was left off"
    );
    let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
    assert!(
        taints.iter().all(|t| t.key != mig_protocol::TAINT_KEY),
        "{taints:?}"
    );
    let state: mig_protocol::NodeState =
        serde_json::from_str(&n.metadata.annotations.unwrap()[mig_protocol::STATE_ANNOTATION]).unwrap();
    assert_eq!(state.phase, mig_protocol::Phase::Done, "{state:?}");
    assert_eq!(state.previous_layouts.get(&0).map(String::as_str), Some(SEVEN_1G));
    let described = plane.kubectl(&["describe", "node", &node]).unwrap();
    assert!(described.contains("ReconfigurationSucceeded"), "{described}");
    system.stop().await;
}

/// Issue 17: reservations by attrition on the real control plane: the controller's RBAC lets it
/// annotate and taint the reserved node, the real kube-scheduler keeps new pods off it, and the
/// 7g pod runs there once the GPU empties (the scenario in `mig_testbed::harness`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_node_takes_no_new_pods_from_kube_scheduler_until_its_large_pod_runs() {
    use mig_testbed::harness::{SEVEN_1G, a_large_pod_gets_a_reserved_gpu_and_runs_there, nodes};

    let Some(mut plane) = installed() else { return };
    let (_cluster, system) = auto_system(&mut plane, nodes(2, 1, SEVEN_1G)).await;
    let admin = plane.admin();
    a_large_pod_gets_a_reserved_gpu_and_runs_there(&admin, system.controller.addr, 60).await;
    let described = plane
        .kubectl(&["describe", "pod", "big", "-n", "default"])
        .unwrap();
    assert!(described.contains("GpusReserved"), "{described}");
    system.stop().await;
}
