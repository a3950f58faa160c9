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
//! [`crate::read::flight`]).
//!
//! # What it costs
//!
//! A hit of a tagged function reads its tags' tokens beside the entry (one
//! request more, sent with the entry's read, not after it); a miss adds the
//! same read of the tokens after the store, and a `SET NX` per tag that
//! has no token yet. Untagged functions pay nothing.

use std::fmt::Write as _;
use std::time::Duration;

use crate::backend::Fetched;
use crate::cache::Cache;
use crate::error::CacheError;
use crate::key::CacheKey;
use crate::local::tracking::Via;
use crate::read::lookup::{Garbage, Read, Ttl};
use crate::site::Site;
use crate::stats::Event;

/// What a tag's key starts with (after the cache's prefix).
pub(crate) const MARK: &str = "\0tag:";
/// What a stored entry's tag header starts with. No encoded value starts
/// with byte 4 but the MessagePack integer 4, which is one byte long
/// (bytes 0 to 3 are placeholders, freshness headers, negative entries and
/// compressed values).
const HEADER: &[u8] = b"\x04tags:";
/// How often a reader tries to make a tag's token that keeps being
/// invalidated between its `SET NX` and its `GET`.
const MAKE_ATTEMPTS: usize = 3;
/// How long a tag's token lives at least: a token that expires turns its
/// entries into misses (all at once, in every process), so it outlives
/// the entries stored with it by far.
const SHORTEST_TOKEN_LIFE: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// A tag's key (before the cache's prefix).
pub(crate) fn tag_key(tag: &str) -> String {
    let mut key = String::with_capacity(MARK.len() + tag.len());
    key.push_str(MARK);
    key.push_str(tag);
    key
}

/// What deleting `key` counts as: a tag's or an entry's invalidation.
pub(crate) fn invalidation_of(key: &str) -> Event {
    if key.contains(MARK) {
        Event::TagInvalidation
    } else {
        Event::Invalidation
    }
}

/// The tag a tag key (before or after the cache's prefix) stands for.
pub(crate) fn tag_of(key: &str) -> &str {
    key.find(MARK).map_or(key, |at| &key[at + MARK.len()..])
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

/// The tags of one call of a tagged function: their Redis keys, and what
/// the last read found them to hold.
#[derive(Debug)]
pub(crate) struct Tagging {
    /// The tags' Redis keys, in the order of the function's `tags`.
    keys: Vec<String>,
    /// Where a tag's name starts in its key (after the prefix and mark).
    name_at: usize,
    /// Their tokens, as the last read found (or made) them (empty before
    /// a read, or when they could not be read).
    tokens: Vec<Vec<u8>>,
}

impl Tagging {
    /// The tags of `key`'s function for these arguments, as Redis keys of
    /// `cache`; `None` for an untagged function.
    pub(crate) fn of(cache: &Cache, key: &CacheKey) -> Option<Box<Tagging>> {
        if !key.has_tags() {
            return None;
        }
        let keys = key
            .tag_keys()
            .map(|tag| cache.prefixed(tag).into_owned())
            .collect();
        let name_at = cache.prefix().map_or(0, |prefix| prefix.len() + 1) + MARK.len();
        Some(Box::new(Tagging {
            keys,
            name_at,
            tokens: Vec::new(),
        }))
    }

    /// The tags' Redis keys.
    pub(crate) fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The header to store an entry with: the tokens read last (empty
    /// when they could not be read: nothing is stored then).
    pub(crate) fn stamp(&self) -> Vec<u8> {
        if self.tokens.is_empty() {
            return Vec::new();
        }
        let mut stamp = HEADER.to_vec();
        for (at, (name, token)) in self.names().zip(&self.tokens).enumerate() {
            if at > 0 {
                stamp.push(b' ');
            }
            stamp.extend_from_slice(token);
            stamp.push(b' ');
            stamp.extend_from_slice(name);
        }
        stamp.push(b'\n');
        stamp
    }

    /// Whether `bytes` were stored with the tokens read last: whether they
    /// start with [`Tagging::stamp`], compared in place (a hit makes no
    /// copy of it).
    pub(crate) fn stamped(&self, bytes: &[u8]) -> bool {
        let Some(mut rest) = bytes.strip_prefix(HEADER) else {
            return false;
        };
        if self.tokens.is_empty() {
            return false;
        }
        for (at, (name, token)) in self.names().zip(&self.tokens).enumerate() {
            if at > 0 {
                let Some(after) = rest.strip_prefix(b" ") else {
                    return false;
                };
                rest = after;
            }
            let pair = (|| {
                let after = rest.strip_prefix(&token[..])?.strip_prefix(b" ")?;
                after.strip_prefix(name)
            })();
            match pair {
                Some(after) => rest = after,
                None => return false,
            }
        }
        rest.first() == Some(&b'\n')
    }

    /// `read` of an entry of these tags: a value stored with other tokens
    /// than the tags hold now is garbage to replace (a miss, not counted as
    /// an error: it was invalidated).
    pub(crate) fn check(&self, read: Read) -> Read {
        match read {
            Read::Value { bytes, .. } if !self.stamped(&bytes) => {
                Read::Garbage(Garbage::Bytes(bytes))
            }
            read => read,
        }
    }

    /// The tags' names, as their keys end.
    fn names(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.keys.iter().map(|key| &key.as_bytes()[self.name_at..])
    }

    fn set_tokens(&mut self, tokens: Vec<Vec<u8>>) {
        self.tokens = tokens;
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
        self.invalidate(&CacheKey::of_tag(tag)).await.map(drop)
    }

    /// The tags of a `#[cache_put]` target's key, with
    /// their tokens read before the write's body runs; with no tokens
    /// (the entry is then invalidated, not stored) when they could not be
    /// read.
    pub(crate) async fn tokens_for_put(&self, key: &CacheKey) -> Option<Box<Tagging>> {
        let site = key.site()?;
        let mut tagging = Tagging::of(self, key)?;
        if self.read_tokens(site, &mut tagging, None).await.is_none() {
            tagging.tokens.clear();
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
        let read = match vias {
            None => self.read_many(&tagging.keys).await,
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
    fn tags_unread(&self, site: &'static Site, error: &CacheError) {
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
        taggings: &mut [Option<Box<Tagging>>],
    ) -> bool {
        let mut keys: Vec<String> = taggings
            .iter()
            .flatten()
            .flat_map(|tagging| tagging.keys.iter().cloned())
            .collect();
        if keys.is_empty() {
            return true;
        }
        keys.sort_unstable();
        keys.dedup();
        let read = match self.read_many(&keys).await {
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
            let mine = tagging
                .keys
                .iter()
                .map(|key| {
                    let at = keys.binary_search(key).unwrap_or_default();
                    tokens[at].clone()
                })
                .collect();
            tagging.set_tokens(mine);
        }
        true
    }

    /// Each tag key read on its tracking connection (or, with a
    /// broadcast, the cache's own), concurrently.
    async fn read_via(
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

    /// A tagged entry and its tags' tokens read in one request (one
    /// server holds them all), the entry checked against them: what
    /// `Cache::read_entry` does with two.
    pub(crate) async fn read_together(
        &self,
        site: &'static Site,
        key: &str,
        tagging: &mut Tagging,
    ) -> Read {
        if self.pending_write(site, key)
            || tagging.keys.iter().any(|tag| self.pending_write(site, tag))
        {
            return Read::Unavailable {
                pending_write: true,
            };
        }
        let limit = self.settings().read_limit;
        let read = self.backend().get_tagged(key, &tagging.keys, limit);
        let (entry, tokens) = match self.guarded(key, read).await {
            Ok(read) => read,
            Err(error) => return self.found(site, key, Err(error)),
        };
        let tokens = self.tokens(site, &tagging.keys, tokens).await;
        match tokens {
            Ok((tokens, _)) => tagging.set_tokens(tokens),
            Err(error) => {
                self.tags_unread(site, &error);
                return Read::Unavailable {
                    pending_write: false,
                };
            }
        }
        tagging.check(self.found(site, key, Ok(entry.map(|bytes| (bytes, Ttl::Unknown)))))
    }

    /// Whether every tag still holds the token read last: no tag was
    /// invalidated since.
    pub(crate) async fn tokens_unchanged(&self, tagging: &Tagging) -> bool {
        if tagging.tokens.is_empty() {
            return false;
        }
        match self.read_many(&tagging.keys).await {
            Ok(read) => read
                .into_iter()
                .zip(&tagging.tokens)
                .all(|(now, then)| matches!(now, Fetched::Found(now) if &now == then)),
            Err(_) => false,
        }
    }

    /// The tokens `read` found, and those made for the tags that had
    /// none; whether any was made.
    async fn tokens(
        &self,
        site: &Site,
        keys: &[String],
        read: Vec<Fetched<Vec<u8>>>,
    ) -> Result<(Vec<Vec<u8>>, bool), CacheError> {
        let mut made = false;
        let life = SHORTEST_TOKEN_LIFE
            .as_millis()
            .max(u128::from(site.longest_expiry_millis()) * 2);
        let life = u64::try_from(life).unwrap_or(u64::MAX);
        let mut tokens = Vec::with_capacity(keys.len());
        for (key, found) in keys.iter().zip(read) {
            let token = match found {
                Fetched::Found(token) => token,
                Fetched::TooLarge => return Err(CacheError::NotATag(tag_of(key).to_owned())),
                Fetched::Absent => {
                    made = true;
                    self.make_token(key, life).await?
                }
            };
            tokens.push(token);
        }
        Ok((tokens, made))
    }

    /// A new token for a tag that has none (or the one another caller
    /// made first). A tag invalidated again between the two steps is
    /// tried again, a few times.
    async fn make_token(&self, key: &str, life: u64) -> Result<Vec<u8>, CacheError> {
        for _ in 0..MAKE_ATTEMPTS {
            let mut token = String::with_capacity(16);
            let _ = write!(token, "{:016x}", fastrand::u64(..));
            let token = token.into_bytes();
            let made = self.backend().set_if_absent(key, &token, life);
            if self.guarded(key, made).await? {
                return Ok(token);
            }
            let read = self.backend().get(key, self.settings().read_limit);
            match self.guarded(key, read).await? {
                Fetched::Found(token) => return Ok(token),
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
            keys: vec!["app:\0tag:org:42".into(), "app:\0tag:members".into()],
            name_at: 4 + MARK.len(),
            tokens: Vec::new(),
        };
        assert!(!tagging.stamped(b"\x04tags:\n"), "nothing read yet");
        tagging.set_tokens(vec![b"00ff".to_vec(), b"0a0b".to_vec()]);
        assert_eq!(tagging.stamp(), b"\x04tags:00ff org:42 0a0b members\n");
        assert!(tagging.stamped(b"\x04tags:00ff org:42 0a0b members\n{}"));
        assert!(!tagging.stamped(b"\x04tags:00fe org:42 0a0b members\n{}"));
        assert!(!tagging.stamped(b"\x04tags:00ff org:42 0a0b members2\n{}"));
        assert_eq!(tag_of("app:\0tag:org:42"), "org:42");
    }
}
