//! The operator's view: what an entry is and what the cache would do with
//! it ([`Cache::inspect`]), the entries of one template
//! ([`Cache::entries`]), and what the servers say of their memory, eviction
//! policy, evictions and hit ratio ([`Cache::server_reports`]). The
//! `cachectl` command (package `cache-cli`) prints them; a service can show
//! them on an admin endpoint of its own.
//!
//! Entries are not what `redis-cli get` shows plainly: freshness headers,
//! lease placeholders, negative entries, compressed and MessagePack values,
//! tag headers (the format is on the guide's
//! [operations](crate::guide::operations) page). An [`Inspection`] reads
//! them the way a cached call does.
//!
//! When it connects, a cache reads its servers' `INFO` once (each primary
//! of a cluster): it logs which server it is (Redis or Valkey, and the
//! version), warns when the `maxmemory-policy` would make cache writes
//! fail (`noeviction` with a `maxmemory`), and then reads it every 10 s to
//! count the keys the servers evict ([`ServerStats`](crate::ServerStats)).
//! A user that may not run `INFO` (an ACL user without `+info`) is told
//! so once, at `info` (the server logs the refusal in its `ACL LOG`);
//! the cache works as before, and counts no evictions.

mod entry;

use std::time::Duration;

pub use crate::backend::info::{Server, ServerKind, ServerReport, Warning};
pub use crate::holder::Holder;
pub use entry::{
    Entry, HumanDuration, Inspection, Lease, Stamp, Tag, TagState, Value, Verdict, Windows,
};

use crate::backend::Fetched;
use crate::cache::Cache;
use crate::error::CacheError;
use crate::key::CacheKey;

impl Cache {
    /// Reads `key` (the rendered template, without the cache's prefix:
    /// `user:42`) the way a cached call would, and says what it holds: a
    /// value decoded to JSON (with its freshness header and its tags,
    /// each checked against the tag's current token), a negative entry, a
    /// lease and who holds it, or garbage and why; its TTL; and the
    /// entry's refresh lock, if held. [`Inspection::verdict`] says what
    /// the next call would do with it.
    ///
    /// A value is decoded with the cache's codec, or else with the other
    /// one (a tool does not know which codec the service uses). Nothing is
    /// written, and no call's counter moves (the reads go through the op
    /// timeout and the breaker, and are timed, as every cache command).
    ///
    /// Cancel safe: it only reads.
    pub async fn inspect(&self, key: &str) -> Result<Inspection, CacheError> {
        let redis_key = self.prefixed(key).into_owned();
        let settings = self.settings();
        let (mut entry, expires_in, size) = match self.read_with_ttl(&redis_key).await {
            Ok(Fetched::Found((bytes, ttl))) => {
                let limit = settings.max_value_size;
                let entry = entry::parse(&bytes, ttl, settings.codec, limit);
                (entry, ttl.map(Duration::from_millis), bytes.len())
            }
            Ok(Fetched::Absent) => (Entry::Absent, None, 0),
            Ok(Fetched::TooLarge) => {
                let why = format!(
                    "longer than the cache reads ({} bytes: max_value_size)",
                    settings.read_limit
                );
                (Entry::Garbage(why), None, 0)
            }
            Err(error) if error.is_wrong_type() => {
                (Entry::Garbage("not a string (WRONGTYPE)".into()), None, 0)
            }
            Err(error) => return Err(error),
        };
        if let Entry::Value(value) = &mut entry
            && !value.tags.is_empty()
        {
            self.check_tags(&mut value.tags).await;
        }
        // Anything but a lease there (or a failed read) is no lock held.
        let lock = crate::key::refresh_lock_key(self.prefix(), &redis_key);
        let refresh_lock = match self.read_with_ttl(&lock).await {
            Ok(Fetched::Found((bytes, ttl))) => {
                match entry::parse(&bytes, ttl, settings.codec, 0) {
                    Entry::Lease(lease) => Some(lease),
                    _ => None,
                }
            }
            _ => None,
        };
        Ok(Inspection {
            key: redis_key,
            entry,
            expires_in,
            size,
            refresh_lock,
        })
    }

    /// `GET` and `PTTL` of a Redis key, under the op timeout and breaker.
    async fn read_with_ttl(
        &self,
        redis_key: &str,
    ) -> Result<Fetched<(Vec<u8>, Option<u64>)>, CacheError> {
        let read = self
            .backend()
            .get_with_ttl(redis_key, self.settings().read_limit);
        let read = self.guarded(redis_key, read).await?;
        Ok(read.map(|stored| (stored.bytes, stored.ttl_millis)))
    }

    /// Whether each tag still holds the token its value was stored with,
    /// one read each (on a cluster, tags live on any primary): a tag whose
    /// read failed stays [`TagState::Unknown`].
    async fn check_tags(&self, tags: &mut [Tag]) {
        for tag in tags {
            let key = self.redis_key(&CacheKey::of_tag(&tag.name));
            tag.state = match self.read_with_ttl(&key).await {
                Ok(Fetched::Found((token, _))) if token == tag.token.as_bytes() => {
                    TagState::Current
                }
                Ok(_) => TagState::Invalidated,
                Err(_) => TagState::Unknown,
            };
        }
    }

    /// The keys (without the cache's prefix) of the entries that match
    /// `pattern`, at most `limit`: a key template (`user:<id>`, whose
    /// placeholders match one key part each; keys of every `version`) or
    /// a glob of `*` and `?` (`user:4*`; other characters, `[` included,
    /// match themselves). Read with `SCAN` (never `KEYS`), on
    /// every primary of a cluster; lease placeholders count as entries,
    /// refresh locks and tags' keys do not. Over-long keys, whose tail the
    /// cache replaced with a hash, match a glob but not a template.
    ///
    /// Cancel safe: it only reads.
    pub async fn entries(&self, pattern: &str, limit: usize) -> Result<Vec<String>, CacheError> {
        let matcher = Pattern::new(pattern);
        let start = self.prefixed("").into_owned();
        let glob = format!("{}{}", crate::write::glob_escape(&start), matcher.glob());
        let backend = self.backend();
        let timeout = self.settings().op_timeout;
        let mut found = Vec::new();
        for target in crate::cache::within(timeout, backend.scan_targets()).await? {
            let mut cursor = 0;
            loop {
                let scan = backend.scan(target.as_deref(), cursor, &glob, &start);
                let (next, keys) = crate::cache::within(timeout, scan).await?;
                found.extend(keys.into_iter().filter_map(|key| {
                    let rest = key.strip_prefix(&start)?;
                    (!rest.contains('\0') && matcher.matches(rest)).then(|| rest.to_owned())
                }));
                if found.len() >= limit {
                    found.sort();
                    found.truncate(limit);
                    return Ok(found);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        found.sort();
        Ok(found)
    }
}

/// What [`Cache::entries`] lists: a key template or a glob.
#[derive(Debug)]
struct Pattern(Vec<Token>);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Token {
    Char(char),
    /// `*` of a glob: any text.
    Any,
    /// `?` of a glob: one character.
    One,
    /// A template's placeholder: one key part (no `:`), not empty.
    Part,
    /// The end of a template: nothing, or a version (`:v2`).
    Version,
}

impl Pattern {
    fn new(pattern: &str) -> Pattern {
        let mut tokens = Vec::new();
        let mut chars = pattern.chars();
        let template = pattern.contains('<');
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '<' if template => {
                    chars.by_ref().find(|&c| c == '>');
                    Token::Part
                }
                '*' if !template => Token::Any,
                '?' if !template => Token::One,
                '\\' if !template => Token::Char(chars.next().unwrap_or('\\')),
                c => Token::Char(c),
            });
        }
        if template {
            tokens.push(Token::Version);
        }
        Pattern(tokens)
    }

    /// The `SCAN MATCH` glob (after the escaped prefix).
    fn glob(&self) -> String {
        let mut glob = String::new();
        for token in &self.0 {
            match token {
                Token::Any | Token::Part | Token::Version => glob.push('*'),
                Token::One => glob.push('?'),
                Token::Char(c) => glob.push_str(&crate::write::glob_escape(&c.to_string())),
            }
        }
        glob
    }

    /// Whether `key` matches, in time proportional to the pattern's length
    /// times the key's (no backtracking: a pattern of many `*` cannot
    /// make it slow).
    fn matches(&self, key: &str) -> bool {
        let key: Vec<char> = key.chars().collect();
        let n = key.len();
        // `next[j]`: whether the tokens after the current one match
        // `key[j..]`; built from the last token back.
        let mut next = vec![false; n + 1];
        next[n] = true;
        for token in self.0.iter().rev() {
            let mut here = vec![false; n + 1];
            for j in (0..=n).rev() {
                here[j] = match token {
                    Token::Char(c) => j < n && key[j] == *c && next[j + 1],
                    Token::One => j < n && next[j + 1],
                    Token::Any => next[j] || (j < n && here[j + 1]),
                    // One character or more without `:`.
                    Token::Part => j < n && key[j] != ':' && (next[j + 1] || here[j + 1]),
                    Token::Version => {
                        let rest = &key[j..];
                        next[n]
                            && (rest.is_empty()
                                || rest.len() > 2
                                    && rest[..2] == [':', 'v']
                                    && rest[2..].iter().all(char::is_ascii_digit))
                    }
                };
            }
            next = here;
        }
        next[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_their_keys_only() {
        let user = Pattern::new("user:<id>");
        assert_eq!(user.glob(), "user:**");
        for key in ["user:42", "user:42:v2", "user:%2A"] {
            assert!(user.matches(key), "{key}");
        }
        for key in ["user:", "user:42:posts", "user:42:v", "users:1"] {
            assert!(!user.matches(key), "{key}");
        }
        let member = Pattern::new("org:<org.id>:member:<user_id>");
        assert!(member.matches("org:1:member:2"));
        assert!(!member.matches("org:1:2:member:2"));
        let glob = Pattern::new(r"user:4\*?");
        assert_eq!(glob.glob(), r"user:4\*?");
        assert!(glob.matches("user:4*2"));
        assert!(!glob.matches("user:412"));
        assert!(Pattern::new("*").matches("anything:at:all"));
        assert!(Pattern::new("a*b?").matches("axxbc"));
        assert!(!Pattern::new("a*b?").matches("axxb"));
        // No backtracking blow-up.
        let many = Pattern::new("*a*a*a*a*a*a*a*a*b");
        assert!(!many.matches(&"a".repeat(5_000)));
    }
}
