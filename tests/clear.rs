//! `Cache::clear` and `Cache::clear_prefix`: `SCAN` + `UNLINK` under the
//! cache's prefix, on every primary of a cluster, never `FLUSHDB`. They
//! delete exactly the matching entries (a glob character in the prefix is
//! matched as itself), leave other caches' keys and foreign keys alone,
//! drop this process's local copies, and refuse any clear on a cache
//! without a prefix. On a real `redis-server`, the shared local cluster and in memory.

use std::sync::atomic::{AtomicU64, Ordering};

use cache_harness::{RedisCluster, RedisServer, Target, raw, raw_connection};
use cache_runtime::{Cache, CacheError, redis_cached};

struct App {
    cache: Cache,
    runs: AtomicU64,
}

impl App {
    fn new(cache: Cache) -> App {
        App {
            cache,
            runs: AtomicU64::new(0),
        }
    }

    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    async fn user(&self, id: u64) -> u64 {
        self.runs.fetch_add(1, Ordering::SeqCst);
        id
    }

    #[redis_cached(key = "order:<id>", ttl = 60, local = "30s", cache = self.cache)]
    async fn order(&self, id: u64) -> u64 {
        self.runs.fetch_add(1, Ordering::SeqCst);
        id
    }

    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }
}

const USERS: u64 = 2_500;
const ORDERS: u64 = 40;

/// Fills both functions, and reads the orders until they are copied
/// locally (where the cache has a local tier).
async fn fill(app: &App) {
    for id in 0..USERS {
        app.user(id).await;
    }
    for _ in 0..3 {
        for id in 0..ORDERS {
            app.order(id).await;
        }
    }
}

async fn clears_exactly_what_it_names(app: &App, other: &App) {
    fill(app).await;
    fill(other).await;
    let runs = app.runs();

    let cleared = app.cache.clear_prefix("user:").await.unwrap();
    assert_eq!(cleared, USERS, "every user entry, nothing else");
    for id in 0..ORDERS {
        app.order(id).await;
    }
    assert_eq!(app.runs(), runs, "the orders stayed");
    app.user(7).await;
    assert_eq!(app.runs(), runs + 1, "a cleared user is computed again");

    let cleared = app.cache.clear().await.unwrap();
    assert_eq!(
        cleared,
        ORDERS + 1,
        "the orders and the user computed since"
    );
    let runs = app.runs();
    app.order(3).await;
    assert_eq!(app.runs(), runs + 1, "the local copy went with the entry");

    // The other cache (another prefix) kept everything.
    let other_runs = other.runs();
    other.user(1).await;
    other.order(1).await;
    assert_eq!(other.runs(), other_runs, "another prefix is not touched");
    println!(
        "cleared {USERS} users then {} entries; the other cache's {} entries untouched",
        ORDERS + 1,
        USERS + ORDERS
    );
}

#[tokio::test]
async fn clear_on_a_server() {
    let server = RedisServer::start();
    let build = |prefix: &str| Cache::builder().url(server.url()).prefix(prefix).build();
    let app = App::new(build("app").await.unwrap());
    let other = App::new(build("other").await.unwrap());
    let mut conn = raw_connection(&server).await;
    // Keys that are not the cache's, or that only a glob would take for
    // its: a `SCAN MATCH app:we*` would match `app:weird` too.
    for key in ["user:1", "app", "appx:user:1", "app:we*ird", "app:weird"] {
        raw::<()>(&mut conn, &[b"SET", key.as_bytes(), b"x"]).await;
    }
    assert_eq!(app.cache.clear_prefix("we*").await.unwrap(), 1);
    let exists: u64 = raw(&mut conn, &[b"EXISTS", b"app:weird"]).await;
    assert_eq!(exists, 1, "`*` in the prefix is matched as itself");
    raw::<()>(&mut conn, &[b"DEL", b"app:weird"]).await;

    clears_exactly_what_it_names(&app, &other).await;
    for key in ["user:1", "app", "appx:user:1"] {
        let exists: u64 = raw(&mut conn, &[b"EXISTS", key.as_bytes()]).await;
        assert_eq!(exists, 1, "{key} is not the cache's");
    }
}

/// A cache without a prefix, as `Cache::connect(url)` builds it, on a
/// database that other applications share: no clear may touch their keys.
#[tokio::test]
async fn a_cache_without_a_prefix_clears_nothing() {
    let server = RedisServer::start();
    let mut conn = raw_connection(&server).await;
    let theirs = ["session:abc", "ratelimit:7", "s", "user:1", "queue:jobs"];
    for key in theirs {
        raw::<()>(&mut conn, &[b"SET", key.as_bytes(), b"x"]).await;
    }
    let app = App::new(Cache::connect(&server.url()).await.unwrap());
    app.user(1).await; // the cache's own entry is `user:1` too: indistinguishable
    app.user(2).await;
    for attempt in ["", "s", "user:", "*"] {
        assert!(
            matches!(
                app.cache.clear_prefix(attempt).await,
                Err(CacheError::ClearWithoutPrefix)
            ),
            "clear_prefix({attempt:?}) without a cache prefix"
        );
    }
    assert!(matches!(
        app.cache.clear().await,
        Err(CacheError::ClearWithoutPrefix)
    ));
    let left: u64 = raw(&mut conn, &[b"DBSIZE"]).await;
    for key in theirs {
        let exists: u64 = raw(&mut conn, &[b"EXISTS", key.as_bytes()]).await;
        assert_eq!(exists, 1, "{key} is another application's");
    }
    println!("no prefix: clear and clear_prefix refused; {left} keys left in the database");
    assert_eq!(left, theirs.len() as u64 + 1, "theirs, and user:2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_on_a_cluster() {
    let target = Target::cluster(RedisCluster::shared());
    let id = std::process::id();
    let app = App::new(target.cache(Some(&format!("clear-{id}"))).await);
    let other = App::new(target.cache(Some(&format!("clear-other-{id}"))).await);
    clears_exactly_what_it_names(&app, &other).await;
}

#[tokio::test]
async fn clear_in_memory() {
    let build = |prefix: &str| Cache::builder().memory().prefix(prefix).build();
    let app = App::new(build("app").await.unwrap());
    let other = App::new(build("other").await.unwrap());
    clears_exactly_what_it_names(&app, &other).await;
}
