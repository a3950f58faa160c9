//! The operator's view against real servers: `Cache::inspect`,
//! `Cache::entries` and `Cache::server_reports`, and `cachectl` (the
//! `cache-cli` package), which prints them. Each kind of entry is written
//! by a cached function (or planted, for garbage) and shown by `cachectl
//! get`; the output is a snapshot (`tests/snapshots/`), its clocks, TTLs
//! and process ids masked. `INSTA_UPDATE=always cargo test -p
//! cache-harness --test operator` rewrites the snapshots.

use std::sync::Arc;
use std::time::Duration;

use cache_harness::{RedisCluster, RedisServer, Server, raw, raw_connection, wait_for};
use cache_runtime::inspect::{Entry, Holder, ServerKind, TagState, Verdict, Windows};
use cache_runtime::{Cache, CacheKey, Codec, redis_cached};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[path = "support/logs.rs"]
mod logs;
use logs::Logs;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    id: u64,
    name: String,
    categories: Vec<String>,
}

fn product(id: u64) -> Product {
    Product {
        id,
        name: format!("product {id}"),
        categories: vec!["tools".into(), "garden".into()],
    }
}

fn categories(product: &Product) -> Vec<String> {
    product
        .categories
        .iter()
        .map(|c| format!("category:{c}"))
        .collect()
}

/// A service with one cached function of each kind.
struct Shop {
    cache: Cache,
    /// Bodies of `slow` wait for it.
    gate: Notify,
}

impl Shop {
    fn new(cache: Cache) -> Arc<Shop> {
        Arc::new(Shop {
            cache,
            gate: Notify::new(),
        })
    }

    #[redis_cached(key = "product:<id>", ttl = 60, cache_none, none_ttl = 30, cache = self.cache)]
    async fn product(&self, id: u64) -> Option<Product> {
        (id != 0).then(|| product(id))
    }

    #[redis_cached(key = "page:<id>", ttl = 60, cache = self.cache)]
    async fn page(&self, id: u64) -> Vec<Product> {
        (0..6).map(|at| product(id * 100 + at)).collect()
    }

    #[redis_cached(key = "fresh:<id>", ttl = 60, stale = "30s", cache = self.cache)]
    async fn fresh(&self, id: u64) -> Product {
        product(id)
    }

    #[redis_cached(key = "member:<org>:<id>", ttl = 60, tags = ["org:<org>"], tags_from = categories, cache = self.cache)]
    async fn member(&self, org: u64, id: u64) -> Product {
        product(org * 1000 + id)
    }

    #[redis_cached(key = "slow:<id>", ttl = 60, cache = self.cache)]
    async fn slow(&self, id: u64) -> Product {
        self.gate.notified().await;
        product(id)
    }

    #[redis_cached(key = "refresh:<id>", ttl = "1s", stale = "1m", skip(wait), cache = self.cache)]
    async fn refreshed(&self, id: u64, wait: bool) -> Product {
        if wait {
            self.gate.notified().await;
        }
        product(id)
    }
}

/// A cache of the shop, with an op timeout and a lease long enough for a
/// busy machine (a lease is shown while its body waits).
fn shop_cache(server: &RedisServer) -> cache_runtime::CacheBuilder {
    op_timeout_2s(server)
        .prefix("shop")
        .lease(Duration::from_secs(60))
}

/// `cachectl --url <server> --prefix shop <args>`, its output masked.
async fn cachectl(server: &RedisServer, args: &[&str]) -> String {
    let url = server.url();
    let mut argv = vec!["cachectl", "--url", &url, "--prefix", "shop"];
    argv.extend_from_slice(args);
    let out = cache_cli::run(argv).await.expect("cachectl runs");
    format!("$ cachectl {}\n{}", args.join(" "), mask(&out))
}

/// `text` with what changes from run to run masked: durations (`41.2 s`,
/// `3 min 5 s`, whatever their unit), sizes (a freshness header holds the
/// body's time) and the process ids in leases.
fn mask(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        let mut masked: Vec<String> = Vec::new();
        let mut at = 0;
        while at < words.len() {
            let word = words[at];
            let number = !word.is_empty() && word.chars().all(|c| c.is_ascii_digit() || c == '.');
            let unit = words.get(at + 1).map(|w| w.trim_end_matches([',', ')']));
            if number && unit == Some("bytes") {
                masked.push("<N>".to_owned());
                at += 1;
                continue;
            }
            if number && matches!(unit, Some("ms" | "s" | "min" | "h")) {
                let tail = &words[at + 1][unit.unwrap().len()..];
                if masked.last().is_some_and(|w| w == "<T>") {
                    masked.pop();
                }
                masked.push(format!("<T>{tail}"));
                at += 2;
                continue;
            }
            masked.push(match at.checked_sub(1).map(|p| words[p]) {
                Some("pid") => "<PID>,".to_owned(),
                Some("instance") => format!("<INSTANCE>{}", &word[word.len().min(8)..]),
                _ => word.to_owned(),
            });
            at += 1;
        }
        out.push_str(&masked.join(" "));
        out.push('\n');
    }
    out
}

#[tokio::test]
async fn every_kind_of_entry_as_cachectl_shows_it() {
    let server = RedisServer::start();
    let shop = Shop::new(shop_cache(&server).build().await.unwrap());
    let compressing = Shop::new(
        shop_cache(&server)
            .compress_above(64)
            .build()
            .await
            .unwrap(),
    );
    let msgpack = Shop::new(
        shop_cache(&server)
            .codec(Codec::MessagePack)
            .build()
            .await
            .unwrap(),
    );
    shop.product(1).await;
    shop.product(0).await;
    compressing.page(2).await;
    msgpack.product(3).await;
    shop.fresh(4).await;
    shop.member(7, 5).await;
    shop.member(8, 6).await;
    shop.cache.invalidate_tag("org:8").await.unwrap();
    let mut conn = raw_connection(&server).await;
    raw::<()>(&mut conn, &[b"SET", b"shop:product:9", b"{not json"]).await;
    // A lease: `slow`'s body waits while its key is shown.
    let leader = tokio::spawn({
        let shop = shop.clone();
        async move { shop.slow(10).await }
    });
    let leased = wait_for(
        Duration::from_secs(10),
        Duration::from_millis(5),
        async || {
            let found = shop.cache.inspect("slow:10").await.unwrap();
            matches!(found.entry, Entry::Lease(_))
        },
    )
    .await;
    assert!(leased.is_some(), "the lease was taken");

    let mut transcript = String::new();
    for key in [
        "product:1",
        "product:0",
        "page:2",
        "product:3",
        "fresh:4",
        "member:7:5",
        "member:8:6",
        "product:9",
        "slow:10",
        "product:404",
    ] {
        transcript.push_str(&cachectl(&server, &["get", key]).await);
        transcript.push('\n');
    }
    transcript.push_str(&cachectl(&server, &["get", "fresh:4", "--stale", "30s"]).await);
    transcript.push('\n');
    transcript.push_str(&cachectl(&server, &["list", "product:<id>"]).await);
    println!("{transcript}");
    insta::assert_snapshot!("entries", transcript);

    // The lease is this process's.
    let Entry::Lease(lease) = shop.cache.inspect("slow:10").await.unwrap().entry else {
        panic!("a lease")
    };
    assert_eq!(lease.holder, Holder::this_process());
    shop.gate.notify_one();
    assert_eq!(leader.await.unwrap(), product(10));
    // Tags: current, then invalidated.
    let Entry::Value(member) = shop.cache.inspect("member:7:5").await.unwrap().entry else {
        panic!("a value")
    };
    assert!(member.tags.iter().all(|t| t.state == TagState::Current));
    assert_eq!(member.tags.len(), 3, "{member:?}");
    let out = cachectl(&server, &["invalidate", "--tag", "category:tools"]).await;
    assert!(out.contains("invalidated tag category:tools"), "{out}");
    let after = shop.cache.inspect("member:7:5").await.unwrap();
    assert_eq!(
        after.verdict(None),
        Verdict::Invalidated("category:tools".into())
    );
    // A key invalidation as `#[invalidates]` does it.
    let out = cachectl(&server, &["invalidate", "product:1", "product:404"]).await;
    assert_eq!(
        out,
        "$ cachectl invalidate product:1 product:404\ninvalidated product:1 (deleted)\ninvalidated product:404 (absent)\n"
    );
    assert_eq!(
        shop.cache.inspect("product:1").await.unwrap().entry,
        Entry::Absent
    );
}

#[tokio::test]
async fn a_stale_entry_and_its_refresh_lock() {
    let server = RedisServer::start();
    let shop = Shop::new(shop_cache(&server).build().await.unwrap());
    shop.refreshed(1, false).await;
    let windows = Some(Windows::new(Duration::from_secs(60), Duration::ZERO));
    // Fresh for its 1 s TTL (stale already, on a machine slow enough).
    let fresh = shop.cache.inspect("refresh:1").await.unwrap();
    assert!(
        matches!(
            fresh.verdict(windows),
            Verdict::Fresh(Some(d)) if d <= Duration::from_secs(1)
        ) || matches!(fresh.verdict(windows), Verdict::Stale(_)),
        "{fresh:?}"
    );
    let stale = wait_for(
        Duration::from_secs(10),
        Duration::from_millis(20),
        async || {
            let found = shop.cache.inspect("refresh:1").await.unwrap();
            matches!(found.verdict(windows), Verdict::Stale(_))
        },
    )
    .await;
    assert!(stale.is_some(), "stale after its 1 s TTL");
    // A stale hit: this caller recomputes it (its body waits) while the
    // others are served the stale value.
    let refresher = tokio::spawn({
        let shop = shop.clone();
        async move { shop.refreshed(1, true).await }
    });
    let locked = wait_for(
        Duration::from_secs(10),
        Duration::from_millis(5),
        async || {
            let found = shop.cache.inspect("refresh:1").await.unwrap();
            found
                .refresh_lock
                .is_some_and(|l| l.holder == Holder::this_process())
        },
    )
    .await;
    assert!(
        locked.is_some(),
        "the refresh lock is shown with its holder"
    );
    assert_eq!(shop.refreshed(1, false).await, product(1), "served stale");
    shop.gate.notify_one();
    assert_eq!(refresher.await.unwrap(), product(1));
}

#[tokio::test]
async fn the_entries_of_a_template_on_a_cluster() {
    let cluster = RedisCluster::shared();
    let cache = Cache::builder()
        .cluster(cluster.seeds())
        .prefix(format!("operator-{}", std::process::id()))
        .build()
        .await
        .unwrap();
    let shop = Shop::new(cache);
    for id in 1..=40 {
        shop.product(id).await;
    }
    shop.fresh(1).await;
    let mut entries = shop.cache.entries("product:<id>", 1_000).await.unwrap();
    let mut expected: Vec<String> = (1..=40).map(|id| format!("product:{id}")).collect();
    entries.sort();
    expected.sort();
    assert_eq!(
        entries, expected,
        "every primary scanned, no other template"
    );
    assert_eq!(
        shop.cache.entries("product:<id>", 5).await.unwrap().len(),
        5
    );
    assert_eq!(
        shop.cache.entries("product:1*", 100).await.unwrap().len(),
        11
    );
    let reports = shop.cache.server_reports().await.unwrap();
    assert_eq!(
        reports.len(),
        cluster.seeds().len() / 2,
        "one per primary: {reports:?}"
    );
    for report in &reports {
        assert!(report.address.is_some());
        assert_eq!(report.server.kind, expected_kind());
    }
}

fn expected_kind() -> ServerKind {
    match Server::chosen() {
        Server::Redis => ServerKind::Redis,
        Server::Valkey => ServerKind::Valkey,
    }
}

/// What connecting a cache to `server` logs.
async fn logs_of_connecting(server: &RedisServer) -> String {
    let logs = Logs::default();
    let guard = logs.capture();
    let _cache = op_timeout_2s(server).build().await.unwrap();
    drop(guard);
    logs.text()
}

/// A cache builder for `server` whose connect-time `INFO` has 2 s, on a
/// busy machine.
fn op_timeout_2s(server: &RedisServer) -> cache_runtime::CacheBuilder {
    Cache::builder()
        .url(server.url())
        .op_timeout(Duration::from_secs(2))
}

#[tokio::test]
async fn a_policy_that_refuses_writes_is_warned_of_once_at_connect() {
    const WARNING: &str = "maxmemory-policy is noeviction: once memory is full";
    let refusing =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let logs = logs_of_connecting(&refusing).await;
    println!("noeviction, maxmemory 2mb:\n{logs}");
    // (Only the warning is asserted: an `info` line whose call site
    // another test thread reached first, with no subscriber, may be
    // filtered out by `tracing`'s cached interest.)
    assert_eq!(logs.matches(WARNING).count(), 1, "{logs}");
    let evicting =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"]);
    let logs = logs_of_connecting(&evicting).await;
    println!("allkeys-lru, maxmemory 2mb:\n{logs}");
    assert_eq!(logs.matches(WARNING).count(), 0, "{logs}");

    let out = cachectl(&refusing, &["server"]).await;
    println!("{out}");
    let kind = match expected_kind() {
        ServerKind::Redis => "server        Redis ",
        _ => "server        Valkey ",
    };
    assert!(out.contains(kind), "{out}");
    assert!(out.contains("policy        noeviction\n"), "{out}");
    assert!(out.contains("of maxmemory 2.0 MiB"), "{out}");
    assert!(out.contains(&format!("warning: {WARNING}")), "{out}");
}

#[tokio::test]
async fn evictions_are_counted_as_the_server_reports_them() {
    let server =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"]);
    let cache = op_timeout_2s(&server).build().await.unwrap();
    // The first reading (at connect) is the baseline.
    let before = cache.server_reports().await.unwrap()[0].evicted_keys;
    let value = "x".repeat(10_000);
    for id in 0..600u64 {
        let key = CacheKey::new(format!("doc:{id}"));
        let set = redis::cmd("SET")
            .arg(cache.redis_key(&key))
            .arg(&value)
            .arg("EX")
            .arg(60)
            .clone();
        let _: Result<(), _> = cache.command(&set).await;
    }
    let reports = cache.server_reports().await.unwrap();
    let evicted = reports[0].evicted_keys - before;
    let counted = cache.stats().server.evicted_keys;
    println!("evicted_keys grew by {evicted}; the cache counted {counted}; {reports:?}");
    assert!(evicted > 0, "the server evicted");
    assert_eq!(counted, evicted, "every eviction since connecting counted");
    assert_eq!(reports[0].server.kind, expected_kind());
}

#[tokio::test]
async fn a_user_that_may_not_run_info_is_served_and_counts_no_evictions() {
    let server = RedisServer::start();
    let mut conn = raw_connection(&server).await;
    let fence: [&[u8]; 10] = [
        b"ACL",
        b"SETUSER",
        b"shop",
        b"on",
        b">pw",
        b"~shop:*",
        b"&shop:*",
        b"+@all",
        b"-@dangerous",
        b"+role",
    ];
    raw::<()>(&mut conn, &fence).await;
    let url = server.url().replace("redis://", "redis://shop:pw@");
    let shop = Shop::new(
        Cache::builder()
            .url(url)
            .prefix("shop")
            .build()
            .await
            .unwrap(),
    );
    let refused = shop.cache.server_reports().await.unwrap_err();
    assert!(refused.is_not_permitted(), "{refused}");
    assert_eq!(shop.product(1).await, Some(product(1)));
    assert_eq!(shop.product(1).await, Some(product(1)));
    let stats = shop.cache.stats();
    assert_eq!((stats.total.hits, stats.total.misses), (1, 1));
    assert_eq!(stats.total.errors, 0, "a refused INFO is not a cache error");
    assert_eq!(stats.server.evicted_keys, 0);
}
