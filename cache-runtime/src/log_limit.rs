//! Bounded logging: during an outage every call would log the same failure,
//! so a cache logs at most [`LINES_PER_SECOND`] warnings and errors per
//! second and says in the next line it logs how many it left out.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

/// The most warning and error lines one cache logs per second.
pub(crate) const LINES_PER_SECOND: u32 = 10;

#[derive(Debug, Default)]
pub(crate) struct LogLimit {
    /// The second (since the process's first use) the count is for.
    second: AtomicU64,
    lines: AtomicU32,
    suppressed: AtomicU64,
}

impl LogLimit {
    /// `Some(lines left out since the last one)` if a line may be logged now.
    pub(crate) fn admit(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        let now = START.get_or_init(Instant::now).elapsed().as_secs() + 1;
        let second = self.second.load(Ordering::Relaxed);
        if second != now
            && self
                .second
                .compare_exchange(second, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.lines.store(0, Ordering::Relaxed);
        }
        if self.lines.fetch_add(1, Ordering::Relaxed) < LINES_PER_SECOND {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `limited!(cache, warn!(key, %error, "message"))`: a `tracing` event,
/// if the cache's log limit admits it, with a `suppressed` field.
macro_rules! limited {
    ($cache:expr, $level:ident!($($arg:tt)+)) => {
        if let Some(suppressed) = $cache.log_limit().admit() {
            ::tracing::$level!(suppressed, $($arg)+);
        }
    };
}
pub(crate) use limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_to_the_limit_and_the_rest_counted() {
        let limit = LogLimit::default();
        let admitted = (0..1000).filter(|_| limit.admit().is_some()).count();
        assert!(admitted <= 2 * LINES_PER_SECOND as usize, "{admitted}");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(limit.admit().is_some_and(|suppressed| suppressed > 900));
    }
}
