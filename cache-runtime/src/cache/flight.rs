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
//! handed a value computed from data read before it. A waiter is handed the
//! leader's answer when one of two things shows that it cannot have:
//!
//! - **Its call began before the body did.** Any write whose invalidation
//!   had completed when the waiter started had landed in the database
//!   before the body read it. This needs nothing from the cache, so it
//!   holds whatever the cache answers: a read that timed out, a breaker
//!   that is open, a server that is down or not connected yet. That is what
//!   keeps a burst of callers to one database query when the cache fails.
//! - **The cache proved that no write touched the key during the
//!   computation** (the leader's compare-and-set over its own lease
//!   succeeded, or the key still holds the same foreign lease it saw), and
//!   the waiter joined *before* that proof was sent: each waiter draws a
//!   ticket, the leader reads the ticket count (its fence) just before
//!   sending, and a later ticket is not covered. A waiter whose own read
//!   found a write of this process still to be delivered takes no proof:
//!   that write's `DEL` may not have reached the server the proof came
//!   from.
//!
//! Anyone else is told to look again (it reads the key itself, usually a
//! hit; with the cache unavailable, it joins the next flight, whose body
//! starts after it did). So while the cache cannot be asked, the callers
//! of a key in this process cost at most one body run at a time.
//!
//! # Landed answers linger
//!
//! A caller whose read was slow (a burst that makes the cache's reads time
//! out) may come to the flight after it landed, though it began before the
//! body did. So an answer stays in the map for a moment after it landed
//! (twice the op timeout, the longest a read takes, and within a bound on
//! the bytes kept), for the callers that began before its body started;
//! anyone else who comes to a landed flight leads a new one.
//!
//! # Failing keys
//!
//! After a few leaders in a row failed, the remaining waiters compute on
//! their own, through a [`Gate`] that lets at most [`FAILING_RUNS`] of them
//! at a time run the body for that key: a failing database is not hit by
//! every waiter at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

/// Body runs at once for a key whose leaders keep failing.
pub(crate) const FAILING_RUNS: usize = 2;
/// The most bytes that landed answers keep lingering at once (their
/// encoded values, keys and [`LANDED_OVERHEAD`] each).
const LINGERING_BYTES: usize = 16 * 1024 * 1024;
/// What a lingering answer weighs besides its value and key.
const LANDED_OVERHEAD: usize = 128;

/// How one computation ended, as its waiters see it.
#[derive(Debug, Clone)]
pub(crate) enum Landing {
    /// Still computing.
    Pending,
    /// The encoded value, for the waiters it covers.
    Value { bytes: Arc<[u8]>, cover: Cover },
    /// The answer "nothing" (`None`), for the waiters it covers.
    Nothing { cover: Cover },
    /// A value the leader found in the cache, or could not hand over:
    /// read the key again.
    LookAgain,
    /// The body failed (`Err`), or the leader was cancelled or panicked.
    Failed,
}

/// Which waiters an answer is good for; see the module docs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cover {
    /// When the body that computed it started.
    pub(crate) body_started: Instant,
    /// Tickets up to this one are covered by the cache's proof that no
    /// write touched the key meanwhile; 0 without a proof.
    pub(crate) fence: u64,
}

/// Who joins a flight: when its call began, and whether the cache's proof
/// covers it (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Joiner {
    pub(crate) began: Instant,
    pub(crate) takes_proof: bool,
}

/// What a waiter is handed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Handed {
    Value(Arc<[u8]>),
    Nothing,
    /// The leader's answer, not for this caller (its call began after the
    /// leader's body started, and no proof covers it): the next flight,
    /// whose body starts after this caller joined it, is.
    Later,
    LookAgain,
    Failed,
}

#[derive(Debug)]
struct Flight {
    landing: watch::Receiver<Landing>,
    tickets: Arc<AtomicU64>,
}

/// The computations in flight (and those that landed a moment ago), by
/// Redis key, and the keys whose leaders keep failing.
#[derive(Debug)]
pub(crate) struct Flights {
    in_flight: DashMap<String, Flight>,
    failing: DashMap<String, Arc<Semaphore>>,
    /// Keys of `fail_safe` functions whose body failed (or was slow) a
    /// moment ago, until when their kept value answers without running the
    /// body again.
    failed: DashMap<String, Instant>,
    /// Bodies finishing in the background (`soft_timeout`).
    background: Arc<Places>,
    /// Stores whose replies are awaited in the background
    /// ([`crate::write::lease::HeldLease::fulfil_soon`]).
    stores: Arc<Places>,
    /// How long a landed answer lingers.
    linger: Duration,
    lingering: Mutex<Lingering>,
}

/// The landed flights still in the map, oldest first.
#[derive(Debug, Default)]
struct Lingering {
    queue: VecDeque<Landed>,
    bytes: usize,
}

#[derive(Debug)]
struct Landed {
    until: Instant,
    key: String,
    landing: watch::Receiver<Landing>,
    bytes: usize,
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
    /// Landed: its flight lingers or has ended already.
    landed: bool,
}

/// A caller waiting for a leader, with its ticket.
pub(crate) struct Waiter {
    landing: watch::Receiver<Landing>,
    ticket: u64,
    joiner: Joiner,
}

impl Flights {
    /// Flights whose answers linger for `linger` after they landed.
    pub(crate) fn new(linger: Duration) -> Self {
        Flights {
            in_flight: DashMap::new(),
            failing: DashMap::new(),
            failed: DashMap::new(),
            background: Arc::default(),
            stores: Arc::default(),
            linger,
            lingering: Mutex::new(Lingering::default()),
        }
    }

    /// Leads the computation of `key`, or joins the one in flight, or takes
    /// the answer of one that landed a moment ago if it covers `joiner`.
    pub(crate) fn join(&self, key: &str, joiner: Joiner) -> Role<'_> {
        // Answers whose moment is over go, even when nothing lands for a
        // while; a caller that finds the queue busy leaves it to the other.
        if let Ok(mut lingering) = self.lingering.try_lock() {
            self.sweep(&mut lingering, Instant::now());
        }
        let flight = match self.in_flight.entry(key.to_owned()) {
            Entry::Occupied(flight) => {
                let landed = match &*flight.get().landing.borrow() {
                    Landing::Pending => None,
                    Landing::Value { cover, .. } | Landing::Nothing { cover } => {
                        Some(joiner.began < cover.body_started)
                    }
                    Landing::LookAgain | Landing::Failed => Some(false),
                };
                match landed {
                    // In flight, or landed with an answer for this caller
                    // (the wait returns at once).
                    None | Some(true) => {
                        let flight = flight.get();
                        return Role::Waiter(Waiter {
                            landing: flight.landing.clone(),
                            ticket: flight.tickets.fetch_add(1, Ordering::SeqCst) + 1,
                            joiner,
                        });
                    }
                    // Landed, not for this caller: it leads the next flight.
                    Some(false) => Entry::Occupied(flight),
                }
            }
            vacant => vacant,
        };
        let (landing, waiters) = watch::channel(Landing::Pending);
        let tickets = Arc::new(AtomicU64::new(0));
        drop(flight.insert_entry(Flight {
            landing: waiters,
            tickets: tickets.clone(),
        }));
        Role::Leader(Leader {
            flights: self,
            key: key.to_owned(),
            landing,
            tickets,
            landed: false,
        })
    }

    /// Keeps a landed flight with an answer of `bytes` in the map for a
    /// moment, if the bound on lingering bytes allows; whether it does.
    /// Every landing calls it, so that those whose moment is over go.
    fn linger(&self, key: &str, landing: &watch::Sender<Landing>, bytes: Option<usize>) -> bool {
        let now = Instant::now();
        let mut lingering = self.lingering.lock().unwrap_or_else(|e| e.into_inner());
        self.sweep(&mut lingering, now);
        let Some(value) = bytes else {
            return false;
        };
        let bytes = value + key.len() + LANDED_OVERHEAD;
        let Some(until) = now.checked_add(self.linger) else {
            return false;
        };
        if self.linger.is_zero() || lingering.bytes + bytes > LINGERING_BYTES {
            return false;
        }
        lingering.bytes += bytes;
        lingering.queue.push_back(Landed {
            until,
            key: key.to_owned(),
            landing: landing.subscribe(),
            bytes,
        });
        true
    }

    /// Removes the landed flights whose moment is over (unless a new flight
    /// of their key replaced them already).
    fn sweep(&self, lingering: &mut Lingering, now: Instant) {
        while lingering
            .queue
            .front()
            .is_some_and(|landed| landed.until <= now)
        {
            let Some(landed) = lingering.queue.pop_front() else {
                break;
            };
            lingering.bytes -= landed.bytes;
            self.in_flight.remove_if(&landed.key, |_, flight| {
                flight.landing.same_channel(&landed.landing)
            });
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

    /// Flights, gates, bodies finishing and stores awaited in the
    /// background in use: 0
    /// once no call is under way (landed answers that linger are not in
    /// use).
    #[cfg(any(test, feature = "__testing"))]
    pub(crate) fn len(&self) -> usize {
        let pending = self
            .in_flight
            .iter()
            .filter(|flight| matches!(*flight.landing.borrow(), Landing::Pending))
            .count();
        pending + self.failing.len() + self.in_background() + self.stores.taken()
    }
}

/// Bodies left to finish in the background at once, at most: past it, a
/// slow body is dropped at its soft timeout instead.
const BACKGROUND: usize = 1024;

/// Stores awaited in the background at once, at most: past it, a caller
/// waits for its store's reply itself.
const STORES: usize = 4096;

/// Places for work in the background, counted, with a wake-up for those
/// waiting until none is taken.
#[derive(Debug, Default)]
struct Places {
    taken: AtomicUsize,
    none_taken: Notify,
}

impl Places {
    fn taken(&self) -> usize {
        self.taken.load(Ordering::SeqCst)
    }
}

/// A place among the bodies finishing (or the stores awaited) in the
/// background, given back when the task holding it ends (or is dropped).
pub(crate) struct BackgroundSlot(Arc<Places>);

impl BackgroundSlot {
    /// One of `most` places, if one is free.
    fn take(places: &Arc<Places>, most: usize) -> Option<Self> {
        places
            .taken
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < most).then_some(n + 1)
            })
            .ok()
            .map(|_| BackgroundSlot(places.clone()))
    }
}

impl Drop for BackgroundSlot {
    fn drop(&mut self) {
        if self.0.taken.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.none_taken.notify_waiters();
        }
    }
}

impl Flights {
    /// A place for one more body in the background, if there is room.
    pub(crate) fn background_slot(&self) -> Option<BackgroundSlot> {
        BackgroundSlot::take(&self.background, BACKGROUND)
    }

    /// A place for one more store awaited in the background, if there is
    /// room.
    pub(crate) fn store_slot(&self) -> Option<BackgroundSlot> {
        BackgroundSlot::take(&self.stores, STORES)
    }

    /// Once no store is awaited in the background (see
    /// [`Cache::settled`](crate::Cache::settled)).
    pub(crate) async fn stores_settled(&self) {
        loop {
            let idle = self.stores.none_taken.notified();
            let mut idle = std::pin::pin!(idle);
            // Registered before the count is read, so that the last
            // store's wake-up cannot fall in between.
            idle.as_mut().enable();
            if self.stores.taken() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Bodies finishing in the background now.
    #[cfg(any(test, feature = "__testing"))]
    pub(crate) fn in_background(&self) -> usize {
        self.background.taken()
    }
}

/// Keys remembered as [`Flights::failed_lately`] at most: past it, the
/// oldest are not looked for, the map is emptied (each key then costs one
/// more body run).
const FAILED_KEYS: usize = 64 * 1024;

impl Flights {
    /// The body of `fail_safe` key `key` failed: for `pause`, its kept
    /// value answers without running the body again in this process.
    pub(crate) fn note_failure(&self, key: &str, pause: Duration) {
        if self.failed.len() >= FAILED_KEYS {
            self.failed.clear();
        }
        self.failed.insert(key.to_owned(), Instant::now() + pause);
    }

    /// Whether the body of `key` failed in this process a moment ago (see
    /// [`Flights::note_failure`]).
    pub(crate) fn failed_lately(&self, key: &str) -> bool {
        if self.failed.is_empty() {
            return false;
        }
        let now = Instant::now();
        let until = self.failed.get(key).map(|until| *until);
        match until {
            Some(until) if until > now => true,
            Some(_) => {
                self.failed.remove_if(key, |_, until| *until <= now);
                false
            }
            None => false,
        }
    }
}

/// A leader that found the value (or did not compute) tells its waiters,
/// if it leads any, to read the key themselves.
pub(crate) fn look_again(leader: Option<Leader<'_>>) {
    if let Some(leader) = leader {
        leader.land(Landing::LookAgain);
    }
}

impl Leader<'_> {
    /// The tickets drawn so far. Read it just before sending the command
    /// whose success proves the value fresh, and land with it.
    pub(crate) fn fence(&self) -> u64 {
        self.tickets.load(Ordering::SeqCst)
    }

    /// Hands the outcome to the waiters. An answer lingers for a moment
    /// (see the module docs); any other outcome ends the flight first, so
    /// that a woken waiter that looks again cannot join this flight.
    pub(crate) fn land(mut self, landing: Landing) {
        let bytes = match &landing {
            Landing::Value { bytes, .. } => Some(bytes.len()),
            Landing::Nothing { .. } => Some(0),
            Landing::Pending | Landing::LookAgain | Landing::Failed => None,
        };
        self.landed = true;
        if !self.flights.linger(&self.key, &self.landing, bytes) {
            self.end();
        }
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
        if !self.landed {
            self.end();
        }
    }
}

impl Waiter {
    /// Waits for the leader; see [`Handed`].
    pub(crate) async fn wait(mut self) -> Handed {
        let landed = self
            .landing
            .wait_for(|landing| !matches!(landing, Landing::Pending))
            .await;
        let joiner = self.joiner;
        let covered = |cover: &Cover| {
            joiner.began < cover.body_started || (joiner.takes_proof && self.ticket <= cover.fence)
        };
        match landed.as_deref() {
            Ok(Landing::Value { bytes, cover }) if covered(cover) => Handed::Value(bytes.clone()),
            Ok(Landing::Nothing { cover }) if covered(cover) => Handed::Nothing,
            Ok(Landing::Value { .. } | Landing::Nothing { .. }) => Handed::Later,
            Ok(Landing::LookAgain) => Handed::LookAgain,
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

    #[tokio::test]
    async fn settled_waits_for_the_stores_under_way() {
        let flights = Arc::new(Flights::new(Duration::from_secs(1)));
        // None under way: at once.
        flights.stores_settled().await;
        let (first, second) = (flights.store_slot().unwrap(), flights.store_slot().unwrap());
        let waiting = tokio::spawn({
            let flights = flights.clone();
            async move { flights.stores_settled().await }
        });
        tokio::task::yield_now().await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "one store is still under way");
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken when the last store ended")
            .unwrap();
        assert_eq!(flights.stores.taken(), 0);
    }

    /// A caller that began long ago and takes the proof.
    fn early() -> Joiner {
        Joiner {
            began: Instant::now(),
            takes_proof: true,
        }
    }

    fn leader(flights: &Flights) -> Leader<'_> {
        match flights.join("k", early()) {
            Role::Leader(leader) => leader,
            Role::Waiter(_) => panic!("expected to lead"),
        }
    }

    fn waiter(flights: &Flights, joiner: Joiner) -> Waiter {
        match flights.join("k", joiner) {
            Role::Waiter(waiter) => waiter,
            Role::Leader(_) => panic!("expected to wait"),
        }
    }

    /// A cover for a body that started just now, with a proof up to `fence`.
    fn proved(fence: u64) -> Cover {
        Cover {
            body_started: Instant::now(),
            fence,
        }
    }

    fn value(bytes: &[u8], cover: Cover) -> Landing {
        Landing::Value {
            bytes: Arc::from(bytes),
            cover,
        }
    }

    #[tokio::test]
    async fn waiters_get_the_leaders_value_and_the_flight_ends() {
        let flights = Flights::new(Duration::from_secs(1));
        let leader = leader(&flights);
        let waiter = waiter(&flights, early());
        assert!(
            matches!(flights.join("other", early()), Role::Leader(_)),
            "keys are independent"
        );
        let waiting = tokio::spawn(waiter.wait());
        let fence = leader.fence();
        leader.land(value(b"42", proved(fence)));
        assert_eq!(waiting.await.unwrap(), Handed::Value(Arc::from(&b"42"[..])));
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_began_after_the_body_needs_the_proof() {
        let flights = Flights::new(Duration::from_secs(1));
        let leader = leader(&flights);
        let body_started = Instant::now();
        let later = || Joiner {
            began: body_started + std::time::Duration::from_millis(1),
            takes_proof: true,
        };
        let proved_early = waiter(&flights, later());
        let fence = leader.fence();
        let after_the_proof = waiter(&flights, later());
        let not_trusting = waiter(
            &flights,
            Joiner {
                takes_proof: false,
                ..later()
            },
        );
        leader.land(value(
            b"1",
            Cover {
                body_started,
                fence,
            },
        ));
        assert_eq!(
            proved_early.wait().await,
            Handed::Value(Arc::from(&b"1"[..]))
        );
        assert_eq!(after_the_proof.wait().await, Handed::Later);
        assert_eq!(not_trusting.wait().await, Handed::Later);
    }

    #[tokio::test]
    async fn a_waiter_that_began_before_the_body_needs_no_proof() {
        let flights = Flights::new(Duration::from_secs(1));
        let began = Instant::now();
        let leader = leader(&flights);
        let waiting = waiter(
            &flights,
            Joiner {
                began,
                takes_proof: false,
            },
        );
        let body_started = began + std::time::Duration::from_millis(1);
        // No proof: the cache could not be asked.
        leader.land(Landing::Nothing {
            cover: Cover {
                body_started,
                fence: 0,
            },
        });
        assert_eq!(waiting.wait().await, Handed::Nothing);
    }

    #[tokio::test]
    async fn a_landed_answer_lingers_for_callers_that_began_before_its_body() {
        let flights = Flights::new(Duration::from_secs(60));
        let slow_reader = early();
        let leader = leader(&flights);
        let body_started = Instant::now();
        leader.land(value(
            b"7",
            Cover {
                body_started,
                fence: 0,
            },
        ));
        assert_eq!(
            flights.len(),
            0,
            "a lingering answer is not a flight in use"
        );
        // Its read was slow: it comes after the landing.
        match flights.join("k", slow_reader) {
            Role::Waiter(waiter) => {
                assert_eq!(waiter.wait().await, Handed::Value(Arc::from(&b"7"[..])));
            }
            Role::Leader(_) => panic!("the lingering answer covers it"),
        }
        let late = Joiner {
            began: body_started + Duration::from_millis(1),
            takes_proof: true,
        };
        assert!(
            matches!(flights.join("k", late), Role::Leader(_)),
            "a caller that began after the body leads the next flight"
        );
    }

    #[tokio::test]
    async fn a_lingering_answer_goes_after_its_moment() {
        let flights = Flights::new(Duration::from_millis(10));
        let slow_reader = early();
        leader(&flights).land(value(b"7", proved(0)));
        std::thread::sleep(Duration::from_millis(20));
        // Swept by the next landing.
        let other = match flights.join("other", early()) {
            Role::Leader(leader) => leader,
            Role::Waiter(_) => panic!("a new key"),
        };
        other.land(Landing::Failed);
        assert!(
            flights.in_flight.is_empty(),
            "nothing lingers past its moment"
        );
        assert!(matches!(flights.join("k", slow_reader), Role::Leader(_)));
    }

    #[tokio::test]
    async fn a_failed_or_dropped_leader_releases_its_waiters() {
        let flights = Flights::new(Duration::from_secs(1));
        let leader_one = leader(&flights);
        let waiting = waiter(&flights, early());
        leader_one.land(Landing::Failed);
        assert_eq!(waiting.wait().await, Handed::Failed);

        let leader_two = leader(&flights);
        let waiting = waiter(&flights, early());
        drop(leader_two);
        assert_eq!(waiting.wait().await, Handed::Failed);
        assert!(matches!(flights.join("k", early()), Role::Leader(_)));
    }

    #[tokio::test]
    async fn a_gate_admits_a_few_at_a_time_and_leaves_no_entry() {
        let flights = Flights::new(Duration::from_secs(1));
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
