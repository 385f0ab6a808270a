//! Actuation: a granted candidate re-checked against fresh state, its mig-parted config put into
//! the ConfigMap, and the grant written on the Node (optimistically, counted in the ledger even
//! when the answer was lost).

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use mig_catalog::Catalog;
use mig_catalog::migparted::{GpuTarget, render_node_config};
use mig_planner::Plan;
use mig_protocol::{GRANT_ANNOTATION, Grant};
use serde_json::json;

use super::{CONFIG_PREFIX, ControlLoop, FIELD_MANAGER, annotation};
use crate::budget::{self, Candidate};
use crate::metrics::ResultLabel;
use crate::observe::{ClusterView, NodeView};

impl ControlLoop {
    /// Re-check a candidate against fresh state, then write the ConfigMap entry and the grant.
    pub(super) async fn grant(
        &mut self,
        plan: &Plan,
        planned: &ClusterView,
        c: &Candidate,
    ) -> Result<(), GrantError> {
        let settings = self.shared.settings.clone();
        let fresh = self.observe_now();
        let now = self.now();
        let (view, evictions) = self.still_valid(plan, planned, &fresh, c, now)?;
        let Some(node_plan) = plan.nodes.iter().find(|n| n.node == c.node) else {
            return Err(GrantError::Invalidated("not in the plan".into()));
        };
        let targets: BTreeMap<u32, String> = plan
            .gpus
            .iter()
            .filter(|g| g.node == c.node && g.changed)
            .map(|g| (g.index, g.target.clone()))
            .collect();
        if !self.shared.lease.is_leader() {
            return Err(GrantError::Invalidated("no longer the leader".into()));
        }
        if let Some(config) = &node_plan.mig_config {
            self.ensure_config(plan, &c.node, config).await?;
        }
        let window = jiff::SignedDuration::try_from(settings.budgets.eviction_window.0)
            .unwrap_or(jiff::SignedDuration::MAX);
        let mut recent: Vec<String> = view
            .recent_evictions
            .iter()
            .filter(|t| now.duration_since(**t) < window)
            .map(|t| t.to_string())
            .collect();
        recent.extend(std::iter::repeat_n(now.to_string(), evictions.len()));
        let grant = Grant {
            id: format!("{}-{}", plan.id, now.as_millisecond()),
            plan_id: plan.id.clone(),
            mig_config: node_plan.mig_config.clone(),
            targets,
            evictions: evictions.clone(),
            granted_at: now.to_string(),
            granted_by: self.shared.lease.identity().to_string(),
            recent_evictions: recent,
        };
        let written = budget::Written {
            grant_id: grant.id.clone(),
            at: now,
            evictions: vec![now; evictions.len()],
        };
        self.write_grant(plan, c, &grant, written).await
    }

    /// Whether candidate `c` of `plan` still holds on `fresh` state: the node and its GPUs as
    /// planned, within the budgets, the pods to evict still there and evictable. Its view and the
    /// evictions, or why not.
    pub(super) fn still_valid<'v>(
        &mut self,
        plan: &Plan,
        planned: &ClusterView,
        fresh: &'v ClusterView,
        c: &Candidate,
        now: Timestamp,
    ) -> Result<(&'v crate::observe::NodeView, Vec<String>), GrantError> {
        let shared = self.shared.clone();
        let settings = &shared.settings;
        let Some(view) = fresh.nodes.get(&c.node) else {
            return Err(GrantError::Invalidated("node is gone".into()));
        };
        let Some(old) = planned.nodes.get(&c.node) else {
            return Err(GrantError::Invalidated("node was not observed".into()));
        };
        if !same_gpus(view, old) {
            return Err(GrantError::Invalidated(
                "the node's GPUs changed since planning".into(),
            ));
        }
        let facts = self.budget_facts(fresh);
        let (verdicts, _) = budget::decide(
            &settings.budgets,
            now,
            fresh.managed,
            &facts,
            std::slice::from_ref(c),
        );
        if let Some((_, Err(d))) = verdicts.first() {
            return Err(GrantError::Invalidated(d.describe(&settings.budgets)));
        }
        let evictions: Vec<String> = plan
            .evictions
            .iter()
            .filter(|e| e.node == c.node)
            .map(|e| e.pod.clone())
            .collect();
        for pod in &evictions {
            let gone_or_protected = !fresh
                .snapshot
                .running_pods
                .iter()
                .any(|r| format!("{}/{}", r.namespace, r.name) == *pod && !r.do_not_disrupt);
            if gone_or_protected {
                return Err(GrantError::Invalidated(format!(
                    "pod {pod} to evict is gone or now do-not-disrupt"
                )));
            }
        }
        Ok((view, evictions))
    }

    /// Write `grant` on the node (optimistic: a changed node is a conflict, retried next round),
    /// recording it in the ledger when it landed, even if the answer was lost.
    pub(super) async fn write_grant(
        &mut self,
        plan: &Plan,
        c: &Candidate,
        grant: &Grant,
        written: budget::Written,
    ) -> Result<(), GrantError> {
        let evictions = &grant.evictions;
        let node = self
            .caches
            .nodes
            .state()
            .into_iter()
            .find(|n| n.name_any() == c.node)
            .ok_or_else(|| GrantError::Invalidated("node is gone".into()))?;
        let patch = json!({"metadata": {
            "resourceVersion": node.resource_version(),
            "annotations": {GRANT_ANNOTATION: serde_json::to_string(grant).unwrap_or_default()},
        }});
        if !self.shared.lease.is_leader() {
            return Err(GrantError::Invalidated("no longer the leader".into()));
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        match nodes
            .patch(&c.node, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.state.ledger.record(&c.node, written);
                self.shared.record_write(format!(
                    "{}: granted plan {} ({} GPU(s) to change, {} eviction(s))",
                    c.node,
                    plan.id,
                    grant.targets.len(),
                    evictions.len()
                ));
                self.shared
                    .metrics
                    .grants
                    .get_or_create(&ResultLabel { result: "written" })
                    .inc();
                self.shared
                    .metrics
                    .evictions_granted
                    .inc_by(evictions.len() as u64);
                tracing::info!(node = %c.node, plan_id = %plan.id, evictions = evictions.len(), "reconfiguration granted");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Err(GrantError::Write(
                "conflict",
                "the node changed; retried next round".into(),
            )),
            Err(e) => {
                // The write may have landed (a timeout after the server applied it): read the
                // Node back; count the grant if it is there, or if that cannot be told, until the
                // cache shows it or `grantTimeout` passes.
                let mut landed = true; // unless a read says otherwise
                for _ in 0..3 {
                    if let Ok(n) = nodes.get(&c.node).await {
                        landed = annotation::<Grant>(&n, GRANT_ANNOTATION).is_some_and(|g| g.id == grant.id);
                        break;
                    }
                }
                if !landed {
                    return Err(GrantError::Write("error", e.to_string()));
                }
                self.state.ledger.record(&c.node, written);
                Err(GrantError::Write("error", e.to_string()))
            }
        }
    }

    /// Put the node's mig-parted config into the ConfigMap; drop our entries nothing refers to.
    pub(super) async fn ensure_config(
        &mut self,
        plan: &Plan,
        node: &str,
        name: &str,
    ) -> Result<(), GrantError> {
        let catalog = Catalog::embedded();
        let mut targets = Vec::new();
        for g in plan.gpus.iter().filter(|g| g.node == node) {
            let model = catalog
                .lookup(&g.model)
                .map_err(|e| GrantError::Invalidated(e.to_string()))?;
            let layout = model
                .parse_layout(&g.target)
                .map_err(|e| GrantError::Invalidated(e.to_string()))?;
            targets.push((g.index, model, layout));
        }
        let gpus: Vec<(u32, GpuTarget<'_>)> = targets
            .iter()
            .map(|(i, model, layout)| (*i, GpuTarget::Mig { model, layout }))
            .collect();
        let rendered =
            render_node_config(&gpus).map_err(|e| GrantError::Invalidated(format!("invalid target: {e}")))?;
        if rendered.name != name {
            return Err(GrantError::Invalidated(format!(
                "config name {} differs from the plan's {name}",
                rendered.name
            )));
        }
        let (ns, cm_name) = self.shared.settings.config_map();
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let mut cm = match api.get(cm_name).await {
            Ok(cm) => cm,
            Err(e) => {
                return Err(GrantError::Write(
                    "error",
                    format!("mig-parted ConfigMap {ns}/{cm_name}: {e}"),
                ));
            }
        };
        let text = cm
            .data
            .as_ref()
            .and_then(|d| d.get("config.yaml"))
            .cloned()
            .unwrap_or_default();
        let mut doc: serde_yaml::Value = serde_yaml::from_str(&text)
            .map_err(|e| GrantError::Write("error", format!("ConfigMap {ns}/{cm_name} config.yaml: {e}")))?;
        let Some(configs) = doc.get_mut("mig-configs").and_then(|c| c.as_mapping_mut()) else {
            return Err(GrantError::Write(
                "error",
                format!("ConfigMap {ns}/{cm_name} config.yaml has no mig-configs"),
            ));
        };
        // Entries still referenced: by a node's label, by a grant, this one, and any this replica
        // wrote within `grantTimeout` (the node cache may not show their grants yet).
        let keep_written = self.shared.settings.budgets.grant_timeout.0;
        let now = self.instant();
        self.state
            .written_configs
            .retain(|_, at| now.saturating_duration_since(*at) < keep_written);
        self.state.written_configs.insert(name.to_string(), now);
        let mut referenced: BTreeSet<String> = self.state.written_configs.keys().cloned().collect();
        for n in self.caches.nodes.state() {
            if let Some(v) = n.labels().get(mig_protocol::MIG_CONFIG_LABEL) {
                referenced.insert(v.clone());
            }
            if let Some(c) = annotation::<Grant>(&n, GRANT_ANNOTATION).and_then(|g| g.mig_config) {
                referenced.insert(c);
            }
        }
        let before = configs.clone();
        configs.retain(|k, _| {
            k.as_str()
                .is_none_or(|k| !k.starts_with(CONFIG_PREFIX) || referenced.contains(k))
        });
        let entries =
            serde_yaml::to_value(&rendered.entries).map_err(|e| GrantError::Write("error", e.to_string()))?;
        configs.insert(serde_yaml::Value::String(name.to_string()), entries);
        if *configs == before {
            return Ok(());
        }
        let text = serde_yaml::to_string(&doc).map_err(|e| GrantError::Write("error", e.to_string()))?;
        cm.data
            .get_or_insert_with(Default::default)
            .insert("config.yaml".into(), text);
        if !self.shared.lease.is_leader() {
            return Err(GrantError::Invalidated("no longer the leader".into()));
        }
        match api.replace(cm_name, &PostParams::default(), &cm).await {
            Ok(_) => {
                self.shared
                    .record_write(format!("mig-parted config {name} written"));
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Err(GrantError::Write(
                "conflict",
                "the ConfigMap changed; retried next round".into(),
            )),
            Err(e) => Err(GrantError::Write("error", e.to_string())),
        }
    }
}

/// Why a grant was not written.

#[derive(Debug)]
pub(super) enum GrantError {
    /// Fresh state no longer supports it (counted as decision `invalidated`).
    Invalidated(String),
    /// The write failed (`conflict` or `error`).
    Write(&'static str, String),
}

/// Whether two views of a node show the same GPUs (the report's `observedAt`, which its agent
/// moves every few minutes, aside).
fn same_gpus(a: &NodeView, b: &NodeView) -> bool {
    let gpus = |v: &NodeView| {
        v.report_raw
            .as_deref()
            .and_then(|r| serde_json::from_str::<mig_protocol::NodeReport>(r).ok())
            .map(|r| (r.gpus, r.backend))
    };
    a.report_raw == b.report_raw || gpus(a).is_some_and(|g| Some(g) == gpus(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(report: &str) -> NodeView {
        NodeView {
            report_raw: Some(report.into()),
            grant: None,
            state: None,
            flight: mig_protocol::flight(None, None),
            tainted: false,
            mig_config: None,
            malformed: false,
            reported: true,
            unreported: None,
            recent_evictions: Vec::new(),
        }
    }

    #[test]
    fn a_refreshed_report_is_the_same_gpus_and_a_changed_instance_is_not() {
        let gpu = |start: u8| {
            format!(
                r#"{{"index": 0, "product": "NVIDIA-H100-80GB-HBM3", "instances": [{{"profile": "3g.40gb", "start": {start}}}]}}"#
            )
        };
        let report = |at: &str, start: u8| format!(r#"{{"observedAt": "{at}", "gpus": [{}]}}"#, gpu(start));
        let planned = view(&report("2026-12-03T12:00:00Z", 0));
        assert!(same_gpus(&planned, &view(&report("2026-12-03T12:05:00Z", 0))));
        assert!(!same_gpus(&planned, &view(&report("2026-12-03T12:00:00Z", 4))));
        assert!(!same_gpus(&planned, &view("{garbage")));
    }
}
