//! The engine's one source of time, injected so tests (and later the cron scheduler's) run on
//! a clock they move by hand instead of sleeping.
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Time as the engine reads it.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Monotonic time: heartbeat timeouts, resume grace, deadlines.
    fn now(&self) -> Instant;
    /// Wall time in seconds since the Unix epoch: timestamps clients see and records keep.
    fn epoch(&self) -> f64;
}

/// A shared clock.
pub type SharedClock = Arc<dyn Clock>;

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn epoch(&self) -> f64 {
        ish_core::now_epoch()
    }
}

/// The real clock, shared.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock that moves only when told to: both readings advance together.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    start_epoch: f64,
    elapsed: Mutex<Duration>,
}

impl ManualClock {
    /// A clock standing at the current real time.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            start_epoch: ish_core::now_epoch(),
            elapsed: Mutex::new(Duration::ZERO),
        })
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        *self.elapsed.lock().unwrap_or_else(|p| p.into_inner()) += by;
    }

    fn elapsed(&self) -> Duration {
        *self.elapsed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.elapsed()
    }

    fn epoch(&self) -> f64 {
        self.start_epoch + self.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_both_readings_together_and_only_when_told() {
        let c = ManualClock::new();
        let (t0, e0) = (c.now(), c.epoch());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(c.now(), t0);
        assert_eq!(c.epoch(), e0);
        c.advance(Duration::from_secs(90));
        assert_eq!(c.now() - t0, Duration::from_secs(90));
        assert!((c.epoch() - e0 - 90.0).abs() < 1e-6);
    }
}
