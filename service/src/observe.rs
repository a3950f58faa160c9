//! What an operator of the service watches: the cache's metrics in
//! Prometheus's text format (`GET /metrics`, with the `metrics` feature:
//! `cargo run --release -p cache-service --features metrics`), and a
//! warning in the log when a cached function's hit ratio stays below 70 %,
//! where a cache is mostly overhead.

use std::collections::BTreeMap;
use std::time::Duration;

use cache_runtime::{Cache, Counts};

/// Below this share of lookups answered from the cache, a function's
/// cache costs more than it saves.
pub const LOW_HIT_RATIO: f64 = 0.70;

/// The process's Prometheus recorder, installed on first call (before the
/// first cached call, so that every counter reaches it); `None` when the
/// example is built without the `metrics` feature.
#[cfg(feature = "metrics")]
pub fn prometheus() -> Option<&'static metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .ok()
        })
        .as_ref()
}

/// Without the `metrics` feature there is nothing to export.
#[cfg(not(feature = "metrics"))]
pub fn prometheus() -> Option<&'static ()> {
    None
}

/// The body of `GET /metrics`.
pub fn render() -> String {
    #[cfg(feature = "metrics")]
    if let Some(handle) = prometheus() {
        return handle.render();
    }
    "# built without the `metrics` feature: cargo run --release -p cache-service --features metrics\n"
        .to_owned()
}

/// Every `every`, the hit ratio of each function of the installed cache
/// over that interval; a function that stays below [`LOW_HIT_RATIO`] for
/// three intervals in a row (with at least 50 lookups each) gets a
/// warning. Returns the warnings it gave, once `stop` changes.
pub async fn watch_hit_ratios(
    every: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let mut before: BTreeMap<&'static str, Counts> = BTreeMap::new();
    let mut low_for: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut stop = stop;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return warnings,
        }
        // The installed cache, whichever it is now (a new one starts
        // from zero: its first interval is skipped).
        let Some(cache) = Cache::installed() else {
            continue;
        };
        let now = cache.stats().functions;
        for (function, counts) in &now {
            let Some(old) = before.get(function).copied() else {
                continue;
            };
            if counts.calls() < old.calls() {
                continue;
            }
            let served = (counts.hits + counts.local_hits + counts.stale_hits + counts.coalesced)
                .saturating_sub(old.hits + old.local_hits + old.stale_hits + old.coalesced);
            let computed =
                (counts.misses + counts.refreshes).saturating_sub(old.misses + old.refreshes);
            let lookups = served + computed;
            if lookups < 50 {
                continue;
            }
            let ratio = served as f64 / lookups as f64;
            let low = low_for.entry(function).or_default();
            *low = if ratio < LOW_HIT_RATIO { *low + 1 } else { 0 };
            if *low == 3 {
                let warning = format!(
                    "{function}: hit ratio {:.0} % for {:?}, below {:.0} %: the cache is mostly overhead here (TTL too short, keys too fine, or writes too frequent)",
                    ratio * 100.0,
                    every * 3,
                    LOW_HIT_RATIO * 100.0
                );
                tracing::warn!("{warning}");
                warnings.push(warning);
            }
        }
        before = now;
    }
}
