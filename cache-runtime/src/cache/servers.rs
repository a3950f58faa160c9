//! What a cache reads of its servers: `INFO` once when it connects (which
//! server it is, a `maxmemory-policy` that refuses cache writes), then
//! every 10 s for as long as the cache lives, to count the keys the
//! servers evict. The reports themselves are parsed in
//! `backend/info.rs`; the operator's view ([`crate::inspect`]) shows them.

use std::time::Duration;

use crate::backend::info::{ServerReport, Warning};
use crate::cache::{Cache, WeakCache, within};
use crate::error::CacheError;
use crate::holder::Holder;

/// How often a cache reads its servers' `INFO` after connecting.
const READ_INFO_EVERY: Duration = Duration::from_secs(10);

impl Cache {
    /// What each server says of itself (`INFO`): on a cluster, one report
    /// per primary. Each reading also counts the server's evictions into
    /// [`Stats::server`](crate::Stats::server).
    ///
    /// Fails with [`CacheError::NotRedis`] on the in-process backend, and
    /// with the server's refusal (`NOPERM`) for an ACL user without
    /// `+info`. Cancel safe: it only reads.
    pub async fn server_reports(&self) -> Result<Vec<ServerReport>, CacheError> {
        let backend = self.backend();
        let timeout = self.settings().op_timeout;
        let read = |target: Option<String>| async move {
            let info = within(timeout, backend.info(target.as_deref())).await?;
            Ok::<_, CacheError>(ServerReport::parse(target, &info))
        };
        let readings =
            futures_util::future::join_all(backend.info_targets().into_iter().map(read)).await;
        let mut reports = Vec::with_capacity(readings.len());
        for reading in readings {
            let report = reading?;
            let address = report.address.as_deref().unwrap_or_default();
            self.recorder()
                .note_evicted_keys(address, &report.run_id, report.evicted_keys);
            reports.push(report);
        }
        Ok(reports)
    }
}

/// The first reading of a new cache's servers, when it reached them
/// (`answered`): logs which they are and warns of a `maxmemory-policy`
/// that refuses cache writes once memory is full. Then reads them every
/// 10 s in a task of its own, for as long as the cache lives, to count
/// evictions (and, if they were not reachable at first, to log and warn
/// on the first reading). Nothing on the in-process backend, and nothing
/// more where `INFO` is refused.
pub(crate) async fn first_reading(cache: &Cache, answered: bool) {
    if cache.backend().as_memory().is_some() {
        return;
    }
    let mut announced = false;
    if answered {
        match cache.server_reports().await {
            Ok(reports) => {
                announce(&reports);
                announced = true;
            }
            Err(error) if error.is_not_permitted() => return refused(&error),
            // Slow: the task reads it later.
            Err(error) => tracing::debug!(%error, "INFO not read at connect"),
        }
    }
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::spawn(read_info(cache.downgrade(), announced));
    }
}

/// Logs which servers a cache connected to, and warns of a policy that
/// refuses writes.
fn announce(reports: &[ServerReport]) {
    for report in reports {
        let address = report.address.as_deref().unwrap_or("-");
        tracing::info!(
            server = %report.server,
            address,
            maxmemory = report.maxmemory,
            maxmemory_policy = %report.maxmemory_policy,
            holder = %Holder::this_process(),
            "cache connected"
        );
        if report.refuses_writes_when_full() {
            tracing::warn!(
                server = %report.server,
                address,
                maxmemory = report.maxmemory,
                "{}",
                Warning::NoEviction
            );
        }
    }
}

fn refused(error: &CacheError) {
    tracing::info!(
        %error,
        holder = %Holder::this_process(),
        "cache connected; its user may not run INFO: the server is not named and evictions are not counted"
    );
}

/// Reads the servers' `INFO` every [`READ_INFO_EVERY`] while the cache
/// lives (its handle is not kept between readings).
async fn read_info(cache: WeakCache, mut announced: bool) {
    loop {
        tokio::time::sleep(READ_INFO_EVERY).await;
        let Some(cache) = cache.upgrade() else { return };
        // An outage: the breaker's probe, not this, finds the server again.
        if cache.breaker().is_open() {
            continue;
        }
        match cache.server_reports().await {
            Ok(reports) if !announced => {
                announce(&reports);
                announced = true;
            }
            Ok(_) => {}
            Err(error) if error.is_not_permitted() => return refused(&error),
            Err(_) => {}
        }
    }
}
