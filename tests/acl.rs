//! Inside a tenant's fence: a shared Redis gives each application an ACL
//! user fenced to its own key prefix and channels
//! (`~app:* &app:* +@all -@dangerous`, and `+role`, which writes ask to
//! learn how many replicas to wait for, and `+info`, which the cache reads
//! at connect and to count evictions). With `prefix("app")` and that user,
//! every option of the cache keeps to the fence: values, leases, refresh
//! locks, batches, the local tier (tracking and broadcast), invalidations,
//! write-through and clearing. The server's `ACL LOG` stays empty and no
//! cache error is counted; on a standalone server and on a 3+3 cluster.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cache_harness::{RedisCluster, RedisServer, raw, raw_connection};
use cache_runtime::{Cache, CacheBuilder, LocalInvalidation, cache_put, invalidates, redis_cached};
use serde::{Deserialize, Serialize};

/// The fence, as the README gives it.
const FENCE: [&str; 8] = [
    ">apppw",
    "~app:*",
    "&app:*",
    "+@all",
    "-@dangerous",
    "+role",
    "+info",
    "on",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Row {
    id: u64,
    version: u64,
}

#[derive(Debug, PartialEq)]
struct DbError;

struct App {
    cache: Cache,
    broadcast: Cache,
    version: AtomicU64,
}

impl App {
    fn row(&self, id: u64) -> Row {
        Row {
            id,
            version: self.version.load(Ordering::SeqCst),
        }
    }

    #[redis_cached(key = "plain:<id>", ttl = 60, cache = self.cache)]
    async fn plain(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.row(id))
    }

    #[redis_cached(key = "flight:<id>", ttl = 60, single_flight, cache = self.cache)]
    async fn flight(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.row(id))
    }

    #[redis_cached(key = "dist:<id>", ttl = 60, single_flight = "distributed", cache = self.cache)]
    async fn distributed(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.row(id))
    }

    #[redis_cached(key = "stale:<id>", ttl = "100ms", stale = "30s", cache = self.cache)]
    async fn stale(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.row(id))
    }

    #[redis_cached(key = "early:<id>", ttl = "100ms", early_refresh = 2.0, cache = self.cache)]
    async fn early(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.row(id))
    }

    #[redis_cached(key = "none:<id>", ttl = 60, cache_none, cache = self.cache)]
    async fn none(&self, id: u64) -> Result<Option<Row>, DbError> {
        Ok(id.is_multiple_of(2).then(|| self.row(id)))
    }

    #[redis_cached(key = "plain:<ids>", ttl = 60, batch, single_flight, cache = self.cache)]
    async fn batch(&self, ids: &[u64]) -> Result<HashMap<u64, Row>, DbError> {
        Ok(ids.iter().map(|&id| (id, self.row(id))).collect())
    }

    #[redis_cached(key = "local:<id>", ttl = 60, local = "5s", cache = self.cache)]
    async fn local(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.row(id))
    }

    /// Tagged: its tags' tokens are keys under the prefix too.
    #[redis_cached(key = "tagged:<id>", ttl = 60, tags = ["row:<id>", "rows"], single_flight, cache = self.cache)]
    async fn tagged(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.row(id))
    }

    #[redis_cached(key = "tagged_local:<id>", ttl = 60, tags = ["row:<id>"], local = "5s", cache = self.cache)]
    async fn tagged_local(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.row(id))
    }

    #[redis_cached(key = "bcast:<id>", ttl = 60, local = "5s", cache = self.broadcast)]
    async fn local_broadcast(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.row(id))
    }

    #[invalidates(
        Self::plain(id),
        Self::flight(id),
        Self::distributed(id),
        Self::stale(id),
        Self::early(id),
        Self::none(id),
        Self::local(id),
        tag = "row:<id>",
        cache = self.cache
    )]
    async fn write(&self, id: u64) -> Result<(), DbError> {
        self.version.fetch_add(1, Ordering::SeqCst);
        let _ = id;
        Ok(())
    }

    #[invalidates(Self::local_broadcast(id), cache = self.broadcast)]
    async fn write_broadcast(&self, id: u64) -> Result<(), DbError> {
        let _ = id;
        Ok(())
    }

    #[cache_put(Self::plain(id), cache = self.cache)]
    async fn put(&self, id: u64) -> Result<Row, DbError> {
        self.version.fetch_add(1, Ordering::SeqCst);
        Ok(self.row(id))
    }
}

/// Every option, twice over, with writes, refreshes and clears between.
async fn every_option(app: &App) {
    for round in 0..3 {
        for id in 0..4 {
            app.plain(id).await.unwrap();
            app.flight(id).await.unwrap();
            app.distributed(id).await.unwrap();
            app.stale(id).await.unwrap();
            app.early(id).await.unwrap();
            app.none(id).await.unwrap();
            app.local(id).await.unwrap();
            app.local(id).await.unwrap();
            app.local_broadcast(id).await.unwrap();
            app.local_broadcast(id).await.unwrap();
            app.tagged(id).await.unwrap();
            app.tagged_local(id).await.unwrap();
            app.tagged_local(id).await.unwrap();
        }
        app.batch(&[0, 1, 2, 3, 4, 5]).await.unwrap();
        // Past the TTLs: `stale` and `early` refresh under their locks.
        tokio::time::sleep(Duration::from_millis(150)).await;
        for id in 0..4 {
            app.stale(id).await.unwrap();
            app.early(id).await.unwrap();
        }
        app.write(round).await.unwrap();
        app.write_broadcast(round).await.unwrap();
        app.put(round + 1).await.unwrap();
    }
    cache_harness::landed(app.cache.invalidate_tag("rows").await);
    app.cache.clear_prefix("plain:").await.unwrap();
    app.cache.clear().await.unwrap();
}

async fn fenced(builder: CacheBuilder) -> Cache {
    builder.prefix("app").build().await.expect("the URLs parse")
}

/// The counts of the app's caches, checked: no cache error, and the local
/// tiers answered.
fn check(what: &str, app: &App) {
    let stats = app.cache.stats().total;
    let broadcast = app.broadcast.stats().total;
    println!("{what}: {stats:?}; broadcast cache: {broadcast:?}");
    assert_eq!(
        (stats.errors, broadcast.errors),
        (0, 0),
        "{what}: cache errors"
    );
    assert!(stats.refreshes > 0, "{what}: refreshes ran");
    assert!(
        stats.local_hits > 0 && broadcast.local_hits > 0,
        "{what}: the local tiers answered"
    );
}

fn app(cache: Cache, broadcast: Cache) -> App {
    App {
        cache,
        broadcast,
        version: AtomicU64::new(1),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_option_keeps_to_the_fence_on_a_server() {
    let mut args = vec!["--user", "app"];
    args.extend(FENCE);
    let server = RedisServer::start_with(&args);
    let url = format!("redis://app:apppw@127.0.0.1:{}/", server.port());
    let app = app(
        fenced(Cache::builder().url(&url)).await,
        fenced(
            Cache::builder()
                .url(&url)
                .local_invalidation(LocalInvalidation::Broadcast),
        )
        .await,
    );
    every_option(&app).await;
    app.cache.settled().await;
    let mut admin = raw_connection(&server).await;
    let log: Vec<redis::Value> = raw(&mut admin, &[b"ACL", b"LOG"]).await;
    println!("server: ACL LOG has {} entries: {log:?}", log.len());
    assert!(log.is_empty(), "the server refused commands: {log:?}");
    check("server", &app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_option_keeps_to_the_fence_on_a_cluster() {
    // One shell word each: the nodes are started through `sh`.
    let fence: Vec<String> = FENCE.iter().map(|rule| format!("'{rule}'")).collect();
    let user = format!("--user app {}", fence.join(" "));
    let cluster = RedisCluster::start_with(&[&user]);
    let seeds: Vec<String> = cluster
        .seeds()
        .iter()
        .map(|seed| seed.replace("redis://", "redis://app:apppw@"))
        .collect();
    let app = app(
        fenced(Cache::builder().cluster(seeds.clone())).await,
        fenced(
            Cache::builder()
                .cluster(seeds)
                .local_invalidation(LocalInvalidation::Broadcast),
        )
        .await,
    );
    every_option(&app).await;
    let mut refused = Vec::new();
    for port in cluster.ports() {
        let log = cluster.cli(port, &["ACL", "LOG"]).unwrap_or_default();
        if !log.trim().is_empty() {
            refused.push((port, log));
        }
    }
    println!(
        "cluster: ACL LOG entries on {} nodes: {refused:?}",
        refused.len()
    );
    assert!(refused.is_empty(), "nodes refused commands: {refused:?}");
    check("cluster", &app);
}
