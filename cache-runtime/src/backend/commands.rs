//! The commands of the backend contract, written once for any connection of
//! the `redis` crate: the standalone `ConnectionManager`, the Sentinel
//! primary's connection and the cluster connection all speak them.
//!
//! The compare operations are Lua scripts on one key, atomic on the server.
//! The compare-and-set is sent as `EVAL` with its source (see
//! [`compare_and_set`]); the others as `EVALSHA`, and a node that does not know the script (just
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

pub(crate) async fn query<T: FromRedisValue>(
    conn: &mut impl ConnectionLike,
    cmd: &Cmd,
) -> Result<T, CacheError> {
    cmd.query_async(conn).await.map_err(CacheError::redis)
}

/// Whether a read on the local tier's tracking connection has the server
/// track the keys it reads. That connection is opened with `CLIENT
/// TRACKING ON OPTIN`: only a read whose answer is kept (a local copy, a
/// tag's token) is tracked, with `CLIENT CACHING YES` right before it;
/// a tagged hit's entry, read there so that it comes after its tags'
/// invalidations (see `crate::local`), is not, which spares the server
/// a tracking table entry per entry read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Track {
    Keys,
    Not,
}

impl Track {
    /// A pipeline that begins, when the keys are tracked, with `CLIENT
    /// CACHING YES` (its reply ignored): nothing comes between it and the
    /// next command, which a pipeline sends together on a multiplexed
    /// connection.
    fn pipe(self) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        self.before_next(&mut pipe);
        pipe
    }

    /// Adds `CLIENT CACHING YES` (its reply ignored) to `pipe` when the
    /// keys of the command added next are tracked.
    fn before_next(self, pipe: &mut redis::Pipeline) {
        if self == Track::Keys {
            pipe.cmd("CLIENT").arg("CACHING").arg("YES").ignore();
        }
    }
}

/// `name` (`EVAL` or `EVALSHA`) of `body` on one key.
fn script_call(name: &str, body: &str, key: &str, args: &[&dyn ToRedisArgsDyn]) -> Cmd {
    let mut cmd = redis::cmd(name);
    cmd.arg(body).arg(1).arg(key);
    for arg in args {
        arg.write_to(&mut cmd);
    }
    cmd
}

/// `EVAL` with the script's source.
async fn eval_source<T: FromRedisValue>(
    conn: &mut impl ConnectionLike,
    script: &LuaScript,
    key: &str,
    args: &[&dyn ToRedisArgsDyn],
) -> Result<T, CacheError> {
    query(conn, &script_call("EVAL", script.source, key, args)).await
}

/// `EVALSHA`, then `EVAL` if the node does not know the script.
async fn eval<T: FromRedisValue>(
    conn: &mut impl ConnectionLike,
    script: &LuaScript,
    key: &str,
    args: &[&dyn ToRedisArgsDyn],
) -> Result<T, CacheError> {
    eval_tracked(conn, Track::Not, script, key, args).await
}

/// [`eval`], with the script's key tracked or not (see [`Track`]): the
/// `EVAL` after a `NOSCRIPT` is told again, since `CLIENT CACHING YES`
/// holds for one command only.
async fn eval_tracked<T: FromRedisValue>(
    conn: &mut impl ConnectionLike,
    track: Track,
    script: &LuaScript,
    key: &str,
    args: &[&dyn ToRedisArgsDyn],
) -> Result<T, CacheError> {
    let call = |name: &str, body: &str| script_call(name, body, key, args);
    let send = |cmd: Cmd| {
        let mut pipe = track.pipe();
        pipe.add_command(cmd);
        pipe
    };
    let first = match track {
        Track::Not => call("EVALSHA", &script.sha).query_async(conn).await,
        Track::Keys => send(call("EVALSHA", &script.sha))
            .query_async::<(T,)>(conn)
            .await
            .map(|(reply,)| reply),
    };
    match first {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            match track {
                Track::Not => query(conn, &call("EVAL", script.source)).await,
                Track::Keys => send(call("EVAL", script.source))
                    .query_async::<(T,)>(conn)
                    .await
                    .map(|(reply,)| reply)
                    .map_err(CacheError::redis),
            }
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
    // Sized once and not cloned (`.to_owned()` after `.arg()` copies the
    // command): every hit sends one.
    let mut cmd = Cmd::with_capacity(4, "GETRANGE".len() + key.len() + 1 + 20);
    cmd.arg("GETRANGE").arg(key).arg(0).arg(limit);
    cmd
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

/// [`get`] on the standalone server's connection, sent with
/// `ConnectionManager::send_packed_command` itself: through
/// `ConnectionLike` every command's future is boxed, allocated on the
/// worker that sends it and usually freed on the one the reply wakes.
pub(crate) async fn get_standalone(
    conn: &mut redis::aio::ConnectionManager,
    key: &str,
    limit: usize,
) -> Result<Fetched<Vec<u8>>, CacheError> {
    let reply = conn
        .send_packed_command(&get_cmd(key, limit))
        .await
        .map_err(CacheError::redis)?;
    let reply = reply.extract_error().map_err(CacheError::redis)?;
    let bytes = Vec::<u8>::from_redis_value(reply).map_err(|e| CacheError::redis(e.into()))?;
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

/// Tags' tokens (or tag clocks'), small values of ours: one `MGET` (one
/// command to parse, where [`get_many`] has one per key); a value over
/// `limit` is reported as such, after it was transferred.
pub(crate) async fn get_tokens(
    conn: &mut impl ConnectionLike,
    keys: &[String],
    limit: usize,
    track: Track,
) -> Result<Vec<Fetched<Vec<u8>>>, CacheError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut mget = redis::cmd("MGET");
    mget.arg(keys);
    let tokens: Vec<Option<Vec<u8>>> = match track {
        Track::Not => query(conn, &mget).await?,
        Track::Keys => {
            let mut pipe = track.pipe();
            pipe.add_command(mget);
            let (tokens,) = pipe.query_async(conn).await.map_err(CacheError::redis)?;
            tokens
        }
    };
    check_count(tokens.len(), keys.len())?;
    Ok(tokens
        .into_iter()
        .map(|token| token_of(token, limit))
        .collect())
}

/// What a token read by `MGET` is.
fn token_of(token: Option<Vec<u8>>, limit: usize) -> Fetched<Vec<u8>> {
    match token {
        Some(token) if token.len() <= limit => Fetched::Found(token),
        Some(_) => Fetched::TooLarge,
        None => Fetched::Absent,
    }
}

/// A tagged entry (its first `limit` bytes) and its tags' tokens, in one
/// request: `GETRANGE` and `MGET`, pipelined.
pub(crate) async fn get_tagged(
    conn: &mut impl ConnectionLike,
    key: &str,
    tags: &[String],
    limit: usize,
    track: Track,
) -> Result<(Fetched<Vec<u8>>, Vec<Fetched<Vec<u8>>>), CacheError> {
    if tags.is_empty() {
        return Ok((get(conn, key, limit).await?, Vec::new()));
    }
    let mut pipe = redis::pipe();
    pipe.add_command(get_cmd(key, limit));
    // The entry is not tracked: only the tokens are kept.
    track.before_next(&mut pipe);
    pipe.cmd("MGET").arg(tags);
    let (entry, tokens): (Vec<u8>, Vec<Option<Vec<u8>>>) =
        pipe.query_async(conn).await.map_err(CacheError::redis)?;
    check_count(tokens.len(), tags.len())?;
    let tokens = tokens
        .into_iter()
        .map(|token| token_of(token, limit))
        .collect();
    Ok((fetched(entry, limit), tokens))
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
    track: Track,
) -> Result<Fetched<Stored>, CacheError> {
    let reply: redis::Value = eval_tracked(conn, track, &GET_WITH_TTL, key, &[&limit]).await?;
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
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg(value).arg("NX").arg("PX").arg(px);
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
    // One command, whatever the node's script cache holds (no `EVALSHA`
    // answered `NOSCRIPT` first): a store queued before its caller returns
    // is the write itself (see `HeldLease::fulfil_soon`). The source is a
    // few hundred bytes, and its digest costs the server under a
    // microsecond.
    let reply: Option<()> =
        eval_source(conn, &COMPARE_AND_SET, key, &[&prefix, &value, &px]).await?;
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
    pub(crate) wanted: Wanted,
    /// `WAIT`'s timeout.
    pub(crate) timeout: std::time::Duration,
}

/// The replicas a write waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wanted {
    /// Every replica its primary has (see [`wait_replicated`]); none for a
    /// primary without replicas.
    All,
    /// At least this many (more than 0).
    AtLeast(u32),
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
    /// How many replicas the primary these connections write to has, as
    /// it last said (standalone and Sentinel; a cluster keeps one per
    /// primary).
    pub(crate) replicas: ReplicaCount,
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
            replicas: ReplicaCount::default(),
        }
    }

    /// Every connection of the pool.
    pub(crate) fn all(&self) -> &[C] {
        &self.conns
    }

    /// The connection for writes on `key`: the same one for every write
    /// of a key, so that a write that timed out on the client is applied
    /// before the next write of its key (write-behind's changes).
    pub(crate) fn pick_for(&self, key: &str) -> C {
        let at = usize::from(crate::slot::slot_of(key.as_bytes()));
        self.conns[at % self.conns.len()].clone()
    }

    /// The next connection, in turn.
    pub(crate) fn pick(&self) -> C {
        let at = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conns[at % self.conns.len()].clone()
    }
}

/// The `WAIT` command for `replicas`.
fn wait_cmd(replicas: u32, timeout: std::time::Duration) -> Cmd {
    let millis = u64::try_from(timeout.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    redis::cmd("WAIT").arg(replicas).arg(millis).to_owned()
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

/// How long a primary's word on its replicas (`ROLE`) is trusted: a write
/// within it waits for that many (none: no `WAIT`) without asking again.
/// The hole it leaves: a replica that attached since may lack a write
/// made meanwhile, if its primary fails right then and it is promoted.
pub(crate) const REPLICAS_TRUSTED_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// What one primary last said of its replicas (`ROLE`), and when.
#[derive(Debug, Default)]
pub(crate) struct ReplicaCount(std::sync::Mutex<Option<(u32, std::time::Instant)>>);

impl ReplicaCount {
    fn state(&self) -> std::sync::MutexGuard<'_, Option<(u32, std::time::Instant)>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The count, if said within [`REPLICAS_TRUSTED_FOR`].
    pub(crate) fn known(&self) -> Option<u32> {
        let state = *self.state();
        state.and_then(|(count, at)| (at.elapsed() < REPLICAS_TRUSTED_FOR).then_some(count))
    }

    fn note(&self, count: u32) {
        *self.state() = Some((count, std::time::Instant::now()));
    }
}

/// Whom a `WAIT` after a write on one primary asks for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asked<'a> {
    pub(crate) durability: Durability,
    /// The primary's count, as it said lately.
    pub(crate) replicas: &'a ReplicaCount,
    /// How many replicas the cluster lists for this primary (`CLUSTER
    /// NODES`); `None` off a cluster, or a primary it does not list yet.
    pub(crate) listed: Option<u32>,
    /// Whether the primary's own word (`ROLE`) may lower what is waited
    /// for. It may not be enough on its own: a primary whose replica was
    /// just promoted away from it (a failover it has not heard of yet)
    /// lists no replica either, and a write it takes then is lost. With
    /// [`Wanted::All`] that is the bargain (documented at
    /// `WriteDurability::AllReplicas`); with [`Wanted::AtLeast`] only where
    /// something else covers that case: on Sentinel, the fence, which
    /// deletes the recent writes' keys on a new primary.
    pub(crate) trust_role: bool,
}

/// `WAIT` on a connection to one primary, after a write on it: done once
/// the replicas asked for have the write.
///
/// With [`Wanted::All`]: as many as the cluster lists for that primary, or
/// (off a cluster, not listed, or listed without replicas) as the
/// primary's `ROLE` says, asked at most once per [`REPLICAS_TRUSTED_FOR`];
/// none, no `WAIT`. A short reply
/// asks `ROLE` again: a write that every replica the primary still has
/// acknowledged is done (one that died is not waited for, and one that
/// attaches later copies the primary's data, the write included).
pub(crate) async fn wait_replicated(
    conn: &mut impl ConnectionLike,
    asked: Asked<'_>,
) -> Result<(), CacheError> {
    let Asked {
        durability,
        replicas,
        listed,
        trust_role,
    } = asked;
    // A cluster that lists no replica of this primary may not have heard
    // of them yet (a new cluster's gossip, read once at connect): the
    // primary's own word then, as off a cluster.
    let listed = match listed {
        Some(0) => Some(match replicas.known() {
            Some(known) => known,
            None => role_count(conn, replicas).await?.unwrap_or(0),
        }),
        listed => listed,
    };
    let mut wanted = match durability.wanted {
        Wanted::AtLeast(n) => listed.map_or(n, |listed| n.min(listed)),
        Wanted::All => match listed {
            Some(listed) => listed,
            None => match replicas.known() {
                Some(known) => known,
                None => role_count(conn, replicas).await?.unwrap_or(0),
            },
        },
    };
    if trust_role && let Some(known) = replicas.known() {
        wanted = wanted.min(known);
    }
    if wanted == 0 {
        return Ok(());
    }
    let reply: redis::Value = query(conn, &wait_cmd(wanted, durability.timeout)).await?;
    let acknowledged = match reply {
        redis::Value::Int(n) => u32::try_from(n).unwrap_or(0),
        _ => 0,
    };
    if acknowledged >= wanted {
        return Ok(());
    }
    if trust_role
        && role_count(conn, replicas)
            .await?
            .is_some_and(|count| acknowledged >= count)
    {
        return Ok(());
    }
    Err(CacheError::NotReplicated {
        acknowledged,
        wanted,
    })
}

/// Asks the primary how many replicas it has (`ROLE`), and notes it;
/// `None` if an ACL refuses `ROLE`. That is noted as none (so asked again
/// a second later), with a warning: the caller's first `WAIT` then waits
/// for no replica (off a cluster, where nothing else says how many), and
/// a short `WAIT` is not excused.
pub(crate) async fn role_count(
    conn: &mut impl ConnectionLike,
    replicas: &ReplicaCount,
) -> Result<Option<u32>, CacheError> {
    let role: redis::Value = match query(conn, &redis::cmd("ROLE")).await {
        Ok(role) => role,
        Err(CacheError::Redis(e)) if e.code() == Some("NOPERM") => {
            replicas.note(0);
            tracing::warn!(
                error = %e,
                "the cache's ACL user may not run ROLE: writes cannot learn how many replicas to \
                 wait for, and a failover can undo them; grant it +role"
            );
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    match connected_replicas(&role) {
        Some(count) => {
            replicas.note(count);
            Ok(Some(count))
        }
        // A replica: the write before it failed already (`READONLY`), or
        // this is a write that went to a node demoted since.
        None => Err(CacheError::redis(redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "the node written to says it is not a primary",
        )))),
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
    fn a_primary_s_role_counts_its_connected_replicas() {
        for n in [0, 1, 3] {
            assert_eq!(connected_replicas(&primary_with(n)), Some(n as u32));
        }
    }

    #[test]
    fn a_replica_or_an_unreadable_role_counts_nothing() {
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
            assert_eq!(connected_replicas(&role), None, "{role:?}");
        }
    }

    #[test]
    fn a_primary_s_word_on_its_replicas_is_trusted_for_a_second() {
        let count = ReplicaCount::default();
        assert_eq!(count.known(), None, "never asked");
        count.note(2);
        assert_eq!(count.known(), Some(2));
        *count.state() = Some((0, std::time::Instant::now() - REPLICAS_TRUSTED_FOR));
        assert_eq!(count.known(), None, "asked too long ago");
    }
}
