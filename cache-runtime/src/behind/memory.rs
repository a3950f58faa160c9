//! Write-behind on the in-process backend ([`crate::Cache::memory`]): the
//! same steps as [`super::stream`]'s scripts, on the backend's own
//! streams and hashes, so that a service's tests run its write-behind
//! writes and flushers without Redis. Nothing survives the process.

use std::time::{Duration, Instant};

use super::{ChangeId, DeadLetter, Delivered, QueueStatus, Read, ShardKeys};
use crate::backend::{Fetched, MemoryBackend};

fn id_text((millis, seq): (u64, u64)) -> String {
    format!("{millis}-{seq}")
}

fn id_of(text: &str) -> Option<(u64, u64)> {
    ChangeId::parse(text).map(|id| (id.millis, id.seq))
}

fn field<'a>(fields: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

fn number(fields: &[(String, Vec<u8>)], name: &str) -> Option<u64> {
    std::str::from_utf8(field(fields, name)?).ok()?.parse().ok()
}

fn delivered(id: (u64, u64), fields: &[(String, Vec<u8>)]) -> Option<Delivered> {
    Some(Delivered {
        id: id_text(id),
        version: ChangeId {
            millis: id.0,
            seq: id.1,
        },
        key: String::from_utf8(field(fields, "key")?.to_vec()).ok()?,
        value: field(fields, "value")?.to_vec(),
        ttl: number(fields, "ttl")?,
        at: usize::try_from(number(fields, "at")?).ok()?,
    })
}

fn change_fields(key: &str, value: &[u8], ttl: u64, at: usize) -> Vec<(String, Vec<u8>)> {
    vec![
        ("key".to_owned(), key.as_bytes().to_vec()),
        ("value".to_owned(), value.to_vec()),
        ("ttl".to_owned(), ttl.to_string().into_bytes()),
        ("at".to_owned(), at.to_string().into_bytes()),
    ]
}

fn holds(m: &MemoryBackend, key: &str, value: &[u8]) -> bool {
    matches!(m.get(key, usize::MAX), Fetched::Found(bytes) if bytes == value)
}

pub(crate) fn enqueue(
    m: &MemoryBackend,
    keys: &ShardKeys,
    entry: &str,
    value: &[u8],
    ttl: u64,
    at: usize,
) {
    let mut queues = m.queues();
    let fields = change_fields(entry, value, ttl, at);
    let id = queues
        .streams
        .entry(keys.stream.clone())
        .or_default()
        .add(fields);
    queues
        .hashes
        .entry(keys.latest.clone())
        .or_default()
        .insert(entry.to_owned(), id_text(id));
    // "No expiry": the longest a value is kept.
    m.set(entry, value, crate::outcome::LONGEST_TTL);
}

/// The lease: taken if free (or expired) or already `token`'s.
pub(crate) fn take_lease(m: &MemoryBackend, keys: &ShardKeys, token: &str, millis: u64) -> bool {
    let mut queues = m.queues();
    let now = Instant::now();
    let free = match queues.leases.get(&keys.lease) {
        Some((holder, until)) => holder == token || *until <= now,
        None => true,
    };
    if free {
        let until = now + Duration::from_millis(millis);
        queues
            .leases
            .insert(keys.lease.clone(), (token.to_owned(), until));
    }
    free
}

/// The lease renewed, if it is still `token`'s.
pub(crate) fn renew_lease(m: &MemoryBackend, keys: &ShardKeys, token: &str, millis: u64) -> bool {
    if !lease_is(m, keys, token) {
        return false;
    }
    take_lease(m, keys, token, millis)
}

/// The lease given up, if it is `token`'s.
pub(crate) fn release_lease(m: &MemoryBackend, keys: &ShardKeys, token: &str) {
    if lease_is(m, keys, token) {
        m.queues().leases.remove(&keys.lease);
    }
}

fn lease_is(m: &MemoryBackend, keys: &ShardKeys, token: &str) -> bool {
    m.queues()
        .leases
        .get(&keys.lease)
        .is_some_and(|(holder, until)| holder == token && *until > Instant::now())
}

pub(crate) fn read_new(m: &MemoryBackend, keys: &ShardKeys, count: usize) -> Read {
    let mut queues = m.queues();
    let Some(stream) = queues.streams.get_mut(&keys.stream) else {
        return Read::default();
    };
    let mut read = Read::default();
    let from = stream.delivered;
    let ids: Vec<(u64, u64)> = stream
        .entries
        .range((std::ops::Bound::Excluded(from), std::ops::Bound::Unbounded))
        .take(count)
        .map(|(id, _)| *id)
        .collect();
    for id in ids {
        stream.pending.insert(id);
        stream.delivered = id;
        match stream.entries.get(&id).and_then(|f| delivered(id, f)) {
            Some(change) => read.changes.push(change),
            None => read.malformed.push(id_text(id)),
        }
    }
    read
}

pub(crate) fn claim(
    m: &MemoryBackend,
    keys: &ShardKeys,
    cursor: &str,
    count: usize,
) -> (Option<String>, Read) {
    let queues = m.queues();
    let Some(stream) = queues.streams.get(&keys.stream) else {
        return (None, Read::default());
    };
    let from = id_of(cursor).unwrap_or_default();
    let mut ids = stream.pending.range(from..);
    let taken: Vec<(u64, u64)> = ids.by_ref().take(count).copied().collect();
    let next = ids.next().map(|id| id_text(*id));
    let mut read = Read::default();
    for id in taken {
        match stream.entries.get(&id).and_then(|f| delivered(id, f)) {
            Some(change) => read.changes.push(change),
            None => read.malformed.push(id_text(id)),
        }
    }
    (next, read)
}

pub(crate) fn settle(m: &MemoryBackend, keys: &ShardKeys, changes: &[&Delivered]) {
    let queues = m.queues();
    let latest = queues.hashes.get(&keys.latest);
    for change in changes {
        if latest.and_then(|l| l.get(&change.key)) != Some(&change.id) {
            continue;
        }
        match m.get(&change.key, usize::MAX) {
            Fetched::Found(bytes) if bytes == change.value => {
                m.set(&change.key, &change.value, change.ttl.max(1));
            }
            Fetched::Found(_) | Fetched::TooLarge => {
                m.delete(std::slice::from_ref(&change.key));
            }
            Fetched::Absent => {}
        }
    }
}

pub(crate) fn ack(
    m: &MemoryBackend,
    keys: &ShardKeys,
    token: &str,
    ids: &[&str],
    flushed: &[(&str, &str)],
) -> bool {
    if !lease_is(m, keys, token) {
        return false;
    }
    let mut queues = m.queues();
    if let Some(stream) = queues.streams.get_mut(&keys.stream) {
        for id in ids.iter().filter_map(|id| id_of(id)) {
            stream.pending.remove(&id);
            stream.entries.remove(&id);
        }
    }
    if let Some(latest) = queues.hashes.get_mut(&keys.latest) {
        for (key, id) in flushed {
            if latest.get(*key).map(String::as_str) == Some(*id) {
                latest.remove(*key);
            }
        }
    }
    true
}

pub(crate) fn bury(
    m: &MemoryBackend,
    keys: &ShardKeys,
    token: &str,
    change: &Delivered,
    error: &str,
    failures: u32,
) -> bool {
    if !lease_is(m, keys, token) {
        return false;
    }
    let mut queues = m.queues();
    let mut fields = change_fields(&change.key, &change.value, change.ttl, change.at);
    fields.push(("id".to_owned(), change.id.clone().into_bytes()));
    fields.push(("error".to_owned(), error.as_bytes().to_vec()));
    fields.push(("failures".to_owned(), failures.to_string().into_bytes()));
    queues
        .streams
        .entry(keys.dead.clone())
        .or_default()
        .add(fields);
    if let (Some(stream), Some(id)) = (queues.streams.get_mut(&keys.stream), id_of(&change.id)) {
        stream.pending.remove(&id);
        stream.entries.remove(&id);
    }
    let latest = queues.hashes.entry(keys.latest.clone()).or_default();
    if latest.get(&change.key) == Some(&change.id) {
        latest.remove(&change.key);
        if holds(m, &change.key, &change.value) {
            m.delete(std::slice::from_ref(&change.key));
        }
    }
    true
}

/// The shards of `queue` that have a stream or dead letters: the
/// streams whose key starts with `start` (`<prefix>:{wb:<queue>:`).
pub(crate) fn shards(m: &MemoryBackend, start: &str) -> Vec<u16> {
    let queues = m.queues();
    let mut shards: Vec<u16> = queues
        .streams
        .keys()
        .filter_map(|key| key.strip_prefix(start)?.split_once('}')?.0.parse().ok())
        .collect();
    shards.sort_unstable();
    shards.dedup();
    shards
}

pub(crate) fn status(m: &MemoryBackend, keys: &[ShardKeys]) -> QueueStatus {
    let queues = m.queues();
    let now = crate::clock::millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let mut status = QueueStatus::default();
    let mut oldest: Option<u64> = None;
    for keys in keys {
        if let Some(stream) = queues.streams.get(&keys.stream) {
            status.pending += stream.entries.len() as u64;
            if let Some(((millis, _), _)) = stream.entries.first_key_value() {
                let age = now.saturating_sub(*millis);
                oldest = Some(oldest.map_or(age, |o| o.max(age)));
            }
        }
        if let Some(dead) = queues.streams.get(&keys.dead) {
            status.dead += dead.entries.len() as u64;
        }
    }
    status.oldest = oldest.map(Duration::from_millis);
    status
}

pub(crate) fn dead_letters(m: &MemoryBackend, keys: &ShardKeys, limit: usize) -> Vec<DeadLetter> {
    let queues = m.queues();
    let Some(dead) = queues.streams.get(&keys.dead) else {
        return Vec::new();
    };
    dead.entries
        .iter()
        .take(limit)
        .filter_map(|(id, fields)| {
            let text = |name| field(fields, name).map(|v| String::from_utf8_lossy(v).into_owned());
            Some(DeadLetter {
                id: id_text(*id),
                key: text("key")?,
                version: text("id").as_deref().and_then(ChangeId::parse),
                error: text("error").unwrap_or_default(),
                failures: number(fields, "failures")
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(0),
                value: field(fields, "value")
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default(),
            })
        })
        .collect()
}

pub(crate) fn replay(m: &MemoryBackend, keys: &ShardKeys) -> u64 {
    let mut queues = m.queues();
    let letters: Vec<Vec<(String, Vec<u8>)>> = match queues.streams.get_mut(&keys.dead) {
        Some(dead) => std::mem::take(&mut dead.entries).into_values().collect(),
        None => return 0,
    };
    let mut replayed = 0;
    for fields in letters {
        let Some(key) = field(&fields, "key").map(|k| String::from_utf8_lossy(k).into_owned())
        else {
            continue;
        };
        let change: Vec<(String, Vec<u8>)> = fields
            .into_iter()
            .filter(|(name, _)| matches!(name.as_str(), "key" | "value" | "ttl" | "at"))
            .collect();
        let id = queues
            .streams
            .entry(keys.stream.clone())
            .or_default()
            .add(change);
        queues
            .hashes
            .entry(keys.latest.clone())
            .or_default()
            .insert(key, id_text(id));
        replayed += 1;
    }
    replayed
}
