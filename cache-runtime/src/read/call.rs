//! The typed half of a cached call, behind a small object-safe interface.
//!
//! The read path ([`crate::read::lookup`]) is compiled once, not once per
//! cached function: it sees a call as a [`dyn Call`](Call), which runs the
//! body, decodes bytes into the call's answer and encodes the body's
//! output. Only [`Typed`], a few small functions over serde and the
//! function's result type, is compiled for each cached function. A service
//! with a hundred cached functions used to compile (and optimize) the
//! whole state machine of leases, flights and refreshes a hundred times.

use std::borrow::Cow;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use tracing::Instrument;

use crate::cache::Cache;
use crate::codec::{Codec, CodecError};
use crate::key::CacheKey;
use crate::local::{LocalTier, TagTicket, Ticket};
use crate::outcome::{ByValue, Encoded, Outcome};
use crate::scope::Mode;
use crate::site::Site;
use crate::tag::{Tagging, Tags};

/// Which of its answers a call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answered {
    /// What was decoded last: a hit, a value handed over by another
    /// caller, the old value of a refresh that failed.
    Decoded,
    /// The body's output.
    Body,
}

/// One cached call, as the read path sees it.
pub(crate) trait Call {
    /// Decodes an encoded value (decompressed already) as the answer.
    fn decode(self: Pin<&mut Self>, codec: Codec, bytes: &[u8]) -> Result<(), CodecError>;
    /// Takes the answer of nothing (`None`) as the answer; `false` if the
    /// function's result has no such answer.
    fn decode_nothing(self: Pin<&mut Self>) -> bool;
    /// Polls the body, keeping its output; the body is dropped when it
    /// completes.
    fn poll_body(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()>;
    /// Drops the body where it stands (its run was cancelled).
    fn drop_body(self: Pin<&mut Self>);
    /// The body's output, encoded ([`Encoded::Failed`] before it is done).
    fn encode_output(&self, codec: Codec) -> Encoded;
    /// Whether the call has the answer (see [`Typed::answer`]).
    fn has(&self, answered: Answered) -> bool;
    /// The tags the body's value names (`tags_from`; none without it, or
    /// without a value).
    fn derived_tags(&self) -> Vec<String>;
    /// The body, still running, as a future that outlives the call and
    /// ends with its output encoded (`soft_timeout`); `None` if the body
    /// cannot outlive the call (it borrows), or is done.
    fn detach(self: Pin<&mut Self>, codec: Codec) -> Option<Detached>;
    /// Whether [`Call::detach`] will hand the body over (it is still to
    /// run, or running, and can outlive the call).
    fn can_detach(&self) -> bool;
    /// With a local tier, keeps a copy of the decoded answer for
    /// `keep_for` (see [`crate::local`]).
    fn keep_local(
        &self,
        tier: &LocalTier,
        ticket: Ticket,
        tags: Option<&Arc<[TagTicket]>>,
        key: &str,
        encoded: usize,
        keep_for: Duration,
    );
}

/// A call held by the read path: a [`Call`], or a batch's `BatchCall`
/// (whose `Send` and constructor are in `read::batch`).
pub(crate) struct Erased<'a, C: ?Sized + 'a = dyn Call + 'a> {
    call: Pin<&'a mut C>,
    /// A tagged function's tags (see [`crate::tag`]).
    tagging: Option<Tags>,
    /// Inside [`crate::refresh`]: whatever the cache holds is recomputed.
    refresh: bool,
}

// SAFETY: an `Erased` borrows a `Typed` (or a `TypedBatch`) that lives in
// the future of the cached call itself (`__private::cached` and its
// siblings pin it there), and it is only
// ever held by the read path's futures, which that same future awaits in
// place: none is spawned or handed elsewhere. So it crosses threads only
// when the future that owns the `Typed` does, which the compiler allows
// only if the body and the result are `Send`. This is what keeps the read
// path one non-generic state machine while a cached function's future
// stays exactly as `Send` as its body.
unsafe impl Send for Erased<'_, dyn Call + '_> {}

impl<'a, C: ?Sized + 'a> Erased<'a, C> {
    /// `call`, without tags yet (see [`Erased::new`]; a batch's own
    /// constructor is `read::batch`'s).
    pub(crate) fn of(call: Pin<&'a mut C>) -> Self {
        Erased {
            call,
            tagging: None,
            refresh: false,
        }
    }

    /// Made inside [`crate::refresh`]: no value the cache holds is served.
    pub(crate) fn refreshing(&self) -> bool {
        self.refresh
    }

    pub(crate) fn refresh(&mut self, refresh: bool) {
        self.refresh = refresh;
    }

    pub(crate) fn pinned(&mut self) -> Pin<&mut C> {
        self.call.as_mut()
    }

    /// The call's tags, if its function has any.
    pub(crate) fn tagging(&self) -> Option<&Tagging> {
        self.tagging.as_deref()
    }

    pub(crate) fn tagging_mut(&mut self) -> Option<&mut Tagging> {
        self.tagging.as_deref_mut()
    }
}

impl<'a> Erased<'a> {
    pub(crate) fn new<C: Call + 'a>(call: Pin<&'a mut C>) -> Self {
        Erased::of(call)
    }

    pub(crate) fn call(&mut self) -> Pin<&mut (dyn Call + 'a)> {
        self.call.as_mut()
    }

    /// Runs the body to completion. If this future is dropped first, the
    /// body is dropped with it: before anything the caller took earlier
    /// (a lease, a flight's leadership) is given back, as when the body
    /// was a local of the read path.
    pub(crate) async fn run_body(&mut self) {
        let mut running = Running(self);
        std::future::poll_fn(|cx| running.poll(cx)).await;
    }

    /// [`Erased::run_body`] for at most `limit`: whether the body is done.
    /// If not, the body is left as it stands, to [`Erased::detach`] or
    /// drop; if this future is dropped, the body is dropped with it.
    pub(crate) async fn run_body_for(&mut self, limit: Duration) -> bool {
        let mut running = Running(self);
        let mut sleep = std::pin::pin!(tokio::time::sleep(limit));
        let done = std::future::poll_fn(|cx| match running.poll(cx) {
            Poll::Ready(()) => Poll::Ready(true),
            Poll::Pending => sleep.as_mut().poll(cx).map(|()| false),
        })
        .await;
        // Not dropped with the guard: the caller decides.
        std::mem::forget(running);
        done
    }

    /// The body, to finish without this call (see [`Call::detach`]).
    pub(crate) fn detach(&mut self, codec: Codec) -> Option<Detached> {
        self.call.as_mut().detach(codec)
    }

    /// See [`Call::can_detach`].
    pub(crate) fn can_detach(&self) -> bool {
        self.call.can_detach()
    }

    /// Drops the body where it stands.
    pub(crate) fn drop_body(&mut self) {
        self.call.as_mut().drop_body();
    }

    pub(crate) fn encode_output(&self, codec: Codec) -> Encoded {
        self.call.encode_output(codec)
    }

    /// `answered`, if the call has it; else the body's output, the body
    /// run if it has not yet.
    async fn ensure(&mut self, answered: Answered) -> Answered {
        if self.call.has(answered) {
            return answered;
        }
        self.run_body().await;
        Answered::Body
    }
}

/// A body being run, dropped if the run is.
struct Running<'r, 'a>(&'r mut Erased<'a>);

impl Running<'_, '_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.0.call.as_mut().poll_body(cx)
    }
}

impl Drop for Running<'_, '_> {
    fn drop(&mut self) {
        self.0.call.as_mut().drop_body();
    }
}

/// A cached call on its way into the read path: its function, the cache
/// and the Redis key, with its span and (`metrics`) its timer.
pub(crate) struct Lookup<'c> {
    site: &'static Site,
    cache: Cow<'c, Cache>,
    redis_key: String,
    tagging: Option<Tags>,
    /// Made inside [`crate::refresh`].
    refresh: bool,
    span: tracing::Span,
    timer: CallTimer,
}

impl<'c> Lookup<'c> {
    /// `None` without a cache installed (or for a key without its
    /// function's site, which generated keys always have), and inside
    /// [`crate::bypass`].
    pub(crate) fn new(cache: Option<&'c Cache>, key: CacheKey) -> Option<Self> {
        let mode = crate::scope::begin();
        let site = key.site()?;
        let cache = Cache::resolve(cache, site.function())?;
        if mode == Mode::Bypass {
            cache.record(site, crate::stats::Event::Skipped);
            return None;
        }
        let tagging = Tagging::of(&cache, &key);
        let redis_key = cache.redis_key_of(key);
        let span = cache.call_span(site, &redis_key);
        Some(Lookup {
            site,
            cache,
            redis_key,
            tagging,
            refresh: mode == Mode::Refresh,
            span,
            timer: CallTimer::start(site),
        })
    }

    /// Serves `key` into `call` from `cache` (or the installed cache), or
    /// runs the body.
    pub(crate) async fn run(
        cache: Option<&Cache>,
        key: CacheKey,
        mut call: Erased<'_>,
    ) -> Answered {
        let Some(lookup) = Lookup::new(cache, key) else {
            call.run_body().await;
            return Answered::Body;
        };
        call.refresh = lookup.refresh;
        let (site, cache, redis_key, tagging, span, timer) = lookup.into_parts();
        call.tagging = tagging;
        let answered = observed(span, cache.lookup(site, redis_key, &mut call)).await;
        finish(&mut call, answered, timer).await
    }

    #[allow(clippy::type_complexity)]
    fn into_parts(
        self,
    ) -> (
        &'static Site,
        Cow<'c, Cache>,
        String,
        Option<Tags>,
        tracing::Span,
        CallTimer,
    ) {
        (
            self.site,
            self.cache,
            self.redis_key,
            self.tagging,
            self.span,
            self.timer,
        )
    }

    /// A copy held in this process (see [`Cache::local_hit`]), answered
    /// without building the future of the path that reads Redis; else
    /// the lookup, to [`Lookup::run_local`] (moved back, not boxed: the
    /// miss it goes on to boxes its whole future once).
    #[allow(clippy::result_large_err)]
    pub(crate) fn local_hit<R>(
        self,
        hit: impl FnOnce(&Cache, &'static Site, &str) -> Option<R>,
    ) -> Result<R, Self> {
        if self.refresh {
            return Err(self);
        }
        let answer = self
            .span
            .in_scope(|| hit(&self.cache, self.site, &self.redis_key));
        match answer {
            Some(answer) => {
                self.timer.finish();
                crate::key::recycle(self.redis_key);
                Ok(answer)
            }
            None => Err(self),
        }
    }

    /// [`Lookup::run`] of a function with a local tier after
    /// [`Lookup::local_hit`] found no copy; boxed (see `cached_local`).
    pub(crate) async fn run_local(self, mut call: Erased<'_>) -> Answered {
        Box::pin(async move {
            call.refresh = self.refresh;
            let (site, cache, redis_key, tagging, span, timer) = self.into_parts();
            call.tagging = tagging;
            let answered = observed(span, cache.lookup_local(site, redis_key, &mut call)).await;
            finish(&mut call, answered, timer).await
        })
        .await
    }
}

/// A lookup's answer, made sure of (see [`Erased::ensure`]), and its
/// call timed.
async fn finish(call: &mut Erased<'_>, answered: Answered, timer: CallTimer) -> Answered {
    let answered = call.ensure(answered).await;
    timer.finish();
    answered
}

/// Runs a cached call in its span (boxed only when the span is enabled,
/// so that a call without tracing keeps its small future).
async fn observed<T>(span: tracing::Span, call: impl Future<Output = T>) -> T {
    if span.is_disabled() {
        call.await
    } else {
        Box::pin(call).instrument(span).await
    }
}

/// With the `metrics` feature, how long a cached call took
/// (`cache_call_duration_seconds`); nothing without it.
struct CallTimer {
    #[cfg(feature = "metrics")]
    started: (&'static Site, std::time::Instant),
}

impl CallTimer {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn start(site: &'static Site) -> CallTimer {
        CallTimer {
            #[cfg(feature = "metrics")]
            started: (site, std::time::Instant::now()),
        }
    }

    /// The call completed (a cancelled one is not observed).
    fn finish(self) {
        #[cfg(feature = "metrics")]
        {
            let (site, started) = self.started;
            let function = site.function();
            function
                .metrics
                .observe(function, started.elapsed().as_secs_f64());
        }
    }
}

/// A body left to finish in the background, its output encoded.
pub(crate) type Detached = Pin<Box<dyn Future<Output = Encoded> + Send>>;

/// The body of a function with `soft_timeout` whose body can outlive its
/// call (boxed, so that it can be handed to a task).
pub(crate) type SoftBody<R> = Pin<Box<dyn Future<Output = R> + Send>>;

/// How a body that can outlive its call is handed over (see
/// [`Call::detach`]).
type Detach<F, V> = fn(Pin<&mut Option<F>>, Codec, ByValue<V>) -> Option<Detached>;

/// A decoded answer: a value, or the result that says there is nothing.
enum Decoded<V, R> {
    Value(V),
    Nothing(R),
}

/// How a function with a local tier keeps a copy of a value.
type Fill<V> = fn(&LocalTier, Ticket, Option<&Arc<[TagTicket]>>, &str, Option<&V>, usize, Duration);

pin_project_lite::pin_project! {
    /// A cached call of one function: its body, `S` the shape of its
    /// result `R` with the cached value `V`.
    pub(crate) struct Typed<S, V, R, F> {
        #[pin]
        body: Option<F>,
        output: Option<R>,
        decoded: Option<Decoded<V, R>>,
        fill: Option<Fill<V>>,
        rules: ByValue<V>,
        detach: Option<Detach<F, V>>,
        shape: PhantomData<fn() -> S>,
    }
}

impl<S, V, R, F> Typed<S, V, R, F>
where
    S: Outcome<R, Value = V>,
    V: Serialize + serde::de::DeserializeOwned,
    F: Future<Output = R>,
{
    /// A call of `body`, whose value decides what `rules` say (its tags,
    /// its TTL, whether it is stored).
    pub(crate) fn new(body: F, rules: ByValue<V>) -> Self {
        Typed {
            body: Some(body),
            output: None,
            decoded: None,
            fill: None,
            rules,
            detach: None,
            shape: PhantomData,
        }
    }

    /// A call of a function with a local tier: a fresh value it reads is
    /// kept in process memory.
    pub(crate) fn with_local(body: F, rules: ByValue<V>) -> Self
    where
        V: Clone + Send + Sync + 'static,
    {
        Typed::new(body, rules).local()
    }

    /// A call of a function with a local tier (see [`Typed::with_local`]).
    pub(crate) fn local(mut self) -> Self
    where
        V: Clone + Send + Sync + 'static,
    {
        self.fill = Some(|tier, ticket, tags, key, value, encoded, keep_for| {
            tier.fill(ticket, tags, key, value.cloned(), encoded, keep_for);
        });
        self
    }

    /// The answer the read path chose, which [`Lookup::run`] made sure
    /// is there.
    pub(crate) fn answer(self: Pin<&mut Self>, answered: Answered) -> R {
        let this = self.project();
        let answer = match answered {
            Answered::Decoded => this.decoded.take().map(|decoded| match decoded {
                Decoded::Value(value) => S::from_hit(value),
                Decoded::Nothing(nothing) => nothing,
            }),
            Answered::Body => this.output.take(),
        };
        answer.expect("the read path answers with what it decoded or with the body's output")
    }
}

impl<S, V, R> Typed<S, V, R, SoftBody<R>>
where
    S: Outcome<R, Value = V> + 'static,
    V: Serialize + serde::de::DeserializeOwned + 'static,
    R: Send + 'static,
{
    /// A call whose body can outlive it (`soft_timeout`, owned arguments):
    /// left to finish in the background when it is slow.
    pub(crate) fn detachable(body: SoftBody<R>, rules: ByValue<V>) -> Self {
        let mut call = Typed::new(body, rules);
        call.detach = Some(|body, codec, rules| {
            let body = body.get_mut().take()?;
            Some(Box::pin(async move {
                let output = body.await;
                Encoded::of(codec, S::answer(&output), &rules)
            }))
        });
        call
    }
}

impl<S, V, R, F> Call for Typed<S, V, R, F>
where
    S: Outcome<R, Value = V>,
    V: Serialize + serde::de::DeserializeOwned,
    F: Future<Output = R>,
{
    fn decode(self: Pin<&mut Self>, codec: Codec, bytes: &[u8]) -> Result<(), CodecError> {
        let value = codec.decode::<V>(bytes)?;
        *self.project().decoded = Some(Decoded::Value(value));
        Ok(())
    }

    fn decode_nothing(self: Pin<&mut Self>) -> bool {
        let Some(nothing) = S::nothing() else {
            return false;
        };
        *self.project().decoded = Some(Decoded::Nothing(nothing));
        true
    }

    fn poll_body(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let Some(body) = this.body.as_mut().as_pin_mut() else {
            return Poll::Ready(());
        };
        let output = std::task::ready!(body.poll(cx));
        this.body.set(None);
        *this.output = Some(output);
        Poll::Ready(())
    }

    fn drop_body(self: Pin<&mut Self>) {
        self.project().body.set(None);
    }

    fn encode_output(&self, codec: Codec) -> Encoded {
        match &self.output {
            Some(output) => Encoded::of(codec, S::answer(output), &self.rules),
            None => Encoded::Failed,
        }
    }

    fn has(&self, answered: Answered) -> bool {
        match answered {
            Answered::Decoded => self.decoded.is_some(),
            Answered::Body => self.output.is_some(),
        }
    }

    fn derived_tags(&self) -> Vec<String> {
        let mut tags = Vec::new();
        if let Some(output) = &self.output
            && let crate::outcome::Answer::Value(value) = S::answer(output)
        {
            self.rules.tags_of(value, &mut tags);
        }
        tags
    }

    fn detach(self: Pin<&mut Self>, codec: Codec) -> Option<Detached> {
        let this = self.project();
        (*this.detach)?(this.body, codec, *this.rules)
    }

    fn can_detach(&self) -> bool {
        self.detach.is_some() && self.body.is_some()
    }

    fn keep_local(
        &self,
        tier: &LocalTier,
        ticket: Ticket,
        tags: Option<&Arc<[TagTicket]>>,
        key: &str,
        encoded: usize,
        keep_for: Duration,
    ) {
        let (Some(fill), Some(decoded)) = (self.fill, &self.decoded) else {
            return;
        };
        let value = match decoded {
            Decoded::Value(value) => Some(value),
            Decoded::Nothing(_) => None,
        };
        fill(tier, ticket, tags, key, value, encoded, keep_for);
    }
}
