//! The commands of the backend contract, written once for any connection of
//! the `redis` crate: the standalone `ConnectionManager`, the Sentinel
//! primary's connection and the cluster connection all speak them.
//!
//! The compare operations are Lua scripts on one key, atomic on the server.
//! They are sent as `EVALSHA`; a node that does not know the script (just
//! started, failed over, `SCRIPT FLUSH`ed) answers `NOSCRIPT`, and the same
//! call is sent once more as `EVAL` with the source, routed by its key like
//! the first. (`SCRIPT LOAD` would go to every node of a cluster and fail
//! while one is down.)

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{Cmd, FromRedisValue, ToRedisArgs};

use super::{Fetched, Stored};
use crate::error::CacheError;

/// A single-key Lua script, with its SHA1 computed once.
pub(crate) struct LuaScript {
    source: &'static str,
    sha: String,
}

impl LuaScript {
    fn new(source: &'static str) -> Self {
        LuaScript {
            source,
            sha: redis::Script::new(source).get_hash().to_owned(),
        }
    }
}

/// `GET` and `PTTL` in one step: the remaining TTL by the server's clock.
/// A value longer than `ARGV[1]` bytes is not sent: the answer is 1.
static GET_WITH_TTL: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r"if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[1]) then return 1 end
          local value = redis.call('GET', KEYS[1])
          if not value then return false end
          return {value, redis.call('PTTL', KEYS[1])}",
    )
});

/// Replaces a value longer than `ARGV[1]` bytes (one too large to read).
static SET_IF_LONGER: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r"if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[1]) then
              return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
          end
          return false",
    )
});

static COMPARE_AND_SET: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r"local current = redis.call('GET', KEYS[1])
          if current and string.sub(current, 1, #ARGV[1]) == ARGV[1] then
              return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
          end
          return false",
    )
});

static COMPARE_AND_DELETE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r"local current = redis.call('GET', KEYS[1])
          if current and string.sub(current, 1, #ARGV[1]) == ARGV[1] then
              return redis.call('DEL', KEYS[1])
          end
          return 0",
    )
});

static COMPARE_AND_EXPIRE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r"local current = redis.call('GET', KEYS[1])
          if current and string.sub(current, 1, #ARGV[1]) == ARGV[1] then
              return redis.call('PEXPIRE', KEYS[1], ARGV[2])
          end
          return 0",
    )
});

async fn query<T: FromRedisValue>(
    conn: &mut impl ConnectionLike,
    cmd: &Cmd,
) -> Result<T, CacheError> {
    cmd.query_async(conn).await.map_err(CacheError::redis)
}

/// `EVALSHA`, then `EVAL` if the node does not know the script.
async fn eval<T: FromRedisValue>(
    conn: &mut impl ConnectionLike,
    script: &LuaScript,
    key: &str,
    args: &[&dyn ToRedisArgsDyn],
) -> Result<T, CacheError> {
    let call = |name: &str, body: &str| {
        let mut cmd = redis::cmd(name);
        cmd.arg(body).arg(1).arg(key);
        for arg in args {
            arg.write_to(&mut cmd);
        }
        cmd
    };
    match call("EVALSHA", &script.sha).query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            query(conn, &call("EVAL", script.source)).await
        }
        outcome => outcome.map_err(CacheError::redis),
    }
}

/// An argument of a script call (`&[u8]` or a number), object safe.
pub(crate) trait ToRedisArgsDyn: Sync {
    fn write_to(&self, cmd: &mut Cmd);
}

impl<T: ToRedisArgs + Sync> ToRedisArgsDyn for T {
    fn write_to(&self, cmd: &mut Cmd) {
        cmd.arg(self);
    }
}

pub(crate) async fn ping(conn: &mut impl ConnectionLike) -> Result<(), CacheError> {
    query(conn, &redis::cmd("PING")).await
}

/// The read of [`get`]: `GETRANGE key 0 limit`, at most `limit + 1` bytes,
/// so that a value too large to read is never transferred (a 64 MiB value
/// holds the shared connection, and every call queued behind it, for
/// longer than the op timeout). It costs the server what `GET` does.
fn get_cmd(key: &str, limit: usize) -> Cmd {
    redis::cmd("GETRANGE").arg(key).arg(0).arg(limit).to_owned()
}

/// What [`get_cmd`] answered: an empty string is no key (`GETRANGE` does
/// not tell them apart; the cache never stores an empty value).
fn fetched(bytes: Vec<u8>, limit: usize) -> Fetched<Vec<u8>> {
    match bytes.len() {
        0 => Fetched::Absent,
        len if len > limit => Fetched::TooLarge,
        _ => Fetched::Found(bytes),
    }
}

pub(crate) async fn get(
    conn: &mut impl ConnectionLike,
    key: &str,
    limit: usize,
) -> Result<Fetched<Vec<u8>>, CacheError> {
    let bytes: Vec<u8> = query(conn, &get_cmd(key, limit)).await?;
    Ok(fetched(bytes, limit))
}

/// [`get`] of many keys in one pipeline, on a standalone server or (keys
/// of one slot) a cluster node. A key `GETRANGE` fails on with `WRONGTYPE`
/// (someone stored a list there) reads as absent, as it would in `MGET`;
/// any other error reply (`LOADING`, `NOPERM`, ...) fails the read.
pub(crate) async fn get_many(
    conn: &mut impl ConnectionLike,
    keys: &[String],
    limit: usize,
) -> Result<Vec<Fetched<Vec<u8>>>, CacheError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for key in keys {
        pipe.add_command(get_cmd(key, limit));
    }
    let replies: Vec<redis::Value> = pipe.query_async(conn).await.map_err(CacheError::redis)?;
    check_count(replies.len(), keys.len())?;
    replies
        .into_iter()
        .map(|reply| match reply {
            redis::Value::ServerError(error) if error.code() == "WRONGTYPE" => Ok(Fetched::Absent),
            reply => {
                let reply = reply.extract_error().map_err(CacheError::redis)?;
                let bytes =
                    Vec::<u8>::from_redis_value(reply).map_err(|e| CacheError::redis(e.into()))?;
                Ok(fetched(bytes, limit))
            }
        })
        .collect()
}

/// A reply with a different number of values than keys asked for is
/// garbage, not a reason to panic.
pub(crate) fn check_count(values: usize, keys: usize) -> Result<(), CacheError> {
    if values == keys {
        return Ok(());
    }
    Err(CacheError::redis(redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "a batch read answered a different number of values than keys",
    ))))
}

pub(crate) async fn get_with_ttl(
    conn: &mut impl ConnectionLike,
    key: &str,
    limit: usize,
) -> Result<Fetched<Stored>, CacheError> {
    let reply: redis::Value = eval(conn, &GET_WITH_TTL, key, &[&limit]).await?;
    match reply {
        redis::Value::Nil => Ok(Fetched::Absent),
        redis::Value::Int(_) => Ok(Fetched::TooLarge),
        reply => {
            let (bytes, pttl): (Vec<u8>, i64) =
                FromRedisValue::from_redis_value(reply).map_err(|e| CacheError::redis(e.into()))?;
            Ok(Fetched::Found(Stored {
                bytes,
                // -1: no expiry. (-2, gone, cannot follow a GET in one script.)
                ttl_millis: u64::try_from(pttl).ok(),
            }))
        }
    }
}

/// Replaces the value under `key` only if it is longer than `limit` bytes;
/// whether it did.
pub(crate) async fn set_if_longer(
    conn: &mut impl ConnectionLike,
    key: &str,
    limit: usize,
    value: &[u8],
    px: u64,
) -> Result<bool, CacheError> {
    let reply: Option<()> = eval(conn, &SET_IF_LONGER, key, &[&limit, &value, &px]).await?;
    Ok(reply.is_some())
}

pub(crate) async fn set(
    conn: &mut impl ConnectionLike,
    key: &str,
    value: &[u8],
    px: u64,
) -> Result<(), CacheError> {
    query(
        conn,
        redis::cmd("SET").arg(key).arg(value).arg("PX").arg(px),
    )
    .await
}

pub(crate) async fn set_if_absent(
    conn: &mut impl ConnectionLike,
    key: &str,
    value: &[u8],
    px: u64,
) -> Result<bool, CacheError> {
    let cmd = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("NX")
        .arg("PX")
        .arg(px)
        .to_owned();
    let reply: Option<()> = query(conn, &cmd).await?;
    Ok(reply.is_some())
}

pub(crate) async fn compare_and_set(
    conn: &mut impl ConnectionLike,
    key: &str,
    prefix: &[u8],
    value: &[u8],
    px: u64,
) -> Result<bool, CacheError> {
    let reply: Option<()> = eval(conn, &COMPARE_AND_SET, key, &[&prefix, &value, &px]).await?;
    Ok(reply.is_some())
}

pub(crate) async fn compare_and_delete(
    conn: &mut impl ConnectionLike,
    key: &str,
    prefix: &[u8],
) -> Result<bool, CacheError> {
    let deleted: u64 = eval(conn, &COMPARE_AND_DELETE, key, &[&prefix]).await?;
    Ok(deleted > 0)
}

pub(crate) async fn compare_and_expire(
    conn: &mut impl ConnectionLike,
    key: &str,
    prefix: &[u8],
    px: u64,
) -> Result<bool, CacheError> {
    let set: u64 = eval(conn, &COMPARE_AND_EXPIRE, key, &[&prefix, &px]).await?;
    Ok(set > 0)
}

/// How many replicas must have a write (an invalidation, a write-through)
/// before it counts as done: Redis replicates asynchronously, so a write
/// that only its primary had is lost if that primary fails over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Durability {
    pub(crate) replicas: u32,
    pub(crate) timeout: std::time::Duration,
}

/// Connections kept for writes that `WAIT` for replicas.
pub(crate) const DURABLE_CONNECTIONS: usize = 4;

/// The connections for durable writes, used in turn. Several, because
/// `WAIT` blocks the connection it is sent on until the replicas answer:
/// on one connection, concurrent writes queue behind each other's `WAIT`
/// (the cause of the collapse first measured under the cluster fault
/// load), and so does any command sent after them.
pub(crate) struct DurablePool<C> {
    conns: Box<[C]>,
    next: std::sync::atomic::AtomicUsize,
    pub(crate) durability: Durability,
    /// Whether the primary these connections write to lacks replicas
    /// (used on Sentinel only: see [`all_replicas_have_it`]).
    pub(crate) short_of_replicas: ShortOfReplicas,
}

impl<C: Clone> DurablePool<C> {
    /// A pool of `conns` ([`DURABLE_CONNECTIONS`] of them, as the
    /// backends make it); at least one.
    pub(crate) fn new(durability: Durability, conns: Vec<C>) -> Self {
        debug_assert!(!conns.is_empty(), "a pool of no connection");
        DurablePool {
            conns: conns.into_boxed_slice(),
            next: std::sync::atomic::AtomicUsize::new(0),
            durability,
            short_of_replicas: ShortOfReplicas::default(),
        }
    }

    /// Every connection of the pool.
    pub(crate) fn all(&self) -> &[C] {
        &self.conns
    }

    /// The next connection, in turn.
    pub(crate) fn pick(&self) -> C {
        let at = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conns[at % self.conns.len()].clone()
    }
}

/// The `WAIT` command of [`Durability`].
pub(crate) fn wait_cmd(durability: Durability) -> Cmd {
    let millis = u64::try_from(durability.timeout.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    redis::cmd("WAIT")
        .arg(durability.replicas)
        .arg(millis)
        .to_owned()
}

/// Whether a `WAIT` reply shows enough replicas.
pub(crate) fn check_replicated(
    reply: &redis::Value,
    durability: Durability,
) -> Result<(), CacheError> {
    let acknowledged = match reply {
        redis::Value::Int(n) => u32::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    if acknowledged >= durability.replicas {
        Ok(())
    } else {
        Err(CacheError::NotReplicated {
            acknowledged,
            wanted: durability.replicas,
        })
    }
}

/// After a `WAIT` that came back short (`short`, a
/// [`CacheError::NotReplicated`]): whether every replica the primary has
/// now acknowledged the write, from the primary's `ROLE` reply. Then the
/// write is as durable as that primary can make it: a replica that attaches
/// later copies the primary's data, the write included.
///
/// The primary's own word is not enough on its own: a primary whose
/// replica was just promoted away from it (a failover it has not heard of
/// yet) also lists no replica, and a write it takes then is lost. So this
/// is used only where something else covers that case: on Sentinel, the
/// fence, which deletes the recent writes' keys on the new primary.
pub(crate) fn all_replicas_have_it(
    short: CacheError,
    role: &redis::Value,
) -> Result<(), CacheError> {
    let CacheError::NotReplicated { acknowledged, .. } = short else {
        return Err(short);
    };
    match connected_replicas(role) {
        Some(connected) if acknowledged >= connected => Ok(()),
        _ => Err(short),
    }
}

/// The number of replicas in a primary's `ROLE` reply
/// (`["master", offset, [[ip, port, offset], ...]]`); `None` for a replica's
/// reply or one that does not parse.
fn connected_replicas(role: &redis::Value) -> Option<u32> {
    use redis::Value::{Array, BulkString, SimpleString};
    let Array(parts) = role else {
        return None;
    };
    let is_master = match parts.first()? {
        BulkString(name) => name == b"master",
        SimpleString(name) => name == "master",
        _ => false,
    };
    match (is_master, parts.get(2)?) {
        (true, Array(replicas)) => u32::try_from(replicas.len()).ok(),
        _ => None,
    }
}

/// How long writes to a primary found short of replicas (see
/// [`all_replicas_have_it`]) skip `WAIT` before one of them asks again:
/// without this, every write to a primary that a failover left without a
/// replica would wait the whole `WAIT` timeout, and so would the writes
/// queued behind it on the same connection, until the op timeout cut them
/// all short.
const SHORT_OF_REPLICAS_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether one primary was found short of replicas: its writes then skip
/// `WAIT` until one write, alone, has asked again. The hole this leaves on
/// top of [`all_replicas_have_it`]'s: a replica that attaches meanwhile may
/// lack a write made in that second when its primary fails.
#[derive(Debug, Default)]
pub(crate) struct ShortOfReplicas(std::sync::Mutex<Option<Short>>);

#[derive(Debug)]
struct Short {
    /// Until when writes skip `WAIT`.
    until: std::time::Instant,
    /// Since when one write has been asking again (the others skip
    /// meanwhile, for as long again at most, should it never answer).
    asking: Option<std::time::Instant>,
}

impl ShortOfReplicas {
    fn state(&self) -> std::sync::MutexGuard<'_, Option<Short>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a write skips `WAIT` now; `false` for the one write that
    /// asks again.
    fn skips_wait(&self) -> bool {
        let mut state = self.state();
        let Some(short) = state.as_mut() else {
            return false;
        };
        let now = std::time::Instant::now();
        let someone_asks = short
            .asking
            .is_some_and(|since| now < since + SHORT_OF_REPLICAS_FOR);
        if now < short.until || someone_asks {
            return true;
        }
        short.asking = Some(now);
        false
    }

    /// The primary answered a short `WAIT` with every replica it has.
    fn note(&self) {
        let until = std::time::Instant::now() + SHORT_OF_REPLICAS_FOR;
        *self.state() = Some(Short {
            until,
            asking: None,
        });
    }

    /// The primary has the replicas asked for, or one lags: every write
    /// waits again.
    fn forget(&self) {
        *self.state() = None;
    }
}

/// `WAIT` on a connection to one server, after a write on it. With
/// `short_of_replicas` (the state of that primary), a short reply is
/// checked with `ROLE` (see [`all_replicas_have_it`]); without, it is a
/// [`CacheError::NotReplicated`].
pub(crate) async fn wait_replicated(
    conn: &mut impl ConnectionLike,
    durability: Option<Durability>,
    short_of_replicas: Option<&ShortOfReplicas>,
) -> Result<(), CacheError> {
    let Some(durability) = durability else {
        return Ok(());
    };
    if short_of_replicas.is_some_and(ShortOfReplicas::skips_wait) {
        return Ok(());
    }
    let reply: redis::Value = query(conn, &wait_cmd(durability)).await?;
    let checked = check_replicated(&reply, durability);
    let Some(short_of_replicas) = short_of_replicas else {
        return checked;
    };
    match checked {
        Err(short @ CacheError::NotReplicated { .. }) => {
            let role: redis::Value = query(conn, &redis::cmd("ROLE")).await?;
            let enough = all_replicas_have_it(short, &role);
            match enough {
                Ok(()) => short_of_replicas.note(),
                Err(_) => short_of_replicas.forget(),
            }
            enough
        }
        checked => {
            if checked.is_ok() {
                short_of_replicas.forget();
            }
            checked
        }
    }
}

/// `DEL` of keys that a cluster keeps together (one slot), or of any keys on
/// a standalone server; how many existed.
/// `UNLINK` of several keys (freed in the background); how many existed.
pub(crate) async fn unlink(
    conn: &mut impl ConnectionLike,
    keys: &[String],
) -> Result<u64, CacheError> {
    remove(conn, Removal::Unlink, keys).await
}

/// How keys are removed: `DEL`, or `UNLINK` (memory freed in the background).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Removal {
    Del,
    Unlink,
}

/// `DEL` or `UNLINK` of several keys; how many existed. No command for no
/// key.
pub(crate) async fn remove(
    conn: &mut impl ConnectionLike,
    how: Removal,
    keys: &[String],
) -> Result<u64, CacheError> {
    if keys.is_empty() {
        return Ok(0);
    }
    let name = match how {
        Removal::Del => "DEL",
        Removal::Unlink => "UNLINK",
    };
    query(conn, redis::cmd(name).arg(keys)).await
}

/// One step of `SCAN cursor MATCH pattern COUNT count`: the next cursor
/// (0 when done) and the keys found.
pub(crate) fn scan_cmd(cursor: u64, pattern: &str, count: usize) -> Cmd {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(count);
    cmd
}

/// [`scan_cmd`] on a connection.
pub(crate) async fn scan(
    conn: &mut impl ConnectionLike,
    cursor: u64,
    pattern: &str,
    count: usize,
) -> Result<(u64, Vec<String>), CacheError> {
    query(conn, &scan_cmd(cursor, pattern, count)).await
}

/// `PUBLISH` of the local tier's broadcast.
pub(crate) async fn publish(
    conn: &mut impl ConnectionLike,
    channel: &str,
    message: &[u8],
) -> Result<(), CacheError> {
    let _receivers: i64 = query(conn, redis::cmd("PUBLISH").arg(channel).arg(message)).await?;
    Ok(())
}

pub(crate) async fn delete(
    conn: &mut impl ConnectionLike,
    keys: &[String],
) -> Result<u64, CacheError> {
    remove(conn, Removal::Del, keys).await
}

#[cfg(test)]
mod tests {
    use redis::Value::{Array, BulkString, Int};

    use super::*;

    fn short(acknowledged: u32) -> CacheError {
        CacheError::NotReplicated {
            acknowledged,
            wanted: 1,
        }
    }

    fn primary_with(replicas: usize) -> redis::Value {
        let replica = Array(vec![
            BulkString(b"127.0.0.1".to_vec()),
            BulkString(b"7001".to_vec()),
            BulkString(b"42".to_vec()),
        ]);
        Array(vec![
            BulkString(b"master".to_vec()),
            Int(42),
            Array(vec![replica; replicas]),
        ])
    }

    #[test]
    fn a_short_wait_is_enough_when_every_connected_replica_acknowledged() {
        assert!(all_replicas_have_it(short(0), &primary_with(0)).is_ok());
        assert!(all_replicas_have_it(short(1), &primary_with(1)).is_ok());
        assert!(all_replicas_have_it(short(0), &primary_with(1)).is_err());
        assert!(all_replicas_have_it(short(1), &primary_with(2)).is_err());
    }

    #[test]
    fn one_write_at_a_time_asks_a_primary_short_of_replicas_again() {
        let short = ShortOfReplicas::default();
        assert!(!short.skips_wait(), "not known to be short");
        short.note();
        assert!(short.skips_wait());
        // Past the skip window, one write asks; the others skip meanwhile.
        short.state().as_mut().unwrap().until = std::time::Instant::now();
        assert!(!short.skips_wait(), "this write asks again");
        assert!(short.skips_wait(), "the others skip while it asks");
        // An asker that never answered (dropped) gives way after a while.
        short.state().as_mut().unwrap().asking =
            Some(std::time::Instant::now() - SHORT_OF_REPLICAS_FOR);
        assert!(!short.skips_wait());
        short.forget();
        assert!(!short.skips_wait());
        assert!(!short.skips_wait(), "every write waits again");
    }

    #[test]
    fn a_replica_or_an_unreadable_role_keeps_the_write_unreplicated() {
        let replica = Array(vec![
            BulkString(b"slave".to_vec()),
            BulkString(b"127.0.0.1".to_vec()),
            Int(7000),
            BulkString(b"connected".to_vec()),
            Int(42),
        ]);
        for role in [
            replica,
            Int(3),
            Array(vec![]),
            Array(vec![BulkString(b"master".to_vec())]),
        ] {
            assert!(matches!(
                all_replicas_have_it(short(0), &role),
                Err(CacheError::NotReplicated { .. })
            ));
        }
        let timeout = CacheError::Timeout(std::time::Duration::from_millis(1));
        assert!(matches!(
            all_replicas_have_it(timeout, &primary_with(0)),
            Err(CacheError::Timeout(_))
        ));
    }
}
