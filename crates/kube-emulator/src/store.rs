//! The object store: JSON objects by (resource, namespace, name), one global resourceVersion, and a
//! bounded log of changes that watches replay from.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::resources::Resource;
use crate::status::ApiError;

/// ADDED / MODIFIED / DELETED.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Created.
    Added,
    /// Updated.
    Modified,
    /// Removed.
    Deleted,
}

impl Change {
    /// The watch event type.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "ADDED",
            Change::Modified => "MODIFIED",
            Change::Deleted => "DELETED",
        }
    }
}

/// One logged change.
#[derive(Clone, Debug)]
pub struct Event {
    /// resourceVersion of the change.
    pub rv: u64,
    /// Resource plural, e.g. `pods`.
    pub resource: &'static str,
    /// What happened.
    pub change: Change,
    /// The object after the change (before deletion for DELETED).
    pub object: Value,
}

/// Key of an object: (plural, namespace or "", name).
pub type Key = (&'static str, String, String);

/// The store.
pub struct Store {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    log: VecDeque<Event>,
    retention: usize,
    events: broadcast::Sender<Event>,
}

/// Now, as metav1.Time (second precision).
pub fn now() -> String {
    in_seconds(0)
}

/// Now plus `secs` seconds, as metav1.Time (second precision, as the API server writes it).
pub fn in_seconds(secs: i64) -> String {
    let t = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(secs);
    t.round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

impl Store {
    /// An empty store keeping the last `retention` changes for watches.
    pub fn new(retention: usize) -> Self {
        let (events, _) = broadcast::channel(4096);
        Store {
            rv: 1,
            uid: 0,
            objects: BTreeMap::new(),
            log: VecDeque::new(),
            retention: retention.max(1),
            events,
        }
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion a watch may start from (older: 410 Gone).
    pub fn oldest_watchable(&self) -> u64 {
        self.log.front().map_or(self.rv, |e| e.rv.saturating_sub(1))
    }

    /// Subscribe to future changes (call while holding the store lock, then replay `since`).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Logged changes after `rv`.
    pub fn since(&self, rv: u64) -> Vec<Event> {
        self.log.iter().filter(|e| e.rv > rv).cloned().collect()
    }

    fn record(&mut self, resource: &'static str, change: Change, object: Value) {
        let event = Event {
            rv: self.rv,
            resource,
            change,
            object,
        };
        self.log.push_back(event.clone());
        while self.log.len() > self.retention {
            self.log.pop_front();
        }
        let _ = self.events.send(event);
    }

    fn bump(&mut self, object: &mut Value) {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
    }

    /// Get one object.
    pub fn get(&self, r: &Resource, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&(r.plural, ns.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(r, name))
    }

    /// All objects of a resource (in one namespace, or all when `ns` is None), in key order.
    pub fn list(&self, r: &Resource, ns: Option<&str>) -> Vec<Value> {
        self.objects
            .range((r.plural, String::new(), String::new())..)
            .take_while(|((p, _, _), _)| *p == r.plural)
            .filter(|((_, n, _), _)| ns.is_none_or(|ns| n == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Visit one page of matching objects after the key `after` (namespace, name), up to `limit` of
    /// them, without cloning; returns whether more match after the page. The scan starts after the key
    /// and stops at the first match past the page, so paging through a large list stays linear, and
    /// objects added or removed meanwhile never shift the pages (keyset pagination).
    pub fn visit_page(
        &self,
        r: &Resource,
        ns: Option<&str>,
        matches: impl Fn(&Value) -> bool,
        after: Option<(String, String)>,
        limit: usize,
        mut visit: impl FnMut(&Value),
    ) -> bool {
        use std::ops::Bound;
        let lower = match after {
            Some((n, name)) => Bound::Excluded((r.plural, n, name)),
            None => Bound::Included((r.plural, String::new(), String::new())),
        };
        let iter = self
            .objects
            .range((lower, Bound::Unbounded))
            .take_while(|((p, _, _), _)| *p == r.plural)
            .filter(|((_, n, _), _)| ns.is_none_or(|ns| n == ns))
            .map(|(_, v)| v)
            .filter(|v| matches(v));
        for (sent, v) in iter.enumerate() {
            if sent == limit {
                return true;
            }
            visit(v);
        }
        false
    }

    /// Create; fills uid, creationTimestamp, resourceVersion, namespace and generateName.
    pub fn create(&mut self, r: &Resource, ns: &str, mut object: Value) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::bad_request("the body is not a JSON object"));
        }
        let meta = object.as_object_mut().and_then(|o| {
            o.entry("metadata").or_insert_with(|| json!({}));
            o.get_mut("metadata")
        });
        let Some(meta) = meta.and_then(Value::as_object_mut) else {
            return Err(ApiError::bad_request("metadata is not an object"));
        };
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) => format!("{prefix}{:05x}", self.uid + 1),
                None => {
                    return Err(ApiError::invalid(
                        r,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        if r.namespaced {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.insert("name".into(), json!(name));
        self.uid += 1;
        meta.insert(
            "uid".into(),
            json!(format!("00000000-0000-4000-8000-{:012x}", self.uid)),
        );
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.remove("resourceVersion");
        let key = (
            r.plural,
            if r.namespaced {
                ns.to_string()
            } else {
                String::new()
            },
            name.clone(),
        );
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(r, &name));
        }
        object["apiVersion"] = json!(r.api_version());
        object["kind"] = json!(r.kind);
        if object.get("spec").is_some() {
            object["metadata"]["generation"] = json!(1);
        }
        self.bump(&mut object);
        self.objects.insert(key, object.clone());
        self.record(r.plural, Change::Added, object.clone());
        Ok(object)
    }

    /// Replace; a stale `metadata.resourceVersion` in the body is a 409 Conflict.
    pub fn replace(
        &mut self,
        r: &Resource,
        ns: &str,
        name: &str,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let current = self.get(r, ns, name)?;
        let wanted = object["metadata"]["resourceVersion"].as_str().map(str::to_string);
        let have = current["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        if let Some(w) = wanted
            && !w.is_empty()
            && w != have
        {
            return Err(ApiError::conflict(r, name));
        }
        if object["metadata"]["name"].as_str().is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name in the URL",
            ));
        }
        // Identity is the server's, and so is the generation: one more on each change of the spec.
        for field in ["uid", "creationTimestamp", "namespace", "name"] {
            object["metadata"][field] = current["metadata"][field].clone();
        }
        if let Some(generation) = current["metadata"]["generation"].as_i64() {
            let changed = object["spec"] != current["spec"];
            object["metadata"]["generation"] = json!(generation + i64::from(changed));
        }
        object["apiVersion"] = json!(r.api_version());
        object["kind"] = json!(r.kind);
        self.bump(&mut object);
        self.objects
            .insert((r.plural, ns_key(r, ns), name.to_string()), object.clone());
        self.record(r.plural, Change::Modified, object.clone());
        Ok(object)
    }

    /// Delete.
    pub fn delete(&mut self, r: &Resource, ns: &str, name: &str) -> Result<Value, ApiError> {
        let mut object = self
            .objects
            .remove(&(r.plural, ns_key(r, ns), name.to_string()))
            .ok_or_else(|| ApiError::not_found(r, name))?;
        self.bump(&mut object);
        self.record(r.plural, Change::Deleted, object.clone());
        Ok(object)
    }
}

fn ns_key(r: &Resource, ns: &str) -> String {
    if r.namespaced {
        ns.to_string()
    } else {
        String::new()
    }
}
