//! Tags: invalidating a group of entries (`tags = ["org:<org_id>"]`,
//! `#[invalidates(tag = "...")]`, [`Cache::invalidate_tag`]).
//!
//! # A tag is a key with a token
//!
//! Each tag has a key of its own, `<prefix>:\0tag:<tag>` (no template
//! renders a NUL byte, so it never collides with an entry), that holds a
//! random token. An entry of a tagged function is stored with the tokens
//! its tags had *before its body ran*, in a header line:
//!
//! ```text
//! \x04tags:<token> org:42 <token> members\n{"id":7,...}
//! ```
//!
//! and a read serves it only while every one of its tags still holds the
//! token it was stored with. Invalidating a tag deletes its key, which is
//! exactly a key invalidation: durable where the deployment is replicated,
//! retried until delivered, its readers in this process skipping the tag
//! meanwhile, local copies dropped, on every deployment. The entries of
//! the tag are left where they are, and die as misses.
//!
//! Why this keeps the promise of a key invalidation: once the tag's key is
//! deleted, nothing holds its old token any more, and a token is never
//! made again (64 random bits); the first reader after the deletion makes
//! a new one (`SET NX`) before its body runs. A computation that read the
//! database before the invalidation had read the tag's old token before
//! that, and its value, stored with the old token, is never served. A tag
//! key that the server evicts or expires has the same effect: misses,
//! never a stale answer. No clock is compared.
//!
//! In-process single flight needs one step more: a leader's compare-and-set
//! over its lease proves that no *key* invalidation came in between, not a
//! tag's. So a tagged leader reads its tags once more after storing, and
//! hands its value to waiters that joined after its body began only if
//! every token is still the one it stored with (see
//! [`crate::cache::flight`]).
//!
//! # Tags from the value
//!
//! A function with `tags_from` learns some of its tags from its value,
//! after its body ran, too late to read their tokens before it. They
//! share [`CLOCKS`] clocks, keys whose deletion goes first in every
//! invalidation of a tag (same `DEL` off a cluster; on a cluster, before
//! the tag is sent at all, see `Cache::invalidate_keys`; in the worker's
//! retries, before the tag on any backend).
//! Such a function reads every clock before its body; after it, the tokens
//! of the tags its value names, then their clocks, and stores the value
//! with those tokens only if no clock moved: an invalidation whose clock
//! went before that last read is seen, and one whose clock went after it
//! deleted its tag after the tokens were read. The entry's header lists
//! them after a `|` ([`DERIVED`]); a read checks them in a second request
//! ([`Cache::check_derived`]).
//!
//! # What it costs
//!
//! A hit of a tagged function reads its tags' tokens beside the entry (one
//! request more, sent with the entry's read, not after it); a miss adds the
//! same read of the tokens after the store, and a `SET NX` per tag that
//! has no token yet. A function with `tags_from` adds a read of the tags
//! its value names to a hit, and the clocks to a miss. Untagged functions
//! pay nothing.

use std::time::Duration;

use smallvec::SmallVec;

use crate::backend::Fetched;
use crate::cache::Cache;
use crate::error::CacheError;
use crate::key::{CacheKey, TAG_MARK, tag_of};
use crate::local::tracking::Via;
use crate::site::Site;
use crate::stats::Event;
use crate::token::{Token, is_token};

/// What a stored entry's tag header starts with. No encoded value starts
/// with byte 4 but the MessagePack integer 4, which is one byte long
/// (bytes 0 to 3 are placeholders, freshness headers, negative entries and
/// compressed values).
const HEADER: &[u8] = b"\x04tags:";
/// What a tag clock's key starts with (after the cache's prefix). The
/// rest, `<prefix>:tags}:<shard>`, is a hash tag that keeps every clock
/// of one cache in one slot of a cluster, read in one request (whatever
/// braces the prefix has, the hash tag is the same for every clock).
const CLOCK: &str = "\0tagclock{";
/// How many clocks the tags share: a `tags_from` value is not stored when
/// a tag of one of its tags' clocks was invalidated while its body ran.
const CLOCKS: u64 = 128;
/// How many tags a value may name (`tags_from`): each is checked on every
/// hit. A value that names more is returned, not stored.
const MOST_DERIVED: usize = 1_000;
/// The mark in the header of an entry of a function with `tags_from`,
/// after its own tags and before those its value named: never a token
/// (hexadecimal).
const DERIVED: u8 = b'|';
/// How often a reader tries to make a tag's token that keeps being
/// invalidated between its `SET NX` and its `GET`.
const MAKE_ATTEMPTS: usize = 3;
/// How long a tag's token lives at least: a token that expires turns its
/// entries into misses (all at once, in every process), so it outlives
/// the entries stored with it by far.
const SHORTEST_TOKEN_LIFE: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// What deleting `key` counts as: a tag's or an entry's invalidation, or
/// nothing (a tag clock's, which is part of a tag's).
pub(crate) fn invalidation_of(key: &str) -> Option<Event> {
    if key.contains(CLOCK) {
        None
    } else if key.contains(TAG_MARK) {
        Some(Event::TagInvalidation)
    } else {
        Some(Event::Invalidation)
    }
}

/// The key of the clock that a tag key (before or after the cache's
/// prefix) ticks when it is invalidated; `None` for other keys.
pub(crate) fn clock_of(key: &str) -> Option<String> {
    let at = key.find(TAG_MARK)?;
    let name = &key.as_bytes()[at + TAG_MARK.len()..];
    Some(clock_key(&key[..at], shard_of(name)))
}

/// The key of clock `shard` under `prefix` (empty, or the cache's prefix
/// with its `:`).
fn clock_key(prefix: &str, shard: u64) -> String {
    format!("{prefix}{CLOCK}{prefix}tags}}:{shard}")
}

/// Which clock a tag's name ticks: FNV-1a, so that every process and
/// every release agrees.
fn shard_of(name: &[u8]) -> u64 {
    let hash = name.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    hash % CLOCKS
}

/// A write's keys with the clock of each tag key among them put first, so
/// that a clock never ticks after its tag was invalidated (see
/// "Tags from the value" above).
pub(crate) fn with_clocks(keys: Vec<String>) -> Vec<String> {
    let mut clocks: Vec<String> = keys.iter().filter_map(|key| clock_of(key)).collect();
    if clocks.is_empty() {
        return keys;
    }
    clocks.sort_unstable();
    clocks.dedup();
    clocks.extend(keys);
    clocks
}

/// Whether `key` is a tag clock's.
pub(crate) fn is_clock(key: &str) -> bool {
    key.contains(CLOCK)
}

/// Whether `bytes` start with a tag header.
pub(crate) fn has_header(bytes: &[u8]) -> bool {
    bytes.len() > HEADER.len() && bytes.starts_with(HEADER)
}

/// How many bytes of `bytes` are a tag header (0 without one), or `None`
/// for a header without its end: garbage.
pub(crate) fn header_len(bytes: &[u8]) -> Option<usize> {
    if bytes.len() <= 1 || !bytes.starts_with(HEADER) {
        return Some(0);
    }
    let newline = bytes.iter().position(|&b| b == b'\n')?;
    Some(newline + 1)
}

/// The tags of a tag header (`header`, [`header_len`] bytes of an
/// entry), each as `(token, tag, whether the value named it)`; empty
/// without a header, `None` for a malformed one.
pub(crate) fn parse_header(header: &[u8]) -> Option<Vec<(String, String, bool)>> {
    let Some(line) = header.strip_prefix(HEADER) else {
        return header.is_empty().then(Vec::new);
    };
    let line = std::str::from_utf8(line.strip_suffix(b"\n")?).ok()?;
    let (mut tags, mut derived) = (Vec::new(), false);
    let mut words = line.split(' ').filter(|w| !w.is_empty());
    while let Some(word) = words.next() {
        if word.as_bytes() == [DERIVED] {
            derived = true;
            continue;
        }
        let name = words.next()?;
        if !is_token(word.as_bytes()) {
            return None;
        }
        tags.push((word.to_owned(), name.to_owned(), derived));
    }
    Some(tags)
}

/// The tags a stored value named (`tags_from`), each as `(token, tag)`.
pub(crate) type Named<'b> = Vec<(&'b [u8], &'b [u8])>;

/// The tags of one call of a tagged function: their Redis keys, and what
/// the last read found them to hold.
#[derive(Debug)]
pub(crate) struct Tagging {
    /// The tags' Redis keys: the function's own (`tags`), in their order,
    /// then those its value named (`tags_from`), once its body ran.
    pub(crate) keys: SmallVec<[String; 4]>,
    /// How many of `keys` are the function's own.
    pub(crate) fixed: usize,
    /// Where a tag's name starts in its key (after the prefix and mark).
    name_at: usize,
    /// Their tokens, as the last read found (or made) them: inline for
    /// a function's own tags (no allocation on a hit).
    tokens: SmallVec<[Token; 4]>,
    /// Whether `tokens` hold every key's token (a value is stored only
    /// then).
    read: bool,
    /// Whether the function has `tags_from` (see the module docs).
    pub(crate) derives: bool,
}

thread_local! {
    /// The tags of a call this thread is done with, for its next tagged
    /// call (see [`Tags`]).
    static SPARE: std::cell::Cell<Option<Box<Tagging>>> = const { std::cell::Cell::new(None) };
}

/// A tagged call's [`Tagging`], boxed (an untagged call's future stays
/// small) and, once the call is done, kept for this thread's next tagged
/// call with its keys' buffers: a tagged hit would otherwise allocate
/// the box and a key per tag, and free them at its end, often on another
/// worker thread than the one that allocated them.
#[derive(Debug)]
pub(crate) struct Tags(Option<Box<Tagging>>);

impl std::ops::Deref for Tags {
    type Target = Tagging;
    fn deref(&self) -> &Tagging {
        self.0
            .as_deref()
            .expect("a Tags holds its Tagging until dropped")
    }
}

impl std::ops::DerefMut for Tags {
    fn deref_mut(&mut self) -> &mut Tagging {
        self.0
            .as_deref_mut()
            .expect("a Tags holds its Tagging until dropped")
    }
}

impl Drop for Tags {
    fn drop(&mut self) {
        let Some(tagging) = self.0.take() else {
            return;
        };
        // Not one that a value's many tags (`tags_from`) grew: kept, it
        // would hold their buffers for as long as the thread lives.
        let small = !tagging.keys.spilled()
            && !tagging.tokens.spilled()
            && tagging
                .keys
                .iter()
                .all(|key| key.capacity() <= crate::key::MAX_KEY_LEN + 128);
        if small {
            // During thread teardown it is simply freed.
            let _ = SPARE.try_with(|spare| spare.set(Some(tagging)));
        }
    }
}

impl Tagging {
    /// The tags of `key`'s function for these arguments, as Redis keys of
    /// `cache`; `None` for an untagged function.
    pub(crate) fn of(cache: &Cache, key: &CacheKey) -> Option<Tags> {
        let derives = key.site().is_some_and(Site::derives_tags);
        if !key.has_tags() && !derives {
            return None;
        }
        let mut tagging = SPARE
            .try_with(std::cell::Cell::take)
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                Box::new(Tagging {
                    keys: SmallVec::new(),
                    fixed: 0,
                    name_at: 0,
                    tokens: SmallVec::new(),
                    read: false,
                    derives: false,
                })
            });
        // The kept keys' buffers are written over.
        let mut count = 0;
        for tag in key.tag_keys() {
            let at = count;
            count += 1;
            if at == tagging.keys.len() {
                tagging.keys.push(String::new());
            }
            let buffer = &mut tagging.keys[at];
            buffer.clear();
            if let Some(prefix) = cache.prefix() {
                buffer.reserve(prefix.len() + 1 + tag.len());
                buffer.push_str(prefix);
                buffer.push(':');
            }
            buffer.push_str(tag);
        }
        tagging.keys.truncate(count);
        tagging.fixed = count;
        tagging.name_at = cache.prefix().map_or(0, |prefix| prefix.len() + 1) + TAG_MARK.len();
        tagging.tokens.clear();
        tagging.read = false;
        tagging.derives = derives;
        Some(Tags(Some(tagging)))
    }

    /// The tags' Redis keys.
    pub(crate) fn keys(&self) -> &[String] {
        &self.keys
    }

    /// Whether every tag's token was read: only then is a value stored.
    pub(crate) fn is_read(&self) -> bool {
        self.read
    }

    /// The header to store an entry with: the tokens read last (empty
    /// when they could not be read: nothing is stored then).
    pub(crate) fn stamp(&self) -> Vec<u8> {
        if !self.read {
            return Vec::new();
        }
        let mut stamp = HEADER.to_vec();
        for (at, (name, token)) in self.names().zip(&self.tokens).enumerate() {
            if at > 0 {
                stamp.push(b' ');
            }
            if at == self.fixed && self.derives {
                stamp.extend_from_slice(b"| ");
            }
            stamp.extend_from_slice(token.as_bytes());
            stamp.push(b' ');
            stamp.extend_from_slice(name);
        }
        if self.derives && self.keys.len() == self.fixed {
            if self.fixed > 0 {
                stamp.push(b' ');
            }
            stamp.push(DERIVED);
        }
        stamp.push(b'\n');
        stamp
    }

    /// Whether `bytes` were stored with the tokens read last for the
    /// function's own tags: whether they start with [`Tagging::stamp`]
    /// (followed, for a function with `tags_from`, by its value's tags,
    /// which [`Cache::check_derived`] checks), compared in place (a hit
    /// makes no copy of it).
    pub(crate) fn stamped(&self, bytes: &[u8]) -> bool {
        self.own_stamp_len(bytes).is_some()
    }

    /// How many bytes of `bytes` are the header's start and the function's
    /// own tags with the tokens read last (and, for a function with
    /// `tags_from`, the mark after which its value's tags follow); `None`
    /// if they are not. An entry of a function with `tags_from` has the
    /// mark, even when its value named no tag, and no other has it, so
    /// that neither is taken for the other across a deployment that adds
    /// or removes `tags_from`.
    fn own_stamp_len(&self, bytes: &[u8]) -> Option<usize> {
        let mut rest = bytes.strip_prefix(HEADER)?;
        if !self.read {
            return None;
        }
        for (at, (name, token)) in self.names().zip(&self.tokens).take(self.fixed).enumerate() {
            if at > 0 {
                rest = rest.strip_prefix(b" ")?;
            }
            rest = rest
                .strip_prefix(token.as_bytes())?
                .strip_prefix(b" ")?
                .strip_prefix(name)?;
        }
        if self.derives {
            if self.fixed > 0 {
                rest = rest.strip_prefix(b" ")?;
            }
            rest = rest.strip_prefix(&[DERIVED])?;
            if !matches!(rest.first(), Some(b'\n' | b' ')) {
                return None;
            }
        } else if rest.first() != Some(&b'\n') {
            return None;
        }
        Some(bytes.len() - rest.len())
    }

    /// The tags a stamped entry's value named (`tags_from`), with the
    /// tokens it was stored with: `None` if the header is malformed.
    pub(crate) fn derived_of<'b>(&self, bytes: &'b [u8]) -> Option<Named<'b>> {
        let at = self.own_stamp_len(bytes)?;
        let end = at + bytes[at..].iter().position(|&b| b == b'\n')?;
        let mut pairs = Vec::new();
        if at == end {
            return Some(pairs);
        }
        let mut words = bytes[at + 1..end].split(|&b| b == b' ');
        while let Some(token) = words.next() {
            let name = words.next()?;
            if !is_token(token) || name.is_empty() || pairs.len() == MOST_DERIVED {
                return None;
            }
            pairs.push((token, name));
        }
        Some(pairs)
    }

    /// The tags' names, as their keys end.
    fn names(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.keys.iter().map(|key| &key.as_bytes()[self.name_at..])
    }

    pub(crate) fn set_tokens(&mut self, tokens: impl IntoIterator<Item = Token>) {
        self.tokens.clear();
        self.tokens.extend(tokens);
        self.read = true;
    }

    /// The tokens could not be read: nothing is stored.
    fn unread(&mut self) {
        self.tokens.clear();
        self.read = false;
    }
}

impl Cache {
    /// Invalidates every entry stored with `tag`, in every process. `tag`
    /// is the tag as its template renders it: `tags = ["org:<org_id>"]`
    /// renders `org:42` for `org_id = 42` (integers as themselves, other
    /// values escaped as in keys: `org:acme%20inc` for `"acme inc"`);
    /// `<fn>_cache_key(...).tags()` lists a call's tags, and
    /// `#[invalidates(tag = "...")]` renders them for you. Once this returns,
    /// no call that starts afterwards is answered with a value computed
    /// before it, from any function carrying the tag. It is
    /// a key invalidation of the tag's own key, with its guarantees (see
    /// [`Cache::invalidate`]); the tagged entries stay until they expire,
    /// and are never served.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), cache_runtime::CacheError> {
    /// let cache = cache_runtime::Cache::memory();
    /// cache.invalidate_tag("org:42").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// Cancel safe, as [`Cache::invalidate`] is.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<(), CacheError> {
        let key = self.redis_key(&CacheKey::of_tag(tag));
        match self.invalidate_keys(None, vec![key]).await {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// The tags of a `#[cache_put]` target's key, with
    /// their tokens read before the write's body runs; with no tokens
    /// (the entry is then invalidated, not stored) when they could not be
    /// read.
    pub(crate) async fn tokens_for_put(&self, key: &CacheKey) -> Option<Tags> {
        let site = key.site()?;
        let mut tagging = Tagging::of(self, key)?;
        if self.read_tokens(site, &mut tagging, None).await.is_none() {
            tagging.unread();
        }
        Some(tagging)
    }

    /// Reads the tags' tokens, making those that have none, into
    /// `tagging` (on the tracking connections `vias`, one per tag, for a
    /// function with a local tier); `None` (counted and logged) when the
    /// cache could not tell them, else whether every token was read where
    /// `vias` say (none had to be made).
    pub(crate) async fn read_tokens(
        &self,
        site: &'static Site,
        tagging: &mut Tagging,
        vias: Option<&[Via]>,
    ) -> Option<bool> {
        tagging.keys.truncate(tagging.fixed);
        if tagging.keys.is_empty() {
            tagging.set_tokens(Vec::new());
            return Some(true);
        }
        let read = match vias {
            None => self.read_tokens_of(&tagging.keys).await,
            Some(vias) => self.read_via(&tagging.keys, vias).await,
        };
        let tokens = match read {
            Ok(read) => self.tokens(site, &tagging.keys, read).await,
            Err(error) => Err(error),
        };
        match tokens {
            Ok((tokens, made)) => {
                tagging.set_tokens(tokens);
                Some(!made)
            }
            Err(error) => {
                self.tags_unread(site, &error);
                None
            }
        }
    }

    /// Counts and logs tags that could not be read (not while the breaker
    /// is open: its opening was counted): the call runs uncached.
    pub(crate) fn tags_unread(&self, site: &'static Site, error: &CacheError) {
        if !matches!(error, CacheError::CircuitOpen) {
            self.record(site, Event::Error);
            crate::limited!(
                self,
                warn!(%error, "cache tags could not be read: running uncached")
            );
        }
    }

    /// [`Cache::read_tokens`] for the keys of a batch, each tag read once
    /// however many keys carry it; `false` when the cache could not tell
    /// them.
    pub(crate) async fn read_batch_tokens(
        &self,
        site: &'static Site,
        taggings: &mut [Option<Tags>],
    ) -> bool {
        for tagging in taggings.iter_mut().flatten() {
            let fixed = tagging.fixed;
            tagging.keys.truncate(fixed);
        }
        let mut keys: Vec<String> = taggings
            .iter()
            .flatten()
            .flat_map(|tagging| tagging.keys.iter().cloned())
            .collect();
        if keys.is_empty() {
            // Functions with `tags_from` only: nothing to read.
            for tagging in taggings.iter_mut().flatten() {
                tagging.set_tokens(Vec::new());
            }
            return true;
        }
        keys.sort_unstable();
        keys.dedup();
        let read = match self.read_tokens_of(&keys).await {
            Ok(read) => self.tokens(site, &keys, read).await,
            Err(error) => Err(error),
        };
        let tokens = match read {
            Ok((tokens, _)) => tokens,
            Err(error) => {
                self.tags_unread(site, &error);
                return false;
            }
        };
        for tagging in taggings.iter_mut().flatten() {
            let mine: SmallVec<[Token; 4]> = tagging
                .keys
                .iter()
                .map(|key| {
                    let at = keys.binary_search(key).unwrap_or_default();
                    tokens[at]
                })
                .collect();
            tagging.set_tokens(mine);
        }
        true
    }

    /// Each tag key read on its tracking connection (or, with a
    /// broadcast, the cache's own), concurrently.
    pub(crate) async fn read_via(
        &self,
        keys: &[String],
        vias: &[Via],
    ) -> Result<Vec<Fetched<Vec<u8>>>, CacheError> {
        let limit = self.settings().read_limit;
        let reads = keys.iter().zip(vias).map(|(key, via)| async move {
            match via {
                Via::Tracked(conn) => {
                    let mut conn = (**conn).clone();
                    let read = crate::backend::get_with_ttl_on(&mut conn, key, limit);
                    let read = self.guarded(key, read).await?;
                    Ok(match read {
                        Fetched::Found(stored) => Fetched::Found(stored.bytes),
                        Fetched::Absent => Fetched::Absent,
                        Fetched::TooLarge => Fetched::TooLarge,
                    })
                }
                Via::Shared => self.guarded(key, self.backend().get(key, limit)).await,
            }
        });
        futures_util::future::join_all(reads)
            .await
            .into_iter()
            .collect()
    }

    /// Whether every tag still holds the token read last: no tag was
    /// invalidated since.
    pub(crate) async fn tokens_unchanged(&self, tagging: &Tagging) -> bool {
        if !tagging.read {
            return false;
        }
        if tagging.keys.is_empty() {
            return true;
        }
        match self.read_tokens_of(&tagging.keys).await {
            Ok(read) => read
                .into_iter()
                .zip(&tagging.tokens)
                .all(|(now, then)| matches!(now, Fetched::Found(now) if now == then.as_bytes())),
            Err(_) => false,
        }
    }

    /// The clocks' tokens, read (and made, where a clock has none) before
    /// the body of a function with `tags_from` runs; `None` (counted and
    /// logged) when they could not be read: its value is then not stored.
    pub(crate) async fn read_clocks(&self, site: &'static Site) -> Option<Vec<Token>> {
        let prefix = self.prefixed("");
        let keys: Vec<String> = (0..CLOCKS).map(|shard| clock_key(&prefix, shard)).collect();
        let read = match self.read_tokens_of(&keys).await {
            Ok(read) => self.tokens(site, &keys, read).await,
            Err(error) => Err(error),
        };
        match read {
            Ok((tokens, _)) => Some(tokens),
            Err(error) => {
                self.tags_unread(site, &error);
                None
            }
        }
    }

    /// After the body of a function with `tags_from` ran: adds the tags
    /// its value `names` to `tagging`, with their tokens, if none of
    /// their clocks ticked since `clocks` were read (before the body);
    /// else the tags count as unread, and the value is returned but not
    /// stored. The tokens are read before the clocks: see the module docs.
    pub(crate) async fn derive(
        &self,
        site: &'static Site,
        tagging: &mut Tagging,
        names: Vec<String>,
        clocks: Option<&[Token]>,
    ) {
        tagging.keys.truncate(tagging.fixed);
        tagging.tokens.truncate(tagging.fixed);
        let (Some(clocks), Some(keys)) = (
            clocks.filter(|_| tagging.read),
            self.derived_keys(tagging, names),
        ) else {
            tagging.unread();
            return;
        };
        if keys.is_empty() {
            return;
        }
        let mut shards: Vec<u64> = keys
            .iter()
            .map(|key| shard_of(&key.as_bytes()[tagging.name_at..]))
            .collect();
        shards.sort_unstable();
        shards.dedup();
        let prefix = self.prefixed("");
        let clock_keys: Vec<String> = shards
            .iter()
            .map(|&shard| clock_key(&prefix, shard))
            .collect();
        if keys
            .iter()
            .chain(&clock_keys)
            .any(|key| self.pending_write(site, key))
        {
            tagging.unread();
            return;
        }
        let tokens = match self.read_tokens_of(&keys).await {
            Ok(read) => self.tokens(site, &keys, read).await,
            Err(error) => Err(error),
        };
        let tokens = match tokens {
            Ok((tokens, _)) => tokens,
            Err(error) => {
                self.tags_unread(site, &error);
                tagging.unread();
                return;
            }
        };
        let still = match self.read_tokens_of(&clock_keys).await {
            Ok(now) => now.into_iter().zip(&shards).all(|(now, &shard)| {
                let then = usize::try_from(shard).ok().and_then(|at| clocks.get(at));
                matches!(now, Fetched::Found(now) if then.is_some_and(|then| then.as_bytes() == now))
            }),
            Err(_) => false,
        };
        if !still {
            tracing::debug!(
                tags = keys.len(),
                "a tag of this value was invalidated while it was computed: returned, not cached"
            );
            tagging.unread();
            return;
        }
        tagging.keys.extend(keys);
        tagging.tokens.extend(tokens);
    }

    /// The Redis keys of the tags a value `names`, once each, but the
    /// function's own; `None` (logged) when the value may not be stored:
    /// a tag that is empty or has a space (the header could not say it),
    /// or more than [`MOST_DERIVED`] of them.
    fn derived_keys(&self, tagging: &Tagging, names: Vec<String>) -> Option<Vec<String>> {
        let mut keys = Vec::with_capacity(names.len());
        for name in names {
            if name.is_empty()
                || name
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            {
                crate::limited!(
                    self,
                    warn!(tag = %name.escape_debug(), "a tag from `tags_from` is empty or has a space or a control character: the value is not cached")
                );
                return None;
            }
            keys.push(self.prefixed(CacheKey::of_tag(&name).as_str()).into_owned());
        }
        keys.sort_unstable();
        keys.dedup();
        keys.retain(|key| !tagging.keys[..tagging.fixed].contains(key));
        if keys.len() > MOST_DERIVED {
            crate::limited!(
                self,
                warn!(
                    tags = keys.len(),
                    most = MOST_DERIVED,
                    "a value names more tags than a cached value may (`tags_from`): it is not cached"
                )
            );
            return None;
        }
        Some(keys)
    }

    /// The tokens `read` found, and those made for the tags that had
    /// none; whether any was made.
    pub(crate) async fn tokens(
        &self,
        site: &Site,
        keys: &[String],
        read: Vec<Fetched<Vec<u8>>>,
    ) -> Result<(Vec<Token>, bool), CacheError> {
        let life = SHORTEST_TOKEN_LIFE
            .as_millis()
            .max(u128::from(site.longest_expiry_millis()) * 2);
        let life = u64::try_from(life).unwrap_or(u64::MAX);
        let mut tokens = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (at, (key, found)) in keys.iter().zip(read).enumerate() {
            let token = match found {
                Fetched::Found(token) => Token::parse(&token),
                Fetched::TooLarge => None,
                Fetched::Absent => {
                    missing.push(at);
                    // Replaced by the token made below.
                    Some(Token::random())
                }
            };
            let token = token.ok_or_else(|| CacheError::NotATag(tag_of(key).to_owned()))?;
            tokens.push(token);
        }
        // Made together: the first miss after a flush makes every clock.
        let made = futures_util::future::join_all(
            missing.iter().map(|&at| self.make_token(&keys[at], life)),
        )
        .await;
        for (&at, token) in missing.iter().zip(made) {
            tokens[at] = token?;
        }
        Ok((tokens, !missing.is_empty()))
    }

    /// A new token for a tag that has none (or the one another caller
    /// made first). A tag invalidated again between the two steps is
    /// tried again, a few times.
    async fn make_token(&self, key: &str, life: u64) -> Result<Token, CacheError> {
        for _ in 0..MAKE_ATTEMPTS {
            let token = Token::random();
            let made = self.backend().set_if_absent(key, token.as_bytes(), life);
            if self.guarded(key, made).await? {
                return Ok(token);
            }
            let read = self.backend().get(key, self.settings().read_limit);
            match self.guarded(key, read).await? {
                Fetched::Found(token) => match Token::parse(&token) {
                    Some(token) => return Ok(token),
                    None => break,
                },
                Fetched::TooLarge => break,
                Fetched::Absent => {}
            }
        }
        Err(CacheError::NotATag(tag_of(key).to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(digits: &str) -> Token {
        Token::parse(digits.as_bytes()).unwrap()
    }

    #[test]
    fn a_header_is_told_from_a_value() {
        assert_eq!(header_len(b"\x04"), Some(0), "the MessagePack integer 4");
        assert_eq!(header_len(b"{\"a\":1}"), Some(0));
        assert_eq!(header_len(b"\x04tags:0a org:1\n{}"), Some(15));
        assert_eq!(header_len(b"\x04tags:0a org:1"), None);
        assert_eq!(header_len(b"\x03tags:0a org:1"), Some(0), "compressed");
    }

    #[test]
    fn a_stamp_names_each_tag_with_its_token() {
        let mut tagging = Tagging {
            keys: smallvec::smallvec!["app:\0tag:org:42".into(), "app:\0tag:members".into()],
            fixed: 2,
            name_at: 4 + TAG_MARK.len(),
            tokens: SmallVec::new(),
            read: false,
            derives: false,
        };
        assert!(!tagging.stamped(b"\x04tags:\n"), "nothing read yet");
        tagging.set_tokens([token("00ff00ff00ff00ff"), token("0a0b0a0b0a0b0a0b")]);
        assert_eq!(
            tagging.stamp(),
            b"\x04tags:00ff00ff00ff00ff org:42 0a0b0a0b0a0b0a0b members\n"
        );
        assert!(tagging.stamped(b"\x04tags:00ff00ff00ff00ff org:42 0a0b0a0b0a0b0a0b members\n{}"));
        assert!(!tagging.stamped(b"\x04tags:00fe00ff00ff00ff org:42 0a0b0a0b0a0b0a0b members\n{}"));
        assert!(
            !tagging.stamped(b"\x04tags:00ff00ff00ff00ff org:42 0a0b0a0b0a0b0a0b members2\n{}")
        );
        assert_eq!(tag_of("app:\0tag:org:42"), "org:42");
        assert!(
            !tagging.stamped(
                b"\x04tags:00ff00ff00ff00ff org:42 0a0b0a0b0a0b0a0b members 0c0d product:1\n{}"
            ),
            "a value's own tags, without `tags_from`"
        );
    }

    #[test]
    fn a_value_names_its_tags_after_the_functions_own() {
        for (fixed, stamp, none, torn) in [
            (
                1,
                &b"\x04tags:00ff00ff00ff00ff org:42 | 0c0d0c0d0c0d0c0d product:1 0e0f0e0f0e0f0e0f product:2\n{}"[..],
                &b"\x04tags:00ff00ff00ff00ff org:42 |\n{}"[..],
                &b"\x04tags:00ff00ff00ff00ff org:42 | 0c0d0c0d0c0d0c0d\n{}"[..],
            ),
            (
                0,
                b"\x04tags:| 0c0d0c0d0c0d0c0d product:1 0e0f0e0f0e0f0e0f product:2\n{}",
                b"\x04tags:|\n{}",
                b"\x04tags:| 0c0d0c0d0c0d0c0d\n{}",
            ),
        ] {
            let mut tagging = Tagging {
                keys: smallvec::smallvec!["app:\0tag:org:42".into()],
                fixed,
                name_at: 4 + TAG_MARK.len(),
                tokens: SmallVec::new(),
                read: false,
                derives: true,
            };
            tagging.keys.truncate(fixed);
            tagging.set_tokens([token("00ff00ff00ff00ff")].into_iter().take(fixed));
            assert_eq!(&tagging.stamp()[..], &none[..none.len() - 2]);
            assert!(tagging.stamped(stamp));
            assert_eq!(
                tagging.derived_of(stamp).unwrap(),
                [(&b"0c0d0c0d0c0d0c0d"[..], &b"product:1"[..]), (b"0e0f0e0f0e0f0e0f", b"product:2")]
            );
            assert!(tagging.stamped(none));
            assert_eq!(tagging.derived_of(none).unwrap(), []);
            assert_eq!(tagging.derived_of(torn), None, "a token without its tag");
            let foreign = [&stamp[..stamp.len() - 3], b" x y\n{}"].concat();
            assert_eq!(tagging.derived_of(&foreign), None, "not a token");
            // An entry of the function before it had `tags_from`.
            let before = if fixed == 1 {
                &b"\x04tags:00ff00ff00ff00ff org:42\n{}"[..]
            } else {
                b"{}"
            };
            assert!(!tagging.stamped(before));
            tagging.keys.push("app:\0tag:product:1".into());
            tagging.tokens.push(token("0c0d0c0d0c0d0c0d"));
            assert!(stamp.starts_with(&tagging.stamp()[..tagging.stamp().len() - 1]));
        }
    }

    #[test]
    fn a_tags_clock_is_put_before_it_and_never_moves() {
        // The shard is part of what two releases must agree on.
        assert_eq!(shard_of(b"org:42"), 95);
        assert_eq!(
            clock_of("app:\0tag:org:42").as_deref(),
            Some("app:\0tagclock{app:tags}:95")
        );
        assert_eq!(clock_of("app:user:1"), None);
        let keys = with_clocks(vec!["app:user:1".into(), "app:\0tag:org:42".into()]);
        assert_eq!(
            keys,
            [
                "app:\0tagclock{app:tags}:95",
                "app:user:1",
                "app:\0tag:org:42"
            ]
        );
        // (A prefix that starts with `{}` makes Redis hash whole keys: the
        // clocks are then read in several requests.)
        for prefix in ["", "app:", "a{b}:", "a}b:", "x{y:"] {
            let slots: std::collections::BTreeSet<u16> = (0..CLOCKS)
                .map(|shard| crate::slot::slot_of(clock_key(prefix, shard).as_bytes()))
                .collect();
            assert_eq!(slots.len(), 1, "the clocks under {prefix:?} share a slot");
        }
        assert_eq!(invalidation_of(&keys[0]), None);
        assert_eq!(invalidation_of(&keys[2]), Some(Event::TagInvalidation));
    }
}
