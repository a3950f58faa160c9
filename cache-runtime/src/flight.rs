//! In-process single-flight: concurrent misses of one key run the body once.
//!
//! The first caller to miss becomes the leader; later callers wait on a
//! `watch` channel for the leader's *encoded* value and decode it themselves,
//! so the value type needs no `Clone`. If the leader's body fails, the
//! waiters are told so (not given the error, which they could not clone) and
//! elect a new leader among themselves; if the leader is cancelled or
//! panics, dropping its [`Leader`] closes the channel, with the same effect.
//! Nobody waits on a leader that no longer exists, and keys never wait on
//! each other.

use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::watch;

/// How one computation ended, as its waiters see it.
#[derive(Debug, Clone)]
pub(crate) enum Landing {
    /// Still computing.
    Pending,
    /// The encoded value.
    Value(Arc<[u8]>),
    /// The body returned something that is not cached (an `Err`, a `None`).
    Failed,
}

/// The computations in flight, by Redis key.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    in_flight: DashMap<String, watch::Receiver<Landing>>,
}

/// What a caller that missed does.
pub(crate) enum Role<'a> {
    /// Compute, then [`Leader::land`].
    Leader(Leader<'a>),
    /// Wait for the leader.
    Waiter(watch::Receiver<Landing>),
}

/// The right and duty to compute one key. Dropping it without landing
/// (cancellation, panic) releases the waiters, who elect a new leader.
pub(crate) struct Leader<'a> {
    flights: &'a Flights,
    key: String,
    landing: watch::Sender<Landing>,
}

impl Flights {
    /// Leads the computation of `key`, or joins the one in flight.
    pub(crate) fn join(&self, key: &str) -> Role<'_> {
        match self.in_flight.entry(key.to_owned()) {
            Entry::Occupied(flight) => Role::Waiter(flight.get().clone()),
            Entry::Vacant(slot) => {
                let (landing, waiters) = watch::channel(Landing::Pending);
                slot.insert(waiters);
                Role::Leader(Leader {
                    flights: self,
                    key: key.to_owned(),
                    landing,
                })
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.in_flight.len()
    }
}

impl Leader<'_> {
    /// Ends the flight, then hands the outcome to the waiters: in this order,
    /// so that a woken waiter that looks again cannot join this flight.
    pub(crate) fn land(self, landing: Landing) {
        self.end();
        self.landing.send_replace(landing);
    }

    fn end(&self) {
        // Only this leader's own flight: a later one may use the same key.
        let own = self.landing.subscribe();
        self.flights
            .in_flight
            .remove_if(&self.key, |_, waiters| waiters.same_channel(&own));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        // Cancelled or panicked before landing: the channel closes after
        // this, which releases the waiters.
        self.end();
    }
}

/// Waits for the leader. `None` when it failed, was cancelled or panicked:
/// the caller then tries to lead.
pub(crate) async fn wait(mut waiters: watch::Receiver<Landing>) -> Option<Arc<[u8]>> {
    let landed = waiters
        .wait_for(|landing| !matches!(landing, Landing::Pending))
        .await;
    match landed.as_deref() {
        Ok(Landing::Value(bytes)) => Some(bytes.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_get_the_leaders_value_and_the_flight_ends() {
        let flights = Flights::default();
        let Role::Leader(leader) = flights.join("k") else {
            panic!("first caller leads");
        };
        let Role::Waiter(waiter) = flights.join("k") else {
            panic!("second caller waits");
        };
        assert!(
            matches!(flights.join("other"), Role::Leader(_)),
            "keys are independent"
        );
        let waiting = tokio::spawn(wait(waiter));
        leader.land(Landing::Value(Arc::from(&b"42"[..])));
        assert_eq!(waiting.await.unwrap().as_deref(), Some(&b"42"[..]));
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_failed_or_dropped_leader_releases_its_waiters() {
        let flights = Flights::default();
        let Role::Leader(leader) = flights.join("k") else {
            panic!()
        };
        let Role::Waiter(waiter) = flights.join("k") else {
            panic!()
        };
        leader.land(Landing::Failed);
        assert_eq!(wait(waiter).await, None);

        let Role::Leader(leader) = flights.join("k") else {
            panic!("a new flight")
        };
        let Role::Waiter(waiter) = flights.join("k") else {
            panic!()
        };
        drop(leader);
        assert_eq!(wait(waiter).await, None);
        assert!(matches!(flights.join("k"), Role::Leader(_)));
    }
}
