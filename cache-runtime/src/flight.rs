//! In-process single-flight: concurrent misses of one key run the body once.
//!
//! The first caller to miss becomes the leader; later callers wait on a
//! `watch` channel for the leader's *encoded* value and decode it themselves,
//! so the value type needs no `Clone`. If the leader's body fails, the
//! waiters are told so (not given the error, which they could not clone) and
//! elect a new leader among themselves; if the leader is cancelled or
//! panics, dropping its [`Leader`] closes the channel, with the same effect.
//!
//! # Writes fence the flight
//!
//! A caller that starts after a write's invalidation completed must not be
//! handed a value computed from data read before it. A leader therefore
//! hands its value over only when the cache proves that no write touched
//! the key during its computation (its compare-and-set over its own lease
//! succeeded, or the key still holds the same foreign lease it saw), and
//! only to the waiters that joined *before* it sent that proof: each waiter
//! draws a ticket, the leader reads the ticket count (its fence) just
//! before sending, and a later ticket is told to look again (it reads the
//! key itself, usually a hit). A waiter that joined later may have started
//! after the write, and the proof came too early to cover it.
//!
//! # Failing keys
//!
//! After a few leaders in a row failed, the remaining waiters compute on
//! their own, through a [`Gate`] that lets at most [`FAILING_RUNS`] of them
//! at a time run the body for that key: a failing database is not hit by
//! every waiter at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// Body runs at once for a key whose leaders keep failing.
pub(crate) const FAILING_RUNS: usize = 2;

/// How one computation ended, as its waiters see it.
#[derive(Debug, Clone)]
pub(crate) enum Landing {
    /// Still computing.
    Pending,
    /// The encoded value, good for tickets up to `fence`.
    Value { bytes: Arc<[u8]>, fence: u64 },
    /// The answer "nothing" (`None`), good for tickets up to `fence`.
    Nothing { fence: u64 },
    /// A value the leader could not prove fresh, or found in the cache:
    /// read the key again.
    LookAgain,
    /// The body failed (`Err`), or the leader was cancelled or panicked.
    Failed,
}

/// What a waiter is handed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Handed {
    Value(Arc<[u8]>),
    Nothing,
    LookAgain,
    Failed,
}

#[derive(Debug)]
struct Flight {
    landing: watch::Receiver<Landing>,
    tickets: Arc<AtomicU64>,
}

/// The computations in flight, by Redis key, and the keys whose leaders
/// keep failing.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    in_flight: DashMap<String, Flight>,
    failing: DashMap<String, Arc<Semaphore>>,
}

/// What a caller that missed does.
pub(crate) enum Role<'a> {
    /// Compute, then [`Leader::land`].
    Leader(Leader<'a>),
    /// Wait for the leader.
    Waiter(Waiter),
}

/// The right and duty to compute one key. Dropping it without landing
/// (cancellation, panic) releases the waiters, who elect a new leader.
pub(crate) struct Leader<'a> {
    flights: &'a Flights,
    key: String,
    landing: watch::Sender<Landing>,
    tickets: Arc<AtomicU64>,
}

/// A caller waiting for a leader, with its ticket.
pub(crate) struct Waiter {
    landing: watch::Receiver<Landing>,
    ticket: u64,
}

impl Flights {
    /// Leads the computation of `key`, or joins the one in flight.
    pub(crate) fn join(&self, key: &str) -> Role<'_> {
        match self.in_flight.entry(key.to_owned()) {
            Entry::Occupied(flight) => {
                let flight = flight.get();
                Role::Waiter(Waiter {
                    landing: flight.landing.clone(),
                    ticket: flight.tickets.fetch_add(1, Ordering::SeqCst) + 1,
                })
            }
            Entry::Vacant(slot) => {
                let (landing, waiters) = watch::channel(Landing::Pending);
                let tickets = Arc::new(AtomicU64::new(0));
                slot.insert(Flight {
                    landing: waiters,
                    tickets: tickets.clone(),
                });
                Role::Leader(Leader {
                    flights: self,
                    key: key.to_owned(),
                    landing,
                    tickets,
                })
            }
        }
    }

    /// The gate of a key whose leaders keep failing.
    pub(crate) fn gate(&self, key: &str) -> Gate<'_> {
        let semaphore = self
            .failing
            .entry(key.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(FAILING_RUNS)))
            .clone();
        Gate {
            flights: self,
            key: key.to_owned(),
            semaphore,
        }
    }

    /// Flights and gates in use: 0 once no call is under way.
    pub(crate) fn len(&self) -> usize {
        self.in_flight.len() + self.failing.len()
    }
}

impl Leader<'_> {
    /// The tickets drawn so far. Read it just before sending the command
    /// whose success proves the value fresh, and land with it.
    pub(crate) fn fence(&self) -> u64 {
        self.tickets.load(Ordering::SeqCst)
    }

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
            .remove_if(&self.key, |_, flight| flight.landing.same_channel(&own));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        // Cancelled or panicked before landing: the channel closes after
        // this, which releases the waiters.
        self.end();
    }
}

impl Waiter {
    /// Waits for the leader; see [`Handed`].
    pub(crate) async fn wait(mut self) -> Handed {
        let landed = self
            .landing
            .wait_for(|landing| !matches!(landing, Landing::Pending))
            .await;
        let covered = |fence: u64| self.ticket <= fence;
        match landed.as_deref() {
            Ok(Landing::Value { bytes, fence }) if covered(*fence) => Handed::Value(bytes.clone()),
            Ok(Landing::Nothing { fence }) if covered(*fence) => Handed::Nothing,
            Ok(Landing::Value { .. } | Landing::Nothing { .. } | Landing::LookAgain) => {
                Handed::LookAgain
            }
            Ok(Landing::Pending | Landing::Failed) | Err(_) => Handed::Failed,
        }
    }
}

/// Admission to the body for a key whose leaders keep failing. Its map
/// entry goes when the last caller holding the gate drops it.
pub(crate) struct Gate<'a> {
    flights: &'a Flights,
    key: String,
    semaphore: Arc<Semaphore>,
}

impl Gate<'_> {
    /// Waits for one of the [`FAILING_RUNS`] places. Keep the permit in a
    /// variable declared after the gate, so it drops first.
    pub(crate) async fn enter(&self) -> Option<OwnedSemaphorePermit> {
        self.semaphore.clone().acquire_owned().await.ok()
    }
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        // The map's reference and this one: nobody else is at the gate.
        self.flights
            .failing
            .remove_if(&self.key, |_, semaphore| Arc::strong_count(semaphore) <= 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader(flights: &Flights) -> Leader<'_> {
        match flights.join("k") {
            Role::Leader(leader) => leader,
            Role::Waiter(_) => panic!("expected to lead"),
        }
    }

    fn waiter(flights: &Flights) -> Waiter {
        match flights.join("k") {
            Role::Waiter(waiter) => waiter,
            Role::Leader(_) => panic!("expected to wait"),
        }
    }

    #[tokio::test]
    async fn waiters_get_the_leaders_value_and_the_flight_ends() {
        let flights = Flights::default();
        let leader = leader(&flights);
        let waiter = waiter(&flights);
        assert!(
            matches!(flights.join("other"), Role::Leader(_)),
            "keys are independent"
        );
        let waiting = tokio::spawn(waiter.wait());
        let fence = leader.fence();
        leader.land(Landing::Value {
            bytes: Arc::from(&b"42"[..]),
            fence,
        });
        assert_eq!(waiting.await.unwrap(), Handed::Value(Arc::from(&b"42"[..])));
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_joined_after_the_fence_looks_again() {
        let flights = Flights::default();
        let leader = leader(&flights);
        let early = waiter(&flights);
        let fence = leader.fence();
        let late = waiter(&flights); // joined after the proof was sent
        leader.land(Landing::Value {
            bytes: Arc::from(&b"1"[..]),
            fence,
        });
        assert_eq!(early.wait().await, Handed::Value(Arc::from(&b"1"[..])));
        assert_eq!(late.wait().await, Handed::LookAgain);
    }

    #[tokio::test]
    async fn a_failed_or_dropped_leader_releases_its_waiters() {
        let flights = Flights::default();
        let leader_one = leader(&flights);
        let waiting = waiter(&flights);
        leader_one.land(Landing::Failed);
        assert_eq!(waiting.wait().await, Handed::Failed);

        let leader_two = leader(&flights);
        let waiting = waiter(&flights);
        drop(leader_two);
        assert_eq!(waiting.wait().await, Handed::Failed);
        assert!(matches!(flights.join("k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn a_gate_admits_a_few_at_a_time_and_leaves_no_entry() {
        let flights = Flights::default();
        let gates: Vec<Gate<'_>> = (0..3).map(|_| flights.gate("k")).collect();
        let mut permits = Vec::new();
        for gate in &gates[..FAILING_RUNS] {
            permits.push(gate.enter().await.unwrap());
        }
        let third = tokio::time::timeout(std::time::Duration::from_millis(20), gates[2].enter());
        assert!(third.await.is_err(), "only {FAILING_RUNS} at a time");
        drop(permits);
        drop(gates);
        assert_eq!(flights.len(), 0);
    }
}
