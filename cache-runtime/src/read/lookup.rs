//! The read path of a cached call, as the design reads:
//!
//! 1. **Read** the key (one `GET`; with its TTL for `stale` and
//!    `early_refresh` functions) and **classify** what was found, in one
//!    place that also decodes: *serve* it, *refresh* it (stale, or drawn
//!    for early refresh), or *claim* the key (absent, garbage, or leased by
//!    another caller).
//! 2. To claim, first **coalesce** (`single_flight`): join the computation
//!    in flight in this process, or lead it.
//! 3. Take the key's **lease** (see [`crate::write::lease`]), or with
//!    `single_flight = "distributed"` wait for another process's value.
//! 4. **Compute**: run the body, store its value over the lease, and hand it
//!    to the waiters if the store proved it fresh (see [`crate::cache::flight`]).
//!
//! Any cache failure runs the body and is counted, never returned. Every
//! piece of state a call takes (lease, refresh lock, flight leadership, a
//! place at a failing key's gate) is a guard released on every exit,
//! including the future being dropped at any `.await`.

use std::borrow::Cow;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::backend::Fetched;
use crate::cache::Cache;
use crate::cache::flight::{Cover, Handed, Joiner, Landing, Leader, Role, look_again};
use crate::cache::shared_reads::{Failed, Shared};
use crate::clock::px;
use crate::codec::CodecError;
use crate::error::CacheError;
use crate::local::tracking::Via;
use crate::local::{LocalHit, LocalTier, TagTicket, Ticket};
use crate::outcome::{Encoded, Life, NOTHING, Outcome};
use crate::read::call::{Answered, Erased};
use crate::read::found::{Garbage, Read, Ttl};
use crate::read::freshness::{self, Freshness, Verdict};
use crate::read::run::{REFRESH_RETRY_AFTER, Ran, Run};
use crate::read::tagged::Derived;
use crate::site::{SingleFlight, Site};
use crate::stats::Event;
use crate::tag::Tagging;
use crate::token::Token;
use crate::write::lease::{self, Found, HeldLease, Take, Taken};

/// How many failed leaders a waiter sits through before it computes on its
/// own, through the key's gate.
const MAX_HANDOVERS: u32 = 3;
/// How many leaders' values a waiter may be told to look again for before
/// it computes on its own.
const MAX_LOOKS: u32 = 3;
/// How often a caller may find the key changed between its read and its
/// `SET NX` before it computes without storing.
const MAX_RECHECKS: u32 = 3;
/// First and longest pause between two reads while another process holds
/// the lease (`single_flight = "distributed"`).
const FIRST_POLL: Duration = Duration::from_millis(2);
const LONGEST_POLL: Duration = Duration::from_millis(50);

/// What the caller does next.
enum Step {
    /// Answer without a lease.
    Done(Done),
    /// Claim the key: compute under its lease.
    Claim(Claim),
    /// A placeholder read without its TTL: read it again with it, to tell a
    /// live lease from a stray one.
    Recheck,
}

/// How a caller answers without claiming the key: with the entry it
/// decoded (counted as the event).
enum Done {
    Serve(Event),
    Refresh(Refresh),
    /// Past its stale window, kept by `fail_safe`: recompute, and serve it
    /// only if the body fails.
    Expired(Refresh),
    /// Inside `refresh(...)`, an entry with a freshness header (its
    /// headers): recomputed under the refresh lock, the entry left in
    /// place meanwhile.
    Forced(Vec<u8>),
}

/// A value to recompute while others are served it (the decoded answer).
struct Refresh {
    /// Its freshness header: the refresh stores only over this very value.
    header: Vec<u8>,
    /// How a caller served the old value is counted.
    served: Event,
}

/// What a miss may do to the key.
enum Claim {
    IfAbsent,
    Replace(Garbage),
    /// Another caller's live lease, by its placeholder.
    Foreign(Vec<u8>),
    /// Nothing: the cache could not be read (see [`Read::Unavailable`]).
    Uncached {
        pending_write: bool,
    },
}

/// The lease a computation runs under.
pub(crate) enum Leased<'c> {
    Own(HeldLease<'c>),
    /// Another caller's, as seen before computing.
    Foreign(Vec<u8>),
    None,
    /// None, because the cache could not be read: the body's run counts
    /// as a bypass, not a miss.
    Uncached,
}

/// How a claim ended.
enum Claimed<'c> {
    Computing(Leased<'c>),
    /// The key changed, or a poll of another process's lease: go round.
    Read(Step),
}

/// How coalescing ended.
enum Coalesced<'c> {
    /// Another caller's answer, decoded.
    Answer,
    /// Compute; as the leader of this process's flight, or alone.
    Lead(Option<Leader<'c>>),
    /// The key's leaders keep failing: compute alone, through its gate.
    Gated,
    LookAgain,
}

/// What a caller went through so far.
struct Rounds {
    /// When the call began, before its first read: see [`Joiner`].
    began: Instant,
    failed_leaders: u32,
    looks: u32,
    rechecks: u32,
    /// While waiting for another process (distributed): when to give up,
    /// the next pause, and the placeholder waited on.
    wait: Option<Wait>,
}

impl Rounds {
    fn new(began: Instant) -> Self {
        Rounds {
            began,
            failed_leaders: 0,
            looks: 0,
            rechecks: 0,
            wait: None,
        }
    }
}

/// A wait for another process's value: at most one lease per holder. A
/// holder that took over from a dead one gets a lease of its own: the
/// callers that waited on the dead one wait on it too, instead of giving
/// up on the dead one's clock and computing beside it. In all, at most
/// [`HOLDERS_WAITED_ON`] leases.
struct Wait {
    give_up: Instant,
    pause: Duration,
    placeholder: Vec<u8>,
    last_call: Instant,
}

/// How many leases' worth a caller waits for other processes at most.
const HOLDERS_WAITED_ON: u32 = 3;

impl Cache {
    /// The answer of a copy held in this process for a function with a
    /// local tier (`local = "5s"`), counted as a local hit; `None` when
    /// none is held (or the cache has no local tier: the memory backend is
    /// local already). Synchronous, so that a local hit never builds the
    /// future of the path that reads Redis.
    pub(crate) fn local_hit<S, R>(&self, site: &'static Site, redis_key: &str) -> Option<R>
    where
        S: Outcome<R>,
        S::Value: Clone + Send + Sync + 'static,
    {
        let tracking = self.local()?;
        // On a cluster, copies made under another slot map are not served.
        let primaries = self.backend().primaries_epoch();
        let answer = match tracking.tier().get::<S::Value>(redis_key, primaries)? {
            LocalHit::Value(value) => S::from_hit(value),
            LocalHit::Nothing => S::nothing()?,
        };
        self.record(site, Event::LocalHit);
        Some(answer)
    }

    /// The read path of one key. A hit (and an unavailable cache) is
    /// answered here; everything else in a boxed future, so that the
    /// future of a hit stays small.
    pub(crate) async fn lookup(
        &self,
        site: &'static Site,
        redis_key: String,
        call: &mut Erased<'_>,
    ) -> Answered {
        let began = Instant::now();
        let read = self
            .read_entry(site, &redis_key, site.tracks_freshness(), call)
            .await;
        let step = match read {
            // The common case, without the classify step's moves of the
            // value: a plain value (no freshness header) served as it is.
            Read::Value {
                bytes,
                value_at: 0,
                freshness: None,
                ..
            } if !call.refreshing() => {
                if self.decode(site, &redis_key, &bytes, call) {
                    self.record(site, Event::Hit);
                    // For this thread's next key.
                    crate::key::recycle(redis_key);
                    return Answered::Decoded;
                }
                Step::Claim(Claim::Replace(Garbage::Bytes(bytes)))
            }
            Read::Unavailable { .. } if site.single_flight_mode() == SingleFlight::Off => {
                self.record(site, Event::Bypass);
                call.run_body().await;
                return Answered::Body;
            }
            read => match self.classify(site, &redis_key, read, call, None) {
                // A value after a header (a tagged entry's): served here too.
                Step::Done(Done::Serve(event)) => {
                    self.record(site, event);
                    return Answered::Decoded;
                }
                step => step,
            },
        };
        Box::pin(self.after_read(site, &redis_key, step, call, began)).await
    }

    /// [`Cache::lookup`] of a function with a local tier: the key is read
    /// on the tracking connection, and a fresh value found there is kept
    /// (see [`crate::local`]) for at most the function's `local` time and
    /// never past its freshness.
    pub(crate) async fn lookup_local(
        &self,
        site: &'static Site,
        redis_key: String,
        call: &mut Erased<'_>,
    ) -> Answered {
        let Some(tracking) = self.local() else {
            return self.lookup(site, redis_key, call).await;
        };
        let primaries = self.backend().primaries_epoch();
        let tier = tracking.tier();
        // Taken before the read is sent (see `crate::local`), and before
        // the connection is: a connection given up after this moves the
        // epoch, so that a read on it is never kept.
        let ticket = tier.ticket(&redis_key, primaries);
        let tags = tier.tag_tickets(call.tagging().map_or(&[][..], Tagging::keys));
        let Some(via) = tracking.live(&redis_key) else {
            return self.lookup(site, redis_key, call).await;
        };
        // A tagged function's tags are read where the server tracks them
        // too (see `crate::local`).
        let mut tag_vias = Vec::new();
        for tag in call.tagging().map_or(&[][..], Tagging::keys) {
            match tracking.live(tag) {
                Some(via) => tag_vias.push(via),
                None => return self.lookup(site, redis_key, call).await,
            }
        }
        let began = Instant::now();
        let entry = async {
            match &via {
                Via::Tracked(conn) => self.read_tracked(site, &redis_key, conn).await,
                Via::Shared => self.read(site, &redis_key, true).await,
            }
        };
        let (read, tracked, derived) = self
            .read_entry_with(site, entry, Some(&tag_vias), call)
            .await;
        if let Read::Unavailable { .. } = read
            && site.single_flight_mode() == SingleFlight::Off
        {
            self.record(site, Event::Bypass);
            call.run_body().await;
            return Answered::Body;
        }
        // The tags the value named (`tags_from`) are tracked as its
        // function's own are.
        let tags = match derived {
            Some(derived) => Some(
                tags.iter()
                    .flat_map(|own| own.iter())
                    .chain(derived.iter())
                    .copied()
                    .collect(),
            ),
            None => tags,
        };
        let keep = tracked.then_some(Keep {
            tier,
            ticket,
            tags,
            local_for: site.local_millis(),
        });
        let step = self.classify(site, &redis_key, read, call, keep);
        if let Step::Done(Done::Serve(event)) = step {
            self.record(site, event);
            return Answered::Decoded;
        }
        // Not boxed: this whole future is (see `Lookup::run_local`).
        self.after_read(site, &redis_key, step, call, began).await
    }

    /// Everything but a plain hit: misses, leases, single-flight, refreshes.
    async fn after_read(
        &self,
        site: &'static Site,
        key: &str,
        mut step: Step,
        call: &mut Erased<'_>,
        began: Instant,
    ) -> Answered {
        let mut rounds = Rounds::new(began);
        let mut leader = None;
        // Declared in this order so that the permit drops before its gate.
        let (mut gate, mut _permit) = (None, None);
        loop {
            let claim = match step {
                Step::Claim(claim) => claim,
                Step::Done(done) => {
                    look_again(leader);
                    return self.done(site, key, done, call, rounds.began).await;
                }
                Step::Recheck => {
                    step = self.reread(site, key, call).await;
                    continue;
                }
            };
            if leader.is_none() && gate.is_none() {
                // Inside `refresh`, only a computation that began after the
                // call answers it: a proof that no write came in between
                // says nothing of when the data was read.
                let takes_proof = !call.refreshing()
                    && !matches!(
                        claim,
                        Claim::Uncached {
                            pending_write: true
                        }
                    );
                match self
                    .coalesce(site, key, &mut rounds, takes_proof, call)
                    .await
                {
                    Coalesced::Answer => return Answered::Decoded,
                    // The placeholder this call read may be that of a
                    // flight of this process that ended between the read
                    // and the join: its value is stored now, so the new
                    // leader reads once more before it computes.
                    Coalesced::Lead(Some(me)) if matches!(claim, Claim::Foreign(_)) => {
                        leader = Some(me);
                        step = self.reread(site, key, call).await;
                        continue;
                    }
                    Coalesced::Lead(me) => leader = me,
                    Coalesced::Gated => {
                        let at = self.flights().gate(key);
                        _permit = at.enter().await;
                        gate = Some(at);
                        step = self.reread(site, key, call).await;
                        continue;
                    }
                    Coalesced::LookAgain => {
                        step = self.reread(site, key, call).await;
                        continue;
                    }
                }
            }
            match self.claim(site, key, claim, &mut rounds, call).await {
                Claimed::Computing(lease) => {
                    return self.compute(site, key, lease, leader, call).await;
                }
                Claimed::Read(next) => step = next,
            }
        }
    }

    /// Answers a call that needs no lease.
    async fn done(
        &self,
        site: &'static Site,
        key: &str,
        done: Done,
        call: &mut Erased<'_>,
        began: Instant,
    ) -> Answered {
        match done {
            Done::Serve(event) => {
                self.record(site, event);
                Answered::Decoded
            }
            Done::Refresh(refresh) => self.refresh(site, key, refresh, call, began).await,
            Done::Forced(header) => Box::pin(self.forced(site, key, header, call, began)).await,
            Done::Expired(expired) => {
                Box::pin(crate::read::fail_safe::expired(
                    self,
                    site,
                    key,
                    expired.header,
                    call,
                    began,
                ))
                .await
            }
        }
    }

    /// Whether this process still has to deliver an invalidation of `key`
    /// (see `Janitor::is_invalidating`): then the key may hold the old
    /// value, and the call runs uncached. Notes the function's expiry for
    /// the read to come.
    pub(crate) fn pending_write(&self, site: &Site, key: &str) -> bool {
        crate::backend::note_px(site.longest_expiry_millis());
        self.janitor()
            .is_invalidating(key, || self.backend().primaries_epoch())
    }

    /// [`Cache::read`], and for a tagged function its tags' tokens beside
    /// it (see [`crate::tag`]): an entry stored with other tokens than its
    /// tags hold now is replaced, as garbage is (not counted as such: it
    /// was invalidated).
    async fn read_entry(
        &self,
        site: &'static Site,
        key: &str,
        with_ttl: bool,
        call: &mut Erased<'_>,
    ) -> Read {
        let Some(tagging) = call.tagging_mut() else {
            return crate::read::tagged::untagged(self.read(site, key, with_ttl).await);
        };
        // One server: the entry and its tags in one request.
        if !with_ttl && !matches!(self.backend(), crate::backend::Backend::Cluster(_)) {
            return Box::pin(self.read_together(site, key, tagging)).await;
        }
        let entry = self.read(site, key, with_ttl);
        Box::pin(self.read_entry_with(site, entry, None, call))
            .await
            .0
    }

    /// `entry`, the read of a tagged function's entry, with its tags'
    /// tokens read beside it (on the tracking connections `vias`, for a
    /// function with a local tier) and checked against the entry; and
    /// whether every tag is tracked where it was read (`vias`). An
    /// untagged function's read is `entry` as it is.
    async fn read_entry_with(
        &self,
        site: &'static Site,
        entry: impl Future<Output = Read>,
        vias: Option<&[Via]>,
        call: &mut Erased<'_>,
    ) -> (Read, bool, Option<std::sync::Arc<[TagTicket]>>) {
        let Some(tagging) = call.tagging_mut() else {
            return (crate::read::tagged::untagged(entry.await), true, None);
        };
        if tagging
            .keys()
            .iter()
            .any(|tag| self.pending_write(site, tag))
        {
            let pending = Read::Unavailable {
                pending_write: true,
            };
            return (pending, false, None);
        }
        let (read, tokens) =
            futures_util::future::join(entry, self.read_tokens(site, tagging, vias)).await;
        let read = match read {
            // An invalidation of the key still to deliver says more.
            read @ Read::Unavailable { .. } => read,
            _ if tokens.is_none() => Read::Unavailable {
                pending_write: false,
            },
            read => tagging.check(read),
        };
        if !site.derives_tags() {
            return (read, tokens == Some(true), None);
        }
        let (read, tracked, derived) =
            Box::pin(self.check_derived(site, tagging, read, Derived::Local(vias.is_some()))).await;
        (read, tracked && tokens == Some(true), derived)
    }

    /// One read of the key, classified; failures are counted and logged here.
    async fn read(&self, site: &'static Site, key: &str, with_ttl: bool) -> Read {
        if self.pending_write(site, key) {
            return Read::Unavailable {
                pending_write: true,
            };
        }
        let backend = self.backend();
        let send = || async move {
            if with_ttl {
                // Boxed: the script's future would double the size of every
                // plain hit's future, which is moved on each call.
                let read = backend.get_with_ttl(key, self.settings().read_limit);
                let stored = Box::pin(self.guarded(key, read)).await;
                stored.map(|s| s.map(Ttl::of))
            } else {
                let bytes = self
                    .guarded(key, backend.get(key, self.settings().read_limit))
                    .await;
                bytes.map(|b| b.map(|b| (b, Ttl::Unknown)))
            }
        };
        // A hot key's concurrent calls share one read sent after they all
        // started (see `crate::cache::shared_reads`).
        match self.shared_reads().read(key, with_ttl, send).await {
            Shared::Sent(outcome) => self.found(site, key, outcome),
            Shared::Joined(Ok(found)) => self.found(site, key, Ok(found)),
            // Read as its sender read it, which logged it.
            Shared::Joined(Err(Failed::Skipped)) => Read::Unavailable {
                pending_write: false,
            },
            Shared::Joined(Err(Failed::WrongType)) => {
                self.record(site, Event::Error);
                Read::Garbage(Garbage::Unreadable)
            }
            Shared::Joined(Err(Failed::Unavailable)) => {
                self.record(site, Event::Error);
                Read::Unavailable {
                    pending_write: false,
                }
            }
        }
    }

    /// [`Cache::read`] with its TTL, on the local tier's tracking
    /// connection: from now on the server tells this process when `key`
    /// changes.
    async fn read_tracked(
        &self,
        site: &'static Site,
        key: &str,
        conn: &redis::aio::MultiplexedConnection,
    ) -> Read {
        if self.pending_write(site, key) {
            return Read::Unavailable {
                pending_write: true,
            };
        }
        let mut conn = conn.clone();
        let read = crate::backend::get_with_ttl_on(&mut conn, key, self.settings().read_limit);
        let outcome = self.guarded(key, read).await.map(|s| s.map(Ttl::of));
        self.found(site, key, outcome)
    }

    /// What a read's outcome is; failures are counted and logged here.
    pub(crate) fn found(
        &self,
        site: &'static Site,
        key: &str,
        outcome: Result<Fetched<(Vec<u8>, Ttl)>, CacheError>,
    ) -> Read {
        match outcome {
            // Lease placeholders, freshness headers, negative entries and
            // tag headers start with byte 0, 1, 2 or 4, which no JSON value
            // does: anything else is a plain value (or compressed, byte 3).
            Ok(Fetched::Found((bytes, Ttl::Unknown)))
                if !matches!(bytes.first(), Some(0..=2 | 4)) =>
            {
                Read::Value {
                    bytes,
                    value_at: 0,
                    freshness: None,
                    ttl: Ttl::Unknown,
                }
            }
            Ok(Fetched::Found((bytes, ttl))) => self.inspect_stored(site, key, bytes, ttl),
            Ok(Fetched::Absent) => Read::Absent,
            // Not transferred: counted against its function, never against
            // the server's breaker, and replaced by this call.
            Ok(Fetched::TooLarge) => {
                self.record(site, Event::Error);
                crate::limited!(
                    self,
                    warn!(
                        key,
                        read_limit = self.settings().read_limit,
                        "cache entry larger than max_value_size: not read; recomputing and replacing it"
                    )
                );
                Read::Garbage(Garbage::TooLarge)
            }
            Err(CacheError::CircuitOpen) => Read::Unavailable {
                pending_write: false,
            },
            Err(error) if error.is_unavailable() => {
                self.record(site, Event::Error);
                crate::limited!(
                    self,
                    warn!(key, %error, "cache read failed: running uncached")
                );
                Read::Unavailable {
                    pending_write: false,
                }
            }
            // Someone stored a list there: bad data like an undecodable
            // value, overwritten.
            Err(error) if error.is_wrong_type() => {
                self.record(site, Event::Error);
                crate::limited!(
                    self,
                    warn!(key, %error, "unreadable cache entry: recomputing and overwriting it")
                );
                Read::Garbage(Garbage::Unreadable)
            }
            // Any other error reply (`NOPERM` from an ACL, `ERR`): counted
            // and logged, and the call runs uncached; nothing is
            // overwritten on the strength of a refusal.
            Err(error) => {
                self.record(site, Event::Error);
                crate::limited!(
                    self,
                    warn!(key, %error, "cache read refused: running uncached")
                );
                Read::Unavailable {
                    pending_write: false,
                }
            }
        }
    }

    async fn reread(&self, site: &'static Site, key: &str, call: &mut Erased<'_>) -> Step {
        let read = self.read_entry(site, key, true, call).await;
        self.classify(site, key, read, call, None)
    }

    /// What stored bytes are: a value (split from its header), someone's
    /// lease, or garbage (counted and logged).
    fn inspect_stored(&self, site: &'static Site, key: &str, bytes: Vec<u8>, ttl: Ttl) -> Read {
        match lease::inspect(&bytes) {
            Found::Placeholder if ttl == Ttl::Forever => {
                self.garbage(site, key, "a lease placeholder without expiry");
                Read::Garbage(Garbage::Bytes(bytes))
            }
            // This process's own lease, whose holder is gone and whose
            // release is on its way: take the lease over it.
            Found::Placeholder if self.janitor().is_abandoned(&bytes) => {
                Read::Garbage(Garbage::Bytes(bytes))
            }
            Found::Placeholder => Read::Leased {
                placeholder: bytes,
                ttl,
            },
            Found::Malformed => {
                self.garbage(site, key, "a malformed lease placeholder");
                Read::Garbage(Garbage::Bytes(bytes))
            }
            Found::Value => {
                let Some(tags) = crate::tag::header_len(&bytes) else {
                    self.garbage(site, key, "a malformed tag header");
                    return Read::Garbage(Garbage::Bytes(bytes));
                };
                self.inspect_value(site, key, bytes, tags, ttl)
            }
        }
    }

    /// A value's bytes after its tag header (the first `tags` bytes): a
    /// freshness header, if any, then the encoded value.
    fn inspect_value(
        &self,
        site: &'static Site,
        key: &str,
        bytes: Vec<u8>,
        tags: usize,
        ttl: Ttl,
    ) -> Read {
        match freshness::split(&bytes[tags..]) {
            Ok(None) => Read::Value {
                bytes,
                value_at: tags,
                freshness: None,
                ttl,
            },
            Ok(Some((freshness, value_at))) => Read::Value {
                bytes,
                value_at: tags + value_at,
                freshness: Some((freshness, ttl)),
                ttl,
            },
            Err(freshness::MalformedHeader) => {
                self.garbage(site, key, "a malformed freshness header");
                Read::Garbage(Garbage::Bytes(bytes))
            }
        }
    }

    pub(crate) fn garbage(&self, site: &'static Site, key: &str, what: &str) {
        self.record(site, Event::Error);
        crate::limited!(
            self,
            warn!(
                key,
                what, "not a cache entry: recomputing and overwriting it"
            )
        );
    }

    /// The classify step: the one place where a read becomes a decision.
    /// A value it serves or refreshes is decoded into `call`; with `keep`
    /// (a function with a local tier), a fresh one is kept in process
    /// memory before it is served, so that the one place that decides
    /// what a read means also decides what is copied.
    fn classify(
        &self,
        site: &'static Site,
        key: &str,
        read: Read,
        call: &mut Erased<'_>,
        keep: Option<Keep<'_>>,
    ) -> Step {
        let read = match read {
            // Inside `refresh`: a value with a freshness header (`stale`,
            // `early_refresh`, `fail_safe`) is recomputed under the refresh
            // lock, so that it stays for the others (and as `fail_safe`'s
            // kept value) while the body runs, and if it fails; any other
            // value is replaced as garbage is (if the key still holds it).
            // None is served.
            Read::Value {
                mut bytes,
                value_at,
                freshness: Some(_),
                ..
            } if call.refreshing() && site.tracks_freshness() => {
                bytes.truncate(value_at);
                return Step::Done(Done::Forced(bytes));
            }
            Read::Value { bytes, .. } if call.refreshing() => Read::Garbage(Garbage::Bytes(bytes)),
            read => read,
        };
        let (mut bytes, value_at, freshness, ttl) = match read {
            Read::Value {
                bytes,
                value_at,
                freshness,
                ttl,
            } => (bytes, value_at, freshness, ttl),
            Read::Unavailable { pending_write } => {
                return Step::Claim(Claim::Uncached { pending_write });
            }
            Read::Absent => return Step::Claim(Claim::IfAbsent),
            Read::Garbage(garbage) => return Step::Claim(Claim::Replace(garbage)),
            Read::Leased {
                ttl: Ttl::Unknown, ..
            } => return Step::Recheck,
            Read::Leased { placeholder, .. } => return Step::Claim(Claim::Foreign(placeholder)),
        };
        if !self.decode(site, key, &bytes[value_at..], call) {
            return Step::Claim(Claim::Replace(Garbage::Bytes(bytes)));
        }
        let Some((verdict, fresh_for)) = self.verdict(site, freshness, ttl) else {
            return Step::Done(Done::Serve(Event::Hit));
        };
        let served = match verdict {
            Verdict::Fresh => {
                if let Some(keep) = keep {
                    let keep_for = Duration::from_millis(keep.local_for.min(fresh_for));
                    let encoded = bytes.len() - value_at;
                    call.call().keep_local(
                        keep.tier,
                        keep.ticket,
                        keep.tags.as_ref(),
                        key,
                        encoded,
                        keep_for,
                    );
                }
                return Step::Done(Done::Serve(Event::Hit));
            }
            Verdict::RefreshEarly => Event::Hit,
            Verdict::Stale => Event::StaleHit,
            Verdict::Expired => {
                bytes.truncate(value_at);
                return Step::Done(Done::Expired(Refresh {
                    header: bytes,
                    served: Event::StaleHit,
                }));
            }
        };
        bytes.truncate(value_at);
        Step::Done(Done::Refresh(Refresh {
            header: bytes,
            served,
        }))
    }

    /// What a decoded value's freshness header (if its function reads
    /// one) and TTL say: serve it, refresh it, or recompute it, and for how
    /// long it is fresh (what a local copy may live). `None` for a header
    /// read without its TTL: served as a hit.
    fn verdict(
        &self,
        site: &'static Site,
        freshness: Option<(Freshness, Ttl)>,
        ttl: Ttl,
    ) -> Option<(Verdict, u64)> {
        match freshness {
            Some((freshness, ttl)) if site.tracks_freshness() => {
                let left = match ttl {
                    Ttl::Left(left) => Some(left),
                    Ttl::Forever => None,
                    Ttl::Unknown => return None,
                };
                let kept = self.kept(site);
                let fresh_for = left.map_or(0, |left| left.saturating_sub(kept));
                let verdict = freshness.verdict(
                    left,
                    kept,
                    site.fail_safe_millis(),
                    site.early_refresh_beta(),
                );
                Some((verdict, fresh_for))
            }
            _ => Some(match ttl {
                Ttl::Left(left) => (Verdict::Fresh, left),
                Ttl::Forever => (Verdict::Fresh, u64::MAX),
                Ttl::Unknown => (Verdict::Fresh, 0),
            }),
        }
    }

    /// The one place that decodes an entry into a call's answer; failures
    /// are counted and logged. A negative entry is an answer of nothing,
    /// for functions whose result has one (else garbage).
    pub(crate) fn decode(
        &self,
        site: &'static Site,
        key: &str,
        bytes: &[u8],
        call: &mut Erased<'_>,
    ) -> bool {
        if bytes == NOTHING {
            let nothing = call.call().decode_nothing();
            if !nothing {
                self.garbage(
                    site,
                    key,
                    "a cached `None` for a function that cannot return one",
                );
            }
            return nothing;
        }
        let codec = self.settings().codec;
        let decoded = self.decoding(bytes, |bytes| call.call().decode(codec, bytes));
        self.decoded(site, key, decoded).is_some()
    }

    /// `decode` over `bytes`, decompressed first if they are compressed.
    pub(crate) fn decoding<T>(
        &self,
        bytes: &[u8],
        decode: impl FnOnce(&[u8]) -> Result<T, CodecError>,
    ) -> Result<T, CodecError> {
        if crate::compression::is_compressed(bytes) {
            let value = crate::compression::decompress(bytes, self.settings().max_value_size)?;
            decode(&value)
        } else {
            decode(bytes)
        }
    }

    /// A decoded value; a failure is counted and logged.
    pub(crate) fn decoded<T>(
        &self,
        site: &'static Site,
        key: &str,
        decoded: Result<T, CodecError>,
    ) -> Option<T> {
        match decoded {
            Ok(value) => Some(value),
            Err(error) => {
                self.record(site, Event::Error);
                crate::limited!(
                    self,
                    warn!(key, %error, "undecodable cache entry: recomputing and overwriting it")
                );
                None
            }
        }
    }

    /// With `single_flight`: joins this process's computation of `key`, or
    /// leads it. `takes_proof`: see [`Joiner`].
    async fn coalesce(
        &self,
        site: &'static Site,
        key: &str,
        rounds: &mut Rounds,
        takes_proof: bool,
        call: &mut Erased<'_>,
    ) -> Coalesced<'_> {
        if site.single_flight_mode() == SingleFlight::Off || rounds.looks >= MAX_LOOKS {
            return Coalesced::Lead(None);
        }
        if rounds.failed_leaders >= MAX_HANDOVERS {
            return Coalesced::Gated;
        }
        let joiner = Joiner {
            began: rounds.began,
            takes_proof,
        };
        let waiter = match self.flights().join(key, joiner) {
            Role::Leader(leader) => return Coalesced::Lead(Some(leader)),
            Role::Waiter(waiter) => waiter,
        };
        match waiter.wait().await {
            Handed::Value(bytes) => {
                if !self.decode(site, key, &bytes, call) {
                    return Coalesced::Lead(None);
                }
            }
            // A batch's answer that this function cannot return (the id
            // was not in the batch's map): it computes on its own.
            Handed::Nothing => {
                if !call.call().decode_nothing() {
                    return Coalesced::Lead(None);
                }
            }
            Handed::LookAgain | Handed::Later => {
                rounds.looks += 1;
                return Coalesced::LookAgain;
            }
            Handed::Failed => {
                rounds.failed_leaders += 1;
                return Coalesced::LookAgain;
            }
        }
        self.record(site, Event::Coalesced);
        Coalesced::Answer
    }

    /// Takes the lease on a missing key, or (distributed) waits for another
    /// process's value for at most one lease and then computes without it.
    async fn claim<'c>(
        &'c self,
        site: &'static Site,
        key: &'c str,
        claim: Claim,
        rounds: &mut Rounds,
        call: &mut Erased<'_>,
    ) -> Claimed<'c> {
        let take = match claim {
            Claim::Uncached { .. } => return Claimed::Computing(Leased::Uncached),
            Claim::IfAbsent => Take::IfAbsent,
            Claim::Replace(garbage) => garbage.take(),
            Claim::Foreign(placeholder) => {
                if site.single_flight_mode() != SingleFlight::Distributed {
                    return Claimed::Computing(Leased::Foreign(placeholder));
                }
                let lease = self.settings().lease;
                let one_lease = lease + lease / 10;
                let wait = rounds.wait.get_or_insert_with(|| Wait {
                    give_up: Instant::now() + one_lease,
                    pause: FIRST_POLL,
                    placeholder: placeholder.clone(),
                    last_call: Instant::now() + one_lease * HOLDERS_WAITED_ON,
                });
                if wait.placeholder != placeholder {
                    wait.give_up = (Instant::now() + one_lease).min(wait.last_call);
                    wait.pause = FIRST_POLL;
                    wait.placeholder.clone_from(&placeholder);
                }
                if Instant::now() >= wait.give_up {
                    return Claimed::Computing(Leased::Foreign(placeholder));
                }
                let this_pause = wait.pause;
                wait.pause = (wait.pause * 2).min(LONGEST_POLL);
                tokio::time::sleep(this_pause).await;
                self.record(site, Event::LeasePoll);
                return Claimed::Read(self.reread(site, key, call).await);
            }
        };
        match HeldLease::take(self, site, key, take).await {
            Taken::Held(lease) => Claimed::Computing(Leased::Own(lease)),
            Taken::Occupied if rounds.rechecks < MAX_RECHECKS => {
                rounds.rechecks += 1;
                Claimed::Read(self.reread(site, key, call).await)
            }
            Taken::Occupied | Taken::Failed => Claimed::Computing(Leased::None),
        }
    }
}

impl Cache {
    /// Runs the body on a miss and settles the lease with its result.
    async fn compute(
        &self,
        site: &'static Site,
        key: &str,
        lease: Leased<'_>,
        leader: Option<Leader<'_>>,
        call: &mut Erased<'_>,
    ) -> Answered {
        let uncached = matches!(lease, Leased::Uncached);
        let event = match (uncached, call.refreshing()) {
            (true, _) => Event::Bypass,
            (false, true) => Event::Refresh,
            (false, false) => Event::Miss,
        };
        self.record(site, event);
        // If this call is dropped during the body, the tuple drops in field
        // order: the lease is marked abandoned before the flight's waiters
        // are woken, so the one that leads next takes the lease over
        // instead of computing beside a placeholder it cannot replace.
        let held = (lease, leader);
        let clocks = self.clocks_for(site, uncached).await;
        let ((), run) = Run::time(call.run_body()).await;
        let (lease, leader) = held;
        if uncached && leader.is_none() {
            // Nothing to store and nobody to hand the answer to.
            return Answered::Body;
        }
        self.derive_tags(site, call, clocks).await;
        let answer = call.encode_output(self.settings().codec);
        let landing = self
            .settle(
                site,
                key,
                answer,
                lease,
                leader.as_ref(),
                run,
                call.tagging(),
            )
            .await;
        if let Some(leader) = leader {
            leader.land(landing);
        }
        Answered::Body
    }

    /// Stores a body's answer over the lease (or gives the lease back) and
    /// says what the waiters get: the value only if the cache proved that no
    /// write touched the key meanwhile (see [`crate::cache::flight`]). A
    /// batch settles one answer per key.
    // The single and the batch lookup's step: each argument is one of
    // their locals, bundling them would only move them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn settle(
        &self,
        site: &'static Site,
        key: &str,
        answer: Encoded,
        lease: Leased<'_>,
        leader: Option<&Leader<'_>>,
        run: Run,
        tagging: Option<&Tagging>,
    ) -> Landing {
        let (entry, life) = match answer {
            Encoded::Failed => {
                if let Leased::Own(lease) = lease {
                    lease.give_back().await;
                }
                return Landing::Failed;
            }
            // Nothing is stored: the bytes are only for the waiters.
            Encoded::Value(encoded, life) if matches!(lease, Leased::Uncached) => match encoded {
                Ok(bytes) => (Some(bytes), life),
                Err(_) => return Landing::LookAgain,
            },
            Encoded::Value(encoded, life) => {
                let Some(bytes) = self.fit_for_store(Some(site.function()), key, encoded) else {
                    if let Leased::Own(lease) = lease {
                        lease.give_back().await;
                    }
                    return Landing::LookAgain;
                };
                (Some(bytes), life)
            }
            Encoded::Nothing => (None, Life::Ttl),
        };
        // Read before the command that proves the answer fresh is sent.
        let fence = leader.map_or(0, Leader::fence);
        let stamp = tagging.map(Tagging::stamp).unwrap_or_default();
        let mut fresh = match lease {
            // Its tags could not be told (a tag its value names was
            // invalidated while the body ran: see `crate::tag`).
            Leased::Own(lease) if tagging.is_some_and(|t| !t.is_read()) => {
                lease.give_back().await;
                false
            }
            Leased::Own(lease) => match self.to_store(site, entry.as_deref(), life) {
                Some((bytes, ttl)) => {
                    let (stored, ttl) = self.stored_form(site, &stamp, bytes, ttl, run.took);
                    // Nobody waits on the proof: the caller need not wait
                    // for the reply either, where its next read of the key
                    // goes out on the connection the store does (a local
                    // tier's and a tagged function's reads may go on the
                    // tracking connection instead), and unless it is a
                    // `refresh`, whose caller (a job warming entries, say)
                    // counts on the value being stored when it returns.
                    if leader.is_none()
                        && tagging.is_none()
                        && site.local_millis() == 0
                        && crate::scope::mode() != crate::scope::Mode::Refresh
                    {
                        lease.fulfil_soon(site, stored.into_owned(), ttl).await;
                        false
                    } else {
                        lease.fulfil(site, &stored, ttl).await
                    }
                }
                // Nothing to store (a `None` not cached, a value `unless`
                // rejects): the lease goes back, and was still there only
                // if no write came in between.
                None => lease.give_back().await,
            },
            Leased::Foreign(seen) => fence > 0 && self.still_holds(key, &seen).await,
            Leased::None | Leased::Uncached => false,
        };
        // The proof covers the key; a tagged answer needs its tags
        // unchanged too (see `crate::tag`), when someone waits for it.
        if let Some(tagging) = tagging
            && fresh
            && fence > 0
        {
            fresh = self.tokens_unchanged(tagging).await;
        }
        let cover = Cover {
            body_started: run.started,
            fence: if fresh { fence } else { 0 },
        };
        match entry {
            Some(bytes) => Landing::Value {
                bytes: bytes.into(),
                cover,
            },
            None => Landing::Nothing { cover },
        }
    }

    /// For a function with `tags_from`, before its body runs: the tag
    /// clocks (see `crate::tag`); `None` otherwise, or when nothing will
    /// be stored.
    pub(crate) async fn clocks_for(
        &self,
        site: &'static Site,
        uncached: bool,
    ) -> Option<Vec<Token>> {
        if !site.derives_tags() || uncached {
            return None;
        }
        Box::pin(self.read_clocks(site)).await
    }

    /// For a function with `tags_from`, once its body ran: the tags its
    /// value names, added to the call's (see [`Cache::derive`]).
    pub(crate) async fn derive_tags(
        &self,
        site: &'static Site,
        call: &mut Erased<'_>,
        clocks: Option<Vec<Token>>,
    ) {
        if !site.derives_tags() {
            return;
        }
        let names = call.call().derived_tags();
        if let Some(tagging) = call.tagging_mut() {
            Box::pin(self.derive(site, tagging, names, clocks.as_deref())).await;
        }
    }

    /// What an answer stores, and for how long: an encoded value for its
    /// `life`, or (`cache_none`) the negative entry for the `None` TTL;
    /// `None` when nothing is stored.
    pub(crate) fn to_store<'b>(
        &self,
        site: &Site,
        value: Option<&'b [u8]>,
        life: Life,
    ) -> Option<(&'b [u8], u64)> {
        match value {
            Some(bytes) => site.ttl_of(life).map(|ttl| (bytes, ttl)),
            None => site.none_ttl_millis().map(|ttl| (NOTHING, ttl)),
        }
    }

    /// Whether `key` still holds an entry that begins with `header` (the
    /// one read before computing): then no write touched it in between.
    pub(crate) async fn still_begins(&self, key: &str, header: &[u8]) -> bool {
        let read = self.backend().get(key, self.settings().read_limit);
        match self.guarded(key, read).await {
            Ok(Fetched::Found(bytes)) => bytes.starts_with(header),
            Ok(Fetched::TooLarge) => false,
            _ => false,
        }
    }

    /// Whether `key` still holds `placeholder` (another caller's lease seen
    /// before computing): then no write touched it in between.
    async fn still_holds(&self, key: &str, placeholder: &[u8]) -> bool {
        let read = self.backend().get(key, self.settings().read_limit);
        matches!(self.guarded(key, read).await, Ok(Fetched::Found(bytes)) if bytes == placeholder)
    }

    /// The bytes stored for an encoded value, and their TTL: with a
    /// freshness header, kept past the TTL, for `stale` and `early_refresh`.
    pub(crate) fn stored_form<'b>(
        &self,
        site: &Site,
        stamp: &[u8],
        bytes: &'b [u8],
        ttl: u64,
        took: Duration,
    ) -> (Cow<'b, [u8]>, u64) {
        let (bytes, ttl): (Cow<'b, [u8]>, u64) = if site.tracks_freshness() {
            let header = Freshness::new(took, self.clock());
            (
                header.wrap(bytes).into(),
                ttl.saturating_add(self.kept(site)),
            )
        } else {
            (bytes.into(), ttl)
        };
        if stamp.is_empty() {
            return (bytes, ttl);
        }
        let mut stamped = Vec::with_capacity(stamp.len() + bytes.len());
        stamped.extend_from_slice(stamp);
        stamped.extend_from_slice(&bytes);
        (stamped.into(), ttl)
    }

    /// How long past its TTL a value with a freshness header stays stored:
    /// the stale window, and with `early_refresh` at least one lease, so
    /// that a refresh drawn just before expiry can finish while the others
    /// are served the old value; then the fail-safe window.
    fn kept(&self, site: &Site) -> u64 {
        let grace = if site.early_refresh_beta().is_some() {
            px(self.settings().lease)
        } else {
            0
        };
        site.stale_millis()
            .max(grace)
            .saturating_add(site.fail_safe_millis())
    }

    /// Recomputes a value that is stale or drawn for early refresh, held by
    /// one caller across processes (the refresh lock); the others are served
    /// the old value meanwhile. The refresh's answer replaces the entry: a
    /// value is stored over the very value that was read, nothing (`None`)
    /// removes it; a failure serves the old value (stale-if-error) and
    /// holds the lock for a moment, so that the failure is not retried by
    /// every caller.
    async fn refresh(
        &self,
        site: &'static Site,
        key: &str,
        refresh: Refresh,
        call: &mut Erased<'_>,
        began: Instant,
    ) -> Answered {
        let Some(lock) = HeldLease::refresh_lock(self, site, key).await else {
            self.record(site, refresh.served);
            return Answered::Decoded;
        };
        self.record(site, Event::Refresh);
        let clocks = self.clocks_for(site, false).await;
        // A slow body finishes in the background if it can (the old value
        // answers at the soft timeout), else it runs to its end.
        let background = crate::read::fail_safe::background(self, site, call, began);
        let limit = background.as_ref().map(|(limit, _)| *limit);
        let catch = site.fail_safe_millis() > 0;
        let run = match crate::read::run::run(self, key, call, limit, catch).await {
            Ran::Done(run) => run,
            Ran::Slow { started } => {
                if let Some((_, slot)) = background {
                    crate::read::fail_safe::finish_late(
                        self,
                        site,
                        key,
                        &refresh.header,
                        call,
                        lock,
                        slot,
                        started,
                        false,
                    );
                }
                self.record(site, Event::FailSafe);
                return Answered::Decoded;
            }
        };
        self.derive_tags(site, call, clocks).await;
        if call.tagging().is_some_and(|t| !t.is_read()) {
            // Its tags could not be told: the old value stays, checked
            // against its own tags on every read.
            lock.give_back().await;
            return Answered::Body;
        }
        let answer = call.encode_output(self.settings().codec);
        if let Encoded::Failed = answer {
            crate::limited!(
                self,
                warn!(
                    key,
                    "cache refresh failed: serving the value it was to replace"
                )
            );
            lock.hold_for(REFRESH_RETRY_AFTER).await;
            return Answered::Decoded;
        }
        let stamp = call.tagging().map(Tagging::stamp).unwrap_or_default();
        let entry = self.entry_of(site, key, answer).1;
        self.replace_entry(site, key, &refresh.header, entry, run, &stamp)
            .await;
        lock.give_back().await;
        Answered::Body
    }

    /// Inside `refresh(...)`, an entry with a freshness header: see
    /// [`Done::Forced`]. Coalesced (`single_flight`) with this process's
    /// computation of the key only if it began after this call. A body
    /// that fails answers with its error, and leaves the entry as it was.
    async fn forced(
        &self,
        site: &'static Site,
        key: &str,
        header: Vec<u8>,
        call: &mut Erased<'_>,
        began: Instant,
    ) -> Answered {
        let mut leader = None;
        if site.single_flight_mode() != SingleFlight::Off {
            let joiner = Joiner {
                began,
                takes_proof: false,
            };
            match self.flights().join(key, joiner) {
                Role::Leader(me) => leader = Some(me),
                Role::Waiter(waiter) => match waiter.wait().await {
                    Handed::Value(bytes) if self.decode(site, key, &bytes, call) => {
                        self.record(site, Event::Coalesced);
                        return Answered::Decoded;
                    }
                    Handed::Nothing if call.call().decode_nothing() => {
                        self.record(site, Event::Coalesced);
                        return Answered::Decoded;
                    }
                    // Computed here, under the lock if it can be taken.
                    _ => {}
                },
            }
        }
        let lock = HeldLease::refresh_lock(self, site, key).await;
        self.record(site, Event::Refresh);
        let clocks = self.clocks_for(site, false).await;
        let ((), run) = Run::time(call.run_body()).await;
        self.derive_tags(site, call, clocks).await;
        let answer = call.encode_output(self.settings().codec);
        let failed = matches!(answer, Encoded::Failed);
        if failed || call.tagging().is_some_and(|t| !t.is_read()) {
            if let Some(leader) = leader {
                leader.land(if failed {
                    Landing::Failed
                } else {
                    Landing::LookAgain
                });
            }
            if let Some(lock) = lock {
                lock.give_back().await;
            }
            return Answered::Body;
        }
        let nothing = matches!(answer, Encoded::Nothing);
        let (handed, entry) = self.entry_of(site, key, answer);
        let fence = leader.as_ref().map_or(0, Leader::fence);
        let fresh = match lock {
            Some(lock) => {
                let stamp = call.tagging().map(Tagging::stamp).unwrap_or_default();
                let replaced = self
                    .replace_entry(site, key, &header, entry, run, &stamp)
                    .await;
                lock.give_back().await;
                replaced
            }
            None => false,
        };
        if let Some(leader) = leader {
            self.hand_over(leader, fence, handed, nothing, fresh, run, call.tagging())
                .await;
        }
        Answered::Body
    }

    /// Lands a recomputation that replaced an entry read (`fail_safe`, a
    /// forced refresh) for the waiters of its flight: its value (`handed`),
    /// or nothing (`nothing`), or, for a value that did not encode, a call
    /// to read the key. `fresh`: the entry was replaced (or still there),
    /// so no write came in between; a tagged answer needs its tags
    /// unchanged too (see `crate::tag`). `fence` was read before that
    /// proof's command was sent.
    // The recomputations' locals, as for `settle`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn hand_over(
        &self,
        leader: Leader<'_>,
        fence: u64,
        handed: Option<Vec<u8>>,
        nothing: bool,
        fresh: bool,
        run: Run,
        tagging: Option<&Tagging>,
    ) {
        let fresh = match tagging {
            Some(tagging) if fresh => self.tokens_unchanged(tagging).await,
            _ => fresh,
        };
        let cover = Cover {
            body_started: run.started,
            fence: if fresh { fence } else { 0 },
        };
        leader.land(match (handed, nothing) {
            (Some(bytes), _) => Landing::Value {
                bytes: bytes.into(),
                cover,
            },
            (None, true) => Landing::Nothing { cover },
            (None, false) => Landing::LookAgain,
        });
    }

    /// What an answer (not [`Encoded::Failed`]) hands to waiters (its
    /// encoded value, `None` for nothing) and what it stores over an entry
    /// it replaces: a value and its TTL, the negative entry, or nothing
    /// (a value that does not encode, or is not to be stored: `unless`).
    pub(crate) fn entry_of(
        &self,
        site: &'static Site,
        key: &str,
        answer: Encoded,
    ) -> (Option<Vec<u8>>, Option<Entry>) {
        match answer {
            Encoded::Value(Ok(bytes), life) => {
                let stored = site.ttl_of(life).and_then(|ttl| {
                    self.fit_for_store(Some(site.function()), key, Ok(bytes.clone()))
                        .map(|bytes| (Cow::Owned(bytes), ttl))
                });
                (Some(bytes), stored)
            }
            Encoded::Value(Err(error), _) => {
                // Counted and logged by `fit_for_store`.
                let _ = self.fit_for_store(Some(site.function()), key, Err(error));
                (None, None)
            }
            Encoded::Nothing | Encoded::Failed => (
                None,
                site.none_ttl_millis()
                    .map(|ttl| (Cow::Borrowed(NOTHING), ttl)),
            ),
        }
    }

    /// Replaces the entry read with `header` (its tag and freshness
    /// headers) by `entry`: stored over it, or the entry removed when there
    /// is nothing to store; a write's `DEL` in the meantime wins. Whether
    /// the key still held what was read: then no write came in between.
    pub(crate) async fn replace_entry(
        &self,
        site: &'static Site,
        key: &str,
        header: &[u8],
        entry: Option<Entry>,
        run: Run,
        stamp: &[u8],
    ) -> bool {
        let backend = self.backend();
        match entry {
            Some((bytes, ttl)) => {
                let (stored, ttl) = self.stored_form(site, stamp, &bytes, ttl, run.took);
                let set = backend.compare_and_set(key, header, &stored, ttl);
                self.record_store(site, key, self.guarded(key, set).await)
            }
            None => {
                let remove = backend.compare_and_delete(key, header);
                match self.guarded(key, remove).await {
                    Ok(removed) => removed,
                    Err(error) => {
                        if !matches!(error, CacheError::CircuitOpen) {
                            self.record(site, Event::Error);
                        }
                        false
                    }
                }
            }
        }
    }
}

/// What is stored over an entry (see [`Cache::entry_of`]): the bytes and
/// their TTL in milliseconds.
pub(crate) type Entry = (Cow<'static, [u8]>, u64);

/// Where a read of a function with a local tier keeps a fresh value: see
/// [`Cache::classify`].
struct Keep<'t> {
    tier: &'t LocalTier,
    ticket: Ticket,
    /// The tickets of its tags, if it has any.
    tags: Option<std::sync::Arc<[TagTicket]>>,
    /// The function's `local` time, in milliseconds.
    local_for: u64,
}
