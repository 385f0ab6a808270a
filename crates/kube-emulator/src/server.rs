//! The HTTP API: discovery, CRUD, list/watch, patches, eviction and binding, over real HTTP/JSON.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::resources::{RESOURCES, Resource, find};
use crate::selectors::{FieldSelector, LabelSelector, expression_holds};
use crate::status::ApiError;
use crate::store::{Change, Event, Store};

/// Faults to inject, per test.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Share of non-watch requests answered with 500, in [0, 1].
    pub error_rate: f64,
    /// Added to every request.
    pub latency: Duration,
    /// End every watch stream after this many events (a dropped connection).
    pub drop_watch_after: Option<usize>,
    /// Answer the next N watches with 410 Gone.
    pub force_gone: u32,
    /// Deliver each change to watches this long after it happened (a lagging watch cache, as
    /// behind a slow apiserver or a congested network); lists and gets stay current. No bookmarks
    /// are sent while it is set. Only watches of these resources (plural names) lag; empty: all.
    pub watch_delay: Duration,
    /// The resources `watch_delay` applies to (`["nodes"]`); empty: every resource.
    pub watch_delay_resources: Vec<String>,
}

/// Who sent a request, as the real server's authenticator would say (from a bearer token
/// registered with [`Shared::add_token`]; requests without one are unchecked, as an admin's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    /// `request.userInfo.username`.
    pub username: String,
    /// `request.userInfo.extra["authentication.kubernetes.io/node-name"]`: the node of the pod a
    /// bound service-account token belongs to.
    pub node_name: Option<String>,
}

/// An update of an existing object, or an Eviction (`pods`, subresource `eviction`: `old` is null,
/// `new` the Eviction), as an admission policy sees it.
pub struct AdmissionRequest<'a> {
    /// Who.
    pub user: &'a UserInfo,
    /// Resource plural (`nodes`).
    pub resource: &'a str,
    /// Subresource (`status`), if any.
    pub subresource: Option<&'a str>,
    /// The object before.
    pub old: &'a Value,
    /// The object after.
    pub new: &'a Value,
}

/// A validating admission policy: `Err` denies the request with 403 and the denial's message.
pub type Admission = Arc<dyn Fn(&AdmissionRequest<'_>) -> Result<(), Denied> + Send + Sync>;

/// An admission policy's denial: the message the client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// Server configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Changes kept for watches; a watch from an older resourceVersion gets 410 Gone.
    pub retention: usize,
    /// Interval between watch bookmarks (when the client allows them).
    pub bookmark_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            retention: 10_000,
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

/// Shared server state.
pub struct Shared {
    store: Mutex<Store>,
    faults: Mutex<Faults>,
    config: Config,
    dice: AtomicU64,
    lists: AtomicU64,
    kubelets: std::sync::atomic::AtomicBool,
    tokens: Mutex<HashMap<String, UserInfo>>,
    admission: Mutex<Vec<Admission>>,
    /// `(username, verb, non-resource path)` allowed by SubjectAccessReviews (a path ending in
    /// `*` is a prefix, as in RBAC's nonResourceURLs).
    grants: Mutex<Vec<(String, String, String)>>,
}

impl Shared {
    /// A state with an empty store.
    pub fn new(config: Config) -> Arc<Self> {
        Arc::new(Shared {
            store: Mutex::new(Store::new(config.retention)),
            faults: Mutex::new(Faults::default()),
            config,
            dice: AtomicU64::new(0x2545_F491_4F6C_DD1D),
            lists: AtomicU64::new(0),
            kubelets: std::sync::atomic::AtomicBool::new(false),
            tokens: Mutex::new(HashMap::new()),
            admission: Mutex::new(Vec::new()),
            grants: Mutex::new(Vec::new()),
        })
    }

    /// Requests with `Authorization: Bearer <token>` come from `user`.
    pub fn add_token(&self, token: &str, user: UserInfo) {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_string(), user);
    }

    /// Let `username` do `verb` on the non-resource URL `path` (as a ClusterRole's
    /// `nonResourceURLs` rule bound to it would): what SubjectAccessReviews answer.
    pub fn allow_path(&self, username: &str, verb: &str, path: &str) {
        self.grants.lock().unwrap_or_else(|e| e.into_inner()).push((
            username.into(),
            verb.into(),
            path.into(),
        ));
    }

    /// A TokenReview: who the token in `spec.token` is.
    fn token_review(&self, review: &Value) -> Value {
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let user = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned();
        let status = match user {
            Some(u) => {
                json!({"authenticated": true, "user": {"username": u.username, "groups": ["system:authenticated"]}})
            }
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {}, "spec": review["spec"], "status": status})
    }

    /// A SubjectAccessReview for a non-resource URL.
    fn access_review(&self, review: &Value) -> Value {
        let spec = &review["spec"];
        let user = spec["user"].as_str().unwrap_or_default();
        let verb = spec["nonResourceAttributes"]["verb"].as_str().unwrap_or_default();
        let path = spec["nonResourceAttributes"]["path"].as_str().unwrap_or_default();
        let allowed = self
            .grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(u, v, p)| {
                u == user
                    && (v == verb || v == "*")
                    && match p.strip_suffix('*') {
                        Some(prefix) => path.starts_with(prefix),
                        None => p == path,
                    }
            });
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "metadata": {}, "spec": spec, "status": {"allowed": allowed}})
    }

    /// Check every update (replace or patch) of an existing object, and every eviction, by an
    /// authenticated user with `policy`, as a ValidatingAdmissionPolicy with `validationActions: [Deny]` would.
    pub fn add_admission(&self, policy: Admission) {
        self.admission
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(policy);
    }

    fn user(&self, headers: &HeaderMap) -> Result<Option<UserInfo>, ApiError> {
        let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
            return Ok(None);
        };
        let token = auth.strip_prefix("Bearer ").unwrap_or_default().trim();
        match self.tokens.lock().unwrap_or_else(|e| e.into_inner()).get(token) {
            Some(u) => Ok(Some(u.clone())),
            None => Err(ApiError {
                code: 401,
                reason: "Unauthorized",
                message: "Unauthorized".into(),
            }),
        }
    }

    fn admit(&self, user: Option<&UserInfo>, t: &Target, old: &Value, new: &Value) -> Result<(), ApiError> {
        let Some(user) = user else { return Ok(()) };
        let request = AdmissionRequest {
            user,
            resource: t.resource.plural,
            subresource: t.sub.as_deref(),
            old,
            new,
        };
        let policies = self.admission.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for policy in policies {
            policy(&request).map_err(|d| ApiError::forbidden(&d.0))?;
        }
        Ok(())
    }

    /// Lock the store (never held across an await).
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many list requests were served (a watcher relists after 410 or a failed watch).
    pub fn list_requests(&self) -> u64 {
        self.lists.load(Ordering::Relaxed)
    }

    /// Whether kubelets run (the cluster actors): then deleting a pod with a grace period marks it
    /// terminating and its kubelet removes it when the grace period is over; without them pods go at once.
    pub fn set_kubelets(&self, on: bool) {
        self.kubelets.store(on, Ordering::Relaxed);
    }

    /// Replace the faults.
    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
    }

    fn faults(&self) -> Faults {
        self.faults.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn roll(&self) -> f64 {
        // xorshift on an atomic: cheap, good enough to spread injected errors.
        let mut x = self.dice.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.dice.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn take_forced_gone(&self) -> bool {
        let mut f = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        if f.force_gone > 0 {
            f.force_gone -= 1;
            true
        } else {
            false
        }
    }
}

/// The router.
pub fn router(state: Arc<Shared>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/api", get(core_versions))
        .route("/apis", get(groups))
        .route("/api/v1", get(|| async { axum::Json(resource_list("", "v1")) }))
        .route(
            "/apis/{group}/{version}",
            get(|Path((g, v)): Path<(String, String)>| async move { axum::Json(resource_list(&g, &v)) }),
        )
        .route("/api/v1/{*rest}", any(core_handler))
        .route("/apis/{group}/{version}/{*rest}", any(group_handler))
        .with_state(state)
}

async fn version() -> axum::Json<Value> {
    axum::Json(
        json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-kube-emulator", "platform": "linux/amd64"}),
    )
}

async fn core_versions() -> axum::Json<Value> {
    axum::Json(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}))
}

async fn groups() -> axum::Json<Value> {
    let mut names: Vec<(&str, &str)> = RESOURCES
        .iter()
        .filter(|r| !r.group.is_empty())
        .map(|r| (r.group, r.version))
        .collect();
    names.dedup();
    let groups: Vec<Value> = names
        .iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    axum::Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
}

fn resource_list(group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        resources.push(json!({
            "name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced, "kind": r.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
        }));
        for sub in r.subresources {
            let verbs = if *sub == "status" {
                json!(["get", "patch", "update"])
            } else {
                json!(["create"])
            };
            resources.push(json!({"name": format!("{}/{sub}", r.plural), "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs}));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

/// What a URL names.
struct Target {
    resource: &'static Resource,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_target(group: &str, version: &str, rest: &str) -> Result<Target, ApiError> {
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let nf = || ApiError::no_such_path(rest);
    let resolve = |plural: &str| find(group, version, plural).ok_or_else(nf);
    let t = match segs.as_slice() {
        ["namespaces", ns, plural, tail @ ..]
            if find(group, version, plural).is_some_and(|r| r.namespaced) =>
        {
            let r = resolve(plural)?;
            match tail {
                [] => Target {
                    resource: r,
                    namespace: Some(ns.to_string()),
                    name: None,
                    sub: None,
                },
                [name] => Target {
                    resource: r,
                    namespace: Some(ns.to_string()),
                    name: Some(name.to_string()),
                    sub: None,
                },
                [name, sub] => Target {
                    resource: r,
                    namespace: Some(ns.to_string()),
                    name: Some(name.to_string()),
                    sub: Some(sub.to_string()),
                },
                _ => return Err(nf()),
            }
        }
        [plural] => Target {
            resource: resolve(plural)?,
            namespace: None,
            name: None,
            sub: None,
        },
        [plural, name] if !resolve(plural)?.namespaced => Target {
            resource: resolve(plural)?,
            namespace: None,
            name: Some(name.to_string()),
            sub: None,
        },
        [plural, name, sub] if !resolve(plural)?.namespaced => Target {
            resource: resolve(plural)?,
            namespace: None,
            name: Some(name.to_string()),
            sub: Some(sub.to_string()),
        },
        _ => return Err(nf()),
    };
    if let Some(sub) = &t.sub
        && !t.resource.subresources.contains(&sub.as_str())
    {
        return Err(nf());
    }
    Ok(t)
}

async fn core_handler(
    State(state): State<Arc<Shared>>,
    Path(rest): Path<String>,
    method: Method,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    dispatch(state, "", "v1", &rest, method, query, headers, body).await
}

async fn group_handler(
    State(state): State<Arc<Shared>>,
    Path((group, version, rest)): Path<(String, String, String)>,
    method: Method,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    dispatch(state, &group, &version, &rest, method, query, headers, body).await
}

#[allow(clippy::too_many_arguments)]
async fn dispatch(
    state: Arc<Shared>,
    group: &str,
    version: &str,
    rest: &str,
    method: Method,
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let faults = state.faults();
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watch && faults.error_rate > 0.0 && state.roll() < faults.error_rate {
        return ApiError::internal("injected fault").into_response();
    }
    let target = match parse_target(group, version, rest) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let user = match state.user(&headers) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let result = match (&method, &target.name, &target.sub) {
        (&Method::GET, None, _) if watch => return watch_stream(state, &target, &query),
        (&Method::GET, None, _) => {
            return list(&state, &target, &query).unwrap_or_else(IntoResponse::into_response);
        }
        (&Method::POST, None, _) if target.resource.plural == "tokenreviews" => {
            parse_body(&body).map(|o| (StatusCode::CREATED, state.token_review(&o)))
        }
        (&Method::POST, None, _) if target.resource.plural == "subjectaccessreviews" => {
            parse_body(&body).map(|o| (StatusCode::CREATED, state.access_review(&o)))
        }
        (&Method::POST, None, _) => parse_body(&body).and_then(|mut o| {
            validate(target.resource, &o)?;
            // As the real server: a new pod is Pending until a kubelet says otherwise.
            let pod = target.resource.plural == "pods" && target.resource.group.is_empty();
            if pod && (o["status"].is_null() || o["status"].is_object()) && o["status"]["phase"].is_null() {
                o["status"]["phase"] = json!("Pending");
            }
            let ns = target
                .namespace
                .clone()
                .or_else(|| o["metadata"]["namespace"].as_str().map(str::to_string))
                .unwrap_or_default();
            state
                .store()
                .create(target.resource, &ns, o)
                .map(|v| (StatusCode::CREATED, v))
        }),
        (&Method::GET, Some(name), None | Some(_)) => state
            .store()
            .get(target.resource, ns(&target), name)
            .map(|v| (StatusCode::OK, v)),
        (&Method::PUT, Some(name), sub) => parse_body(&body).and_then(|o| {
            let mut store = state.store();
            let old = store.get(target.resource, ns(&target), name)?;
            let o = if sub.as_deref() == Some("status") {
                with_status_only(&old, o)
            } else {
                o
            };
            state.admit(user.as_ref(), &target, &old, &o)?;
            store
                .replace(target.resource, ns(&target), name, o)
                .map(|v| (StatusCode::OK, v))
        }),
        (&Method::PATCH, Some(name), _) => patch(&state, &target, name, &headers, &body, user.as_ref()),
        (&Method::DELETE, Some(name), None) => {
            // DeleteOptions may come as a body or as a query parameter.
            let body_grace = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|b| b["gracePeriodSeconds"].as_i64());
            let grace = body_grace.or_else(|| query.get("gracePeriodSeconds").and_then(|g| g.parse().ok()));
            delete_object(&state, &mut state.store(), &target, name, grace).map(|v| (StatusCode::OK, v))
        }
        (&Method::POST, Some(name), Some(sub)) if sub == "eviction" => {
            let eviction = serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
            state
                .admit(user.as_ref(), &target, &Value::Null, &eviction)
                .and_then(|()| evict(&state, &target, name, &body))
        }
        (&Method::POST, Some(name), Some(sub)) if sub == "binding" => bind(&state, &target, name, &body),
        _ => Err(ApiError::method_not_allowed()),
    };
    match result {
        Ok((code, v)) => (code, axum::Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn ns(t: &Target) -> &str {
    t.namespace.as_deref().unwrap_or_default()
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(&format!("the body is not valid JSON: {e}")))
}

/// A status-subresource write changes only `.status`.
fn with_status_only(current: &Value, incoming: Value) -> Value {
    let mut merged = current.clone();
    merged["status"] = incoming["status"].clone();
    merged["metadata"]["resourceVersion"] = incoming["metadata"]["resourceVersion"].clone();
    merged
}

fn list(state: &Shared, t: &Target, query: &HashMap<String, String>) -> Result<Response, ApiError> {
    state.lists.fetch_add(1, Ordering::Relaxed);
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))?;
    // The continue token is the key of the last object sent: "namespace/name" ("/name" if cluster-scoped).
    let after = query
        .get("continue")
        .filter(|c| !c.is_empty())
        .map(|c| match c.split_once('/') {
            Some((n, name)) => (n.to_string(), name.to_string()),
            None => (String::new(), c.clone()),
        });
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    // Items are serialized straight from the store (under its lock) instead of being cloned.
    let mut items: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut last: Option<(String, String)> = None;
    let store = state.store();
    let more = store.visit_page(
        t.resource,
        t.namespace.as_deref(),
        |o| labels.matches(o) && fields.matches(o),
        after,
        limit,
        |o| {
            if last.is_some() {
                items.push(b',');
            }
            let _ = serde_json::to_writer(&mut items, o);
            last = Some((
                o["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                o["metadata"]["name"].as_str().unwrap_or_default().to_string(),
            ));
        },
    );
    let rv = store.resource_version();
    drop(store);
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if more && let Some((n, name)) = &last {
        meta["continue"] = json!(format!("{n}/{name}"));
    }
    let head = json!({"kind": format!("{}List", t.resource.kind), "apiVersion": t.resource.api_version(), "metadata": meta});
    let mut body = serde_json::to_vec(&head).map_err(|e| ApiError::internal(&e.to_string()))?;
    body.pop(); // the closing brace
    body.extend_from_slice(b",\"items\":[");
    body.extend_from_slice(&items);
    body.extend_from_slice(b"]}");
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| ApiError::internal("response").into_response()))
}

fn patch(
    state: &Shared,
    t: &Target,
    name: &str,
    headers: &HeaderMap,
    body: &Bytes,
    user: Option<&UserInfo>,
) -> Result<(StatusCode, Value), ApiError> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let ct = ct.split(';').next().unwrap_or_default().trim().to_string();
    let mut store = state.store();
    let current = match store.get(t.resource, ns(t), name) {
        Ok(c) => Some(c),
        Err(e) if ct == "application/apply-patch+yaml" && e.code == 404 => None,
        Err(e) => return Err(e),
    };
    let patch_doc = parse_body(body)?;
    let mut doc = current
        .clone()
        .unwrap_or_else(|| json!({"metadata": {"name": name}}));
    match ct.as_str() {
        // Strategic merge and server-side apply are served as JSON merge patches: they agree on the
        // maps our code patches (labels, annotations, status fields); lists are replaced whole.
        "application/merge-patch+json"
        | "application/strategic-merge-patch+json"
        | "application/apply-patch+yaml" => {
            json_patch::merge(&mut doc, &patch_doc);
        }
        "application/json-patch+json" => {
            let ops: json_patch::Patch = serde_json::from_value(patch_doc)
                .map_err(|e| ApiError::bad_request(&format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut doc, &ops)
                .map_err(|e| ApiError::invalid(t.resource, name, &e.to_string()))?;
        }
        other => return Err(ApiError::unsupported_media(other)),
    }
    match current {
        None => store
            .create(t.resource, ns(t), doc)
            .map(|v| (StatusCode::CREATED, v)),
        Some(c) => {
            // A patch may carry a resourceVersion precondition; without one it applies to the latest.
            if doc["metadata"]["resourceVersion"].is_null() {
                doc["metadata"]["resourceVersion"] = c["metadata"]["resourceVersion"].clone();
            }
            let doc = if t.sub.as_deref() == Some("status") {
                with_status_only(&c, doc)
            } else {
                doc
            };
            state.admit(user, t, &c, &doc)?;
            store
                .replace(t.resource, ns(t), name, doc)
                .map(|v| (StatusCode::OK, v))
        }
    }
}

fn pdb_selects(pdb: &Value, pod: &Value) -> bool {
    let sel = &pdb["spec"]["selector"];
    let labels = &pod["metadata"]["labels"];
    let by_labels = sel["matchLabels"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let by_expr = sel["matchExpressions"]
        .as_array()
        .is_none_or(|exprs| exprs.iter().all(|e| expression_holds(e, labels)));
    // An empty selector selects every pod in the namespace (policy/v1).
    !sel.is_null() && by_labels && by_expr
}

/// Delete, or for a pod with a grace period while kubelets run, mark it terminating:
/// `deletionTimestamp` = now + grace (as the real server does); the kubelet removes it then.
fn delete_object(
    state: &Shared,
    store: &mut Store,
    t: &Target,
    name: &str,
    grace: Option<i64>,
) -> Result<Value, ApiError> {
    if t.resource.plural == "pods" && t.resource.group.is_empty() && state.kubelets.load(Ordering::Relaxed) {
        let mut pod = store.get(t.resource, ns(t), name)?;
        // As the real server: a pod on no node, or one that has ended, has nothing to stop; a
        // grace period of 0 (the kubelet's last word, or a forced delete) removes it now.
        let unbound = pod["spec"]["nodeName"].as_str().is_none_or(str::is_empty);
        let ended = matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
        if unbound || ended || grace == Some(0) {
            return store.delete(t.resource, ns(t), name);
        }
        if !pod["metadata"]["deletionTimestamp"].is_null() {
            return Ok(pod);
        }
        let grace = grace
            .or_else(|| pod["spec"]["terminationGracePeriodSeconds"].as_i64())
            .unwrap_or(30);
        if grace > 0 {
            pod["metadata"]["deletionTimestamp"] = json!(crate::store::in_seconds(grace));
            pod["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            return store.replace(t.resource, ns(t), name, pod);
        }
    }
    store.delete(t.resource, ns(t), name)
}

/// POST pods/{name}/eviction: honour PodDisruptionBudgets like the real server.
fn evict(state: &Shared, t: &Target, name: &str, body: &Bytes) -> Result<(StatusCode, Value), ApiError> {
    let grace = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|b| b["deleteOptions"]["gracePeriodSeconds"].as_i64());
    let mut store = state.store();
    let pod = store.get(t.resource, ns(t), name)?;
    let want_uid = serde_json::from_slice::<Value>(body).ok().and_then(|b| {
        b["deleteOptions"]["preconditions"]["uid"]
            .as_str()
            .map(str::to_string)
    });
    if let Some(uid) = want_uid
        && pod["metadata"]["uid"].as_str() != Some(uid.as_str())
    {
        return Err(ApiError {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                pod["metadata"]["uid"].as_str().unwrap_or_default()
            ),
        });
    }
    let pdb_resource =
        find("policy", "v1", "poddisruptionbudgets").ok_or_else(|| ApiError::internal("no PDB resource"))?;
    let pdbs: Vec<Value> = store
        .list(pdb_resource, Some(ns(t)))
        .into_iter()
        .filter(|p| pdb_selects(p, &pod))
        .collect();
    if pdbs.len() > 1 {
        return Err(ApiError::internal(
            "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
        ));
    }
    // Terminal, pending and terminating pods are not protected (the real server's `canIgnorePDB`):
    // evicting a pod already on its way out deletes it without spending a disruption.
    let phase = pod["status"]["phase"].as_str().unwrap_or_default();
    let terminating = !pod["metadata"]["deletionTimestamp"].is_null();
    if let Some(pdb) = pdbs.first()
        && !matches!(phase, "Succeeded" | "Failed" | "Pending")
        && !terminating
    {
        // As the real server: a budget whose spec changed since the disruption controller last
        // computed its status allows nothing yet.
        let observed = pdb["status"]["observedGeneration"].as_i64().unwrap_or(0);
        let stale = observed < pdb["metadata"]["generation"].as_i64().unwrap_or(1);
        let allowed = pdb["status"]["disruptionsAllowed"].as_i64().unwrap_or(0);
        if stale || allowed <= 0 {
            return Err(ApiError::disruption_budget());
        }
        let mut updated = pdb.clone();
        updated["status"]["disruptionsAllowed"] = json!(allowed - 1);
        let pdb_name = pdb["metadata"]["name"].as_str().unwrap_or_default().to_string();
        store.replace(pdb_resource, ns(t), &pdb_name, updated)?;
    }
    delete_object(state, &mut store, t, name, grace)?;
    Ok((
        StatusCode::CREATED,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}

/// POST pods/{name}/binding: set `spec.nodeName`.
fn bind(state: &Shared, t: &Target, name: &str, body: &Bytes) -> Result<(StatusCode, Value), ApiError> {
    let binding = parse_body(body)?;
    let node = binding["target"]["name"]
        .as_str()
        .ok_or_else(|| ApiError::bad_request("binding has no target.name"))?
        .to_string();
    let mut store = state.store();
    let mut pod = store.get(t.resource, ns(t), name)?;
    if pod["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty()) {
        return Err(ApiError::conflict(t.resource, name));
    }
    pod["spec"]["nodeName"] = json!(node);
    store.replace(t.resource, ns(t), name, pod)?;
    Ok((
        StatusCode::CREATED,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// GET ...?watch=true: newline-delimited watch events from `resourceVersion` on.
fn watch_stream(state: Arc<Shared>, t: &Target, query: &HashMap<String, String>) -> Response {
    let labels = match LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str)) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let fields = match FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str)) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = Duration::from_secs(
        query
            .get("timeoutSeconds")
            .and_then(|s| s.parse().ok())
            .unwrap_or(1800),
    );
    let faults = state.faults();
    let resource = t.resource;
    let namespace = t.namespace.clone();
    let wants = move |e: &Event| {
        e.resource == resource.plural
            && e.object["apiVersion"].as_str() == Some(&resource.api_version())
            && namespace
                .as_deref()
                .is_none_or(|n| e.object["metadata"]["namespace"].as_str() == Some(n))
            && labels.matches(&e.object)
            && fields.matches(&e.object)
    };
    let (backlog, mut rx, gone) = subscribe(&state, t, query);
    let interval = state.config.bookmark_interval;
    let kind = resource.kind;
    let api_version = resource.api_version();
    let stream = async_stream(move |tx| async move {
        if let Some(e) = gone {
            let _ = tx.send(watch_line("ERROR", &e.body())).await;
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = WatchOut {
            tx,
            wants,
            sent: 0,
            last_rv: 0,
            limit: faults.drop_watch_after.unwrap_or(usize::MAX),
        };
        for e in &backlog {
            if (out.wants)(e) && !out.send(e).await {
                return;
            }
        }
        let delayed = faults.watch_delay > Duration::ZERO
            && (faults.watch_delay_resources.is_empty()
                || faults.watch_delay_resources.iter().any(|r| r == resource.plural));
        if delayed {
            return out.delayed(&state, rx, faults.watch_delay, deadline).await;
        }
        let mut ticker = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = ticker.tick(), if bookmarks => {
                    let rv = state.store().resource_version();
                    let mark = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}});
                    if out.tx.send(watch_line("BOOKMARK", &mark)).await.is_err() { return; }
                }
                msg = rx.recv() => if !out.receive(&state, msg).await { return },
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream.map(Ok::<Bytes, Infallible>)))
        .unwrap_or_else(|_| ApiError::internal("response").into_response())
}

/// Subscribe and read the backlog under one lock, so that no change falls between them: the
/// changes since the asked resourceVersion (or, without one, ADDED for every existing object), the
/// subscription, and a 410 when that version is too old (or one is forced).
fn subscribe(
    state: &Shared,
    t: &Target,
    query: &HashMap<String, String>,
) -> (
    Vec<Event>,
    tokio::sync::broadcast::Receiver<Event>,
    Option<ApiError>,
) {
    let store = state.store();
    let from: Option<u64> = query
        .get("resourceVersion")
        .and_then(|r| r.parse().ok())
        .filter(|r| *r > 0);
    let oldest = store.oldest_watchable();
    let gone = match from {
        _ if state.take_forced_gone() => Some(ApiError::gone(from.unwrap_or(0), oldest)),
        Some(rv) if rv < oldest => Some(ApiError::gone(rv, oldest)),
        _ => None,
    };
    let backlog: Vec<Event> = match from {
        Some(rv) => store.since(rv),
        None => store
            .list(t.resource, t.namespace.as_deref())
            .into_iter()
            .map(|o| Event {
                rv: 0,
                resource: t.resource.plural,
                change: Change::Added,
                object: o,
            })
            .collect(),
    };
    (backlog, store.subscribe(), gone)
}

/// One watch's sending end: what it wants, what it has sent, and how much it may send (a fault).
struct WatchOut<W> {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    wants: W,
    sent: usize,
    last_rv: u64,
    limit: usize,
}

impl<W: Fn(&Event) -> bool> WatchOut<W> {
    /// Send one event; `false` when the watch ends (the fault's limit, or the client went away).
    async fn send(&mut self, e: &Event) -> bool {
        if self.sent >= self.limit
            || self
                .tx
                .send(watch_line(e.change.as_str(), &e.object))
                .await
                .is_err()
        {
            return false;
        }
        self.sent += 1;
        self.last_rv = self.last_rv.max(e.rv);
        true
    }

    /// Handle one message of the subscription; `false` when the watch ends (the client went away,
    /// the fault's limit, or the subscription fell behind: then a 410, as a real server would).
    async fn receive(&mut self, state: &Shared, msg: Result<Event, RecvError>) -> bool {
        match msg {
            Ok(e) => e.rv <= self.last_rv || !(self.wants)(&e) || self.send(&e).await,
            Err(RecvError::Lagged(_)) => {
                let oldest = state.store().oldest_watchable();
                let _ = self
                    .tx
                    .send(watch_line("ERROR", &ApiError::gone(self.last_rv, oldest).body()))
                    .await;
                false
            }
            Err(RecvError::Closed) => false,
        }
    }

    /// A lagging watch cache (a fault): a forwarder stamps each change when it happens; it is sent
    /// `delay` later, in order.
    async fn delayed(
        mut self,
        state: &Shared,
        mut rx: tokio::sync::broadcast::Receiver<Event>,
        delay: Duration,
        deadline: tokio::time::Instant,
    ) {
        let (lag_tx, mut lagged) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let msg = rx.recv().await;
                let end = matches!(msg, Err(RecvError::Closed));
                if lag_tx.send((tokio::time::Instant::now() + delay, msg)).is_err() || end {
                    return;
                }
            }
        });
        loop {
            let next = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                m = lagged.recv() => m,
            };
            let Some((due, msg)) = next else { return };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tokio::time::sleep_until(due) => {}
            }
            if !self.receive(state, msg).await {
                return;
            }
        }
    }
}

/// The real server's validation where the project's clients could break it: an
/// `events.k8s.io` Event's note is at most 1 kB (a longer one is refused, and the Event lost).
fn validate(r: &Resource, o: &Value) -> Result<(), ApiError> {
    if r.group == "events.k8s.io"
        && r.plural == "events"
        && o["note"].as_str().is_some_and(|n| n.len() > 1024)
    {
        let name = o["metadata"]["name"].as_str().unwrap_or_default();
        return Err(ApiError::invalid(
            r,
            name,
            "note: Too long: may not be more than 1024 bytes",
        ));
    }
    Ok(())
}

/// A stream fed by a spawned task through a channel.
fn async_stream<F, Fut>(f: F) -> impl futures::Stream<Item = Bytes>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A running server on 127.0.0.1.
pub struct Running {
    /// Bound address.
    pub addr: SocketAddr,
    /// State, for tests to inspect or to inject faults.
    pub state: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Start on `addr` (port 0: any free port).
    pub async fn start(addr: SocketAddr, config: Config) -> std::io::Result<Running> {
        let state = Shared::new(config);
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(state.clone());
        let task = tokio::spawn(async move {
            // Without TCP_NODELAY, Nagle and delayed ACKs add ~40 ms to every large response.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Running {
            addr,
            state,
            shutdown: Some(tx),
            task,
        })
    }

    /// Create objects (each must carry apiVersion and kind of a served resource).
    pub fn seed(&self, objects: impl IntoIterator<Item = Value>) -> Result<(), ApiError> {
        let mut store = self.state.store();
        for o in objects {
            let api_version = o["apiVersion"].as_str().unwrap_or("v1").to_string();
            let (group, version) = api_version.split_once('/').unwrap_or(("", api_version.as_str()));
            let kind = o["kind"].as_str().unwrap_or_default();
            let r = RESOURCES
                .iter()
                .find(|r| r.group == group && r.version == version && r.kind == kind)
                .ok_or_else(|| ApiError::bad_request(&format!("not a served kind: {api_version} {kind}")))?;
            let ns = o["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            store.create(r, &ns, o)?;
        }
        Ok(())
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server (plain HTTP, no auth), for kubectl and clients.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-emulator\n  cluster:\n    server: {}\ncontexts:\n- name: kube-emulator\n  context:\n    cluster: kube-emulator\n    user: kube-emulator\ncurrent-context: kube-emulator\nusers:\n- name: kube-emulator\n  user: {{}}\n",
            self.url()
        )
    }

    /// Stop: open watches end, new connections are refused.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        self.task.abort();
    }
}
