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

use super::Stored;
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
static GET_WITH_TTL: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r"local value = redis.call('GET', KEYS[1])
          if not value then return false end
          return {value, redis.call('PTTL', KEYS[1])}",
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

pub(crate) async fn get(
    conn: &mut impl ConnectionLike,
    key: &str,
) -> Result<Option<Vec<u8>>, CacheError> {
    query(conn, redis::cmd("GET").arg(key)).await
}

/// `MGET` of keys that a cluster keeps together (one slot), or of any keys
/// on a standalone server.
pub(crate) async fn mget(
    conn: &mut impl ConnectionLike,
    keys: &[String],
) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
    let values: Vec<Option<Vec<u8>>> = query(conn, redis::cmd("MGET").arg(keys)).await?;
    check_count(values.len(), keys.len())?;
    Ok(values)
}

/// A reply with a different number of values than keys asked for is
/// garbage, not a reason to panic.
pub(crate) fn check_count(values: usize, keys: usize) -> Result<(), CacheError> {
    if values == keys {
        return Ok(());
    }
    Err(CacheError::redis(redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "MGET answered a different number of values than keys",
    ))))
}

pub(crate) async fn get_with_ttl(
    conn: &mut impl ConnectionLike,
    key: &str,
) -> Result<Option<Stored>, CacheError> {
    let reply: Option<(Vec<u8>, i64)> = eval(conn, &GET_WITH_TTL, key, &[]).await?;
    Ok(reply.map(|(bytes, pttl)| Stored {
        bytes,
        // -1: no expiry. (-2, gone, cannot follow a GET in one script.)
        ttl_millis: u64::try_from(pttl).ok(),
    }))
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
        }
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

/// `WAIT` on a connection to one server, after a write on it.
pub(crate) async fn wait_replicated(
    conn: &mut impl ConnectionLike,
    durability: Option<Durability>,
) -> Result<(), CacheError> {
    let Some(durability) = durability else {
        return Ok(());
    };
    let reply: redis::Value = query(conn, &wait_cmd(durability)).await?;
    check_replicated(&reply, durability)
}

/// `DEL` of keys that a cluster keeps together (one slot), or of any keys on
/// a standalone server; how many existed.
pub(crate) async fn delete(
    conn: &mut impl ConnectionLike,
    keys: &[String],
) -> Result<u64, CacheError> {
    query(conn, redis::cmd("DEL").arg(keys)).await
}
