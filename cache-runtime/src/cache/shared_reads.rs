//! Concurrent reads of one key share one request, without breaking
//! read-your-writes. What a caller sees of it (the bounds, which reads
//! share) is in the guide (`guide/stampede.md`); this is how.
//!
//! A key's slot counts its reads in flight. Below [`IN_FLIGHT`], a call
//! sends its own read. At the limit, the calls that come form the *next*
//! read: the first of them (its leader) sends it once a read in flight
//! answers (that read's sender hands its place over) or after
//! [`WAIT_FOR_FLIGHT`] of the op timeout (then it takes a place of its
//! own), and the others (joiners) share its reply. Each goes on as if it
//! had read the key itself: it decodes its own copy, takes its own lease
//! on a miss, and so on.
//!
//! # Why a call never joins a read already sent
//!
//! A read sent before a call started may have reached the server before a
//! write that completed before the call started (this process's or
//! another's): its reply may be older than the call is allowed to see. So
//! a call joins only the next read, which is taken out of the slot, under
//! the slot's lock, before its leader sends it: every joiner joined before
//! the read was sent, exactly as if each had sent it then.
//!
//! # Cancellation
//!
//! A sender's place is an [`InFlight`] guard, a leader's a [`Leading`]
//! one: dropped at any point, they hand the place over or give it back,
//! and a leader dropped before its reply landed tells its joiners, who
//! look again (join or lead the next read). A joiner holds nothing.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::backend::{Fetched, Ttl};
use crate::error::CacheError;

/// The share of the op timeout that a read waits for the one in flight
/// before it is sent anyway (a divisor: half).
pub(crate) const WAIT_FOR_FLIGHT: u32 = 2;

/// Reads of one key in flight at once, before calls wait to share the
/// next: two, so that two calls that meet on a key by chance (not a hot
/// key) do not wait for each other.
pub(crate) const IN_FLIGHT: u32 = 2;

/// Shards of the map of reads in flight: a hot key's lock is not every
/// key's.
const SHARDS: usize = 64;

/// What one read found, as its sender gives it to the reads that shared it.
pub(crate) type Reply = Result<Fetched<(Vec<u8>, Ttl)>, CacheError>;

/// How a call's read went.
pub(crate) enum Shared {
    /// This call sent the read: its outcome, to be counted and logged.
    Sent(Reply),
    /// Another call sent it, after this one started: a copy of what it
    /// found, or why it failed (logged by its sender).
    Joined(Result<Fetched<(Vec<u8>, Ttl)>, Failed>),
}

/// Why a shared read failed, for its joiners (an error cannot be cloned):
/// they read it as its sender did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failed {
    /// Skipped: the circuit breaker is open (not an error of the call).
    Skipped,
    /// Someone stored another type under the key: garbage, replaced.
    WrongType,
    /// Any other failure: the call runs uncached.
    Unavailable,
}

impl Failed {
    fn of(error: &CacheError) -> Failed {
        match error {
            CacheError::CircuitOpen => Failed::Skipped,
            error if !error.is_unavailable() && error.is_wrong_type() => Failed::WrongType,
            _ => Failed::Unavailable,
        }
    }
}

/// What the joiners of a read share.
type Landed = Result<Fetched<(Vec<u8>, Ttl)>, Failed>;

/// Looks at a key's slot again after the leader it joined was dropped, at
/// most this many times, before it reads alone.
const LOOKS: usize = 3;

/// The reads in flight of one cache, by key (see the module docs).
#[derive(Debug)]
pub(crate) struct SharedReads {
    shards: Box<[Mutex<Shard>]>,
    hasher: foldhash::fast::RandomState,
    /// How long the next read waits for the one in flight.
    wait: Duration,
    /// How long a call that does not send at once may wait for a reply
    /// before it reads alone.
    patience: Duration,
    /// Whether reads are shared: not on the memory backend.
    share: bool,
    /// [`IN_FLIGHT`], or 1 in some tests (`testing::share_reads_from_the_first`).
    most: AtomicU32,
    /// Calls that shared another's read, for the tests.
    joined: AtomicU64,
}

/// Some keys' slots.
type Shard = HashMap<u64, Slot, BuildHasherDefault<Prehashed>>;

/// One key's reads: the one in flight, and the next, if any call waits for
/// it.
#[derive(Debug)]
struct Slot {
    /// Reads in flight, at most [`IN_FLIGHT`].
    sent: u32,
    next: Option<Arc<Next>>,
}

/// A read not sent yet, and the calls that wait for its reply.
#[derive(Debug)]
struct Next {
    /// Its key (a slot is found by the key's hash; two keys with one hash
    /// never share a reply).
    key: Box<str>,
    with_ttl: bool,
    /// Its leader may send it (the read in flight answered).
    go: Notify,
    reply: Mutex<NextReply>,
    landed: Notify,
}

#[derive(Debug)]
enum NextReply {
    Waiting,
    /// Shared by reference: each joiner copies it outside the lock.
    Landed(Arc<Landed>),
    /// The leader was dropped first: look again.
    Abandoned,
}

/// The hash of a slot's key is its map key: hashed once, not again.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys")
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// How a joiner's wait ended.
enum Joined {
    Landed(Arc<Landed>),
    /// Its leader was dropped first: look again.
    Abandoned,
    /// Past the call's budget: read alone.
    TimedOut,
}

/// What a call is to do with its read.
enum Role {
    /// Send it now: fewer than [`IN_FLIGHT`] reads of the key are in
    /// flight.
    Send,
    /// Send it once the read in flight answers, for the calls that join.
    Lead(Arc<Next>),
    /// Wait for the next read's reply.
    Join(Arc<Next>),
    /// Read alone (another key with the same hash waits next).
    Alone,
}

impl SharedReads {
    /// The reads of a cache with op timeout `op_timeout`; `share: false`
    /// for a backend without round trips, whose reads all go alone.
    pub(crate) fn new(op_timeout: Duration, share: bool) -> Self {
        let wait = op_timeout / WAIT_FOR_FLIGHT;
        SharedReads {
            share,
            most: AtomicU32::new(IN_FLIGHT),
            joined: AtomicU64::new(0),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: foldhash::fast::RandomState::default(),
            wait,
            patience: wait.saturating_add(op_timeout),
        }
    }

    /// Reads `key` with `send`, or shares a read of it that is not sent
    /// yet (see the module docs).
    pub(crate) async fn read<F>(
        &self,
        key: &str,
        with_ttl: bool,
        send: impl FnOnce() -> F,
    ) -> Shared
    where
        F: Future<Output = Reply>,
    {
        if !self.share {
            return Shared::Sent(send().await);
        }
        let hash = self.hash(key, with_ttl);
        // A call that waits does so within one budget, however many times
        // it looks: set when it first waits (a call that sends at once
        // reads no clock).
        let mut deadline = None;
        for _ in 0..LOOKS {
            match self.role(hash, key, with_ttl) {
                Role::Send => {
                    let _sent = InFlight { reads: self, hash };
                    return Shared::Sent(send().await);
                }
                // Boxed, as the join below: rare, and a hit's future is
                // moved on every call.
                Role::Lead(next) => {
                    let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.patience);
                    return Box::pin(self.lead(hash, next, deadline, send)).await;
                }
                Role::Join(next) => {
                    let until = *deadline.get_or_insert_with(|| Instant::now() + self.patience);
                    match Box::pin(self.join(&next, until)).await {
                        Joined::Landed(landed) => {
                            self.joined.fetch_add(1, Ordering::Relaxed);
                            return Shared::Joined(Landed::clone(&landed));
                        }
                        Joined::Abandoned => {}
                        Joined::TimedOut => break,
                    }
                }
                Role::Alone => break,
            }
        }
        Shared::Sent(send().await)
    }

    fn hash(&self, key: &str, with_ttl: bool) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        hasher.write(key.as_bytes());
        hasher.write_u8(u8::from(with_ttl));
        hasher.finish()
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        // Bits the maps use least: hashbrown takes a bucket from the low
        // bits and a tag from the top seven.
        let at = (hash >> 32) as usize % SHARDS;
        self.shards[at]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn role(&self, hash: u64, key: &str, with_ttl: bool) -> Role {
        let mut shard = self.shard(hash);
        let Some(slot) = shard.get_mut(&hash) else {
            shard.insert(
                hash,
                Slot {
                    sent: 1,
                    next: None,
                },
            );
            return Role::Send;
        };
        match &slot.next {
            Some(next) if *next.key == *key && next.with_ttl == with_ttl => {
                Role::Join(Arc::clone(next))
            }
            Some(_) => Role::Alone,
            None if slot.sent < self.most.load(Ordering::Relaxed) => {
                slot.sent += 1;
                Role::Send
            }
            None => {
                let next = Arc::new(Next {
                    key: key.into(),
                    with_ttl,
                    go: Notify::new(),
                    reply: Mutex::new(NextReply::Waiting),
                    landed: Notify::new(),
                });
                slot.next = Some(Arc::clone(&next));
                Role::Lead(next)
            }
        }
    }

    /// The next read's leader: waits for the read in flight (at most
    /// `wait`, and not past the call's `deadline`), sends, and shares the
    /// reply.
    async fn lead<F>(
        &self,
        hash: u64,
        next: Arc<Next>,
        deadline: Instant,
        send: impl FnOnce() -> F,
    ) -> Shared
    where
        F: Future<Output = Reply>,
    {
        let mut leading = Leading {
            reads: self,
            hash,
            next: &next,
        };
        // The read in flight answered (its sender made this one the read in
        // flight), or took too long: then this one takes its place.
        let until = deadline.min(Instant::now() + self.wait);
        if tokio::time::timeout_at(until.into(), next.go.notified())
            .await
            .is_err()
        {
            let mut shard = self.shard(hash);
            if let Some(slot) = shard.get_mut(&hash)
                && slot.next.as_ref().is_some_and(|n| Arc::ptr_eq(n, &next))
            {
                slot.sent += 1;
                slot.next = None;
            }
        }
        // Every joiner joined before this point: none can join a read that
        // is sent.
        let reply = send().await;
        let shared = match &reply {
            Ok(found) => Ok(found.clone()),
            Err(error) => Err(Failed::of(error)),
        };
        leading.land(NextReply::Landed(Arc::new(shared)));
        Shared::Sent(reply)
    }

    /// A joiner's wait for the next read's reply, until `deadline`.
    async fn join(&self, next: &Next, deadline: Instant) -> Joined {
        let waited = async {
            loop {
                let landed = next.landed.notified();
                let mut landed = std::pin::pin!(landed);
                // Registered before the reply is looked at, so that its
                // wake-up cannot fall in between.
                landed.as_mut().enable();
                match &*next.reply.lock().unwrap_or_else(PoisonError::into_inner) {
                    NextReply::Waiting => {}
                    NextReply::Landed(landed) => return Joined::Landed(Arc::clone(landed)),
                    NextReply::Abandoned => return Joined::Abandoned,
                }
                landed.await;
            }
        };
        tokio::time::timeout_at(deadline.into(), waited)
            .await
            .unwrap_or(Joined::TimedOut)
    }

    /// A read of the key hashed `hash` answered or was dropped: the next
    /// one may go in its place, or one fewer is in flight.
    fn release(&self, hash: u64) {
        let mut shard = self.shard(hash);
        let Some(slot) = shard.get_mut(&hash) else {
            return;
        };
        if let Some(next) = slot.next.take() {
            next.go.notify_one();
            return;
        }
        slot.sent -= 1;
        if slot.sent == 0 {
            shard.remove(&hash);
        }
    }

    /// From now on, calls share a read as soon as one is in flight (not
    /// two): for the tests that check that sharing keeps read-your-writes.
    #[cfg(any(test, feature = "__testing"))]
    pub(crate) fn share_from_the_first(&self) {
        self.most.store(1, Ordering::Relaxed);
    }

    /// Calls that shared another's read so far.
    #[cfg(any(test, feature = "__testing"))]
    pub(crate) fn joined(&self) -> u64 {
        self.joined.load(Ordering::Relaxed)
    }

    /// Keys with a read in flight, for the tests that check that every
    /// call let go of its read.
    #[cfg(any(test, feature = "__testing"))]
    pub(crate) fn in_flight(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// A read in flight: when it ends (or its call is dropped), the next read
/// of its key may go.
struct InFlight<'a> {
    reads: &'a SharedReads,
    hash: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.reads.release(self.hash);
    }
}

/// A next read's leader, until its reply is shared: dropped before, it
/// leaves its place and its joiners read alone.
struct Leading<'a> {
    reads: &'a SharedReads,
    hash: u64,
    next: &'a Arc<Next>,
}

impl Leading<'_> {
    fn land(&mut self, landed: NextReply) {
        *self
            .next
            .reply
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = landed;
        self.next.landed.notify_waiters();
    }
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        let landed = matches!(
            *self
                .next
                .reply
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            NextReply::Landed(_)
        );
        if !landed {
            self.land(NextReply::Abandoned);
        }
        {
            let mut shard = self.reads.shard(self.hash);
            if let Some(slot) = shard.get_mut(&self.hash)
                && slot
                    .next
                    .as_ref()
                    .is_some_and(|n| Arc::ptr_eq(n, self.next))
            {
                // Dropped while waiting: a later call forms the next read.
                slot.next = None;
                return;
            }
        }
        // Sent (or told to go): the read after it may go.
        self.reads.release(self.hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads that share as soon as one is in flight.
    fn one_at_a_time(op_timeout: Duration) -> SharedReads {
        let reads = SharedReads::new(op_timeout, true);
        reads.share_from_the_first();
        reads
    }

    fn found(bytes: &[u8]) -> Reply {
        Ok(Fetched::Found((bytes.to_vec(), Ttl::Unknown)))
    }

    /// A read that answers when `gate` is notified, counting sends.
    async fn gated(gate: &Notify, sends: &AtomicU64, bytes: &'static [u8]) -> Reply {
        sends.fetch_add(1, Ordering::SeqCst);
        gate.notified().await;
        found(bytes)
    }

    /// Polls `f` once: whether it is still pending.
    async fn pending<F: Future>(mut f: std::pin::Pin<&mut F>) -> bool {
        std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx).is_pending())).await
    }

    /// How many of `reads` sent their read.
    fn sent(reads: &[Shared]) -> usize {
        reads
            .iter()
            .filter(|s| matches!(s, Shared::Sent(_)))
            .count()
    }

    fn bytes_of(shared: &Shared) -> Vec<u8> {
        match shared {
            Shared::Sent(Ok(Fetched::Found((b, _))))
            | Shared::Joined(Ok(Fetched::Found((b, _)))) => b.clone(),
            _ => panic!("no value"),
        }
    }

    #[tokio::test]
    async fn calls_that_come_during_a_read_share_the_next_one() {
        let reads = one_at_a_time(Duration::from_secs(60));
        let (first_gate, next_gate) = (Notify::new(), Notify::new());
        let sends = AtomicU64::new(0);
        let first = reads.read("k", false, || gated(&first_gate, &sends, b"old"));
        let mut first = std::pin::pin!(first);
        // The first read is sent.
        assert!(pending(first.as_mut()).await);
        let later: Vec<_> = (0..5)
            .map(|_| Box::pin(reads.read("k", false, || gated(&next_gate, &sends, b"new"))))
            .collect();
        let mut later = futures_util::future::join_all(later);
        assert!(pending(std::pin::Pin::new(&mut later)).await);
        assert_eq!(
            sends.load(Ordering::SeqCst),
            1,
            "the later calls wait for the first read"
        );
        first_gate.notify_one();
        assert_eq!(bytes_of(&first.await), b"old");
        // The leader of the next read sends it now.
        assert!(pending(std::pin::Pin::new(&mut later)).await);
        assert_eq!(
            sends.load(Ordering::SeqCst),
            2,
            "one read for the five later calls"
        );
        next_gate.notify_one();
        let later = later.await;
        assert!(later.iter().all(|shared| bytes_of(shared) == b"new"));
        assert_eq!(sent(&later), 1);
        assert_eq!(reads.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_call_never_joins_a_read_already_sent() {
        let reads = one_at_a_time(Duration::from_secs(60));
        let (gate, next_gate) = (Notify::new(), Notify::new());
        let sends = AtomicU64::new(0);
        let first = reads.read("k", false, || gated(&gate, &sends, b"old"));
        let mut first = std::pin::pin!(first);
        assert!(pending(first.as_mut()).await);
        // The next read, sent: a call that comes now forms the one after.
        let second = reads.read("k", false, || gated(&next_gate, &sends, b"second"));
        let mut second = std::pin::pin!(second);
        assert!(pending(second.as_mut()).await);
        gate.notify_one();
        first.await;
        assert!(pending(second.as_mut()).await);
        assert_eq!(sends.load(Ordering::SeqCst), 2);
        let third_gate = Notify::new();
        let third = reads.read("k", false, || gated(&third_gate, &sends, b"third"));
        let mut third = std::pin::pin!(third);
        assert!(pending(third.as_mut()).await);
        next_gate.notify_one();
        assert_eq!(bytes_of(&second.await), b"second");
        assert!(pending(third.as_mut()).await);
        third_gate.notify_one();
        assert_eq!(
            bytes_of(&third.await),
            b"third",
            "not the reply of a read sent before it"
        );
        assert_eq!(sends.load(Ordering::SeqCst), 3);
        assert_eq!(reads.in_flight(), 0);
    }

    #[tokio::test]
    async fn the_joiners_of_a_dropped_leader_look_again() {
        let reads = one_at_a_time(Duration::from_secs(60));
        let gate = Notify::new();
        let sends = AtomicU64::new(0);
        let first = reads.read("k", false, || gated(&gate, &sends, b"old"));
        let mut first = std::pin::pin!(first);
        assert!(pending(first.as_mut()).await);
        let mut leader = Box::pin(reads.read("k", false, || gated(&gate, &sends, b"never")));
        assert!(pending(leader.as_mut()).await);
        let joiners: Vec<_> = (0..3)
            .map(|_| Box::pin(reads.read("k", false, || async { found(b"next") })))
            .collect();
        let mut joiners = futures_util::future::join_all(joiners);
        assert!(pending(std::pin::Pin::new(&mut joiners)).await);
        drop(leader);
        // One of them leads the next read, behind the read in flight.
        assert!(pending(std::pin::Pin::new(&mut joiners)).await);
        assert_eq!(sends.load(Ordering::SeqCst), 1);
        gate.notify_one();
        assert_eq!(bytes_of(&first.await), b"old");
        let joiners = joiners.await;
        assert!(joiners.iter().all(|shared| bytes_of(shared) == b"next"));
        assert_eq!(sent(&joiners), 1, "one read for the three");
        assert_eq!(reads.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_stalled_read_holds_the_next_one_back_for_half_the_op_timeout() {
        let reads = one_at_a_time(Duration::from_secs(2));
        let (stalled, gate) = (Notify::new(), Notify::new());
        let sends = AtomicU64::new(0);
        let first = reads.read("k", false, || gated(&stalled, &sends, b"old"));
        let mut first = std::pin::pin!(first);
        assert!(pending(first.as_mut()).await);
        let next = reads.read("k", false, || gated(&gate, &sends, b"new"));
        let mut next = std::pin::pin!(next);
        assert!(pending(next.as_mut()).await);
        // Timers never fire early.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(pending(next.as_mut()).await);
        assert_eq!(sends.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert!(pending(next.as_mut()).await);
        assert_eq!(sends.load(Ordering::SeqCst), 2, "sent after a second");
        gate.notify_one();
        assert_eq!(bytes_of(&next.await), b"new");
        // The stalled read ends last; it leaves nothing behind.
        stalled.notify_one();
        first.await;
        assert_eq!(reads.in_flight(), 0);
    }

    #[tokio::test]
    async fn two_calls_that_meet_do_not_wait_for_each_other() {
        let reads = SharedReads::new(Duration::from_secs(60), true);
        let (gate, next_gate) = (Notify::new(), Notify::new());
        let sends = AtomicU64::new(0);
        let mut sent: Vec<_> = (0..IN_FLIGHT)
            .map(|_| Box::pin(reads.read("k", false, || gated(&gate, &sends, b"old"))))
            .collect();
        for read in &mut sent {
            assert!(pending(read.as_mut()).await);
        }
        assert_eq!(sends.load(Ordering::SeqCst), u64::from(IN_FLIGHT));
        // One more waits to share the next read.
        let next = reads.read("k", false, || gated(&next_gate, &sends, b"new"));
        let mut next = std::pin::pin!(next);
        assert!(pending(next.as_mut()).await);
        assert_eq!(sends.load(Ordering::SeqCst), u64::from(IN_FLIGHT));
        gate.notify_waiters();
        futures_util::future::join_all(sent).await;
        assert!(pending(next.as_mut()).await);
        next_gate.notify_one();
        assert_eq!(bytes_of(&next.await), b"new");
        assert_eq!(reads.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_joiner_whose_leader_is_not_polled_reads_alone_within_its_budget() {
        let reads = one_at_a_time(Duration::from_millis(100));
        let gate = Notify::new();
        let sends = AtomicU64::new(0);
        let first = reads.read("k", false, || gated(&gate, &sends, b"old"));
        let mut first = std::pin::pin!(first);
        assert!(pending(first.as_mut()).await);
        // Led, then never polled again (nor dropped).
        let mut leader = Box::pin(reads.read("k", false, || gated(&gate, &sends, b"never")));
        assert!(pending(leader.as_mut()).await);
        let started = Instant::now();
        let joiner = reads.read("k", false, || async { found(b"alone") });
        let joined = tokio::time::timeout(Duration::from_secs(10), joiner)
            .await
            .expect("the joiner gave up waiting");
        assert!(matches!(joined, Shared::Sent(_)), "read alone");
        assert_eq!(bytes_of(&joined), b"alone");
        // Timers never fire early: it waited its budget (50 + 100 ms).
        assert!(started.elapsed() >= Duration::from_millis(150));
        drop(leader);
        gate.notify_waiters();
        first.await;
        assert_eq!(reads.in_flight(), 0);
    }

    #[tokio::test]
    async fn keys_do_not_share() {
        let reads = one_at_a_time(Duration::from_secs(60));
        let gate = Notify::new();
        let sends = AtomicU64::new(0);
        let a = reads.read("a", false, || gated(&gate, &sends, b"a"));
        let mut a = std::pin::pin!(a);
        assert!(pending(a.as_mut()).await);
        // Another key, and the same key read with its TTL: reads of their own.
        let b = reads.read("b", false, || async { found(b"b") }).await;
        assert!(matches!(b, Shared::Sent(_)));
        let with_ttl = reads.read("a", true, || async { found(b"a+ttl") }).await;
        assert!(matches!(with_ttl, Shared::Sent(_)));
        gate.notify_one();
        a.await;
        assert_eq!(reads.in_flight(), 0);
    }
}
