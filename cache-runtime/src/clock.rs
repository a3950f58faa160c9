//! Time. No decision of the cache depends on a host's wall clock agreeing
//! with another's: expiry is the backend's (`PX`, `PTTL`), and waits and
//! the circuit breaker use the monotonic clock of this process.
//!
//! The wall clock is read only to stamp lease placeholders and freshness
//! headers with when they were written, for people reading them with
//! `redis-cli` ([`WallClock`]); nothing reads the stamps back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// For `PX`, which rejects 0.
pub(crate) fn px(duration: Duration) -> u64 {
    millis(duration).max(1)
}

/// This cache's view of the wall clock, with an offset that tests set to
/// play a host whose clock is wrong.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WallClock {
    pub(crate) offset_millis: i64,
}

impl WallClock {
    /// Now, in milliseconds since the Unix epoch (0 before 1970).
    pub(crate) fn now_millis(self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, millis);
        now.saturating_add_signed(self.offset_millis)
    }
}
