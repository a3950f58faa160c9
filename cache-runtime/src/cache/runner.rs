//! The operation runner: every backend call of a cache goes through it,
//! under the op timeout and the circuit breaker of its part of the backend,
//! with the breaker's probe started in a task of its own.

#[allow(clippy::wildcard_imports)]
use super::*;

/// `operation`, or a timeout error after `timeout`.
pub(crate) async fn within<T>(
    timeout: std::time::Duration,
    operation: impl std::future::Future<Output = Result<T, CacheError>>,
) -> Result<T, CacheError> {
    tokio::time::timeout(timeout, operation)
        .await
        .unwrap_or(Err(CacheError::Timeout(timeout)))
}

impl Cache {
    /// Runs a backend operation on `key` under the op timeout and the
    /// circuit breaker of `key`'s part of the backend: while the breaker is
    /// open the operation is not started and the result is
    /// `Err(CircuitOpen)`. Only unavailability (I/O, timeout) counts
    /// against Redis; an error reply such as `OOM` or `WRONGTYPE` does not.
    ///
    /// Cancel safe: a dropped operation holds nothing. The call that finds
    /// the breaker's cool-down over starts the probe in a task of its own
    /// and skips the cache, so no caller waits for the probe, and a caller
    /// dropped meanwhile cannot leave it pending.
    pub(crate) fn guarded<T>(
        &self,
        key: &str,
        operation: impl Future<Output = Result<T, CacheError>>,
    ) -> impl Future<Output = Result<T, CacheError>> {
        let breaker = self.inner.backend.breaker(&self.inner.breaker, key);
        self.run(breaker, operation, true)
    }

    /// Runs a backend operation on `key` under the op timeout, for the
    /// janitor, and tells the breaker how it went. It does not ask the
    /// breaker (the janitor's one worker may pay a timeout without slowing
    /// any call, and its success closes the breaker as a probe's would),
    /// except on a cluster, where it does not call a primary whose breaker
    /// is open (`Err(CircuitOpen)`, retried later): there, a command for a
    /// dead primary makes the `redis` crate's cluster connection hold every
    /// node's requests while it recovers.
    pub(crate) fn timed<T>(
        &self,
        key: &str,
        operation: impl Future<Output = Result<T, CacheError>>,
    ) -> impl Future<Output = Result<T, CacheError>> {
        let breaker = self.inner.backend.breaker(&self.inner.breaker, key);
        self.run(breaker, operation, false)
    }

    /// [`Cache::read_many`] of tags' tokens (or tag clocks'): one `MGET`
    /// where every key is on one part of the backend.
    pub(crate) async fn read_tokens_of(
        &self,
        keys: &[String],
    ) -> Result<Vec<Fetched<Vec<u8>>>, CacheError> {
        let inner = &*self.inner;
        let mut groups = inner.backend.by_breaker(&inner.breaker, keys);
        if groups.len() != 1 {
            return self.read_many(keys).await;
        }
        let (breaker, _) = groups.pop().expect("one group");
        let limit = inner.settings.read_limit;
        self.run(breaker, inner.backend.get_tokens(keys, limit), true)
            .await
    }

    /// A read of many keys, each part of the backend (each cluster primary)
    /// under its own breaker: the parts whose breaker is closed in one
    /// request, and if that fails, each of them alone. A part that failed
    /// or was skipped reads as absent, so its keys take the miss path,
    /// which fails open on its own; only when every part failed is the
    /// error returned.
    pub(crate) async fn read_many(
        &self,
        keys: &[String],
    ) -> Result<Vec<Fetched<Vec<u8>>>, CacheError> {
        let inner = &*self.inner;
        let limit = inner.settings.read_limit;
        let mut groups = inner.backend.by_breaker(&inner.breaker, keys);
        if groups.len() == 1 {
            let (breaker, _) = groups.pop().expect("one group");
            return self
                .run(breaker, inner.backend.get_many(keys, limit), true)
                .await;
        }
        // Several primaries. Those whose breaker lets calls through are
        // read together, as one request that the cluster connection splits
        // by slot (three requests for three primaries measured 10 % fewer
        // batches per second); the keys of the others read as absent.
        let all = groups.len();
        groups.retain(|(breaker, _)| match breaker.permit() {
            Permit::Call => true,
            Permit::Skip => false,
            Permit::Probe => {
                self.probe(Arc::clone(breaker));
                false
            }
        });
        if groups.is_empty() {
            return Err(CacheError::CircuitOpen);
        }
        // The keys' places when a part was skipped; when none was (the
        // usual case), the keys are read as they are, without a copy.
        let together: Option<Vec<usize>> = (groups.len() < all).then(|| {
            groups
                .iter()
                .flat_map(|(_, at)| at.iter().copied())
                .collect()
        });
        let copied: Vec<String>;
        let part = match &together {
            None => keys,
            Some(together) => {
                copied = together.iter().map(|&at| keys[at].clone()).collect();
                &copied[..]
            }
        };
        if let Ok(Ok(read)) = tokio::time::timeout(
            inner.settings.op_timeout,
            inner.backend.get_many(part, limit),
        )
        .await
        {
            for (breaker, _) in &groups {
                breaker.record_success();
            }
            let Some(together) = together else {
                return Ok(read);
            };
            let mut values = vec![Fetched::Absent; keys.len()];
            for (at, value) in together.into_iter().zip(read) {
                values[at] = value;
            }
            return Ok(values);
        }
        // Which primary failed is not known: each part again, on its own
        // and under its breaker, so that the failure counts where it
        // belongs and the other parts still serve. A batch that meets a
        // stalled primary before its breaker opens waits two op timeouts.
        self.read_parts(keys, groups).await
    }

    /// [`Cache::read_many`] of each part of `keys` (`groups`: the places of
    /// one primary's keys, with its breaker) on its own, concurrently; the
    /// keys of a part that failed read as absent, unless all failed.
    async fn read_parts(
        &self,
        keys: &[String],
        groups: Vec<(BreakerRef<'_>, Vec<usize>)>,
    ) -> Result<Vec<Fetched<Vec<u8>>>, CacheError> {
        let inner = &*self.inner;
        let reads = join_all(groups.into_iter().map(|(breaker, indices)| async move {
            let part: Vec<String> = indices.iter().map(|&at| keys[at].clone()).collect();
            let read = self
                .run(
                    breaker,
                    inner.backend.get_many(&part, inner.settings.read_limit),
                    true,
                )
                .await;
            (indices, read)
        }))
        .await;
        let mut values = vec![Fetched::Absent; keys.len()];
        let mut last_error = None;
        let mut any_read = false;
        for (indices, read) in reads {
            match read {
                Ok(read) => {
                    any_read = true;
                    for (at, value) in indices.into_iter().zip(read) {
                        values[at] = value;
                    }
                }
                Err(error) => last_error = Some(error),
            }
        }
        match last_error {
            Some(error) if !any_read => Err(error),
            _ => Ok(values),
        }
    }

    /// `DEL` of many keys, each part of the backend (each cluster primary)
    /// under its own breaker, concurrently. The keys whose part failed, and
    /// the last error, so that only those are retried.
    pub(crate) async fn delete_many(&self, keys: &[String]) -> (Vec<String>, Option<CacheError>) {
        let mut failed = Vec::new();
        let mut last_error = None;
        for (indices, deleted) in self.delete_parts(keys).await {
            if let Err(error) = deleted {
                failed.extend(indices.into_iter().map(|at| keys[at].clone()));
                // The error that says least about what landed wins: the
                // keys are marked landed only if every part reached its
                // primary.
                if !matches!(&last_error, Some(e) if !CacheError::is_not_replicated(e)) {
                    last_error = Some(error);
                }
            }
        }
        (failed, last_error)
    }

    /// `DEL` of many keys (durably, if so configured), each part of the
    /// backend under its own breaker, concurrently: the indices of each
    /// part's keys in `keys`, with its outcome.
    async fn delete_parts(&self, keys: &[String]) -> Vec<(Vec<usize>, Result<u64, CacheError>)> {
        let inner = &*self.inner;
        let groups = inner.backend.by_breaker(&inner.breaker, keys);
        join_all(groups.into_iter().map(|(breaker, indices)| async move {
            let part: Vec<String> = indices.iter().map(|&at| keys[at].clone()).collect();
            let deleted = self
                .run(breaker, inner.backend.delete_durably(&part), true)
                .await;
            (indices, deleted)
        }))
        .await
    }

    /// The one body of [`Cache::guarded`] and [`Cache::timed`]: they return
    /// its future rather than await it, which would store the operation
    /// twice in every caller's future.
    pub(super) async fn run<T>(
        &self,
        breaker: BreakerRef<'_>,
        operation: impl Future<Output = Result<T, CacheError>>,
        ask_breaker: bool,
    ) -> Result<T, CacheError> {
        let inner = &*self.inner;
        if !ask_breaker && breaker.is_open() && matches!(inner.backend, Backend::Cluster(_)) {
            // The janitor may be the only one left calling for this
            // primary (its keys' readers skip them while it retries): it
            // starts the probe once the cool-down is over.
            if breaker.permit() == Permit::Probe {
                self.probe(Arc::clone(breaker));
            }
            return Err(CacheError::CircuitOpen);
        }
        if ask_breaker {
            match breaker.permit() {
                Permit::Call => {}
                Permit::Skip => return Err(CacheError::CircuitOpen),
                Permit::Probe => {
                    self.probe(Arc::clone(breaker));
                    return Err(CacheError::CircuitOpen);
                }
            }
        }
        let started = breaker.failures_counted();
        // The memory backend cannot stall, and needs no Tokio timer.
        let outcome = if inner.backend.as_memory().is_some() {
            operation.await
        } else {
            match tokio::time::timeout(inner.settings.op_timeout, operation).await {
                Ok(outcome) => outcome,
                Err(_) => Err(CacheError::Timeout(inner.settings.op_timeout)),
            }
        };
        match &outcome {
            Err(error) if error.is_unavailable() => {
                // Every failure, unlike the limited warnings: which node
                // failed how, when a breaker opens where it should not.
                tracing::debug!(node = breaker.node(), %error, "cache operation failed");
                let timed_out = matches!(error, CacheError::Timeout(_));
                if error.counts_for_breaker() && breaker.record_failure_of(started, timed_out) {
                    self.log_opening(breaker, error);
                }
            }
            _ => breaker.record_success(),
        }
        outcome
    }

    /// Checks `breaker`'s part of the backend in a task of its own, which
    /// settles the breaker.
    fn probe(&self, breaker: Arc<Breaker>) {
        let inner = self.inner.clone();
        let probing = breaker.clone();
        let probe = async move {
            let breaker = probing;
            let slot = ProbeSlot::new(&breaker);
            let checked =
                tokio::time::timeout(inner.settings.op_timeout, inner.backend.check(&breaker))
                    .await;
            let outcome = checked.unwrap_or(Err(CacheError::Timeout(inner.settings.op_timeout)));
            if let Err(error) = &outcome {
                tracing::debug!(%error, node = breaker.node(), "circuit breaker probe failed: the cache stays skipped for another cool-down");
            }
            let healthy = outcome.is_ok();
            slot.settled(healthy);
            if healthy {
                inner.janitor.backend_back();
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(probe)),
            // Redis needs a runtime; without one the slot goes back at once.
            Err(_) => drop(ProbeSlot::new(&breaker)),
        }
    }

    fn log_opening(&self, breaker: &Breaker, error: &CacheError) {
        if error.is_rejected_credentials() {
            if let Some(suppressed) = self.inner.log_limit.admit() {
                log_rejected_credentials(error, suppressed);
            }
        } else {
            crate::limited!(
                self,
                warn!(
                    %error,
                    node = breaker.node(),
                    "cache unavailable: skipping it for a moment (circuit breaker open); calls run uncached"
                )
            );
        }
    }
}
