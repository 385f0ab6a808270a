//! deploy/: the Helm chart and the plain manifests. There is no `helm` binary on our machines
//! (Debian has none), so these tests check what can be checked without rendering: the manifests are
//! valid typed objects with least-privilege RBAC and readable settings; every chart value is
//! documented and every value a template reads exists; and the manifests equal the chart's defaults
//! where it matters (RBAC rules, container args, env, ports, probes, settings, dashboards).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn manifests() -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&read("deploy/manifests/mig-autoscaler.yaml"))
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .collect()
}

use serde::Deserialize;

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
}

fn values() -> serde_yaml::Value {
    serde_yaml::from_str(&read("deploy/helm/mig-autoscaler/values.yaml")).unwrap()
}

fn value_at(v: &serde_yaml::Value, path: &str) -> Option<serde_yaml::Value> {
    path.split('.').try_fold(v.clone(), |v, k| v.get(k).cloned())
}

/// The default rendering of simple template expressions (what the chart yields with defaults,
/// release "mig-autoscaler" in namespace "mig-autoscaler").
fn render_simple(line: &str) -> String {
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/helm/mig-autoscaler/Chart.yaml")).unwrap();
    let v = values();
    let image = format!(
        "{}:{}",
        v["image"]["repository"].as_str().unwrap(),
        chart["appVersion"].as_str().unwrap()
    );
    let cm = v["settings"]["migPartedConfigMap"].as_str().unwrap();
    let mut out = line
        .replace("{{ include \"mig-autoscaler.fullname\" . }}", "mig-autoscaler")
        .replace("{{ include \"mig-autoscaler.image\" . }}", &image)
        .replace("{{ .Release.Namespace }}", "mig-autoscaler")
        .replace("{{ $cm._0 }}", cm.split('/').next().unwrap())
        .replace("{{ $cm._1 }}", cm.split('/').nth(1).unwrap());
    while let Some(i) = out.find("{{ .Values.") {
        let j = out[i..].find(" }}").unwrap() + i;
        let path = &out[i + 11..j];
        let scalar = match value_at(&v, path).unwrap_or_else(|| panic!("no value {path}")) {
            serde_yaml::Value::String(s) => s,
            other => serde_yaml::to_string(&other).unwrap().trim().to_string(),
        };
        out.replace_range(i..j + 3, &scalar);
    }
    out
}

#[test]
fn manifests_are_valid_objects_with_least_privilege() {
    let docs = manifests();
    for d in &docs {
        let kind = d["kind"].as_str().unwrap();
        let ok = match kind {
            "ServiceAccount" => serde_json::from_value::<ServiceAccount>(d.clone()).is_ok(),
            "ClusterRole" => serde_json::from_value::<ClusterRole>(d.clone()).is_ok(),
            "ClusterRoleBinding" => serde_json::from_value::<ClusterRoleBinding>(d.clone()).is_ok(),
            "Role" => serde_json::from_value::<Role>(d.clone()).is_ok(),
            "RoleBinding" => serde_json::from_value::<RoleBinding>(d.clone()).is_ok(),
            "ConfigMap" => serde_json::from_value::<ConfigMap>(d.clone()).is_ok(),
            "Deployment" => serde_json::from_value::<Deployment>(d.clone()).is_ok(),
            "DaemonSet" => serde_json::from_value::<DaemonSet>(d.clone()).is_ok(),
            "Service" => serde_json::from_value::<Service>(d.clone()).is_ok(),
            "PodDisruptionBudget" => serde_json::from_value::<PodDisruptionBudget>(d.clone()).is_ok(),
            "NetworkPolicy" => serde_json::from_value::<NetworkPolicy>(d.clone()).is_ok(),
            "ValidatingAdmissionPolicy" => {
                serde_json::from_value::<ValidatingAdmissionPolicy>(d.clone()).is_ok()
            }
            "ValidatingAdmissionPolicyBinding" => {
                serde_json::from_value::<ValidatingAdmissionPolicyBinding>(d.clone()).is_ok()
            }
            other => panic!("unexpected kind {other}"),
        };
        assert!(ok, "{kind} {} does not parse", d["metadata"]["name"]);
    }
    // The settings the controller will read are valid settings.
    let cm = find(&docs, "ConfigMap", "mig-autoscaler-settings");
    let settings =
        mig_controller::Settings::from_yaml(cm["data"]["settings.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(settings.mode, mig_controller::Mode::DryRun, "start in dry-run");

    // Least privilege: evict, never delete; patch nodes, never update or delete them; no wildcards.
    let mut evictors = Vec::new();
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        let name = d["metadata"]["name"].as_str().unwrap();
        for r in d["rules"].as_array().unwrap() {
            let verbs: Vec<&str> = r["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let resources: Vec<&str> = r["resources"]
                .as_array()
                .or(r["nonResourceURLs"].as_array())
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert!(
                !verbs.contains(&"*") && !resources.contains(&"*"),
                "{name}: wildcard"
            );
            assert!(
                !verbs.contains(&"delete") && !verbs.contains(&"deletecollection"),
                "{name}: delete"
            );
            if resources.contains(&"nodes") {
                assert!(
                    !verbs.contains(&"update"),
                    "{name}: nodes are patched, never updated"
                );
            }
            if resources.contains(&"pods/eviction") {
                // RBAC cannot limit an agent to its own node's pods: a compromised node could
                // evict any pod in the cluster. The controller evicts what it granted.
                evictors.push(name.to_string());
            }
            if resources.contains(&"configmaps") {
                assert!(
                    r["resourceNames"].as_array().is_some_and(|n| n.len() == 1),
                    "{name}: one ConfigMap only"
                );
            }
        }
    }
    assert_eq!(
        evictors,
        ["mig-autoscaler-controller"],
        "only the controller evicts"
    );
}

#[test]
fn every_chart_value_is_documented_and_every_template_value_exists() {
    let text = read("deploy/helm/mig-autoscaler/values.yaml");
    let lines: Vec<&str> = text.lines().collect();
    // (indent, documented) of the enclosing keys: a documented parent documents its children
    // (helm-docs reads it that way).
    let mut stack: Vec<(usize, bool)> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') || t.starts_with('-') {
            continue;
        }
        let Some((key, rest)) = t.split_once(':') else {
            continue;
        };
        let indent = line.len() - t.len();
        while stack.last().is_some_and(|(d, _)| *d >= indent) {
            stack.pop();
        }
        let prev = lines[..i]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or(&"");
        let documented = prev.trim_start().starts_with("# --") || stack.iter().any(|(_, d)| *d);
        if rest.trim().is_empty() {
            stack.push((indent, documented));
            continue; // a parent key: documented itself or through its children
        }
        assert!(documented, "values.yaml: {key} has no `# --` comment");
    }
    let v = values();
    let dir = root().join("deploy/helm/mig-autoscaler/templates");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find(".Values.") {
            let tail = &rest[i + 8..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_'))
                .unwrap_or(tail.len());
            let key = tail[..end].trim_end_matches('.');
            assert!(
                value_at(&v, key).is_some(),
                "{}: .Values.{key} is not in values.yaml",
                path.display()
            );
            rest = &tail[end..];
        }
    }
}

fn template_docs(file: &str) -> Vec<String> {
    read(&format!("deploy/helm/mig-autoscaler/templates/{file}"))
        .split("\n---")
        .map(str::to_string)
        .collect()
}

/// The `rules:` of a Role/ClusterRole template document, rendered with defaults.
fn template_rules(doc: &str) -> Vec<PolicyRule> {
    let body = doc.split("\nrules:\n").nth(1).unwrap();
    let yaml: String = body
        .lines()
        .filter(|l| !l.contains("{{-") && !l.trim_start().starts_with('#'))
        .map(|l| render_simple(l) + "\n")
        .collect();
    serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

#[test]
fn the_manifests_are_the_chart_with_its_defaults() {
    let docs = manifests();
    // RBAC rules, role by role.
    let mut roles = 0;
    for doc in template_docs("rbac.yaml") {
        let kind = if doc.contains("\nkind: ClusterRole\n") {
            "ClusterRole"
        } else if doc.contains("\nkind: Role\n") {
            "Role"
        } else {
            continue;
        };
        let name_line = doc
            .lines()
            .find(|l| l.trim_start().starts_with("name: "))
            .unwrap();
        let name = render_simple(name_line.trim_start().trim_start_matches("name: "));
        let want: Vec<PolicyRule> = template_rules(&doc);
        let got: Vec<PolicyRule> = serde_json::from_value(find(&docs, kind, &name)["rules"].clone()).unwrap();
        assert_eq!(
            got, want,
            "{kind} {name}: rules differ between chart and manifests"
        );
        roles += 1;
    }
    assert_eq!(roles, 6);

    // Containers: args, env names, ports, probe paths.
    for (file, kind, name) in [
        ("controller.yaml", "Deployment", "mig-autoscaler-controller"),
        ("agent.yaml", "DaemonSet", "mig-autoscaler-agent"),
    ] {
        let text = read(&format!("deploy/helm/mig-autoscaler/templates/{file}"));
        let c: Container = serde_json::from_value(
            find(&docs, kind, name)["spec"]["template"]["spec"]["containers"][0].clone(),
        )
        .unwrap();
        let args_line = text
            .lines()
            .find(|l| l.trim_start().starts_with("args: ["))
            .unwrap();
        let args: Vec<String> =
            serde_yaml::from_str(render_simple(args_line.trim_start().trim_start_matches("args: ")).as_str())
                .unwrap();
        assert_eq!(c.args.clone().unwrap(), args, "{file}: args");
        let env_names: BTreeSet<String> = text
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("- name: "))
            .filter(|n| n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .map(str::to_string)
            .collect();
        let got: BTreeSet<String> = c.env.clone().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(got, env_names, "{file}: env");
        let port_line = text.lines().find(|l| l.contains("containerPort:")).unwrap();
        let port: i32 = render_simple(port_line)
            .trim()
            .trim_start_matches("containerPort:")
            .trim()
            .parse()
            .unwrap();
        assert_eq!(c.ports.clone().unwrap()[0].container_port, port, "{file}: port");
        for probe in ["/healthz", "/readyz"] {
            assert!(text.contains(probe));
        }
        assert_eq!(
            c.liveness_probe.unwrap().http_get.unwrap().path.as_deref(),
            Some("/healthz")
        );
        assert_eq!(
            c.readiness_probe.unwrap().http_get.unwrap().path.as_deref(),
            Some("/readyz")
        );
        let image = render_simple("{{ include \"mig-autoscaler.image\" . }}");
        assert_eq!(c.image.as_deref(), Some(image.as_str()));
    }

    // Settings: the manifests' file says what values.yaml says.
    let cm = find(&docs, "ConfigMap", "mig-autoscaler-settings");
    let s: serde_yaml::Value = serde_yaml::from_str(cm["data"]["settings.yaml"].as_str().unwrap()).unwrap();
    let v = values();
    for key in ["mode", "batching", "budgets", "planner", "migPartedConfigMap"] {
        assert_eq!(s[key], v["settings"][key], "settings.{key}");
    }
    assert_eq!(s["lease"]["duration"], v["controller"]["leaseDuration"]);
    assert_eq!(
        s["http"]["listen"].as_str().unwrap(),
        format!("0.0.0.0:{}", v["controller"]["port"].as_u64().unwrap())
    );
}

#[test]
fn the_chart_ships_the_same_dashboards() {
    for f in ["mig-layouts.json", "mig-planner.json"] {
        assert_eq!(
            read(&format!("deploy/helm/mig-autoscaler/dashboards/{f}")),
            read(&format!("deploy/grafana/{f}")),
            "deploy/helm/mig-autoscaler/dashboards/{f} differs from deploy/grafana/{f}: copy it"
        );
    }
}

/// The quoted value on the line of `text` that starts with `prefix` (`key = "value"`).
fn quoted_value<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?}"))
        .trim_matches('"')
}

/// No container engine runs on our machines, so the Dockerfile is checked, not built: it builds
/// with a Rust at least the workspace's `rust-version`, installs the native build needs that
/// scripts/env.sh names for HiGHS, builds the binary the chart runs, and runs it as the user the
/// chart's pod security context names.
#[test]
fn the_dockerfile_builds_what_the_chart_runs_as_the_user_it_names() {
    let dockerfile = read("Dockerfile");
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let version = |text: &str| -> Vec<u32> { text.split('.').map(|p| p.parse().unwrap()).collect() };
    let rust = lines
        .iter()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .and_then(|t| t.split('-').next())
        .expect("a rust builder stage");
    let cargo_toml = read("Cargo.toml");
    let msrv = quoted_value(&cargo_toml, "rust-version = ");
    assert!(
        version(rust) >= version(msrv),
        "builder rust {rust} < rust-version {msrv}"
    );
    let env = read("scripts/env.sh");
    let needs = quoted_value(&env, "export MIG_AUTOSCALER_APT_NEEDS=");
    for pair in needs.split_whitespace() {
        let package = pair.rsplit(':').next().unwrap();
        if package == "kubernetes-client" {
            continue; // kubectl: for people and tests, not for the build
        }
        assert!(
            lines
                .iter()
                .any(|l| l.contains("apt-get install") && l.split_whitespace().any(|w| w == package)),
            "the build stage does not install {package}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("cargo build --release --locked -p mig-autoscaler"))
    );
    assert!(lines.contains(&r#"ENTRYPOINT ["/usr/local/bin/mig-autoscaler"]"#));
    let uid = value_at(&values(), "podSecurityContext.runAsUser")
        .and_then(|v| v.as_u64())
        .unwrap();
    assert!(
        lines.contains(&format!("USER {uid}:{uid}").as_str()),
        "the image's user is not the chart's runAsUser {uid}"
    );
    // The chart's containers run subcommands of that entrypoint.
    for template in ["agent", "controller"] {
        let t = read(&format!("deploy/helm/mig-autoscaler/templates/{template}.yaml"));
        assert!(t.contains(&format!("args: [{template},")), "{template}.yaml");
    }
}

/// The per-node admission policy is on by default, the manifests carry the chart's, and its CEL
/// names exactly the keys the code lets an agent write (`protocol::agent_may_update_node`, which
/// the emulator enforces for every agent of the fault suite).
#[test]
fn the_agent_admission_policy_is_on_and_names_the_keys_the_code_allows() {
    assert_eq!(values()["perNodeAdmissionPolicy"], serde_yaml::Value::Bool(true));
    let chart = read("deploy/helm/mig-autoscaler/templates/admission.yaml");
    assert!(chart.contains("semverCompare \">=1.30-0\" .Capabilities.KubeVersion.Version"));
    // The chart's documents, rendered with the defaults (guards and labels aside), are the manifests'.
    let rendered: String = chart
        .lines()
        .filter(|l| !l.starts_with("{{-") && !l.contains("mig-autoscaler.labels"))
        .map(render_simple)
        .collect::<Vec<_>>()
        .join("\n");
    let docs = manifests();
    let mut compared = 0;
    for d in serde_yaml::Deserializer::from_str(&rendered) {
        let mut want = serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap();
        let name = want["metadata"]["name"].as_str().unwrap().to_string();
        let kind = want["kind"].as_str().unwrap().to_string();
        let mut got = find(&docs, &kind, &name).clone();
        for v in [&mut want, &mut got] {
            v["metadata"].as_object_mut().unwrap().remove("labels");
        }
        assert_eq!(got, want, "{kind} {name}: manifests differ from the chart");
        compared += 1;
    }
    assert_eq!(compared, 2);

    let policy = find(
        &docs,
        "ValidatingAdmissionPolicy",
        "mig-autoscaler-agent-own-node",
    );
    let variable = |name: &str| -> Vec<String> {
        let e = policy["spec"]["variables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()["expression"]
            .as_str()
            .unwrap()
            .to_string();
        e.trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|k| k.trim().trim_matches('\'').to_string())
            .collect()
    };
    use mig_protocol::{AGENT_ANNOTATIONS, AGENT_LABELS, TAINT_KEY};
    assert_eq!(variable("ownLabels"), AGENT_LABELS.map(String::from).to_vec());
    assert_eq!(
        variable("ownAnnotations"),
        AGENT_ANNOTATIONS.map(String::from).to_vec()
    );
    assert_eq!(variable("ownTaint"), vec![TAINT_KEY.to_string()]);
    assert_eq!(
        policy["spec"]["matchConditions"][0]["expression"],
        "request.userInfo.username == 'system:serviceaccount:mig-autoscaler:mig-autoscaler-agent'"
    );
}

/// The controller's API and the agents' metrics are reachable only from the release's namespace
/// and namespaces that opt in, on by default, in the chart and the manifests alike.
#[test]
fn a_network_policy_fences_the_controller_api_and_the_agents_metrics() {
    assert_eq!(
        values()["networkPolicy"]["enabled"],
        serde_yaml::Value::Bool(true)
    );
    for (component, port) in [("controller", "http"), ("agent", "metrics")] {
        fenced(component, port);
    }
    let chart = read("deploy/helm/mig-autoscaler/templates/extras.yaml");
    assert!(
        chart.contains("kind: NetworkPolicy") && chart.contains("mig-autoscaler.io/api-access: \"true\"")
    );
}

/// The manifests' NetworkPolicy for `component` admits connections to `port` only from its
/// namespace and opted-in ones.
fn fenced(component: &str, port: &str) {
    let np = find(
        &manifests(),
        "NetworkPolicy",
        &format!("mig-autoscaler-{component}"),
    )
    .clone();
    let np: NetworkPolicy = serde_json::from_value(np).unwrap();
    let spec = np.spec.unwrap();
    assert_eq!(
        spec.pod_selector
            .unwrap()
            .match_labels
            .unwrap()
            .get("app.kubernetes.io/component")
            .map(String::as_str),
        Some(component)
    );
    let ingress = spec.ingress.unwrap();
    assert_eq!(
        serde_json::to_value(&ingress[0].ports.as_ref().unwrap()[0].port).unwrap(),
        serde_json::json!(port)
    );
    let from = ingress[0].from.as_ref().unwrap();
    assert_eq!(from.len(), 2);
    let opt_in = from[1]
        .namespace_selector
        .as_ref()
        .unwrap()
        .match_labels
        .as_ref()
        .unwrap();
    assert_eq!(
        opt_in.get("mig-autoscaler.io/api-access").map(String::as_str),
        Some("true")
    );
}
