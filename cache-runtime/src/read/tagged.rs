//! A tagged read: an entry checked against its tags' tokens (and, for a
//! function with `tags_from`, against the tags its value named) before it
//! is served; what the tags are and how their tokens are kept is
//! [`crate::tag`].

use std::sync::Arc;

use crate::backend::Fetched;
use crate::cache::Cache;
use crate::key::TAG_MARK;
use crate::local::TagTicket;
use crate::local::tracking::Via;
use crate::read::found::{Garbage, Read, Ttl};
use crate::site::Site;
use crate::tag::{Tagging, has_header};

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

impl Cache {
    /// A tagged entry and its tags' tokens read in one request (one
    /// server holds them all), the entry checked against them: what
    /// `Cache::read_entry` does with two.
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
        let read =
            tagging.check(self.found(site, key, Ok(entry.map(|bytes| (bytes, Ttl::Unknown)))));
        if !tagging.derives {
            return read;
        }
        Box::pin(self.check_derived(site, tagging, read, false))
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
        local: bool,
    ) -> (Read, bool, Option<Arc<[TagTicket]>>) {
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
            keys.push(format!("{prefix}{TAG_MARK}{name}"));
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
        let now = match &tracked {
            Some((vias, _)) => self.read_via(&keys, vias).await,
            None => self.read_tokens_of(&keys).await,
        };
        let same = match now {
            Ok(now) => now
                .iter()
                .zip(&pairs)
                .all(|(now, (token, _))| matches!(now, Fetched::Found(now) if now == token)),
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
