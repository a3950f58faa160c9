//! The read path: a cached call from its key to its answer.
//!
//! - [`lookup`]: one key. Read, classify what was found (a value, fresh or
//!   stale; a negative entry; a lease; garbage), coalesce with the calls in
//!   flight, take the lease, compute, store.
//! - [`batch`]: many keys in one call, over the same steps.
//! - [`call`]: the typed half of a call, behind the interface that lets
//!   the read path be compiled once.
//! - [`fail_safe`]: an expired entry kept to answer when the body fails.
//! - single flight, the computations in flight by key, is state the
//!   handle keeps for every call: [`crate::cache::flight`].
//! - [`found`]: what one read of a key found.
//! - [`run`]: running a body: timed, within a soft timeout, its panic
//!   caught where an old value can answer.
//! - [`freshness`]: the header of a value that is served stale or
//!   refreshed early.
//! - [`tagged`]: an entry checked against its tags' tokens.

pub(crate) mod batch;
pub(crate) mod call;
pub(crate) mod fail_safe;
pub(crate) mod found;
pub(crate) mod freshness;
pub(crate) mod lookup;
pub(crate) mod run;
pub(crate) mod tagged;
