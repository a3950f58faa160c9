//! `#[invalidates]`, `#[cache_put]` and leases end to end, on a real
//! `redis-server` and on `Cache::memory()`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_harness::{RedisServer, on_every_backend, raw, raw_connection};
use cache_runtime::{Cache, CacheBuilder, Counts, cache_put, invalidates, redis_cached};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
    email: String,
}

#[derive(Debug, PartialEq)]
struct DbError;

/// A table of users behind a cache; counts the reads that reach it.
struct Users {
    cache: Cache,
    tenant: &'static str,
    rows: Mutex<HashMap<u64, User>>,
    reads: AtomicU64,
}

impl Users {
    fn new(cache: Cache) -> Self {
        let rows = (1..=3)
            .map(|id| {
                let user = User {
                    id,
                    name: format!("user-{id}"),
                    email: format!("u{id}@example.com"),
                };
                (id, user)
            })
            .collect();
        Users {
            cache,
            tenant: "acme",
            rows: Mutex::new(rows),
            reads: AtomicU64::new(0),
        }
    }

    fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    fn row(&self, id: u64) -> Option<User> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.rows.lock().unwrap().get(&id).cloned()
    }

    fn update(&self, id: u64, change: impl FnOnce(&mut User)) -> Result<User, DbError> {
        let mut rows = self.rows.lock().unwrap();
        let user = rows.get_mut(&id).ok_or(DbError)?;
        change(user);
        Ok(user.clone())
    }

    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    async fn get_user(&self, id: u64) -> Result<User, DbError> {
        self.row(id).ok_or(DbError)
    }

    #[redis_cached(key = "email:<email>", ttl = 60, cache = self.cache)]
    async fn by_email(&self, email: &str) -> Option<User> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let rows = self.rows.lock().unwrap();
        rows.values().find(|u| u.email == email).cloned()
    }

    #[redis_cached(key = "t:<self.tenant>:user:<id>", ttl = 60, cache = self.cache)]
    async fn tenant_user(&self, id: u64) -> Result<User, DbError> {
        self.row(id).ok_or(DbError)
    }

    /// An empty name is rejected by the "database": nothing is invalidated.
    #[invalidates(Self::get_user(id), cache = self.cache)]
    async fn rename(&self, id: u64, name: String) -> Result<(), DbError> {
        if name.is_empty() {
            return Err(DbError);
        }
        self.update(id, |u| u.name = name).map(drop)
    }

    /// Two targets in one attribute, one of them borrowing a field.
    #[invalidates(Self::get_user(user.id), Self::by_email(&user.email), cache = self.cache)]
    async fn save(&self, user: User) -> Result<(), DbError> {
        let id = user.id;
        self.update(id, move |u| *u = user).map(drop)
    }

    /// The attribute repeated; a template target; a plain (non-`Result`) return.
    #[invalidates(Self::get_user(id), cache = self.cache)]
    #[invalidates(key = "email:<old_email>", cache = self.cache)]
    async fn change_email(&self, id: u64, old_email: String, new_email: String) -> bool {
        self.update(id, |u| u.email = new_email).is_ok()
    }

    /// A target whose key reads `<self.tenant>`, in method-call form.
    #[invalidates(self.tenant_user(id), cache = self.cache)]
    async fn rename_in_tenant(&self, id: u64, name: String) -> Result<(), DbError> {
        self.update(id, |u| u.name = name).map(drop)
    }

    /// Keys made from what the write returns (`ret`): its row's email and
    /// tenant entry, beside a key made from a parameter.
    #[invalidates(
        Self::get_user(id),
        Self::by_email(&ret.email),
        self.tenant_user(ret.id),
        cache = self.cache
    )]
    async fn rename_returning(&self, id: u64, name: String) -> Result<User, DbError> {
        if name.is_empty() {
            return Err(DbError);
        }
        self.update(id, |u| u.name = name)
    }

    /// `ret` of a function without `Result`: the value itself.
    #[invalidates(Self::by_email(&ret.email), cache = self.cache)]
    async fn reset_name(&self, id: u64) -> User {
        self.update(id, |u| u.name = "reset".into()).unwrap()
    }

    /// Write-through: the returned row becomes `get_user`'s entry.
    #[cache_put(Self::get_user(id), cache = self.cache)]
    async fn set_name(&self, id: u64, name: String) -> Result<User, DbError> {
        if name.is_empty() {
            return Err(DbError);
        }
        self.update(id, |u| u.name = name)
    }
}

/// A cached free function and its writer; the cache is a skipped parameter.
#[redis_cached(key = "counter:<id>", ttl = 60, skip(cache, source), cache = cache)]
async fn counter(cache: &Cache, source: &AtomicU64, id: u64) -> u64 {
    source.load(Ordering::SeqCst) + id
}

#[invalidates(counter(id), cache = cache)]
async fn bump(cache: &Cache, source: &AtomicU64, id: u64) {
    source.fetch_add(1, Ordering::SeqCst);
}

async fn invalidates_after_ok(cache: Cache) {
    let users = Users::new(cache);
    assert_eq!(users.get_user(1).await.unwrap().name, "user-1");
    assert_eq!(users.get_user(1).await.unwrap().name, "user-1");
    assert_eq!(users.reads(), 1, "second call was a hit");

    users.rename(1, "Ada".into()).await.unwrap();
    assert_eq!(users.get_user(1).await.unwrap().name, "Ada");
    assert_eq!(users.reads(), 2, "the write invalidated the entry");

    let writer = users.cache.stats().function("rename").unwrap();
    assert_eq!(writer.invalidations, 1);
}

async fn err_invalidates_nothing(cache: Cache) {
    let users = Users::new(cache);
    users.get_user(2).await.unwrap();
    assert_eq!(users.rename(2, String::new()).await, Err(DbError));
    assert_eq!(users.get_user(2).await.unwrap().name, "user-2");
    assert_eq!(
        users.reads(),
        1,
        "still a hit: the failed write deleted nothing"
    );
    assert_eq!(users.cache.stats().total.invalidations, 0);
}

async fn several_targets_and_repeated_attributes(cache: Cache) {
    let users = Users::new(cache);
    users.get_user(3).await.unwrap();
    users.by_email("u3@example.com").await.unwrap();
    assert_eq!(users.reads(), 2);

    let mut user = users.get_user(3).await.unwrap();
    user.name = "Grace".into();
    users.save(user).await.unwrap();
    assert_eq!(users.get_user(3).await.unwrap().name, "Grace");
    assert_eq!(
        users.by_email("u3@example.com").await.unwrap().name,
        "Grace"
    );
    assert_eq!(users.reads(), 4, "both entries were invalidated");

    assert!(
        users
            .change_email(3, "u3@example.com".into(), "g@example.com".into())
            .await
    );
    assert_eq!(users.get_user(3).await.unwrap().email, "g@example.com");
    assert_eq!(users.by_email("u3@example.com").await, None);
    assert_eq!(users.reads(), 6, "both attributes' keys were invalidated");
    let writer = users.cache.stats().function("change_email").unwrap();
    assert_eq!(writer.invalidations, 2, "one DEL of two keys");
}

async fn self_keyed_targets_and_free_functions(cache: Cache) {
    let users = Users::new(cache.clone());
    users.tenant_user(1).await.unwrap();
    users.rename_in_tenant(1, "Lin".into()).await.unwrap();
    assert_eq!(users.tenant_user(1).await.unwrap().name, "Lin");
    assert_eq!(users.reads(), 2);

    let source = AtomicU64::new(0);
    assert_eq!(counter(&cache, &source, 10).await, 10);
    source.fetch_add(5, Ordering::SeqCst);
    assert_eq!(counter(&cache, &source, 10).await, 10, "cached");
    bump(&cache, &source, 10).await;
    assert_eq!(counter(&cache, &source, 10).await, 16, "invalidated");
}

async fn cache_put_stores_the_returned_value(cache: Cache) {
    let users = Users::new(cache);
    users.get_user(1).await.unwrap();
    let updated = users.set_name(1, "Put".into()).await.unwrap();
    assert_eq!(updated.name, "Put");
    assert_eq!(users.get_user(1).await.unwrap(), updated);
    assert_eq!(users.reads(), 1, "a hit on the put value: no body run");

    // Before any read: the put value is the first entry.
    users.set_name(2, "Fresh".into()).await.unwrap();
    assert_eq!(users.get_user(2).await.unwrap().name, "Fresh");
    assert_eq!(users.reads(), 1);

    assert_eq!(users.set_name(1, String::new()).await, Err(DbError));
    assert_eq!(
        users.get_user(1).await.unwrap().name,
        "Put",
        "Err stores nothing"
    );
    assert_eq!(users.cache.stats().function("set_name").unwrap().sets, 2);
}

/// A write that lands while a miss computes: the value the miss computed
/// from the old row is not stored (the lease was deleted with the key).
async fn a_value_computed_before_a_write_is_not_stored(cache: Cache) {
    let users = Users::new(cache.clone());
    let read_and_write = async {
        // The write happens inside the read's body, after the read: the
        // exact interleaving of the stale-set race.
        #[redis_cached(key = "race:<id>", ttl = 60, skip(users), cache = users.cache)]
        async fn read_then_overtaken(users: &Users, id: u64) -> User {
            let old = users.row(id).unwrap();
            users.rename(id, "new".into()).await.unwrap();
            let _ = users
                .cache
                .invalidate(&read_then_overtaken_cache_key(&id))
                .await;
            old
        }
        read_then_overtaken(&users, 1).await
    };
    assert_eq!(
        read_and_write.await.name,
        "user-1",
        "the caller gets its result"
    );
    cache.settled().await;
    let stats = cache.stats();
    assert_eq!(stats.total.dropped_sets, 1, "{stats:?}");
    assert_eq!(stats.total.sets, 0);
}

/// A body that fails gives its lease back at once: the next call stores.
async fn a_failed_body_releases_its_lease(cache: Cache) {
    let users = Users::new(cache);
    assert_eq!(users.get_user(99).await, Err(DbError));
    users.rows.lock().unwrap().insert(
        99,
        User {
            id: 99,
            name: "late".into(),
            email: "late@example.com".into(),
        },
    );
    users.get_user(99).await.unwrap();
    users.get_user(99).await.unwrap();
    assert_eq!(
        users.reads(),
        2,
        "stored after the failed call's lease was released"
    );
}

/// Targets naming the written result: rendered after the body, deleted
/// with the others; none on failure; and a value read before such a write
/// is not stored after it (the lease).
async fn keys_made_from_the_result(cache: Cache) {
    async fn warm(users: &Users) {
        users.get_user(1).await.unwrap();
        users.by_email("u1@example.com").await.unwrap();
        users.tenant_user(1).await.unwrap();
    }
    let users = Users::new(cache.clone());
    warm(&users).await;
    let reads = users.reads();
    warm(&users).await;
    assert_eq!(users.reads(), reads, "all three cached");
    assert!(users.rename_returning(1, String::new()).await.is_err());
    warm(&users).await;
    assert_eq!(users.reads(), reads, "a failed write invalidates nothing");
    let renamed = users.rename_returning(1, "new".into()).await.unwrap();
    assert_eq!(
        users.by_email("u1@example.com").await,
        Some(renamed.clone())
    );
    assert_eq!(users.tenant_user(1).await, Ok(renamed.clone()));
    assert_eq!(users.get_user(1).await, Ok(renamed));
    assert_eq!(users.reads(), reads + 3, "all three invalidated");

    // Without `Result`: the value is `ret`.
    assert!(users.by_email("u2@example.com").await.is_some());
    users.reset_name(2).await;
    assert_eq!(
        users.by_email("u2@example.com").await.unwrap().name,
        "reset"
    );

    // The stale-set race, with the write's key made from its result.
    #[redis_cached(key = "email:<email>", ttl = 60, skip(users), cache = users.cache)]
    async fn read_then_overtaken(users: &Users, email: &str) -> Option<User> {
        let old = users
            .rows
            .lock()
            .unwrap()
            .values()
            .find(|u| u.email == email)
            .cloned();
        users.rename_returning(3, "newer".into()).await.unwrap();
        old
    }
    let dropped = cache.stats().total.dropped_sets;
    let old = read_then_overtaken(&users, "u3@example.com").await.unwrap();
    assert_eq!(old.name, "user-3", "the caller gets what it read");
    cache.settled().await;
    assert_eq!(cache.stats().total.dropped_sets, dropped + 1);
    let now = users.by_email("u3@example.com").await.unwrap();
    assert_eq!(now.name, "newer");
}

on_every_backend!(
    keys_made_from_the_result,
    invalidates_after_ok,
    err_invalidates_nothing,
    several_targets_and_repeated_attributes,
    self_keyed_targets_and_free_functions,
    cache_put_stores_the_returned_value,
    a_value_computed_before_a_write_is_not_stored,
    a_failed_body_releases_its_lease,
);

/// `Users` on a cache of `server`, configured by `configure`.
async fn users_on(
    server: &RedisServer,
    configure: impl FnOnce(CacheBuilder) -> CacheBuilder,
) -> Users {
    let builder = configure(Cache::builder().url(server.url()));
    Users::new(builder.build().await.unwrap())
}

/// Polls the writer's counters every 50 ms until `settled` holds (or 15 s
/// pass); returns them and how long it took.
async fn writer_stats_once(
    users: &Users,
    writer: &str,
    settled: impl Fn(&Counts) -> bool,
) -> (Counts, Duration) {
    let started = Instant::now();
    loop {
        let counts = users.cache.stats().function(writer).unwrap();
        if settled(&counts) || started.elapsed() > Duration::from_secs(15) {
            return (counts, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn another_callers_lease_is_respected_and_a_stray_one_overwritten() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let users = Users::new(cache);
    let mut conn = raw_connection(&server).await;
    let key = Users::get_user_cache_key(&1).into_string();

    // A live lease of another caller: compute, do not store.
    let live = format!("\0lease:{:032x}:{}", 7, 1_700_000_000_000_u64);
    let _: () = raw(
        &mut conn,
        &[b"SET", key.as_bytes(), live.as_bytes(), b"PX", b"5000"],
    )
    .await;
    users.get_user(1).await.unwrap();
    users.get_user(1).await.unwrap();
    assert_eq!(users.reads(), 2, "no value stored over another's lease");
    let held: Vec<u8> = raw(&mut conn, &[b"GET", key.as_bytes()]).await;
    assert_eq!(held, live.as_bytes());

    // A placeholder with no expiry (no lease of ours has none): garbage.
    let stray = format!("\0lease:{:032x}:{}", 8, 1_700_000_000_000_u64);
    let _: () = raw(&mut conn, &[b"SET", key.as_bytes(), stray.as_bytes()]).await;
    users.get_user(1).await.unwrap();
    users.get_user(1).await.unwrap();
    assert_eq!(users.reads(), 3, "overwritten, then a hit");
    let stored: String = raw(&mut conn, &[b"GET", key.as_bytes()]).await;
    assert!(stored.starts_with("{\"id\":1"), "{stored}");
}

#[tokio::test]
async fn a_cancelled_miss_gives_its_lease_back() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    #[redis_cached(key = "slow:<id>", ttl = 60, skip(cache), cache = cache)]
    async fn slow(cache: &Cache, id: u64) -> u64 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        id
    }
    let mut conn = raw_connection(&server).await;
    let key = slow_cache_key(&1).into_string();
    let call = tokio::time::timeout(Duration::from_millis(200), slow(&cache, 1));
    assert!(call.await.is_err(), "cancelled mid-body");
    let mut exists = 1;
    for _ in 0..50 {
        exists = raw(&mut conn, &[b"EXISTS", key.as_bytes()]).await;
        if exists == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(exists, 0, "the placeholder was deleted, not left for 10 s");
}

#[tokio::test]
async fn a_write_while_redis_is_down_succeeds_without_waiting() {
    let mut server = RedisServer::start();
    let users = users_on(&server, |b| b.op_timeout(Duration::from_millis(100))).await;
    users.get_user(1).await.unwrap();
    users.cache.settled().await;
    server.stop();

    let started = Instant::now();
    users.rename(1, "Down".into()).await.unwrap();
    let elapsed = started.elapsed();
    println!("write with Redis down returned Ok after {elapsed:?}");
    // A liveness bound, far above the 100 ms op timeout: the write must not
    // hang on the cache.
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    assert!(users.cache.stats().function("rename").unwrap().errors >= 1);

    // Redis stays down: the invalidation is kept, for as long as the
    // outage lasts (past the 7.7 s after which it used to be given up).
    tokio::time::sleep(Duration::from_secs(9)).await;
    let writer = users.cache.stats().function("rename").unwrap();
    assert_eq!((writer.invalidations, writer.lost_invalidations), (0, 0));
    assert!(cache_runtime::testing::pending_chores(&users.cache) >= 1);
    server.restart();
    let (writer, waited) = writer_stats_once(&users, "rename", |c| c.invalidations > 0).await;
    println!(
        "delivered {waited:?} after Redis came back: errors {} lost_invalidations {}",
        writer.errors, writer.lost_invalidations
    );
    assert_eq!((writer.invalidations, writer.lost_invalidations), (1, 0));
}

#[tokio::test]
async fn a_stalled_invalidation_is_retried_in_the_background() {
    let server = RedisServer::start();
    let users = users_on(&server, |b| b.op_timeout(Duration::from_millis(100))).await;
    users.get_user(1).await.unwrap();
    users.cache.settled().await;
    let mut conn = raw_connection(&server).await;
    let key = Users::get_user_cache_key(&1).into_string();

    // Writes stall for 400 ms; reads are still served.
    let _: () = raw(&mut conn, &[b"CLIENT", b"PAUSE", b"400", b"WRITE"]).await;
    let started = Instant::now();
    users.rename(1, "Paused".into()).await.unwrap();
    let elapsed = started.elapsed();
    println!("write with Redis stalled returned Ok after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");

    // The timed-out `DEL` may itself land when the pause ends (Redis queued
    // it); the background retry must succeed either way.
    let (writer, waited) = writer_stats_once(&users, "rename", |c| {
        c.invalidations + c.lost_invalidations > 0
    })
    .await;
    println!(
        "invalidation retried in the background: settled after {waited:?}; errors {} invalidations {} lost {}",
        writer.errors, writer.invalidations, writer.lost_invalidations
    );
    assert_eq!((writer.invalidations, writer.lost_invalidations), (1, 0));
    let exists: u64 = raw(&mut conn, &[b"EXISTS", key.as_bytes()]).await;
    assert_eq!(exists, 0);
    assert_eq!(users.get_user(1).await.unwrap().name, "Paused");
}

#[tokio::test]
async fn writes_honour_the_cache_prefix() {
    let server = RedisServer::start();
    let users = users_on(&server, |b| b.prefix("app")).await;
    let mut conn = raw_connection(&server).await;
    users.get_user(1).await.unwrap();
    let exists: u64 = raw(&mut conn, &[b"EXISTS", b"app:user:1"]).await;
    assert_eq!(exists, 1);
    users.rename(1, "Pre".into()).await.unwrap();
    let exists: u64 = raw(&mut conn, &[b"EXISTS", b"app:user:1"]).await;
    assert_eq!(exists, 0, "the prefixed key was deleted");
    users.set_name(2, "Put".into()).await.unwrap();
    let stored: String = raw(&mut conn, &[b"GET", b"app:user:2"]).await;
    assert!(stored.contains("\"Put\""), "{stored}");
    let ttl: i64 = raw(&mut conn, &[b"TTL", b"app:user:2"]).await;
    assert!((55..=60).contains(&ttl), "the target's TTL: {ttl}");
}

/// The cache's background retries run on the Tokio runtime that first
/// needed them. If that runtime shuts down while the cache lives on (a
/// cache shared by several runtimes), its pending retries are given up and
/// counted, and a later write of the same key is retried anew: it is not
/// taken as covered by a retry that will never run.
#[test]
fn a_write_after_the_retrying_runtime_shut_down_is_still_invalidated() {
    let server = RedisServer::start();
    let proxy = cache_harness::FaultProxy::start(server.port());
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    let users = first.block_on(async {
        let cache = Cache::builder()
            .url(proxy.url())
            .op_timeout(Duration::from_millis(50))
            .build()
            .await
            .unwrap();
        let users = Users::new(cache);
        users.get_user(1).await.unwrap();
        users.cache.settled().await; // cached
        proxy.set(cache_harness::Fault::Blackhole);
        users.rename(1, "lost".into()).await.unwrap(); // its DEL is queued for a retry
        users
    });
    drop(first); // the retry's runtime goes, the retry with it
    proxy.set(cache_harness::Fault::None);

    let second = runtime();
    second.block_on(async {
        users.rename(1, "Ada".into()).await.unwrap();
        let landed = cache_harness::wait_for(
            Duration::from_secs(5),
            Duration::from_millis(50),
            async || users.get_user(1).await.unwrap().name == "Ada",
        )
        .await
        .expect("the second write's invalidation was made");
        let writer = users.cache.stats().function("rename").unwrap();
        println!(
            "retry runtime shut down: the second write's invalidation landed after {landed:?}; \
             lost invalidations counted {}",
            writer.lost_invalidations
        );
        assert_eq!(
            writer.lost_invalidations, 1,
            "the first write's retry, given up"
        );
    });
}
