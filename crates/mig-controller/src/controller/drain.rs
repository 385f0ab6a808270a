//! Draining: the controller, not the node agent, posts the evictions a grant names. An agent
//! holds no eviction permission at all (the API server cannot limit `pods/eviction` to the pods of
//! one node), so a compromised node can evict nothing; the controller evicts only what it granted,
//! only on the node the grant is for, only once that node's agent has tainted it and reports
//! `Draining` for that very grant.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::Eviction;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{DeleteOptions, ObjectMeta, Preconditions};
use kube::api::PostParams;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use super::{ControlLoop, node_ref, pod_ref};
use crate::metrics::ResultLabel;
use crate::observe::NodeView;
use mig_protocol::{DO_NOT_DISRUPT, Grant, Phase, Reason};

/// How long an eviction this replica posted is remembered (not posted again for the same pod UID
/// while the cache has yet to show the pod terminating).
const REMEMBER: Duration = Duration::from_secs(600);

/// Why a pod the grant names is not evicted now.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Skip {
    /// Not in the cache: gone.
    Gone,
    /// Runs on another node now (a pod of the same name, recreated elsewhere).
    Elsewhere,
    /// On its way out already.
    Terminating,
    /// Marked do-not-disrupt since the plan (the agent ends the sequence).
    DoNotDisrupt,
}

/// The pods of grant `g` to evict now on node `name`, given whether the node is draining that
/// grant: each with its UID (the eviction's precondition), or why it is skipped.
pub(super) fn to_evict(
    name: &str,
    view: &NodeView,
    g: &Grant,
    pod: impl Fn(&str, &str) -> Option<std::sync::Arc<Pod>>,
) -> Vec<(String, Result<Option<String>, Skip>)> {
    let draining = view.tainted
        && !view.malformed
        && view
            .state
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Draining && s.grant_id == g.id);
    if !draining {
        return vec![];
    }
    g.evictions
        .iter()
        .map(|key| {
            let (ns, pod_name) = key.split_once('/').unwrap_or(("default", key.as_str()));
            let verdict = match pod(ns, pod_name) {
                None => Err(Skip::Gone),
                Some(p) if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(name) => {
                    Err(Skip::Elsewhere)
                }
                Some(p) if p.metadata.deletion_timestamp.is_some() => Err(Skip::Terminating),
                Some(p) if p.annotations().get(DO_NOT_DISRUPT).is_some_and(|v| v == "true") => {
                    Err(Skip::DoNotDisrupt)
                }
                Some(p) => Ok(p.metadata.uid.clone()),
            };
            (key.clone(), verdict)
        })
        .collect()
}

/// The Eviction of `ns/name`, for that pod only (`uid`): kube's `EvictParams` sends
/// `delete_options`, which the API server ignores, so the body is written out.
fn eviction(ns: &str, name: &str, uid: Option<String>) -> Eviction {
    Eviction {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        delete_options: Some(DeleteOptions {
            preconditions: uid.map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..Default::default()
        }),
    }
}

impl ControlLoop {
    /// Leader, auto mode: post the evictions grant `g` names for node `name` while its agent drains
    /// it. A PDB that refuses (429) is reported and asked again next round, until the agent's drain
    /// timeout rolls the sequence back.
    pub(super) async fn drain(&mut self, name: &str, view: &NodeView, g: &Grant) {
        let now = self.instant();
        self.state
            .evicted
            .retain(|_, at| now.duration_since(*at) < REMEMBER);
        let pods = self.caches.pods.clone();
        let todo = to_evict(name, view, g, |ns, n| pods.get(&ObjectRef::new(n).within(ns)));
        for (key, verdict) in todo {
            let uid = match verdict {
                Ok(uid) => uid,
                Err(Skip::Elsewhere) => {
                    tracing::warn!(node = %name, pod = %key, "a pod the grant names runs on another node now; not evicted");
                    continue;
                }
                Err(_) => continue,
            };
            if let Some(u) = &uid
                && self.state.evicted.contains_key(u)
            {
                continue;
            }
            self.evict(name, &key, uid).await;
        }
    }

    async fn evict(&mut self, node: &str, key: &str, uid: Option<String>) {
        let (ns, pod) = key.split_once('/').unwrap_or(("default", key));
        if !self.shared.lease.is_leader() {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let body = eviction(ns, pod, uid.clone());
        let sent = api
            .create_subresource::<_, serde_json::Value>("eviction", pod, &PostParams::default(), &body)
            .await;
        let result = match &sent {
            Ok(_) => "evicted",
            // Gone, or another pod of the same name now (its UID differs): not ours to evict.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => "gone",
            Err(kube::Error::Api(s)) if s.code == 429 => "blocked",
            Err(_) => "error",
        };
        self.shared
            .metrics
            .evictions
            .get_or_create(&ResultLabel { result })
            .inc();
        match sent {
            Ok(_) => {
                if let Some(u) = uid.clone() {
                    self.state.evicted.insert(u, self.instant());
                }
                self.shared.record_write(format!("{node}: evicted {key}"));
                tracing::info!(node, pod = key, "evicted");
                self.emit(
                    Reason::Evicted,
                    format!("evicted to reconfigure node {node}'s GPUs"),
                    "Drain",
                    pod_ref(ns, pod, uid),
                    Some(node_ref(node, None)),
                );
            }
            Err(kube::Error::Api(s)) if s.code == 429 => {
                self.emit(
                    Reason::EvictionBlockedByPdb,
                    format!(
                        "cannot evict {key} yet: {}; asking again until the agent's drain timeout",
                        s.message
                    ),
                    "Drain",
                    node_ref(node, None),
                    Some(pod_ref(ns, pod, uid)),
                );
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => tracing::warn!(node, pod = key, error = %e, "eviction failed; retrying next round"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use mig_protocol::{Flight, NodeState};

    fn grant() -> Grant {
        Grant {
            id: "p-1".into(),
            plan_id: "p".into(),
            mig_config: None,
            targets: BTreeMap::new(),
            evictions: ["ml/a", "ml/b", "ml/c", "ml/d", "ml/e"]
                .map(String::from)
                .to_vec(),
            granted_at: String::new(),
            granted_by: String::new(),
            recent_evictions: vec![],
        }
    }

    fn view(phase: Phase, grant_id: &str, tainted: bool) -> NodeView {
        let state: NodeState = serde_json::from_value(serde_json::json!({
            "grantId": grant_id, "phase": phase, "since": "2026-12-03T12:00:00Z"
        }))
        .unwrap();
        NodeView {
            report_raw: None,
            grant: Some(grant()),
            state: Some(state),
            flight: Flight::InFlight { phase: Some(phase) },
            tainted,
            mig_config: None,
            malformed: false,
            reported: true,
            unreported: None,
            recent_evictions: vec![],
        }
    }

    fn pod(node: &str, uid: &str) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// The cluster: `ml/a` on n0, `ml/b` on n1, `ml/c` terminating on n0, `ml/d` do-not-disrupt
    /// on n0, `ml/e` gone.
    fn lookup(_ns: &str, name: &str) -> Option<Arc<Pod>> {
        match name {
            "a" => Some(pod("n0", "uid-a")),
            "b" => Some(pod("n1", "uid-b")),
            "c" => {
                let mut p = (*pod("n0", "uid-c")).clone();
                p.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
                Some(Arc::new(p))
            }
            "d" => {
                let mut p = (*pod("n0", "uid-d")).clone();
                p.metadata.annotations = Some([(DO_NOT_DISRUPT.to_string(), "true".to_string())].into());
                Some(Arc::new(p))
            }
            _ => None,
        }
    }

    #[test]
    fn only_pods_the_grant_names_on_its_node_while_it_drains_that_grant() {
        let g = grant();
        let got = to_evict("n0", &view(Phase::Draining, "p-1", true), &g, lookup);
        let got: BTreeMap<_, _> = got.into_iter().collect();
        assert_eq!(got["ml/a"], Ok(Some("uid-a".into())));
        assert_eq!(got["ml/b"], Err(Skip::Elsewhere));
        assert_eq!(got["ml/c"], Err(Skip::Terminating));
        assert_eq!(got["ml/d"], Err(Skip::DoNotDisrupt));
        assert_eq!(got["ml/e"], Err(Skip::Gone));
    }

    #[test]
    fn nothing_before_the_taint_in_another_phase_or_for_another_grant() {
        let g = grant();
        for v in [
            view(Phase::Draining, "p-1", false),
            view(Phase::Tainting, "p-1", true),
            view(Phase::Relabeling, "p-1", true),
            view(Phase::Draining, "p-0", true),
        ] {
            assert!(to_evict("n0", &v, &g, lookup).is_empty(), "{:?}", v.state);
        }
        let mut garbled = view(Phase::Draining, "p-1", true);
        garbled.malformed = true;
        assert!(to_evict("n0", &garbled, &g, lookup).is_empty());
    }
}
