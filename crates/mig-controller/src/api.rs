//! HTTP: the dry-run plan API, metrics and probes. Errors are JSON `{"error": "..."}` with a
//! fitting status; request bodies are size-limited and every request has a timeout.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use mig_planner::{PodOutcome, Snapshot};
use serde::Serialize;
use serde_json::json;

use crate::state::Shared;

use crate::error::ApiError;

/// The router.
pub fn router(shared: Arc<Shared>) -> Router {
    let http = &shared.settings.http;
    Router::new()
        .route("/api/v1/plan", get(get_plan).post(post_plan))
        .route("/", get(index))
        .route("/api/v1/layouts", get(layouts))
        .route("/api/v1/actions", get(actions))
        .route("/api/v1/pods/{namespace}/{name}/explain", get(explain))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::NotFound("no such endpoint; see docs/controller.md".into()) })
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            ApiError::MethodNotAllowed {
                method: method.to_string(),
                path: uri.path().to_string(),
            }
        })
        .layer(axum::middleware::from_fn_with_state(shared.clone(), authorize))
        .layer(DefaultBodyLimit::max(http.max_body_bytes))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            ApiError::TimedOut.status(),
            http.request_timeout.0,
        ))
        .with_state(shared)
}

/// Every endpoint but the probes: the caller's token and its permission for this URL (when
/// `http.auth` asks for it).
async fn authorize(
    State(s): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path().to_string();
    let Some(reviewer) = s
        .reviewer
        .as_ref()
        .filter(|_| path != "/healthz" && path != "/readyz")
    else {
        return next.run(request).await;
    };
    let verb = if request.method() == axum::http::Method::POST {
        "create"
    } else {
        "get"
    };
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match reviewer.check(authorization, verb, &path).await {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

async fn get_plan(State(s): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let p = s.latest().ok_or(ApiError::NoPlanYet)?;
    Ok(Json(&*p).into_response())
}

async fn post_plan(State(s): State<Arc<Shared>>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let refused = |limit: &'static str| {
        s.metrics
            .connections_refused
            .get_or_create(&crate::metrics::LimitLabel { limit })
            .inc();
    };
    // Taken before the body is parsed: parsing a large snapshot costs too.
    let Ok(slot) = s.what_if.clone().try_acquire_owned() else {
        refused("concurrency");
        return Err(ApiError::Busy {
            running: s.settings.http.max_concurrent_plans,
        });
    };
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::NotUtf8)?;
    let mut snapshot = Snapshot::from_json(text).map_err(|e| ApiError::BadSnapshot {
        message: e.message.clone(),
        path: e.path.clone(),
    })?;
    let http = &s.settings.http;
    let gpus: usize = snapshot.nodes.iter().map(|n| n.gpus.len()).sum();
    let pods = snapshot.pending_pods.len() + snapshot.running_pods.len();
    if gpus > http.max_snapshot_gpus || pods > http.max_snapshot_pods {
        refused("size");
        return Err(ApiError::TooLarge {
            gpus,
            pods,
            max_gpus: http.max_snapshot_gpus,
            max_pods: http.max_snapshot_pods,
        });
    }
    // A snapshot without a policy is planned under the controller's.
    let value: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    if value.get("policy").is_none() {
        snapshot.policy = s.settings.planner.clone();
    }
    // A posted policy never makes the planner work harder than the controller's own would.
    let own = &s.settings.planner.solver;
    let solver = &mut snapshot.policy.solver;
    solver.time_limit_ms = solver.time_limit_ms.min(own.time_limit_ms);
    solver.exact_node_limit = solver.exact_node_limit.min(own.exact_node_limit);
    if solver.mip_gap.is_nan() || solver.mip_gap < own.mip_gap {
        solver.mip_gap = own.mip_gap;
    }
    // Nor reserves more (each reservation considered costs a pass over the pods and nodes).
    let own = &s.settings.planner.reservations;
    let reserve = &mut snapshot.policy.reservations;
    reserve.max_gpus = reserve.max_gpus.min(own.max_gpus);
    reserve.max_nodes = reserve.max_nodes.min(own.max_nodes);
    if let Some(program) = s.settings.http.what_if_program.clone() {
        // The slot goes with this future: when the request ends, the child is killed and the slot
        // is free at once.
        let _slot = slot;
        return plan_in_child(&program, &snapshot)
            .await
            .map(|plan| Json(plan).into_response());
    }
    let plan = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        mig_planner::plan(&snapshot, &snapshot.policy)
    })
    .await
    .map_err(|e| ApiError::Planner(e.to_string()))?;
    Ok(Json(plan).into_response())
}

/// Plan `snapshot` in a child process, `PROGRAM plan --snapshot - --json`, killed if this future
/// is dropped (the request timed out or its client went away).
async fn plan_in_child(
    program: &std::path::Path,
    snapshot: &Snapshot,
) -> Result<serde_json::Value, ApiError> {
    use tokio::io::AsyncWriteExt;
    let failed = ApiError::Planner;
    let mut child = tokio::process::Command::new(program)
        .args(["plan", "--snapshot", "-", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("cannot start {}: {e}", program.display())))?;
    let input = serde_json::to_vec(snapshot).map_err(|e| failed(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&input).await.map_err(|e| failed(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(failed(format!("{}: {}", out.status, stderr.trim())));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| failed(format!("its output is not a plan: {e}")))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LayoutRow {
    node: String,
    gpu: u32,
    model: String,
    /// Memory slices of the GPU (the width of a drawing).
    slices: u8,
    actual: String,
    target: String,
    actual_instances: Vec<Slot>,
    target_instances: Vec<Slot>,
    changed: bool,
    decision: Option<String>,
}

/// One instance as drawn: profile and first memory slice, and the memory slices it covers.
#[derive(Serialize)]
struct Slot {
    #[serde(flatten)]
    instance: mig_catalog::NamedInstance,
    size: u8,
}

fn slots(model: &str, layout: &str) -> (u8, Vec<Slot>) {
    let Ok(m) = mig_catalog::Catalog::embedded().lookup(model) else {
        return (0, Vec::new());
    };
    let Ok(l) = m.parse_layout(layout) else {
        return (m.memory_slices, Vec::new());
    };
    let slots = l
        .instances()
        .iter()
        .filter_map(|i| {
            let p = m.profile(i.profile)?;
            Some(Slot {
                instance: m.name_instance(i),
                size: p.memory_slices,
            })
        })
        .collect();
    (m.memory_slices, slots)
}

/// The built-in layout view (one self-contained page; it polls the API).
async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("../ui/index.html"),
    )
}

async fn actions(State(s): State<Arc<Shared>>) -> Response {
    Json(json!({"actions": s.recent_actions()})).into_response()
}

async fn layouts(State(s): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let p = s.latest().ok_or(ApiError::NoPlanYet)?;
    let rows: Vec<LayoutRow> = p
        .plan
        .gpus
        .iter()
        .map(|g| {
            let (slices, actual_instances) = slots(&g.model, &g.actual);
            let (_, target_instances) = slots(&g.model, &g.target);
            LayoutRow {
                node: g.node.clone(),
                gpu: g.index,
                model: g.model.clone(),
                slices,
                actual: g.actual.clone(),
                target: g.target.clone(),
                actual_instances,
                target_instances,
                changed: g.changed,
                decision: if g.changed {
                    p.decisions.get(&g.node).cloned()
                } else {
                    None
                },
            }
        })
        .collect();
    Ok(Json(json!({"planId": p.plan.id, "computedAt": p.computed_at, "gpus": rows})).into_response())
}

async fn explain(
    State(s): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let p = s.latest().ok_or(ApiError::NoPlanYet)?;
    let object = format!("Pod/{namespace}/{name}");
    if let Some(problem) = p.problems.iter().find(|x| x.object == object) {
        return Ok(Json(json!({
            "pod": format!("{namespace}/{name}"), "planId": p.plan.id, "status": "invalid",
            "reason": problem.reason, "explanation": problem.message,
        }))
        .into_response());
    }
    let pod = p
        .plan
        .pods
        .iter()
        .find(|x| x.namespace == namespace && x.name == name)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "pod {namespace}/{name} is not a pending pod with MIG requests in plan {} (computed {})",
                p.plan.id, p.computed_at
            ))
        })?;
    let explanation = match &pod.outcome {
        PodOutcome::Waits { reason } => format!("waits: {reason}"),
        PodOutcome::Fits {
            node,
            needs_repartition: false,
            ..
        } => {
            format!("fits on node {node} as its GPUs are; the scheduler should bind it")
        }
        PodOutcome::Fits { node, .. } => match p.decisions.get(node) {
            Some(d) => format!("fits on node {node} after a repartition: {d}"),
            None => format!("fits on node {node} after a repartition"),
        },
    };
    Ok(Json(json!({
        "pod": format!("{namespace}/{name}"), "planId": p.plan.id, "computedAt": p.computed_at,
        "outcome": pod.outcome, "explanation": explanation,
    }))
    .into_response())
}

async fn metrics(State(s): State<Arc<Shared>>, headers: axum::http::HeaderMap) -> Response {
    // Leadership can change between two control-loop rounds: say what holds at the scrape.
    s.metrics.leader.set(i64::from(s.lease.is_leader()));
    // OpenMetrics for Prometheus (it asks for it), the classic text format for everyone else.
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            s.metrics.encode(),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            s.metrics.encode_text(),
        )
            .into_response()
    }
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    if s.ready.load(Ordering::SeqCst) {
        "ready".into_response()
    } else {
        ApiError::NotReady.into_response()
    }
}
