//! Milliseconds, as Redis counts them: durations for `PX`, and wall-clock
//! deadlines written into stored values (leases, freshness headers), which
//! several machines must read alike.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Now, in milliseconds since the Unix epoch (0 for a clock before 1970).
pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}
