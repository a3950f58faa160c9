//! Repository traits as services write them, cached by attributes alone:
//! `#[async_trait]` impls used as `Arc<dyn UserRepo>` and a generic impl
//! with native `async fn` in traits. Hits, invalidation and write-through
//! through trait methods, on a real `redis-server` and on `Cache::memory()`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cache_harness::on_every_backend;
use cache_runtime::{Cache, cache_put, cached_impl, invalidates, redis_cached};

#[derive(Debug, PartialEq)]
pub struct DbError;

#[async_trait]
pub trait UserRepo: Send + Sync {
    async fn get_user(&self, id: u64) -> Result<Option<String>, DbError>;
    async fn rename(&self, id: u64, name: &str) -> Result<(), DbError>;
    async fn upsert(&self, id: u64, name: String) -> Result<Option<String>, DbError>;
    fn queries(&self) -> u64;
}

/// The table the repositories read.
#[derive(Default)]
pub struct Table {
    rows: Mutex<HashMap<u64, String>>,
    queries: AtomicU64,
}

impl Table {
    fn select(&self, id: u64) -> Option<String> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        self.rows.lock().unwrap().get(&id).cloned()
    }
    fn update(&self, id: u64, name: &str) {
        self.rows.lock().unwrap().insert(id, name.to_owned());
    }
}

pub struct SqlRepo {
    table: Table,
    cache: Cache,
}

#[cached_impl]
#[async_trait]
impl UserRepo for SqlRepo {
    #[tracing::instrument(skip(self))]
    #[redis_cached(key = "user:<id>", ttl = 60, cache_none, single_flight, cache = self.cache)]
    async fn get_user(&self, id: u64) -> Result<Option<String>, DbError> {
        Ok(self.table.select(id))
    }

    #[invalidates(Self::get_user(id), cache = self.cache)]
    async fn rename(&self, id: u64, name: &str) -> Result<(), DbError> {
        self.table.update(id, name);
        Ok(())
    }

    #[cache_put(Self::get_user(id), cache = self.cache)]
    async fn upsert(&self, id: u64, name: String) -> Result<Option<String>, DbError> {
        self.table.update(id, &name);
        Ok(Some(name))
    }

    fn queries(&self) -> u64 {
        self.table.queries.load(Ordering::SeqCst)
    }
}

async fn through_a_trait_object(cache: Cache) {
    let table = Table::default();
    table.update(1, "ada");
    let repo: Arc<dyn UserRepo> = Arc::new(SqlRepo { table, cache });
    for _ in 0..5 {
        assert_eq!(repo.get_user(1).await.unwrap().as_deref(), Some("ada"));
        assert_eq!(repo.get_user(2).await.unwrap(), None);
    }
    assert_eq!(repo.queries(), 2, "one query per id, None included");
    repo.rename(1, "grace").await.unwrap();
    assert_eq!(repo.get_user(1).await.unwrap().as_deref(), Some("grace"));
    repo.upsert(2, "linus".into()).await.unwrap();
    assert_eq!(repo.get_user(2).await.unwrap().as_deref(), Some("linus"));
    println!("trait object: {} queries", repo.queries());
    assert_eq!(repo.queries(), 3, "the write-through value was a hit");
    assert_eq!(SqlRepo::get_user_cache_key(&1).as_str(), "user:1");
}

pub trait Db: Send + Sync {
    fn table(&self) -> &Table;
}

impl Db for Table {
    fn table(&self) -> &Table {
        self
    }
}

#[allow(async_fn_in_trait)]
pub trait Accounts {
    async fn balance(&self, account: u64) -> Option<u64>;
    async fn deposit(&self, account: u64, amount: u64) -> Result<(), DbError>;
}

pub struct Ledger<D> {
    db: D,
    tenant: String,
    cache: Cache,
}

#[cached_impl]
impl<D: Db> Accounts for Ledger<D> {
    #[redis_cached(key = "<self.tenant>:balance:<account>", ttl = 60, cache = self.cache)]
    async fn balance(&self, account: u64) -> Option<u64> {
        self.db
            .table()
            .select(account)
            .map(|v| v.parse().unwrap_or(0))
    }

    #[invalidates(self.balance(account), cache = self.cache)]
    async fn deposit(&self, account: u64, amount: u64) -> Result<(), DbError> {
        let old: u64 = self.balance(account).await.unwrap_or(0);
        self.db.table().update(account, &(old + amount).to_string());
        Ok(())
    }
}

async fn generic_native_impl(cache: Cache) {
    let ledger = Ledger {
        db: Table::default(),
        tenant: "acme".into(),
        cache,
    };
    ledger.deposit(7, 10).await.unwrap();
    ledger.deposit(7, 5).await.unwrap();
    assert_eq!(ledger.balance(7).await, Some(15));
    assert_eq!(ledger.balance(7).await, Some(15));
    assert_eq!(ledger.balance_cache_key(&7).as_str(), "acme:balance:7");
    let queries = ledger.db.queries.load(Ordering::SeqCst);
    println!("generic impl: {queries} queries");
    assert_eq!(
        queries, 3,
        "two deposits read it, then one miss and one hit"
    );
}

on_every_backend!(through_a_trait_object, generic_native_impl);

/// A second implementation of the same trait in the same module: its
/// methods have the same names as `SqlRepo`'s.
pub struct ReplicaRepo {
    table: Table,
    cache: Cache,
}

#[cached_impl]
#[async_trait]
impl UserRepo for ReplicaRepo {
    #[redis_cached(key = "replica:user:<id>", ttl = 60, cache = self.cache)]
    async fn get_user(&self, id: u64) -> Result<Option<String>, DbError> {
        Ok(self.table.select(id))
    }

    #[invalidates(Self::get_user(id), cache = self.cache)]
    async fn rename(&self, id: u64, name: &str) -> Result<(), DbError> {
        self.table.update(id, name);
        Ok(())
    }

    #[cache_put(Self::get_user(id), cache = self.cache)]
    async fn upsert(&self, id: u64, name: String) -> Result<Option<String>, DbError> {
        self.table.update(id, &name);
        Ok(Some(name))
    }

    fn queries(&self) -> u64 {
        self.table.queries.load(Ordering::SeqCst)
    }
}

/// Statistics name a method after its impl, so two implementations of one
/// trait in one module are counted apart; write functions are listed
/// apart from cached ones, whose hit ratios they would skew.
#[tokio::test]
async fn stats_count_each_impl_apart_and_writers_apart() {
    let cache = Cache::memory();
    let sql = SqlRepo {
        table: Table::default(),
        cache: cache.clone(),
    };
    let replica = ReplicaRepo {
        table: Table::default(),
        cache: cache.clone(),
    };
    for _ in 0..3 {
        sql.get_user(1).await.unwrap();
    }
    replica.get_user(1).await.unwrap();
    sql.rename(1, "ada").await.unwrap();
    replica.upsert(1, "grace".into()).await.unwrap();

    let stats = cache.stats();
    println!(
        "functions: {:?}",
        stats.functions.keys().collect::<Vec<_>>()
    );
    println!("writers: {:?}", stats.writers.keys().collect::<Vec<_>>());
    let sql_reads = stats.functions["traits::<SqlRepo as UserRepo>::get_user"];
    let replica_reads = stats.functions["traits::<ReplicaRepo as UserRepo>::get_user"];
    assert_eq!((sql_reads.misses, sql_reads.hits), (1, 2));
    assert_eq!((replica_reads.misses, replica_reads.hits), (1, 0));
    assert_eq!(
        stats.writers["traits::<SqlRepo as UserRepo>::rename"].invalidations,
        1
    );
    assert_eq!(
        stats.writers["traits::<ReplicaRepo as UserRepo>::upsert"].sets,
        1
    );
    assert!(
        stats
            .functions
            .keys()
            .all(|name| name.ends_with("::get_user")),
        "no write function among the cached ones"
    );
    // By its last segments, as before.
    assert_eq!(
        stats.function("<SqlRepo as UserRepo>::get_user"),
        Some(sql_reads)
    );
    assert_eq!(stats.function("get_user").unwrap().calls(), 4);
}
