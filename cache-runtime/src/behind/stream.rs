//! The Redis side of write-behind: the scripts and stream commands, and
//! the parsing of their replies (never a panic on what a server sends).

use std::time::Duration;

use redis::{Cmd, Value};

use super::{ChangeId, DeadLetter, QueueStatus, ShardKeys};
use crate::backend::Backend;
use crate::cache::Cache;
use crate::error::CacheError;

/// The consumer group every flusher of a queue reads with.
pub(crate) const GROUP: &str = "wb";

/// Appends a change and stores its value as the entry, without expiry,
/// in one step (standalone and Sentinel, where both keys are on one
/// server). KEYS: stream, entry. ARGV: value, TTL after the flush, where
/// the encoded value starts.
const ENQUEUE: &str = r"local id = redis.call('XADD', KEYS[1], '*', 'key', KEYS[2], 'value', ARGV[1], 'ttl', ARGV[2], 'at', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1])
return id";

/// After a flush, on the entry: gives it its TTL back if it still holds
/// the flushed value and none; deletes it if it holds something else
/// with a TTL (a value read from the database before the flush, or a
/// reader's lease placeholder); leaves a newer pending value (no TTL).
/// KEYS: entry. ARGV: value, TTL.
const SETTLE: &str = r"local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if current == ARGV[1] then
  if ttl == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
  return 1
end
if ttl >= 0 then redis.call('DEL', KEYS[1]) return 2 end
return 0";

/// Deletes the entry if it holds exactly this value (a dead-lettered
/// change's: reads go back to the database). KEYS: entry. ARGV: value.
const DROP: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// Acknowledges and deletes flushed changes. KEYS: stream. ARGV: ids.
const ACK: &str = r"redis.call('XACK', KEYS[1], 'wb', unpack(ARGV))
return redis.call('XDEL', KEYS[1], unpack(ARGV))";

/// Moves a change to the dead letters. KEYS: stream, dead. ARGV: id, key,
/// value, ttl, at, error, failures.
const BURY: &str = r"redis.call('XADD', KEYS[2], '*', 'key', ARGV[2], 'value', ARGV[3], 'ttl', ARGV[4], 'at', ARGV[5], 'id', ARGV[1], 'error', ARGV[6], 'failures', ARGV[7])
redis.call('XACK', KEYS[1], 'wb', ARGV[1])
return redis.call('XDEL', KEYS[1], ARGV[1])";

/// Creates the consumer group (and the stream) unless it exists.
const GROUP_CREATE: &str = r"redis.pcall('XGROUP', 'CREATE', KEYS[1], 'wb', '0', 'MKSTREAM')
return 1";

/// A shard's pending and dead counts, its oldest change's id and the
/// server's time. KEYS: stream, dead.
const STATUS: &str = r"local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local id = false
if first[1] then id = first[1][1] end
local t = redis.call('TIME')
return {redis.call('XLEN', KEYS[1]), redis.call('XLEN', KEYS[2]), id, t[1], t[2]}";

/// Moves dead letters back to the queue, oldest first (at most 100 per
/// call). KEYS: stream, dead. Returns how many.
const REPLAY: &str = r"local entries = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 100)
for _, entry in ipairs(entries) do
  local f = entry[2]
  local fields = {}
  for i = 1, #f, 2 do fields[f[i]] = f[i + 1] end
  redis.call('XADD', KEYS[1], '*', 'key', fields['key'], 'value', fields['value'], 'ttl', fields['ttl'], 'at', fields['at'])
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

/// One change as read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivered {
    /// The stream entry's id.
    pub(crate) id: String,
    pub(crate) version: ChangeId,
    /// The entry's Redis key.
    pub(crate) key: String,
    /// The stored bytes (tags' stamp, then the encoded value).
    pub(crate) value: Vec<u8>,
    /// The TTL the entry gets back once flushed, in milliseconds.
    pub(crate) ttl: u64,
    /// Where the encoded value starts in `value`.
    pub(crate) at: usize,
}

/// Appends a change of `entry` to `keys`' stream and stores `value` as
/// the entry without expiry, waiting for replicas as configured.
pub(crate) async fn enqueue(
    backend: &Backend,
    keys: &ShardKeys,
    entry: &str,
    value: &[u8],
    ttl: u64,
    at: usize,
) -> Result<(), CacheError> {
    let ttl = ttl.to_string();
    let at = at.to_string();
    if let Backend::Cluster(_) = backend {
        // Two slots: the change first, so that a crash between the two
        // leaves an older entry (deleted by the flush's settling), never
        // a value without expiry that no change will flush.
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&keys.stream).arg("*").arg("key").arg(entry);
        xadd.arg("value")
            .arg(value)
            .arg("ttl")
            .arg(&ttl)
            .arg("at")
            .arg(&at);
        backend.run_durably(&keys.stream, &xadd).await?;
        let mut set = redis::cmd("SET");
        set.arg(entry).arg(value);
        backend.run_durably(entry, &set).await?;
    } else {
        let cmd = eval(
            ENQUEUE,
            &[&keys.stream, entry],
            &[value, ttl.as_bytes(), at.as_bytes()],
        );
        backend.run_durably(&keys.stream, &cmd).await?;
    }
    Ok(())
}

pub(crate) async fn ensure_group(backend: &Backend, keys: &ShardKeys) -> Result<(), CacheError> {
    backend
        .run(&eval(GROUP_CREATE, &[&keys.stream], &[]))
        .await
        .map(drop)
}

/// New changes for `consumer`, at most `count`.
pub(crate) async fn read_new(
    backend: &Backend,
    keys: &ShardKeys,
    consumer: &str,
    count: usize,
) -> Result<Vec<Delivered>, CacheError> {
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
) -> Result<(Option<String>, Vec<Delivered>), CacheError> {
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

/// After a flush: the entry's TTL back (see [`SETTLE`]).
pub(crate) async fn settle(backend: &Backend, change: &Delivered) -> Result<(), CacheError> {
    let ttl = change.ttl.max(1).to_string();
    let cmd = eval(SETTLE, &[&change.key], &[&change.value, ttl.as_bytes()]);
    backend.run(&cmd).await.map(drop)
}

pub(crate) async fn ack(
    backend: &Backend,
    keys: &ShardKeys,
    ids: &[&str],
) -> Result<(), CacheError> {
    if ids.is_empty() {
        return Ok(());
    }
    let ids: Vec<&[u8]> = ids.iter().map(|id| id.as_bytes()).collect();
    backend
        .run(&eval(ACK, &[&keys.stream], &ids))
        .await
        .map(drop)
}

/// Moves `change` to the dead letters, then takes its value out of the
/// cache (if the entry still holds it).
pub(crate) async fn bury(
    backend: &Backend,
    keys: &ShardKeys,
    change: &Delivered,
    error: &str,
    failures: u32,
) -> Result<(), CacheError> {
    let (ttl, at, failures) = (
        change.ttl.to_string(),
        change.at.to_string(),
        failures.to_string(),
    );
    let cmd = eval(
        BURY,
        &[&keys.stream, &keys.dead],
        &[
            change.id.as_bytes(),
            change.key.as_bytes(),
            &change.value,
            ttl.as_bytes(),
            at.as_bytes(),
            error.as_bytes(),
            failures.as_bytes(),
        ],
    );
    backend.run(&cmd).await?;
    backend
        .run(&eval(DROP, &[&change.key], &[&change.value]))
        .await
        .map(drop)
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
    let pattern = format!("{}*", crate::write::glob_escape(&start));
    let backend = cache.backend();
    let timeout = cache.settings().op_timeout;
    let mut shards = std::collections::BTreeSet::new();
    for target in crate::write::within(timeout, backend.scan_targets()).await? {
        let mut cursor = 0;
        loop {
            let scan = backend.scan(target.as_deref(), cursor, &pattern, &start);
            let (next, keys) = crate::write::within(timeout, scan).await?;
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
    let timeout = cache.settings().op_timeout;
    let mut status = QueueStatus::default();
    let mut oldest: Option<u64> = None;
    for shard in 0..shards {
        let keys = ShardKeys::of(cache, queue, shard);
        let cmd = eval(STATUS, &[&keys.stream, &keys.dead], &[]);
        let reply = crate::write::within(timeout, backend.run(&cmd)).await?;
        let parts = items(&reply);
        let [pending, dead, first, seconds, micros] = &parts[..] else {
            continue;
        };
        status.pending += as_u64(pending).unwrap_or(0);
        status.dead += as_u64(dead).unwrap_or(0);
        let first = as_str(first).and_then(ChangeId::parse);
        if let (Some(first), Some(seconds), Some(micros)) = (first, as_u64(seconds), as_u64(micros))
        {
            let age = (seconds * 1000 + micros / 1000).saturating_sub(first.millis);
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
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(&keys.dead)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit);
        let reply = crate::write::within(timeout, backend.run(&cmd)).await?;
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
        loop {
            let cmd = eval(REPLAY, &[&keys.stream, &keys.dead], &[]);
            let moved =
                crate::write::within(timeout, backend.run_durably(&keys.stream, &cmd)).await?;
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
fn fields(value: &Value) -> Vec<(&str, &Value)> {
    let items = items(value);
    items
        .chunks_exact(2)
        .filter_map(|pair| Some((as_str(pair[0])?, pair[1])))
        .collect()
}

fn field<'a>(fields: &[(&str, &'a Value)], name: &str) -> Option<&'a Value> {
    fields.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// `[[id, [field, value, ...]], ...]`: the changes that parse (a deleted
/// entry, `[id, nil]`, or a malformed one is skipped).
fn parse_entries(value: &Value) -> Vec<Delivered> {
    items(value)
        .into_iter()
        .filter_map(|entry| {
            let parts = items(entry);
            let id = as_str(parts.first()?)?;
            let fields = fields(parts.get(1)?);
            Some(Delivered {
                id: id.to_owned(),
                version: ChangeId::parse(id)?,
                key: as_str(field(&fields, "key")?)?.to_owned(),
                value: as_bytes(field(&fields, "value")?)?.to_vec(),
                ttl: as_u64(field(&fields, "ttl")?)?,
                at: usize::try_from(as_u64(field(&fields, "at")?)?).ok()?,
            })
        })
        .collect()
}

/// `XREADGROUP`'s reply: `nil`, or `[[stream, entries]]` (a map of
/// stream to entries in RESP3).
fn parse_read(reply: &Value) -> Vec<Delivered> {
    match reply {
        Value::Map(pairs) => pairs.iter().flat_map(|(_, e)| parse_entries(e)).collect(),
        _ => items(reply)
            .into_iter()
            .flat_map(|stream| {
                let parts = items(stream);
                parts.get(1).map(|e| parse_entries(e)).unwrap_or_default()
            })
            .collect(),
    }
}

/// `XAUTOCLAIM`'s reply: `[next cursor, entries, deleted ids]`.
fn parse_claim(reply: &Value) -> (Option<String>, Vec<Delivered>) {
    let parts = items(reply);
    let cursor = parts
        .first()
        .and_then(|c| as_str(c))
        .filter(|c| *c != "0-0")
        .map(str::to_owned);
    let changes = parts.get(1).map(|e| parse_entries(e)).unwrap_or_default();
    (cursor, changes)
}

fn parse_dead(reply: &Value) -> Vec<DeadLetter> {
    items(reply)
        .into_iter()
        .filter_map(|entry| {
            let parts = items(entry);
            let id = as_str(parts.first()?)?;
            let fields = fields(parts.get(1)?);
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
        let changes = parse_read(&reply);
        let ids: Vec<_> = changes.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["5-1", "7-0"]);
        assert_eq!(changes[0].version, ChangeId { millis: 5, seq: 1 });
        assert_eq!((changes[0].ttl, changes[0].at), (60000, 0));
        assert!(parse_read(&Value::Nil).is_empty());
    }

    #[test]
    fn a_claim_ends_at_cursor_zero() {
        let reply = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![entry("1-0", "k")]),
            Value::Array(vec![]),
        ]);
        let (cursor, changes) = parse_claim(&reply);
        assert_eq!((cursor, changes.len()), (None, 1));
        let more = Value::Array(vec![bulk("9-0"), Value::Array(vec![])]);
        assert_eq!(parse_claim(&more).0.as_deref(), Some("9-0"));
        assert_eq!(parse_claim(&Value::Int(1)), (None, vec![]));
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
