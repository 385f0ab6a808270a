//! Time, injected: controller, agent and lease read the clock only through [`Clock`], so tests can
//! move time by hand ([`ManualClock`]) instead of waiting for it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;

/// A source of time.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic time, for durations, deadlines and caches.
    fn instant(&self) -> Instant;
    /// Wall time, for what is written to the API (grant times, phases, Events, heartbeats).
    fn now(&self) -> Timestamp;
}

/// The clock the product runs on.
pub type SharedClock = Arc<dyn Clock>;

/// The machine's clocks.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn instant(&self) -> Instant {
        Instant::now()
    }
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// The machine's clocks, shared.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock that stands still until [`ManualClock::advance`] moves it (both its monotonic and its
/// wall time, by the same amount).
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    wall: Timestamp,
    offset: Mutex<Duration>,
}

impl ManualClock {
    /// A clock at the machine's present moment, standing still.
    pub fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock {
            start: Instant::now(),
            wall: Timestamp::now(),
            offset: Mutex::new(Duration::ZERO),
        })
    }

    /// Move time forward by `d`.
    pub fn advance(&self, d: Duration) {
        *self.offset.lock().unwrap_or_else(|e| e.into_inner()) += d;
    }

    fn offset(&self) -> Duration {
        *self.offset.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Clock for ManualClock {
    fn instant(&self) -> Instant {
        self.start + self.offset()
    }
    fn now(&self) -> Timestamp {
        self.wall.checked_add(self.offset()).unwrap_or(Timestamp::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_both_times_alike() {
        let c = ManualClock::new();
        let (i, t) = (c.instant(), c.now());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!((c.instant(), c.now()), (i, t));
        c.advance(Duration::from_secs(90));
        assert_eq!(c.instant() - i, Duration::from_secs(90));
        assert_eq!(c.now().duration_since(t), jiff::SignedDuration::from_secs(90));
    }
}
