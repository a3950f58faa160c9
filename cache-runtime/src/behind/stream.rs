//! The Redis side of write-behind: the scripts and stream commands, and
//! the parsing of their replies (never a panic on what a server sends).

use std::time::Duration;

use redis::{Cmd, Value};

use super::{ChangeId, DeadLetter, QueueStatus, ShardKeys};
pub(crate) use super::{Delivered, Read};
use crate::backend::Backend;
use crate::cache::Cache;
use crate::error::CacheError;

/// The consumer group every flusher of a queue reads with.
pub(crate) const GROUP: &str = "wb";

/// Appends a change, notes it as its key's latest, and stores its value
/// as the entry without expiry, in one step (standalone and Sentinel,
/// where every key is on one server). KEYS: stream, latest, entry.
/// ARGV: value, TTL after the flush, where the encoded value starts.
const ENQUEUE: &str = r"local id = redis.call('XADD', KEYS[1], '*', 'key', KEYS[3], 'value', ARGV[1], 'ttl', ARGV[2], 'at', ARGV[3])
redis.call('HSET', KEYS[2], KEYS[3], id)
redis.call('SET', KEYS[3], ARGV[1])
return id";

/// [`ENQUEUE`]'s first half, on a cluster (the entry is in another slot).
/// KEYS: stream, latest. ARGV: entry, value, ttl, at.
const QUEUE: &str = r"local id = redis.call('XADD', KEYS[1], '*', 'key', ARGV[1], 'value', ARGV[2], 'ttl', ARGV[3], 'at', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], id)
return id";

/// After a flush, on a cluster, on the entry of a change that was its
/// key's latest: gives it its TTL back if it holds the flushed value and
/// has none (answers 1); else answers what it holds (or 0 if nothing),
/// which [`DROP`] deletes once the change is seen to be still the latest
/// (a value read from the database before the flush, a reader's
/// placeholder, or a store that arrived out of order). KEYS: entry.
/// ARGV: value, TTL.
const SETTLE_ENTRY: &str = r"local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if current == ARGV[1] then
  if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
  return 1
end
return current";

/// [`SETTLE_ENTRY`] only if the change is still its key's latest, in one
/// step (standalone and Sentinel). KEYS: latest, entry. ARGV: value,
/// TTL, id.
const SETTLE: &str = r"if redis.call('HGET', KEYS[1], KEYS[2]) ~= ARGV[3] then return 0 end
local current = redis.call('GET', KEYS[2])
if not current then return 0 end
if current == ARGV[1] then
  if redis.call('PTTL', KEYS[2]) == -1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
  return 1
end
redis.call('DEL', KEYS[2])
return 2";

/// Deletes the entry if it holds exactly this value: a dead-lettered
/// change's, when it was its key's latest (reads go back to the
/// database), or a stale value a settled change found. KEYS: entry.
/// ARGV: value.
const DROP: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// Acknowledges and deletes changes, and forgets the flushed ones that
/// are their keys' latest, if the shard's lease is still the caller's
/// (-1 if not: another holder has the changes). KEYS: stream, latest,
/// lease. ARGV: token, how many ids, the ids, then pairs of entry and id.
/// Ids go to `XACK`/`XDEL` in chunks (Lua's `unpack` is bounded).
const ACK: &str = r"if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
local n = tonumber(ARGV[2])
local i = 3
while i <= n + 2 do
  local ids = {}
  while i <= n + 2 and #ids < 500 do
    ids[#ids + 1] = ARGV[i]
    i = i + 1
  end
  redis.call('XACK', KEYS[1], 'wb', unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
for j = n + 3, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[j]) == ARGV[j + 1] then redis.call('HDEL', KEYS[2], ARGV[j]) end
end
return n";

/// Moves a change to the dead letters if the shard's lease is still the
/// caller's (-1 if not); 1 if it was its key's latest (forgotten as such,
/// and, with a fifth key (off a cluster), its entry deleted if it holds the
/// value), else 0. KEYS: stream, dead, latest, lease[, entry]. ARGV: id,
/// key, value, ttl, at, error, failures, token.
const BURY: &str = r"if redis.call('GET', KEYS[4]) ~= ARGV[8] then return -1 end
redis.call('XADD', KEYS[2], '*', 'key', ARGV[2], 'value', ARGV[3], 'ttl', ARGV[4], 'at', ARGV[5], 'id', ARGV[1], 'error', ARGV[6], 'failures', ARGV[7])
redis.call('XACK', KEYS[1], 'wb', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[3], ARGV[2]) == ARGV[1] then
  redis.call('HDEL', KEYS[3], ARGV[2])
  if KEYS[5] and redis.call('GET', KEYS[5]) == ARGV[3] then redis.call('DEL', KEYS[5]) end
  return 1
end
return 0";

/// Creates the consumer group (and the stream) unless it exists.
const GROUP_CREATE: &str = r"redis.pcall('XGROUP', 'CREATE', KEYS[1], 'wb', '0', 'MKSTREAM')
return 1";

/// Takes a shard's lease if it is free or already this flusher's.
/// KEYS: lease. ARGV: token, ms.
const LEASE: &str = r"local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0";

/// A shard's pending and dead counts, its oldest change's id and the
/// server's time. KEYS: stream, dead.
const STATUS: &str = r"local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local id = false
if first[1] then id = first[1][1] end
local t = redis.call('TIME')
return {redis.call('XLEN', KEYS[1]), redis.call('XLEN', KEYS[2]), id, t[1], t[2]}";

/// Moves dead letters back to the queue as their keys' latest changes,
/// oldest first (at most 100 per call). KEYS: stream, dead, latest.
/// Returns how many.
const REPLAY: &str = r"local entries = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 100)
for _, entry in ipairs(entries) do
  local f = entry[2]
  local fields = {}
  for i = 1, #f, 2 do fields[f[i]] = f[i + 1] end
  local id = redis.call('XADD', KEYS[1], '*', 'key', fields['key'], 'value', fields['value'], 'ttl', fields['ttl'], 'at', fields['at'])
  redis.call('HSET', KEYS[3], fields['key'], id)
  redis.call('XDEL', KEYS[2], entry[1])
end
return #entries";

fn eval(script: &str, keys: &[&str], args: &[&[u8]]) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

/// Appends a change of `entry` to `keys`' stream and stores `value` as
/// the entry without expiry, waiting for replicas as configured. Sent on
/// the connection of the shard (see `DurablePool::pick_for`), so that a
/// change that timed out on the client is appended before the next one
/// of its key.
pub(crate) async fn enqueue(
    backend: &Backend,
    keys: &ShardKeys,
    entry: &str,
    value: &[u8],
    ttl: u64,
    at: usize,
) -> Result<(), CacheError> {
    if let Backend::Memory(m) = backend {
        super::memory::enqueue(m, keys, entry, value, ttl, at);
        return Ok(());
    }
    let ttl = ttl.to_string();
    let at = at.to_string();
    if let Backend::Cluster(_) = backend {
        // Two slots: the change first, so that a crash between the two
        // leaves the older entry (deleted when the change is settled),
        // never a value without expiry that no change will flush.
        let cmd = eval(
            QUEUE,
            &[&keys.stream, &keys.latest],
            &[entry.as_bytes(), value, ttl.as_bytes(), at.as_bytes()],
        );
        backend.run_durably(&keys.stream, &cmd).await?;
        let mut set = redis::cmd("SET");
        set.arg(entry).arg(value);
        backend.run_durably(entry, &set).await?;
    } else {
        let cmd = eval(
            ENQUEUE,
            &[&keys.stream, &keys.latest, entry],
            &[value, ttl.as_bytes(), at.as_bytes()],
        );
        backend.run_durably(&keys.stream, &cmd).await?;
    }
    Ok(())
}

pub(crate) async fn ensure_group(backend: &Backend, keys: &ShardKeys) -> Result<(), CacheError> {
    if let Backend::Memory(_) = backend {
        return Ok(());
    }
    backend
        .run(&eval(GROUP_CREATE, &[&keys.stream], &[]))
        .await
        .map(drop)
}

/// Consumers of the shard's group that hold nothing and have not read
/// for `idle_ms`, other than `ours`, removed: each flusher that ever ran
/// (one per process start) names one, and the group would keep them all.
/// Best effort; how many went.
pub(crate) async fn prune_consumers(
    backend: &Backend,
    keys: &ShardKeys,
    ours: &str,
    idle_ms: u64,
) -> Result<usize, CacheError> {
    if let Backend::Memory(_) = backend {
        return Ok(0);
    }
    let mut info = redis::cmd("XINFO");
    info.arg("CONSUMERS").arg(&keys.stream).arg(GROUP);
    let reply = backend.run(&info).await?;
    let idle: Vec<String> = items(&reply)
        .into_iter()
        .filter_map(|consumer| {
            let fields = fields_of(consumer);
            let name = as_str(field(&fields, "name")?)?;
            let pending = as_u64(field(&fields, "pending")?)?;
            let idle = as_u64(field(&fields, "idle")?)?;
            (name != ours && pending == 0 && idle >= idle_ms).then(|| name.to_owned())
        })
        .collect();
    for name in &idle {
        let mut del = redis::cmd("XGROUP");
        del.arg("DELCONSUMER")
            .arg(&keys.stream)
            .arg(GROUP)
            .arg(name);
        backend.run(&del).await?;
    }
    Ok(idle.len())
}

/// Takes the shard's lease (or keeps it, if it is still `token`'s).
pub(crate) async fn take_lease(
    backend: &Backend,
    keys: &ShardKeys,
    token: &str,
    millis: u64,
) -> Result<bool, CacheError> {
    if let Backend::Memory(m) = backend {
        return Ok(super::memory::take_lease(m, keys, token, millis));
    }
    let millis = millis.to_string();
    let reply = backend
        .run(&eval(
            LEASE,
            &[&keys.lease],
            &[token.as_bytes(), millis.as_bytes()],
        ))
        .await?;
    Ok(matches!(reply, Value::Int(1)))
}

/// Renews the shard's lease if it is still `token`'s.
pub(crate) async fn renew_lease(
    backend: &Backend,
    keys: &ShardKeys,
    token: &str,
    millis: u64,
) -> Result<bool, CacheError> {
    if let Backend::Memory(m) = backend {
        return Ok(super::memory::renew_lease(m, keys, token, millis));
    }
    backend
        .compare_and_expire(&keys.lease, token.as_bytes(), millis)
        .await
}

/// Gives the shard's lease up if it is `token`'s.
pub(crate) async fn release_lease(
    backend: &Backend,
    keys: &ShardKeys,
    token: &str,
) -> Result<(), CacheError> {
    if let Backend::Memory(m) = backend {
        super::memory::release_lease(m, keys, token);
        return Ok(());
    }
    backend
        .compare_and_delete(&keys.lease, token.as_bytes())
        .await
        .map(drop)
}

/// New changes for `consumer`, at most `count`.
pub(crate) async fn read_new(
    backend: &Backend,
    keys: &ShardKeys,
    consumer: &str,
    count: usize,
) -> Result<Read, CacheError> {
    if let Backend::Memory(m) = backend {
        return Ok(super::memory::read_new(m, keys, count));
    }
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(count);
    cmd.arg("STREAMS").arg(&keys.stream).arg(">");
    let reply = backend.run(&cmd).await?;
    Ok(parse_read(&reply))
}

/// Changes delivered to any consumer and not acknowledged (a flusher
/// that held the shard before), moved to `consumer`, from `cursor`:
/// the next cursor (`None` at the end) and the changes.
pub(crate) async fn claim(
    backend: &Backend,
    keys: &ShardKeys,
    consumer: &str,
    cursor: &str,
    count: usize,
) -> Result<(Option<String>, Read), CacheError> {
    if let Backend::Memory(m) = backend {
        return Ok(super::memory::claim(m, keys, cursor, count));
    }
    let mut cmd = redis::cmd("XAUTOCLAIM");
    cmd.arg(&keys.stream)
        .arg(GROUP)
        .arg(consumer)
        .arg(0)
        .arg(cursor);
    cmd.arg("COUNT").arg(count);
    let reply = backend.run(&cmd).await?;
    Ok(parse_claim(&reply))
}

/// After a flush: the entries of the changes that are still their keys'
/// latest get their TTL back (see [`SETTLE_ENTRY`]); the others are left
/// to their later changes. Atomic per change off a cluster; on a cluster
/// the latest are read first, then their entries settled.
pub(crate) async fn settle(
    backend: &Backend,
    keys: &ShardKeys,
    changes: &[&Delivered],
) -> Result<(), CacheError> {
    if let Backend::Memory(m) = backend {
        super::memory::settle(m, keys, changes);
        return Ok(());
    }
    let ttls: Vec<String> = changes.iter().map(|c| c.ttl.max(1).to_string()).collect();
    if let Backend::Cluster(_) = backend {
        let mut hmget = redis::cmd("HMGET");
        hmget.arg(&keys.latest);
        for change in changes {
            hmget.arg(&change.key);
        }
        let latest = backend.run(&hmget).await?;
        let latest = items(&latest);
        let settled = changes
            .iter()
            .zip(&ttls)
            .zip(latest)
            .filter(|((change, _), latest)| as_str(latest) == Some(change.id.as_str()))
            .map(|((change, ttl), _)| async move {
                let cmd = eval(
                    SETTLE_ENTRY,
                    &[&change.key],
                    &[&change.value, ttl.as_bytes()],
                );
                let found = backend.run(&cmd).await?;
                Ok::<_, CacheError>(as_bytes(&found).map(|stale| (*change, stale.to_vec())))
            });
        let mut stale = Vec::new();
        for outcome in futures_util::future::join_all(settled).await {
            stale.extend(outcome?);
        }
        if !stale.is_empty() {
            // Deleted only if the change is still its key's latest: a
            // write that landed meanwhile keeps its pending entry.
            let mut hmget = redis::cmd("HMGET");
            hmget.arg(&keys.latest);
            for (change, _) in &stale {
                hmget.arg(&change.key);
            }
            let latest = backend.run(&hmget).await?;
            let dropped = stale
                .iter()
                .zip(items(&latest))
                .filter(|((change, _), latest)| as_str(latest) == Some(change.id.as_str()))
                .map(|((change, value), _)| {
                    let cmd = eval(DROP, &[&change.key], &[value]);
                    async move { backend.run(&cmd).await }
                });
            for outcome in futures_util::future::join_all(dropped).await {
                outcome?;
            }
        }
    } else {
        let settled = changes.iter().zip(&ttls).map(|(change, ttl)| {
            let cmd = eval(
                SETTLE,
                &[&keys.latest, &change.key],
                &[&change.value, ttl.as_bytes(), change.id.as_bytes()],
            );
            async move { backend.run(&cmd).await }
        });
        for outcome in futures_util::future::join_all(settled).await {
            outcome?;
        }
    }
    Ok(())
}

/// Acknowledges and deletes the changes `ids`; `flushed` (key, id) that
/// are their keys' latest are forgotten as such. `false` if the shard's
/// lease is no longer `token`'s: nothing was acknowledged.
pub(crate) async fn ack(
    backend: &Backend,
    keys: &ShardKeys,
    token: &str,
    ids: &[&str],
    flushed: &[(&str, &str)],
) -> Result<bool, CacheError> {
    if ids.is_empty() {
        return Ok(true);
    }
    if let Backend::Memory(m) = backend {
        return Ok(super::memory::ack(m, keys, token, ids, flushed));
    }
    let count = ids.len().to_string();
    let mut args: Vec<&[u8]> = vec![token.as_bytes(), count.as_bytes()];
    args.extend(ids.iter().map(|id| id.as_bytes()));
    for (key, id) in flushed {
        args.push(key.as_bytes());
        args.push(id.as_bytes());
    }
    let reply = backend
        .run(&eval(
            ACK,
            &[&keys.stream, &keys.latest, &keys.lease],
            &args,
        ))
        .await?;
    Ok(!matches!(reply, Value::Int(-1)))
}

/// Moves `change` to the dead letters and, if it was its key's latest,
/// takes its value out of the cache (if the entry still holds it: in the
/// same step off a cluster). `false` if the shard's lease is no longer
/// `token`'s: nothing was done.
pub(crate) async fn bury(
    backend: &Backend,
    keys: &ShardKeys,
    token: &str,
    change: &Delivered,
    error: &str,
    failures: u32,
) -> Result<bool, CacheError> {
    if let Backend::Memory(m) = backend {
        return Ok(super::memory::bury(m, keys, token, change, error, failures));
    }
    let (ttl, at, failures) = (
        change.ttl.to_string(),
        change.at.to_string(),
        failures.to_string(),
    );
    let cluster = matches!(backend, Backend::Cluster(_));
    let mut script_keys = vec![
        keys.stream.as_str(),
        keys.dead.as_str(),
        keys.latest.as_str(),
        keys.lease.as_str(),
    ];
    if !cluster {
        script_keys.push(&change.key);
    }
    let cmd = eval(
        BURY,
        &script_keys,
        &[
            change.id.as_bytes(),
            change.key.as_bytes(),
            &change.value,
            ttl.as_bytes(),
            at.as_bytes(),
            error.as_bytes(),
            failures.as_bytes(),
            token.as_bytes(),
        ],
    );
    match backend.run(&cmd).await? {
        Value::Int(-1) => Ok(false),
        Value::Int(1) if cluster => {
            backend
                .run(&eval(DROP, &[&change.key], &[&change.value]))
                .await?;
            Ok(true)
        }
        _ => Ok(true),
    }
}

/// The shards' keys of the queue named `queue`, found on the servers
/// (`SCAN`), for the callers that do not know its shard count.
async fn shards_of(cache: &Cache, queue: &str) -> Result<Vec<ShardKeys>, CacheError> {
    let probe = ShardKeys::of(cache, queue, 0);
    // `<prefix>:{wb:<queue>:` then the shard number and `}`.
    let start = probe
        .stream
        .strip_suffix("0}")
        .unwrap_or(&probe.stream)
        .to_owned();
    let backend = cache.backend();
    if let Backend::Memory(m) = backend {
        return Ok(super::memory::shards(m, &start)
            .into_iter()
            .map(|shard| ShardKeys::of(cache, queue, shard))
            .collect());
    }
    let pattern = format!("{}*", crate::write::glob_escape(&start));
    let timeout = cache.settings().op_timeout;
    let mut shards = std::collections::BTreeSet::new();
    for target in crate::cache::within(timeout, backend.scan_targets()).await? {
        let mut cursor = 0;
        loop {
            let scan = backend.scan(target.as_deref(), cursor, &pattern, &start);
            let (next, keys) = crate::cache::within(timeout, scan).await?;
            for key in keys {
                let shard = key
                    .strip_prefix(&start)
                    .and_then(|rest| rest.split_once('}'))
                    .and_then(|(n, _)| n.parse::<u16>().ok());
                shards.extend(shard);
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(shards
        .into_iter()
        .map(|shard| ShardKeys::of(cache, queue, shard))
        .collect())
}

pub(crate) async fn status(
    cache: &Cache,
    queue: &str,
    shards: u16,
) -> Result<QueueStatus, CacheError> {
    let backend = cache.backend();
    if let Backend::Memory(m) = backend {
        let keys: Vec<ShardKeys> = (0..shards)
            .map(|shard| ShardKeys::of(cache, queue, shard))
            .collect();
        return Ok(super::memory::status(m, &keys));
    }
    let timeout = cache.settings().op_timeout;
    let mut status = QueueStatus::default();
    let mut oldest: Option<u64> = None;
    for shard in 0..shards {
        let keys = ShardKeys::of(cache, queue, shard);
        let cmd = eval(STATUS, &[&keys.stream, &keys.dead], &[]);
        let reply = crate::cache::within(timeout, backend.run(&cmd)).await?;
        let parts = items(&reply);
        let [pending, dead, first, seconds, micros] = &parts[..] else {
            continue;
        };
        status.pending += as_u64(pending).unwrap_or(0);
        status.dead += as_u64(dead).unwrap_or(0);
        let first = as_str(first).and_then(ChangeId::parse);
        if let (Some(first), Some(seconds), Some(micros)) = (first, as_u64(seconds), as_u64(micros))
        {
            let now = seconds.saturating_mul(1000).saturating_add(micros / 1000);
            let age = now.saturating_sub(first.millis);
            oldest = Some(oldest.map_or(age, |o| o.max(age)));
        }
    }
    status.oldest = oldest.map(Duration::from_millis);
    Ok(status)
}

pub(crate) async fn dead_letters(
    cache: &Cache,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, CacheError> {
    let backend = cache.backend();
    let timeout = cache.settings().op_timeout;
    let mut letters = Vec::new();
    for keys in shards_of(cache, queue).await? {
        if let Backend::Memory(m) = backend {
            letters.extend(super::memory::dead_letters(m, &keys, limit));
            continue;
        }
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(&keys.dead)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit);
        let reply = crate::cache::within(timeout, backend.run(&cmd)).await?;
        letters.extend(parse_dead(&reply));
    }
    letters.sort_by_key(|letter| letter.version);
    letters.truncate(limit);
    Ok(letters)
}

pub(crate) async fn replay(cache: &Cache, queue: &str) -> Result<u64, CacheError> {
    let backend = cache.backend();
    let timeout = cache.settings().op_timeout;
    let mut replayed = 0;
    for keys in shards_of(cache, queue).await? {
        if let Backend::Memory(m) = backend {
            replayed += super::memory::replay(m, &keys);
            continue;
        }
        loop {
            let cmd = eval(REPLAY, &[&keys.stream, &keys.dead, &keys.latest], &[]);
            let moved =
                crate::cache::within(timeout, backend.run_durably(&keys.stream, &cmd)).await?;
            let moved = as_u64(&moved).unwrap_or(0);
            replayed += moved;
            if moved == 0 {
                break;
            }
        }
    }
    Ok(replayed)
}

fn as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_str(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

fn as_bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The items of an array, a set, or a map's keys and values in turn.
fn items(value: &Value) -> Vec<&Value> {
    match value {
        Value::Array(items) | Value::Set(items) => items.iter().collect(),
        Value::Map(pairs) => pairs.iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

/// A field list `[name, value, ...]` (or a map) as pairs.
fn fields_of(value: &Value) -> Vec<(&str, &Value)> {
    let items = items(value);
    items
        .chunks_exact(2)
        .filter_map(|pair| Some((as_str(pair[0])?, pair[1])))
        .collect()
}

fn field<'a>(fields: &[(&str, &'a Value)], name: &str) -> Option<&'a Value> {
    fields.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// `[[id, [field, value, ...]], ...]`: the changes that parse, and the
/// ids of the entries that do not (a deleted entry, `[id, nil]`, is
/// neither: it is gone).
fn parse_entries(value: &Value) -> Read {
    let mut read = Read::default();
    for entry in items(value) {
        let parts = items(entry);
        let Some(id) = parts.first().and_then(|id| as_str(id)) else {
            continue;
        };
        let Some(fields) = parts.get(1).filter(|f| !matches!(f, Value::Nil)) else {
            continue;
        };
        let fields = fields_of(fields);
        let change = (|| {
            Some(Delivered {
                id: id.to_owned(),
                version: ChangeId::parse(id)?,
                key: as_str(field(&fields, "key")?)?.to_owned(),
                value: as_bytes(field(&fields, "value")?)?.to_vec(),
                ttl: as_u64(field(&fields, "ttl")?)?,
                at: usize::try_from(as_u64(field(&fields, "at")?)?).ok()?,
            })
        })();
        match change {
            Some(change) => read.changes.push(change),
            None => read.malformed.push(id.to_owned()),
        }
    }
    read
}

/// `XREADGROUP`'s reply: `nil`, or `[[stream, entries]]` (a map of
/// stream to entries in RESP3).
fn parse_read(reply: &Value) -> Read {
    let streams: Vec<&Value> = match reply {
        Value::Map(pairs) => pairs.iter().map(|(_, e)| e).collect(),
        _ => items(reply)
            .into_iter()
            .filter_map(|stream| items(stream).get(1).copied())
            .collect(),
    };
    let mut read = Read::default();
    for entries in streams {
        let more = parse_entries(entries);
        read.changes.extend(more.changes);
        read.malformed.extend(more.malformed);
    }
    read
}

/// `XAUTOCLAIM`'s reply: `[next cursor, entries, deleted ids]`.
fn parse_claim(reply: &Value) -> (Option<String>, Read) {
    let parts = items(reply);
    let cursor = parts
        .first()
        .and_then(|c| as_str(c))
        .filter(|c| *c != "0-0")
        .map(str::to_owned);
    let read = parts.get(1).map(|e| parse_entries(e)).unwrap_or_default();
    (cursor, read)
}

fn parse_dead(reply: &Value) -> Vec<DeadLetter> {
    items(reply)
        .into_iter()
        .filter_map(|entry| {
            let parts = items(entry);
            let id = as_str(parts.first()?)?;
            let fields = fields_of(parts.get(1)?);
            let text = |name| field(&fields, name).and_then(as_str).map(str::to_owned);
            Some(DeadLetter {
                id: id.to_owned(),
                key: text("key")?,
                version: text("id").as_deref().and_then(ChangeId::parse),
                error: text("error").unwrap_or_default(),
                failures: field(&fields, "failures")
                    .and_then(as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(0),
                value: field(&fields, "value")
                    .and_then(as_bytes)
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, key: &str) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(vec![
                bulk("key"),
                bulk(key),
                bulk("value"),
                bulk("{}"),
                bulk("ttl"),
                bulk("60000"),
                bulk("at"),
                bulk("0"),
            ]),
        ])
    }

    #[test]
    fn a_read_parses_and_skips_what_does_not() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                entry("5-1", "user:1"),
                Value::Array(vec![bulk("6-0"), Value::Nil]),
                Value::Array(vec![bulk("x"), Value::Nil]),
                Value::Int(3),
                entry("7-0", "user:2"),
            ]),
        ])]);
        let read = parse_read(&reply);
        let changes = read.changes;
        let ids: Vec<_> = changes.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["5-1", "7-0"]);
        let bad = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![Value::Array(vec![
                bulk("8-0"),
                Value::Array(vec![bulk("key"), bulk("k")]),
            ])]),
        ])]);
        assert_eq!(parse_read(&bad).malformed, ["8-0"]);
        assert_eq!(changes[0].version, ChangeId { millis: 5, seq: 1 });
        assert_eq!((changes[0].ttl, changes[0].at), (60000, 0));
        assert_eq!(parse_read(&Value::Nil), Read::default());
    }

    #[test]
    fn a_claim_ends_at_cursor_zero() {
        let reply = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![entry("1-0", "k")]),
            Value::Array(vec![]),
        ]);
        let (cursor, read) = parse_claim(&reply);
        assert_eq!((cursor, read.changes.len()), (None, 1));
        let more = Value::Array(vec![bulk("9-0"), Value::Array(vec![])]);
        assert_eq!(parse_claim(&more).0.as_deref(), Some("9-0"));
        assert_eq!(parse_claim(&Value::Int(1)), (None, Read::default()));
    }

    #[test]
    fn versions_order_as_ids() {
        let a = ChangeId::parse("1700000000000-3").unwrap();
        let b = ChangeId::parse("1700000000001-0").unwrap();
        assert!(a < b && a.as_i64() < b.as_i64());
        assert_eq!(a.to_string(), "1700000000000-3");
        assert_eq!(ChangeId::parse("12"), None);
        assert_eq!(ChangeId::parse("a-1"), None);
    }
}
