//! `#[redis_cached]` end to end: every behaviour is checked on a real
//! `redis-server` (started on a free loopback port) and on `Cache::memory()`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cache_harness::{RedisServer, on_every_backend, raw, raw_connection};
use cache_runtime::{Cache, redis_cached};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

/// The "old" shape of a value, as an earlier deployment would have stored it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LegacyUser {
    id: String,
}

#[derive(Debug, PartialEq)]
struct DbError;

/// A data source that counts how often its bodies run.
struct Repo {
    cache: Cache,
    calls: AtomicU64,
    fail_next: AtomicBool,
}

impl Repo {
    fn new(cache: Cache) -> Self {
        Repo {
            cache,
            calls: AtomicU64::new(0),
            fail_next: AtomicBool::new(false),
        }
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn load(&self, id: u64) -> Result<User, DbError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(DbError);
        }
        Ok(User {
            id,
            name: format!("user-{id}"),
        })
    }

    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    async fn get_user(&self, id: u64) -> Result<User, DbError> {
        self.load(id)
    }

    #[redis_cached(key = "short:<id>", ttl = "300ms", cache = self.cache)]
    async fn short_lived(&self, id: u64) -> Result<User, DbError> {
        self.load(id)
    }

    #[redis_cached(key = "user:<id>", ttl = 60, version = 2, cache = self.cache)]
    async fn get_user_v2(&self, id: u64) -> Result<User, DbError> {
        self.load(id)
    }

    /// Same key as `get_user`, older value type: reading one with the other
    /// is an undecodable entry.
    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    async fn get_legacy_user(&self, id: u64) -> LegacyUser {
        self.calls.fetch_add(1, Ordering::SeqCst);
        LegacyUser { id: id.to_string() }
    }

    #[redis_cached(key = "find:<name>", ttl = 60, cache = self.cache)]
    async fn find(&self, name: &str) -> Option<User> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        (name != "nobody").then(|| User {
            id: 1,
            name: name.to_owned(),
        })
    }

    #[redis_cached(key = "lookup:<id>", ttl = 60, cache = self.cache)]
    async fn lookup(&self, id: u64) -> Result<Option<User>, DbError> {
        self.load(id).map(|u| (id != 0).then_some(u))
    }
}

async fn hit_after_miss(cache: Cache) {
    let repo = Repo::new(cache.clone());
    for _ in 0..10 {
        assert_eq!(repo.get_user(42).await.unwrap().name, "user-42");
    }
    cache.settled().await;
    let stats = cache.stats().function("get_user").unwrap();
    println!("hit_after_miss: body runs = {}, {stats:?}", repo.calls());
    assert_eq!(repo.calls(), 1, "one miss, then hits");
    assert_eq!((stats.misses, stats.hits, stats.sets), (1, 9, 1));
    assert!((cache.stats().hit_ratio() - 0.9).abs() < 1e-9);

    repo.get_user(43).await.unwrap();
    assert_eq!(repo.calls(), 2, "another id is another entry");
}

async fn err_is_not_cached(cache: Cache) {
    let repo = Repo::new(cache.clone());
    repo.fail_next.store(true, Ordering::SeqCst);
    assert_eq!(repo.get_user(7).await, Err(DbError));
    assert_eq!(repo.get_user(7).await.unwrap().id, 7);
    assert_eq!(repo.get_user(7).await.unwrap().id, 7);
    println!("err_is_not_cached: body runs = {}", repo.calls());
    assert_eq!(repo.calls(), 2, "the Err was not cached, the Ok was");
    cache.settled().await;
    assert_eq!(cache.stats().total.sets, 1);
}

async fn ttl_expires(cache: Cache) {
    let repo = Repo::new(cache);
    repo.short_lived(1).await.unwrap();
    repo.short_lived(1).await.unwrap();
    assert_eq!(repo.calls(), 1);
    tokio::time::sleep(Duration::from_millis(450)).await;
    repo.short_lived(1).await.unwrap();
    println!("ttl_expires: body runs = {}", repo.calls());
    assert_eq!(repo.calls(), 2, "the entry expired after 300 ms");
}

async fn version_changes_the_key(cache: Cache) {
    assert_eq!(Repo::get_user_cache_key(&5).as_str(), "user:5");
    assert_eq!(Repo::get_user_v2_cache_key(&5).as_str(), "user:5:v2");
    let repo = Repo::new(cache);
    repo.get_user(5).await.unwrap();
    repo.get_user_v2(5).await.unwrap();
    repo.get_user_v2(5).await.unwrap();
    assert_eq!(
        repo.calls(),
        2,
        "v2 does not read the v1 entry, then hits its own"
    );
}

async fn undecodable_entry_is_a_miss_and_is_overwritten(cache: Cache) {
    let repo = Repo::new(cache.clone());
    // An older deployment stored another shape under the same key.
    repo.get_legacy_user(9).await;
    assert_eq!(repo.get_user(9).await.unwrap().name, "user-9");
    assert_eq!(repo.get_user(9).await.unwrap().name, "user-9");
    let stats = cache.stats().function("get_user").unwrap();
    println!("undecodable: body runs = {}, {stats:?}", repo.calls());
    assert_eq!(
        repo.calls(),
        2,
        "legacy write + one recompute; the third call hit"
    );
    assert_eq!((stats.errors, stats.misses, stats.hits), (1, 1, 1));
}

async fn option_shapes_cache_only_present_values(cache: Cache) {
    let repo = Repo::new(cache);
    assert!(repo.find("ada").await.is_some());
    assert!(repo.find("ada").await.is_some());
    assert_eq!(repo.calls(), 1, "Some is cached");
    assert!(repo.find("nobody").await.is_none());
    assert!(repo.find("nobody").await.is_none());
    assert_eq!(repo.calls(), 3, "None is not cached");

    let repo = Repo::new(repo.cache.clone());
    assert!(repo.lookup(0).await.unwrap().is_none());
    assert!(repo.lookup(0).await.unwrap().is_none());
    assert!(repo.lookup(4).await.unwrap().is_some());
    assert!(repo.lookup(4).await.unwrap().is_some());
    assert_eq!(repo.calls(), 3, "Ok(None) twice uncached, Ok(Some) once");
}

async fn hostile_strings_get_distinct_entries(cache: Cache) {
    let repo = Repo::new(cache);
    let names = ["a:b", "a", "a%3Ab", "*", "{x}", "a b", "a\nb", ""];
    for name in names {
        assert_eq!(repo.find(name).await.unwrap().name, name);
    }
    for name in names {
        assert_eq!(
            repo.find(name).await.unwrap().name,
            name,
            "hit returns its own value"
        );
    }
    assert_eq!(repo.calls(), names.len() as u64);
    assert_eq!(Repo::find_cache_key("a:b*").as_str(), "find:a%3Ab%2A");
}

on_every_backend!(
    hit_after_miss,
    err_is_not_cached,
    ttl_expires,
    version_changes_the_key,
    undecodable_entry_is_a_miss_and_is_overwritten,
    option_shapes_cache_only_present_values,
    hostile_strings_get_distinct_entries,
);

#[tokio::test]
async fn redis_holds_readable_json_under_the_prefixed_key_with_the_ttl() {
    let server = RedisServer::start();
    let cache = Cache::builder()
        .url(server.url())
        .prefix("app")
        .build()
        .await
        .unwrap();
    let repo = Repo::new(cache);
    repo.get_user(42).await.unwrap();
    repo.cache.settled().await;
    let mut conn = raw_connection(&server).await;
    let stored: String = raw(&mut conn, &[b"GET", b"app:user:42"]).await;
    assert_eq!(stored, r#"{"id":42,"name":"user-42"}"#);
    let pttl: i64 = raw(&mut conn, &[b"PTTL", b"app:user:42"]).await;
    assert!((59_000..=60_000).contains(&pttl), "PTTL {pttl}");
}

#[tokio::test]
async fn invalidate_removes_the_entry() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let repo = Repo::new(cache.clone());
    repo.get_user(11).await.unwrap();
    assert!(
        cache
            .invalidate(&Repo::get_user_cache_key(&11))
            .await
            .unwrap()
    );
    assert!(
        !cache
            .invalidate(&Repo::get_user_cache_key(&11))
            .await
            .unwrap()
    );
    repo.get_user(11).await.unwrap();
    assert_eq!(repo.calls(), 2);
    assert_eq!(cache.stats().total.invalidations, 2);
}

#[tokio::test]
async fn malformed_url_is_the_only_connect_error() {
    let err = Cache::connect("http://nope").await.unwrap_err();
    assert!(err.to_string().contains("invalid Redis URL"), "{err}");
    let err = Cache::builder()
        .prefix("has space")
        .memory()
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid key prefix"), "{err}");
    let err = Cache::builder().build().await.unwrap_err();
    assert!(err.to_string().contains("no backend"), "{err}");
}
