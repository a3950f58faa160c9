//! Running a cached function's body: timed (its start says which of a
//! flight's waiters its answer covers, see [`crate::cache::flight`]; its
//! length feeds early refresh), for at most a soft timeout when an old
//! value can answer meanwhile, and with its panic caught when a value kept
//! by `fail_safe` can answer instead.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use crate::cache::Cache;
use crate::read::call::Erased;

/// After a failed (or slow) refresh, how long the old value is served
/// before the next one is tried (stale-if-error, without a refresh storm).
pub(crate) const REFRESH_RETRY_AFTER: Duration = Duration::from_secs(1);

/// When a computation's body ran.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub(crate) started: Instant,
    pub(crate) took: Duration,
}

impl Run {
    /// Runs `body`, timing it.
    pub(crate) async fn time<T>(body: impl Future<Output = T>) -> (T, Run) {
        let started = Instant::now();
        let output = body.await;
        let took = started.elapsed();
        (output, Run { started, took })
    }
}

/// How a body ran while an old value could answer.
pub(crate) enum Ran {
    Done(Run),
    /// Still running at its limit, left where it stands (to be handed to
    /// a task, or dropped).
    Slow {
        started: Instant,
    },
}

/// Runs the body of `call`, for at most `limit` if there is one. With
/// `catch`, a panic is caught and logged: the body then failed (its
/// output is missing), and the caller answers with what it kept.
pub(crate) async fn run(
    cache: &Cache,
    key: &str,
    call: &mut Erased<'_>,
    limit: Option<Duration>,
    catch: bool,
) -> Ran {
    let started = Instant::now();
    let done = async {
        match limit {
            Some(limit) => call.run_body_for(limit).await,
            None => {
                call.run_body().await;
                true
            }
        }
    };
    let done = if catch {
        match AssertUnwindSafe(done).catch_unwind().await {
            Ok(done) => done,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                crate::limited!(
                    cache,
                    error!(key, panic = %message, "cached function panicked: answering with the value fail_safe kept")
                );
                true
            }
        }
    } else {
        done.await
    };
    if done {
        Ran::Done(Run {
            started,
            took: started.elapsed(),
        })
    } else {
        Ran::Slow { started }
    }
}
