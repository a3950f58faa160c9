//! A tagged read: an entry checked against its tags' tokens (and, for a
//! function with `tags_from`, against the tags its value named) before it
//! is served; what the tags are and how their tokens are kept is
//! [`crate::tag`].

use std::sync::Arc;

use redis::aio::MultiplexedConnection;

use crate::backend::{Backend, Fetched, get_on, get_tagged_on, get_tokens_on};
use crate::cache::Cache;
use crate::error::CacheError;
use crate::key::TAG_MARK;
use crate::local::tracking::Via;
use crate::local::{LocalTier, TagTicket};
use crate::read::found::{Garbage, Read, Ttl};
use crate::site::Site;
use crate::tag::{Tagging, has_header};
use crate::token::Token;

/// The tokens a read of tag keys found: `None` where a tag has none (or
/// holds something that is not one).
fn found_tokens(read: Vec<Fetched<Vec<u8>>>) -> Vec<Option<Token>> {
    read.iter()
        .map(|found| match found {
            Fetched::Found(bytes) => Token::parse(bytes),
            Fetched::Absent | Fetched::TooLarge => None,
        })
        .collect()
}

/// `read` of a function without tags: an entry with a tag header was
/// stored by a release of it that had tags (`tags` or `tags_from`), which
/// this one cannot check, so it is replaced, never served (as garbage is;
/// not counted as an error).
pub(crate) fn untagged(read: Read) -> Read {
    match read {
        Read::Value { bytes, .. } if has_header(&bytes) => Read::Garbage(Garbage::Bytes(bytes)),
        read => read,
    }
}

impl Tagging {
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
}

/// How [`Cache::check_derived`] reads the tokens of the tags a value named.
pub(crate) enum Derived<'a> {
    /// With `true`, a read for the local tier: on the tracking connections,
    /// with the tags' tickets.
    Local(bool),
    /// After a read of the entry on the tracking connection (`Some`): the
    /// tokens kept there, or read there and kept.
    Kept(Option<(&'a LocalTier, &'a MultiplexedConnection, u64)>),
}

impl Cache {
    /// A tagged entry and its tags' tokens read in one request (one
    /// server holds them all), the entry checked against them: what
    /// `Cache::read_entry` does with two. On the tracking connection, when
    /// it is open, the tokens read are kept, and a read whose tags' tokens
    /// are all kept and still valid reads the entry alone (see "Tags'
    /// tokens" in [`crate::local`]).
    pub(crate) async fn read_together(
        &self,
        site: &'static Site,
        key: &str,
        tagging: &mut Tagging,
    ) -> Read {
        tagging.keys.truncate(tagging.fixed);
        if self.pending_write(site, key)
            || tagging.keys.iter().any(|tag| self.pending_write(site, tag))
        {
            return Read::Unavailable {
                pending_write: true,
            };
        }
        let limit = self.settings().read_limit;
        // A standalone server only: a Sentinel's tracking connection may
        // still reach the old primary for a moment after a failover.
        let standalone = matches!(self.backend(), Backend::Redis(_));
        let mut tracked = self
            .local()
            .filter(|_| standalone)
            .and_then(|tracking| Some((tracking.tier(), tracking.tracked()?)));
        if let Some((tier, (conn, era))) = &mut tracked {
            let primaries = self.backend().primaries_epoch();
            if let Some(kept) = tier.kept_tokens(&tagging.keys, primaries, *era) {
                let entry = match self.guarded(key, get_on(conn, key, limit)).await {
                    Ok(entry) => entry,
                    Err(error) => return self.found(site, key, Err(error)),
                };
                // Looked at once the reply is in: see `crate::local`.
                if tier.tokens_valid(&kept) {
                    tagging.set_tokens(kept.iter().map(|kept| kept.token));
                    let on = Some((*tier, &*conn, *era));
                    return self.checked(site, key, tagging, entry, on).await;
                }
            }
        }
        // Boxed: the hit above, the common case, moves a small future.
        Box::pin(self.read_and_keep(site, key, tagging, tracked)).await
    }

    /// [`Cache::read_together`] with the tags' tokens read beside the
    /// entry (and kept, on the tracking connection `tracked`).
    async fn read_and_keep(
        &self,
        site: &'static Site,
        key: &str,
        tagging: &mut Tagging,
        tracked: Option<(&LocalTier, (MultiplexedConnection, u64))>,
    ) -> Read {
        let limit = self.settings().read_limit;
        let mut tickets = None;
        let read = match &tracked {
            Some((tier, (conn, _))) => {
                let primaries = self.backend().primaries_epoch();
                tickets = Some(tier.token_tickets(&tagging.keys, primaries));
                let mut on = conn.clone();
                let read = get_tagged_on(&mut on, key, &tagging.keys, limit);
                self.guarded(key, read).await
            }
            // A function with `tags_from` only: the entry alone.
            None if tagging.keys.is_empty() => {
                let read = self.backend().get(key, limit);
                self.guarded(key, read)
                    .await
                    .map(|entry| (entry, Vec::new()))
            }
            None => {
                let read = self.backend().get_tagged(key, &tagging.keys, limit);
                self.guarded(key, read).await
            }
        };
        let (entry, tokens) = match read {
            Ok(read) => read,
            Err(error) => return self.found(site, key, Err(error)),
        };
        match self.tokens(site, &tagging.keys, tokens).await {
            Ok((tokens, made)) => {
                // A token made here was not read on the tracking
                // connection, which does not track it: not kept.
                if let (Some((tier, (_, era))), Some(tickets), false) = (&tracked, tickets, made) {
                    tier.keep_tokens(&tagging.keys, &tokens, tickets, *era);
                }
                tagging.set_tokens(tokens);
            }
            Err(error) => {
                self.tags_unread(site, &error);
                return Read::Unavailable {
                    pending_write: false,
                };
            }
        }
        let on = tracked
            .as_ref()
            .map(|(tier, (conn, era))| (*tier, conn, *era));
        self.checked(site, key, tagging, entry, on).await
    }

    /// `entry` checked against the tags' tokens in `tagging`, and for a
    /// function with `tags_from` against the tags its value named: with
    /// `on`, the entry was read on the tracking connection, where those
    /// tags' tokens are kept.
    async fn checked(
        &self,
        site: &'static Site,
        key: &str,
        tagging: &mut Tagging,
        entry: Fetched<Vec<u8>>,
        on: Option<(&LocalTier, &MultiplexedConnection, u64)>,
    ) -> Read {
        let read =
            tagging.check(self.found(site, key, Ok(entry.map(|bytes| (bytes, Ttl::Unknown)))));
        if !tagging.derives {
            return read;
        }
        Box::pin(self.check_derived(site, tagging, read, Derived::Kept(on)))
            .await
            .0
    }

    /// `read`, an entry of a function with `tags_from` checked against its
    /// own tags already, checked against the tags its value named (one
    /// read more, of their tokens): served only while each holds the token
    /// it was stored with. With `local` (a read for the local tier), the
    /// tokens are read on the tracking connections, and the tags'
    /// tickets, taken before, come back with the read, with whether
    /// every tag's key was tracked where it was read (else no copy is
    /// kept).
    pub(crate) async fn check_derived(
        &self,
        site: &'static Site,
        tagging: &Tagging,
        read: Read,
        how: Derived<'_>,
    ) -> (Read, bool, Option<Arc<[TagTicket]>>) {
        let (local, kept_on) = match how {
            Derived::Local(local) => (local, None),
            Derived::Kept(on) => (false, on),
        };
        if !tagging.derives {
            return (read, true, None);
        }
        let Read::Value { bytes, .. } = &read else {
            return (read, true, None);
        };
        let Some(pairs) = tagging.derived_of(bytes) else {
            return (self.garbage_tags(site, read), false, None);
        };
        if pairs.is_empty() {
            return (read, true, None);
        }
        let prefix = self.prefixed("");
        let mut keys = Vec::with_capacity(pairs.len());
        for (_, name) in &pairs {
            let Ok(name) = std::str::from_utf8(name) else {
                return (self.garbage_tags(site, read), false, None);
            };
            let mut key = String::with_capacity(prefix.len() + TAG_MARK.len() + name.len());
            key.push_str(&prefix);
            key.push_str(TAG_MARK);
            key.push_str(name);
            keys.push(key);
        }
        if keys.iter().any(|key| self.pending_write(site, key)) {
            let pending = Read::Unavailable {
                pending_write: true,
            };
            return (pending, false, None);
        }
        // Taken before the tokens are read: see `crate::local`.
        let tracked = self.local().filter(|_| local).and_then(|tracking| {
            let vias: Option<Vec<Via>> = keys.iter().map(|key| tracking.live(key)).collect();
            Some((vias?, tracking.tier().tag_tickets(&keys)?))
        });
        let now = match (&tracked, kept_on) {
            (Some((vias, _)), _) => self.read_via(&keys, vias).await.map(found_tokens),
            (None, Some((tier, conn, era))) => self.tokens_on(tier, conn, era, &keys).await,
            (None, None) => self.read_tokens_of(&keys).await.map(found_tokens),
        };
        let same = match now {
            Ok(now) => now
                .iter()
                .zip(&pairs)
                .all(|(now, (token, _))| now.is_some_and(|now| now.as_bytes() == *token)),
            Err(error) => {
                self.tags_unread(site, &error);
                let unavailable = Read::Unavailable {
                    pending_write: false,
                };
                return (unavailable, false, None);
            }
        };
        match read {
            Read::Value { bytes, .. } if !same => {
                (Read::Garbage(Garbage::Bytes(bytes)), false, None)
            }
            read => match tracked {
                Some((_, tickets)) => (read, true, Some(tickets)),
                None => (read, false, None),
            },
        }
    }

    /// The tokens of `keys` as of a read on the tracking connection whose
    /// reply is in: those kept, if all are and are still valid (see "Tags'
    /// tokens" in [`crate::local`]); else read there, and kept.
    async fn tokens_on(
        &self,
        tier: &LocalTier,
        conn: &MultiplexedConnection,
        era: u64,
        keys: &[String],
    ) -> Result<Vec<Option<Token>>, CacheError> {
        let primaries = self.backend().primaries_epoch();
        if let Some(kept) = tier.kept_tokens(keys, primaries, era) {
            return Ok(kept.iter().map(|kept| Some(kept.token)).collect());
        }
        let tickets = tier.token_tickets(keys, primaries);
        let limit = self.settings().read_limit;
        let mut on = conn.clone();
        let read = self
            .guarded(&keys[0], get_tokens_on(&mut on, keys, limit))
            .await?;
        let read = found_tokens(read);
        let found: Option<Vec<Token>> = read.iter().copied().collect();
        if let Some(found) = found {
            tier.keep_tokens(keys, &found, tickets, era);
        }
        Ok(read)
    }

    /// A value whose tag header is not ours: garbage, counted and logged.
    fn garbage_tags(&self, site: &'static Site, read: Read) -> Read {
        match read {
            Read::Value { bytes, .. } => {
                self.garbage(site, "", "a malformed tag header");
                Read::Garbage(Garbage::Bytes(bytes))
            }
            read => read,
        }
    }
}
