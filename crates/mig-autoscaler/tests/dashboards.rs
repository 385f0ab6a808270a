//! The Grafana dashboards in deploy/grafana and the metrics they read, checked with the real
//! Prometheus (Debian `prometheus`: `promtool` and the server) against a running demo.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{Killed, free_addr, get, tool, wait_for};

fn dashboards() -> Vec<(String, Value)> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/grafana"));
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            (
                p.display().to_string(),
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(out.len(), 2, "two dashboards");
    out
}

/// Every PromQL expression, with Grafana's variables substituted for a query.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (file, d) in dashboards() {
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                let q = expr
                    .replace("$__rate_interval", "1m")
                    .replace("\"$node\"", "\".*\"")
                    .replace("\"$gpu\"", "\".*\"")
                    .replace("\"$profile\"", "\".*\"");
                out.push((format!("{file}: {}", p["title"].as_str().unwrap()), q));
            }
        }
    }
    out
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("mig_autoscaler_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn dashboards_follow_the_conventions() {
    for (file, d) in dashboards() {
        assert!(d["id"].is_null(), "{file}: id must be null");
        assert!(
            d["uid"]
                .as_str()
                .is_some_and(|u| u.starts_with("mig-autoscaler-")),
            "{file}: fixed uid"
        );
        assert!(
            d["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{file}: title"
        );
        assert!(!d["tags"].as_array().unwrap().is_empty(), "{file}: tags");
        assert!(
            d["schemaVersion"].as_u64().is_some(),
            "{file}: pinned schemaVersion"
        );
        let vars = d["templating"]["list"].as_array().unwrap();
        let ds = vars
            .iter()
            .find(|v| v["name"] == "datasource")
            .unwrap_or_else(|| panic!("{file}: datasource variable"));
        assert_eq!(ds["type"], "datasource");
        assert_eq!(ds["query"], "prometheus");
        assert_eq!(ds["label"], "Data source");
        for p in d["panels"].as_array().unwrap() {
            let title = p["title"].as_str().unwrap_or_default();
            assert!(!title.is_empty(), "{file}: a panel without a title");
            assert!(
                p["description"].as_str().is_some_and(|s| !s.is_empty()),
                "{file}: {title}: description"
            );
            assert!(
                p["fieldConfig"]["defaults"]["unit"].as_str().is_some(),
                "{file}: {title}: unit"
            );
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{file}: {title}: datasource"
            );
            for t in p["targets"].as_array().unwrap() {
                assert_eq!(
                    t["datasource"]["uid"], "${datasource}",
                    "{file}: {title}: target datasource"
                );
                let expr = t["expr"].as_str().unwrap();
                for m in metric_names(expr) {
                    if m.ends_with("_total") || m.ends_with("_bucket") {
                        let i = expr.find(&m).unwrap();
                        let before = &expr[..i];
                        assert!(
                            before.rfind("rate(").max(before.rfind("increase(")).is_some(),
                            "{file}: {title}: counter {m} outside rate()/increase()"
                        );
                        assert!(
                            expr.contains("[$__rate_interval]"),
                            "{file}: {title}: use $__rate_interval"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn dashboard_expressions_are_valid_promql() {
    if !tool("promtool") {
        return;
    }
    let mut rules = String::from("groups:\n  - name: dashboards\n    rules:\n");
    for (i, (_, expr)) in expressions().iter().enumerate() {
        rules.push_str(&format!(
            "      - record: mig_autoscaler:dashboard_check_{i}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    let file = std::env::temp_dir().join(format!("mig-autoscaler-rules-{}.yaml", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn demo(addr: &str) -> Killed {
    Killed(
        Command::new(env!("CARGO_BIN_EXE_mig-autoscaler"))
            .args([
                "demo",
                "--listen",
                addr,
                "--nodes",
                "2",
                "--gpus-per-node",
                "2",
                "--arrival-seconds",
                "0.7",
            ])
            .args(["--duration", "180", "--seed", "3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn the_scrape_passes_promtool_and_feeds_every_dashboard_query() {
    if !tool("promtool") || !tool("prometheus") {
        return;
    }
    let web = free_addr();
    let _demo = demo(&web);
    // Wait for a plan over reported GPUs: then every family has series.
    let started = Instant::now();
    let scrape = loop {
        let s = wait_for(&web, "/metrics", 60);
        if s.contains("mig_autoscaler_gpu_instances{") {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no GPU layouts in the metrics"
        );
        std::thread::sleep(Duration::from_millis(300));
    };

    // promtool's linter on the exposition.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Both ways: every metric a dashboard reads is exported, every exported family is on a dashboard.
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    let family = |m: &str| {
        ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| m.strip_suffix(s).filter(|b| exported.contains(*b)))
            .map_or(m.to_string(), str::to_string)
    };
    let used: BTreeSet<String> = expressions()
        .iter()
        .flat_map(|(_, e)| metric_names(e))
        .map(|m| family(&m))
        .collect();
    for m in &used {
        assert!(
            exported.contains(m),
            "a dashboard reads {m}, which is not exported"
        );
    }
    let not_on_dashboards = [
        "mig_autoscaler_build_info",
        "mig_autoscaler_caches_synced",
        "mig_autoscaler_plan_pods",
        "mig_autoscaler_last_plan_timestamp_seconds",
    ];
    for m in &exported {
        assert!(
            used.contains(m) || not_on_dashboards.contains(&m.as_str()),
            "{m} is exported but on no dashboard"
        );
    }

    // A real Prometheus scrapes the demo; every dashboard query returns data.
    let prom = free_addr();
    let dir = std::env::temp_dir().join(format!("mig-autoscaler-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: mig-autoscaler\n    static_configs:\n      - targets: ['{web}']\n"),
    )
    .unwrap();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&prom, "/-/ready", 60);
    let started = Instant::now();
    let mut empty: Vec<String> = Vec::new();
    loop {
        empty.clear();
        for (what, expr) in expressions() {
            let q: String = expr
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            let (status, body) = get(&prom, &format!("/api/v1/query?query={q}")).unwrap();
            assert_eq!(status, 200, "{what}: {expr}: {body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["status"], "success", "{what}: {body}");
            if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                empty.push(format!("{what}: {expr}"));
            }
        }
        if empty.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "queries without data:\n{}",
            empty.join("\n")
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!(
        "every dashboard query returned data after {:?}",
        started.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
