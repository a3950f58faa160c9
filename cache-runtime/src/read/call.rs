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
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use tracing::Instrument;

use crate::cache::Cache;
use crate::codec::{Codec, CodecError};
use crate::key::CacheKey;
use crate::local::{LocalTier, Ticket};
use crate::outcome::{Encoded, Outcome};
use crate::site::Site;

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
    /// Polls the body, keeping its output.
    fn poll_body(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()>;
    /// The body's output, encoded ([`Encoded::Failed`] before it is done).
    fn encode_output(&self, codec: Codec) -> Encoded;
    /// Whether the call has the answer (see [`Typed::answer`]).
    fn has(&self, answered: Answered) -> bool;
    /// With a local tier, keeps a copy of the decoded answer for
    /// `keep_for` (see [`crate::local`]).
    fn keep_local(
        &self,
        tier: &LocalTier,
        ticket: Ticket,
        key: &str,
        encoded: usize,
        keep_for: Duration,
    );
}

/// A call held by the read path: a [`Call`], or a batch's
/// [`BatchCall`](crate::read::batch::BatchCall).
pub(crate) struct Erased<'a, C: ?Sized + 'a = dyn Call + 'a>(Pin<&'a mut C>);

// SAFETY: an `Erased` borrows a `Typed` (or a `TypedBatch`) that lives in
// the future of the cached call itself (`__private::cached` and its
// siblings pin it there), and it is only
// ever held by the read path's futures, which that same future awaits in
// place: none is spawned or handed elsewhere. So it crosses threads only
// when the future that owns the `Typed` does, which the compiler allows
// only if the body and the result are `Send`. This is what keeps the read
// path one non-generic state machine while a cached function's future
// stays exactly as `Send` as its body.
unsafe impl<C: ?Sized> Send for Erased<'_, C> {}

impl<'a, C: ?Sized + 'a> Erased<'a, C> {
    /// Holds `call` (unsized already, e.g. a `Pin<&mut dyn BatchCall>`).
    pub(crate) fn holding(call: Pin<&'a mut C>) -> Self {
        Erased(call)
    }

    pub(crate) fn pinned(&mut self) -> Pin<&mut C> {
        self.0.as_mut()
    }
}

impl<'a> Erased<'a> {
    pub(crate) fn new<C: Call + 'a>(call: Pin<&'a mut C>) -> Self {
        Erased(call)
    }

    pub(crate) fn call(&mut self) -> Pin<&mut (dyn Call + 'a)> {
        self.0.as_mut()
    }

    /// Runs the body to completion.
    pub(crate) async fn run_body(&mut self) {
        // The closure borrows the whole `Erased` (a closure that named
        // `self.0` would capture only that field, which is not `Send`).
        let this = self;
        std::future::poll_fn(move |cx| this.poll_body(cx)).await;
    }

    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll_body(cx)
    }

    pub(crate) fn encode_output(&self, codec: Codec) -> Encoded {
        self.0.encode_output(codec)
    }

    /// `answered`, if the call has it; else the body's output, the body
    /// run if it has not yet.
    async fn ensure(&mut self, answered: Answered) -> Answered {
        if self.0.has(answered) {
            return answered;
        }
        self.run_body().await;
        Answered::Body
    }
}

/// A cached call on its way into the read path: its function, the cache
/// and the Redis key, with its span and (`metrics`) its timer.
pub(crate) struct Lookup<'c> {
    site: &'static Site,
    cache: Cow<'c, Cache>,
    redis_key: String,
    span: tracing::Span,
    timer: CallTimer,
}

impl<'c> Lookup<'c> {
    /// `None` without a cache installed (or for a key without its
    /// function's site, which generated keys always have).
    pub(crate) fn new(cache: Option<&'c Cache>, key: CacheKey) -> Option<Self> {
        let site = key.site()?;
        let cache = Cache::resolve(cache, site.function())?;
        let redis_key = cache.redis_key_of(key);
        let span = cache.call_span(site, &redis_key);
        Some(Lookup {
            site,
            cache,
            redis_key,
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
        match Lookup::new(cache, key) {
            Some(lookup) => lookup.serve(&mut call, false).await,
            None => {
                call.run_body().await;
                Answered::Body
            }
        }
    }

    /// The read path in the call's span, its answer made sure of.
    async fn serve(self, call: &mut Erased<'_>, local: bool) -> Answered {
        let Lookup {
            site,
            cache,
            redis_key,
            span,
            timer,
        } = self;
        let answered = if local {
            observed(span, cache.lookup_local(site, redis_key, call)).await
        } else {
            observed(span, cache.lookup(site, redis_key, call)).await
        };
        let answered = call.ensure(answered).await;
        timer.finish();
        answered
    }

    /// A copy held in this process (see [`Cache::local_hit`]), answered
    /// without building the future of the path that reads Redis; else
    /// the lookup, to [`Lookup::run_local`].
    pub(crate) fn local_hit<R>(
        self,
        hit: impl FnOnce(&Cache, &'static Site, &str) -> Option<R>,
    ) -> Result<R, Self> {
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
        Box::pin(self.serve(&mut call, true)).await
    }
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

/// A decoded answer.
enum Decoded<V> {
    Value(V),
    Nothing,
}

/// How a function with a local tier keeps a copy of a value.
type Fill<V> = fn(&LocalTier, Ticket, &str, Option<&V>, usize, Duration);

pin_project_lite::pin_project! {
    /// A cached call of one function: its body, `S` the shape of its
    /// result `R` with the cached value `V`.
    pub(crate) struct Typed<S, V, R, F> {
        #[pin]
        body: F,
        ran: bool,
        output: Option<R>,
        decoded: Option<Decoded<V>>,
        fill: Option<Fill<V>>,
        shape: PhantomData<fn() -> S>,
    }
}

impl<S, V, R, F> Typed<S, V, R, F>
where
    S: Outcome<R, Value = V>,
    V: Serialize + serde::de::DeserializeOwned,
    F: Future<Output = R>,
{
    pub(crate) fn new(body: F) -> Self {
        Typed {
            body,
            ran: false,
            output: None,
            decoded: None,
            fill: None,
            shape: PhantomData,
        }
    }

    /// A call of a function with a local tier: a fresh value it reads is
    /// kept in process memory.
    pub(crate) fn with_local(body: F) -> Self
    where
        V: Clone + Send + Sync + 'static,
    {
        let mut call = Typed::new(body);
        call.fill = Some(|tier, ticket, key, value, encoded, keep_for| {
            tier.fill(ticket, key, value.cloned(), encoded, keep_for);
        });
        call
    }

    /// The answer the read path chose, which [`Lookup::run`] made sure
    /// is there.
    pub(crate) fn answer(self: Pin<&mut Self>, answered: Answered) -> R {
        let this = self.project();
        let answer = match answered {
            Answered::Decoded => this.decoded.take().and_then(|decoded| match decoded {
                Decoded::Value(value) => Some(S::from_hit(value)),
                Decoded::Nothing => S::nothing(),
            }),
            Answered::Body => this.output.take(),
        };
        answer.expect("the read path answers with what it decoded or with the body's output")
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
        if S::HAS_NOTHING {
            *self.project().decoded = Some(Decoded::Nothing);
        }
        S::HAS_NOTHING
    }

    fn poll_body(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if *this.ran {
            return Poll::Ready(());
        }
        let output = std::task::ready!(this.body.poll(cx));
        *this.output = Some(output);
        *this.ran = true;
        Poll::Ready(())
    }

    fn encode_output(&self, codec: Codec) -> Encoded {
        match &self.output {
            Some(output) => Encoded::of(codec, S::answer(output)),
            None => Encoded::Failed,
        }
    }

    fn has(&self, answered: Answered) -> bool {
        match answered {
            Answered::Decoded => match &self.decoded {
                Some(Decoded::Value(_)) => true,
                Some(Decoded::Nothing) => S::HAS_NOTHING,
                None => false,
            },
            Answered::Body => self.output.is_some(),
        }
    }

    fn keep_local(
        &self,
        tier: &LocalTier,
        ticket: Ticket,
        key: &str,
        encoded: usize,
        keep_for: Duration,
    ) {
        let (Some(fill), Some(decoded)) = (self.fill, &self.decoded) else {
            return;
        };
        let value = match decoded {
            Decoded::Value(value) => Some(value),
            Decoded::Nothing => None,
        };
        fill(tier, ticket, key, value, encoded, keep_for);
    }
}
