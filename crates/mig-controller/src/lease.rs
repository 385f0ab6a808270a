//! Leader election on a `coordination.k8s.io/v1` Lease, with fencing by time.
//!
//! kube-rs has no leader election (kube-rs/kube#485); this is the client-go algorithm on optimistic
//! concurrency (`resourceVersion` preconditions, 409 = someone else won):
//! - the holder renews every `retry`; a renewal that started at `t` lets it act until
//!   `t + 2/3 × duration` ([`LeaseHandle::is_leader`] turns false by itself after that, even if the
//!   renewal task hangs or dies);
//! - a follower takes the lease when the holder is empty, or when the record has not changed for a
//!   full `duration` *as measured on the follower's own clock* since it first saw that record (so
//!   clock skew between replicas does not matter);
//! - on graceful shutdown the holder releases the lease (empty holder) so a follower takes over at
//!   its next try instead of waiting a full duration.
//!
//! So two replicas never act at once: the follower's earliest takeover is `duration` after a
//! renewal it saw, which is after the old holder's `2/3 × duration` of validity has run out.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

/// Shared view of this replica's leadership.
#[derive(Clone)]
pub struct LeaseHandle {
    inner: Arc<Inner>,
}

struct Inner {
    identity: String,
    valid_until: Mutex<Option<Instant>>,
    /// Leadership terms: (start, end) where end is `None` while ongoing.
    terms: Mutex<Vec<(Instant, Option<Instant>)>>,
}

impl LeaseHandle {
    /// A handle for `identity`, not leading.
    pub fn new(identity: impl Into<String>) -> LeaseHandle {
        LeaseHandle {
            inner: Arc::new(Inner {
                identity: identity.into(),
                valid_until: Mutex::new(None),
                terms: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Whether this replica may act now. Check right before every write.
    pub fn is_leader(&self) -> bool {
        let until = *self.inner.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|u| Instant::now() < u)
    }

    /// This replica's identity (its pod name).
    pub fn identity(&self) -> &str {
        &self.inner.identity
    }

    /// Leadership terms so far: `(start, end)`, the end being when the right to act ran out
    /// (the last one may still be running: `end` in the future).
    pub fn terms(&self) -> Vec<(Instant, Instant)> {
        let until = *self.inner.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        self.inner
            .terms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(s, e)| (*s, e.or(until).unwrap_or(*s)))
            .collect()
    }

    fn granted(&self, until: Instant) {
        let mut v = self.inner.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        let mut terms = self.inner.terms.lock().unwrap_or_else(|e| e.into_inner());
        let continuing = v.is_some_and(|u| Instant::now() < u);
        if !continuing {
            if let Some(last) = terms.last_mut()
                && last.1.is_none()
            {
                last.1 = *v;
            }
            terms.push((Instant::now(), None));
        }
        *v = Some(until);
    }

    fn lost(&self) {
        let mut v = self.inner.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let end = v.map(|u| u.min(now));
        if let Some(last) = self
            .inner
            .terms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_mut()
            && last.1.is_none()
        {
            last.1 = end.or(Some(last.0));
        }
        *v = None;
    }
}

/// What the follower last saw of the lease record.
struct Observed {
    resource_version: String,
    at: Instant,
}

/// Run the election until `shutdown` turns true; then release the lease if held.
pub async fn run(
    api: Api<Lease>,
    name: String,
    duration: Duration,
    retry: Duration,
    handle: LeaseHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut observed: Option<Observed> = None;
    loop {
        let started = Instant::now();
        match try_acquire_or_renew(&api, &name, duration, handle.identity(), &mut observed).await {
            Ok(true) => handle.granted(started + duration * 2 / 3),
            Ok(false) => handle.lost(),
            Err(e) => {
                // Keep the right to act only until it runs out by itself.
                tracing::warn!(error = %e, lease = %name, "lease renewal failed");
                if !handle.is_leader() {
                    handle.lost();
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    if handle.is_leader() {
        handle.lost();
        if let Err(e) = release(&api, &name, handle.identity()).await {
            tracing::warn!(error = %e, lease = %name, "lease release failed; a follower takes over after the lease duration");
        }
    }
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// One round: `Ok(true)` when we hold the lease now.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    name: &str,
    duration: Duration,
    me: &str,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let secs = duration.as_secs().max(1) as i32;
    let current = match api.get_opt(name).await? {
        Some(l) => l,
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.to_string()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        }
    };
    let rv = current.metadata.resource_version.clone().unwrap_or_default();
    let spec = current.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let held_by_me = holder.as_deref() == Some(me);
    if !held_by_me && holder.is_some() {
        // Someone else's: take it only once it has not changed for a whole duration on our clock.
        let their_duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(secs).max(1) as u64);
        match observed {
            Some(o) if o.resource_version == rv => {
                if o.at.elapsed() <= their_duration {
                    return Ok(false);
                }
            }
            _ => {
                *observed = Some(Observed {
                    resource_version: rv,
                    at: Instant::now(),
                });
                return Ok(false);
            }
        }
    }
    let mut next = current.clone();
    let transitions = spec.lease_transitions.unwrap_or(0);
    next.spec = Some(LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(secs),
        acquire_time: if held_by_me {
            spec.acquire_time.clone()
        } else {
            Some(now())
        },
        renew_time: Some(now()),
        lease_transitions: Some(if held_by_me { transitions } else { transitions + 1 }),
        ..spec
    });
    match api.replace(name, &PostParams::default(), &next).await {
        Ok(l) => {
            *observed = Some(Observed {
                resource_version: l.metadata.resource_version.unwrap_or_default(),
                at: Instant::now(),
            });
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Give the lease up: empty holder, so a follower takes it at its next try.
async fn release(api: &Api<Lease>, name: &str, me: &str) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(me) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = Some(now());
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}
