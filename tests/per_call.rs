//! Per-call control: `refresh(fut)` recomputes and stores whatever is
//! cached, `bypass(fut)` neither reads nor writes the cache, `origin(fut)`
//! says how the call was answered. Through any depth of calls, for single
//! and batch lookups, with writes, leases and single-flight; on a real
//! `redis-server`, a cluster and `Cache::memory()`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cache_harness::{RedisServer, on_every_backend};
use cache_runtime::{Cache, Origin, bypass, cache_put, invalidates, origin, redis_cached, refresh};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    version: u64,
}

#[derive(Debug, PartialEq)]
struct DbError;

/// A users table whose rows change without the cache knowing, unless a
/// write says so; counts its queries.
struct Repo {
    cache: Cache,
    versions: Mutex<HashMap<u64, u64>>,
    queries: AtomicU64,
    query_ms: AtomicU64,
}

impl Repo {
    fn new(cache: Cache) -> Self {
        Repo {
            cache,
            versions: Mutex::new(HashMap::new()),
            queries: AtomicU64::new(0),
            query_ms: AtomicU64::new(0),
        }
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::SeqCst)
    }

    /// Changes the row behind the cache's back.
    fn change(&self, id: u64) -> u64 {
        let mut versions = self.versions.lock().unwrap();
        let version = versions.entry(id).or_default();
        *version += 1;
        *version
    }

    async fn select(&self, id: u64) -> User {
        self.queries.fetch_add(1, Ordering::SeqCst);
        let version = self.versions.lock().unwrap().get(&id).copied().unwrap_or(0);
        let ms = self.query_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        User { id, version }
    }

    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    async fn user(&self, id: u64) -> Result<User, DbError> {
        Ok(self.select(id).await)
    }

    #[redis_cached(key = "user:<id>", ttl = 60, single_flight, cache = self.cache)]
    async fn user_coalesced(&self, id: u64) -> Result<User, DbError> {
        Ok(self.select(id).await)
    }

    #[redis_cached(key = "user:<ids>", ttl = 60, batch, cache = self.cache)]
    async fn users(&self, ids: &[u64]) -> Result<HashMap<u64, User>, DbError> {
        let mut found = HashMap::new();
        for &id in ids {
            found.insert(id, self.select(id).await);
        }
        Ok(found)
    }

    /// A handler over the repository: the scopes reach through it.
    async fn profile_page(&self, id: u64) -> String {
        let user = self.user(id).await.unwrap();
        format!("user {} v{}", user.id, user.version)
    }

    #[invalidates(Self::user(id), cache = self.cache)]
    async fn touch(&self, id: u64) -> Result<(), DbError> {
        self.change(id);
        Ok(())
    }

    #[cache_put(Self::user(id), cache = self.cache)]
    async fn save(&self, id: u64) -> Result<User, DbError> {
        self.change(id);
        Ok(self.select(id).await)
    }
}

async fn a_refresh_recomputes_and_stores(cache: Cache) {
    let repo = Repo::new(cache);
    assert_eq!(repo.user(1).await.unwrap().version, 0);
    repo.change(1);
    assert_eq!(repo.user(1).await.unwrap().version, 0, "cached");
    let (fresh, how) = origin(refresh(repo.user(1))).await;
    assert_eq!((fresh.unwrap().version, how), (1, Origin::Refresh));
    // Stored: the next call is a hit on the new value.
    let (next, how) = origin(repo.user(1)).await;
    assert_eq!((next.unwrap().version, how), (1, Origin::Hit));
    // Through a handler, and on a key that was never cached.
    repo.change(1);
    assert_eq!(refresh(repo.profile_page(1)).await, "user 1 v2");
    assert_eq!(repo.profile_page(1).await, "user 1 v2");
    let (_, how) = origin(refresh(repo.user(2))).await;
    assert_eq!(how, Origin::Refresh);
    assert_eq!(origin(repo.user(2)).await.1, Origin::Hit);
    let stats = repo.cache.stats();
    assert_eq!(stats.total.refreshes, 3, "{stats:?}");
}

async fn a_bypass_neither_reads_nor_writes(cache: Cache) {
    let repo = Repo::new(cache);
    repo.user(1).await.unwrap();
    repo.change(1);
    let (direct, how) = origin(bypass(repo.profile_page(1))).await;
    assert_eq!((direct.as_str(), how), ("user 1 v1", Origin::Bypassed));
    // The entry is as it was, and nothing was stored for a new key.
    assert_eq!(repo.user(1).await.unwrap().version, 0);
    bypass(repo.user(2)).await.unwrap();
    assert_eq!(origin(repo.user(2)).await.1, Origin::Miss);
    repo.cache.settled().await;
    let stats = repo.cache.stats();
    assert_eq!(stats.total.skipped, 2, "{stats:?}");
    assert_eq!(stats.total.sets, 2, "only the calls outside: {stats:?}");
}

/// Writes keep the cache right inside both scopes: an invalidation
/// invalidates and a put stores.
async fn writes_keep_the_cache_right_inside_both_scopes(cache: Cache) {
    let repo = Repo::new(cache);
    for scope in ["bypass", "refresh"] {
        repo.user(1).await.unwrap();
        let write = repo.touch(1);
        match scope {
            "bypass" => bypass(write).await.unwrap(),
            _ => refresh(write).await.unwrap(),
        }
        let (user, how) = origin(repo.user(1)).await;
        assert_eq!(how, Origin::Miss, "{scope}: invalidated");
        let put = repo.save(1);
        let saved = match scope {
            "bypass" => bypass(put).await.unwrap(),
            _ => refresh(put).await.unwrap(),
        };
        assert!(saved.version > user.unwrap().version);
        let (user, how) = origin(repo.user(1)).await;
        assert_eq!(
            (user.unwrap(), how),
            (saved, Origin::Hit),
            "{scope}: stored"
        );
    }
}

/// 50 callers refreshing one key at once with `single_flight` share one
/// query, or two: a refresh joins only a computation whose body started
/// after it began, and on the memory backend the first caller's body
/// starts before the others have begun. Without it, each caller queries.
async fn refreshes_are_coalesced_with_single_flight(cache: Cache) {
    let repo = Repo::new(cache);
    repo.user_coalesced(1).await.unwrap();
    repo.query_ms.store(100, Ordering::SeqCst);
    let before = repo.queries();
    let answers = refresh(join_all((0..50).map(|_| repo.user_coalesced(1)))).await;
    let coalesced = repo.queries() - before;
    let before = repo.queries();
    refresh(join_all((0..50).map(|_| repo.user(1)))).await;
    let alone = repo.queries() - before;
    println!("50 refreshes of one key: {coalesced} queries with single_flight, {alone} without");
    assert!(answers.iter().all(Result::is_ok));
    assert!(coalesced <= 2, "{coalesced} queries");
    assert!(alone > 1);
}

/// A refresh never answers with a computation that began before it, even
/// one that no write interrupted: the row may have changed without the
/// cache knowing.
async fn a_refresh_does_not_join_a_computation_that_began_before_it(cache: Cache) {
    let repo = Repo::new(cache);
    repo.query_ms.store(200, Ordering::SeqCst);
    let earlier = repo.user_coalesced(1);
    let refreshed = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        repo.change(1);
        refresh(repo.user_coalesced(1)).await
    };
    let (earlier, refreshed) = futures_util::future::join(earlier, refreshed).await;
    assert_eq!(earlier.unwrap().version, 0);
    assert_eq!(refreshed.unwrap().version, 1);
}

/// A refresh whose body read the row before a write does not store what
/// it read: the write's invalidation took its lease.
async fn a_refresh_overtaken_by_a_write_stores_nothing(cache: Cache) {
    #[redis_cached(key = "race:<id>", ttl = 60, skip(repo), cache = repo.cache)]
    async fn read_then_overtaken(repo: &Repo, id: u64) -> User {
        let old = repo.select(id).await;
        if old.version == 1 {
            repo.change(id);
            let _ = repo
                .cache
                .invalidate(&read_then_overtaken_cache_key(&id))
                .await;
        }
        old
    }
    let repo = Repo::new(cache.clone());
    assert_eq!(read_then_overtaken(&repo, 1).await.version, 0);
    repo.change(1);
    // The refresh reads version 1, then a write makes it 2.
    assert_eq!(refresh(read_then_overtaken(&repo, 1)).await.version, 1);
    let (user, how) = origin(read_then_overtaken(&repo, 1)).await;
    assert_eq!((user.version, how), (2, Origin::Miss));
    cache.settled().await;
    assert_eq!(cache.stats().total.dropped_sets, 1);
}

async fn batches_follow_the_scopes(cache: Cache) {
    let repo = Repo::new(cache);
    let (_, how) = origin(repo.users(&[1, 2])).await;
    assert_eq!(how, Origin::Miss);
    assert_eq!(origin(repo.users(&[1, 2])).await.1, Origin::Hit);
    // Costliest first: one id missing makes the batch a miss.
    assert_eq!(origin(repo.users(&[1, 2, 3])).await.1, Origin::Miss);
    repo.change(1);
    repo.change(2);
    let (fresh, how) = origin(refresh(repo.users(&[1, 2]))).await;
    assert_eq!(how, Origin::Refresh);
    assert_eq!(fresh.unwrap()[&1].version, 1);
    assert_eq!(repo.user(2).await.unwrap().version, 1, "stored");
    repo.change(1);
    let before = repo.queries();
    let (direct, how) = origin(bypass(repo.users(&[1, 3]))).await;
    assert_eq!((direct.unwrap()[&1].version, how), (2, Origin::Bypassed));
    assert_eq!(repo.queries() - before, 2);
    assert_eq!(repo.user(1).await.unwrap().version, 1, "not stored");
}

async fn origin_counts_the_calls_it_saw(cache: Cache) {
    let repo = Repo::new(cache);
    assert_eq!(origin(async {}).await.1, Origin::NoCall);
    let two = async {
        repo.user(1).await.unwrap();
        repo.user(1).await.unwrap();
    };
    assert_eq!(origin(two).await.1, Origin::Several);
    // Nested: the inner one reports its own call, the outer one sees it too.
    let nested = async {
        let (_, inner) = origin(repo.user(1)).await;
        repo.user(2).await.unwrap();
        inner
    };
    assert_eq!(origin(nested).await, (Origin::Hit, Origin::Several));
    // Concurrent callers of one key, one of them reporting.
    repo.query_ms.store(100, Ordering::SeqCst);
    let leader = repo.user_coalesced(5);
    let (_, (_, how)) = futures_util::future::join(leader, async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        origin(repo.user_coalesced(5)).await
    })
    .await;
    assert_eq!(how, Origin::Coalesced);
}

/// A task spawned inside a scope is not a part of it.
async fn a_spawned_task_is_outside_the_scope(cache: Cache) {
    let repo = std::sync::Arc::new(Repo::new(cache));
    repo.user(1).await.unwrap();
    repo.change(1);
    let inside = refresh(async {
        let repo = repo.clone();
        tokio::spawn(async move { origin(repo.user(1)).await })
            .await
            .unwrap()
    })
    .await;
    assert_eq!((inside.0.unwrap().version, inside.1), (0, Origin::Hit));
}

on_every_backend!(
    a_refresh_recomputes_and_stores,
    a_bypass_neither_reads_nor_writes,
    writes_keep_the_cache_right_inside_both_scopes,
    refreshes_are_coalesced_with_single_flight,
    a_refresh_overtaken_by_a_write_stores_nothing,
    a_refresh_does_not_join_a_computation_that_began_before_it,
    batches_follow_the_scopes,
    origin_counts_the_calls_it_saw,
    a_spawned_task_is_outside_the_scope,
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Flag {
    on: bool,
}

static FLAG_QUERIES: AtomicU64 = AtomicU64::new(0);

#[redis_cached(key = "flag:<id>", ttl = 60, local = "30s")]
async fn flag(id: u64) -> Flag {
    FLAG_QUERIES.fetch_add(1, Ordering::SeqCst);
    Flag {
        on: id.is_multiple_of(2),
    }
}

/// With a local tier: a copy in process memory is a local hit; a refresh
/// does not serve it; a cache that cannot be reached is `Uncached`.
#[tokio::test]
async fn local_copies_and_an_unreachable_cache() {
    let server = RedisServer::start();
    Cache::connect(&server.url()).await.unwrap().install();
    assert_eq!(origin(flag(1)).await.1, Origin::Miss);
    assert_eq!(origin(flag(1)).await.1, Origin::Hit);
    assert_eq!(origin(flag(1)).await.1, Origin::LocalHit);
    let before = FLAG_QUERIES.load(Ordering::SeqCst);
    assert_eq!(origin(refresh(flag(1))).await.1, Origin::Refresh);
    assert_eq!(FLAG_QUERIES.load(Ordering::SeqCst), before + 1);

    let down = Repo::new(Cache::connect("redis://127.0.0.1:1").await.unwrap());
    assert_eq!(origin(down.user(1)).await.1, Origin::Uncached);
}
