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
use mig_protocol::SharedClock;
use tokio::sync::watch;

/// Shared view of this replica's leadership.
#[derive(Clone)]
pub struct LeaseHandle {
    inner: Arc<Inner>,
}

struct Inner {
    identity: String,
    clock: SharedClock,
    valid_until: Mutex<Option<Instant>>,
    /// Leadership terms: (start, end) where end is `None` while ongoing.
    terms: Mutex<Vec<(Instant, Option<Instant>)>>,
}

impl LeaseHandle {
    /// A handle for `identity`, not leading, on the machine's clock.
    pub fn new(identity: impl Into<String>) -> LeaseHandle {
        LeaseHandle::with_clock(identity, mig_protocol::clock::system())
    }

    /// A handle for `identity`, not leading, on `clock`.
    pub fn with_clock(identity: impl Into<String>, clock: SharedClock) -> LeaseHandle {
        LeaseHandle {
            inner: Arc::new(Inner {
                identity: identity.into(),
                clock,
                valid_until: Mutex::new(None),
                terms: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Whether this replica may act now. Check right before every write.
    pub fn is_leader(&self) -> bool {
        let until = *self.inner.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|u| self.instant() < u)
    }

    fn instant(&self) -> Instant {
        self.inner.clock.instant()
    }

    fn micro_time(&self) -> MicroTime {
        MicroTime(self.inner.clock.now())
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
        let now = self.instant();
        let continuing = v.is_some_and(|u| now < u);
        if !continuing {
            if let Some(last) = terms.last_mut()
                && last.1.is_none()
            {
                last.1 = *v;
            }
            terms.push((now, None));
        }
        *v = Some(until);
    }

    fn lost(&self) {
        let mut v = self.inner.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.instant();
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
        let started = handle.instant();
        match try_acquire_or_renew(&api, &name, duration, &handle, &mut observed).await {
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
        if let Err(e) = release(&api, &name, &handle).await {
            tracing::warn!(error = %e, lease = %name, "lease release failed; a follower takes over after the lease duration");
        }
    }
}

/// One round: `Ok(true)` when we hold the lease now.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    name: &str,
    duration: Duration,
    handle: &LeaseHandle,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let me = handle.identity();
    let now = || handle.micro_time();
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
                if handle.instant().saturating_duration_since(o.at) <= their_duration {
                    return Ok(false);
                }
            }
            _ => {
                *observed = Some(Observed {
                    resource_version: rv,
                    at: handle.instant(),
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
                at: handle.instant(),
            });
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Give the lease up: empty holder, so a follower takes it at its next try.
async fn release(api: &Api<Lease>, name: &str, handle: &LeaseHandle) -> Result<(), kube::Error> {
    let me = handle.identity();
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
    spec.renew_time = Some(handle.micro_time());
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mig_protocol::{Clock, ManualClock};

    #[test]
    fn the_right_to_act_runs_out_by_itself_on_the_clock() {
        let clock = ManualClock::new();
        let handle = LeaseHandle::with_clock("a", clock.clone());
        assert!(!handle.is_leader());
        let start = clock.instant();
        handle.granted(start + Duration::from_secs(10));
        clock.advance(Duration::from_secs(9));
        assert!(handle.is_leader());
        // A renewal that hangs: nothing renews, and the right ends at its deadline.
        clock.advance(Duration::from_secs(2));
        assert!(!handle.is_leader());
        // A term ends where its right ran out, not when the loss was noticed.
        clock.advance(Duration::from_secs(30));
        handle.lost();
        assert_eq!(handle.terms(), vec![(start, start + Duration::from_secs(10))]);
    }
}
