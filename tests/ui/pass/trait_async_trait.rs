//! `#[cached_impl]` above and below `#[async_trait]`, with
//! `#[tracing::instrument]` above and below the cache attribute, used
//! through `Arc<dyn UserRepo>`.

use std::sync::Arc;

use async_trait::async_trait;
use cache_runtime::{Cache, cache_put, cached_impl, invalidates, redis_cached};

#[derive(Debug)]
pub struct DbError;

#[async_trait]
pub trait UserRepo: Send + Sync {
    async fn get_user(&self, id: u64) -> Result<String, DbError>;
    async fn find(&self, name: &str) -> Option<u64>;
    async fn rename(&self, id: u64, name: &str) -> Result<(), DbError>;
    async fn replace(&self, id: u64, name: String) -> Result<String, DbError>;
}

pub struct Above {
    cache: Cache,
}

#[cached_impl]
#[async_trait]
impl UserRepo for Above {
    #[tracing::instrument(skip(self))]
    #[redis_cached(key = "user:<id>", ttl = 60, single_flight, cache = self.cache)]
    async fn get_user(&self, id: u64) -> Result<String, DbError> {
        Ok(format!("user-{id}"))
    }

    #[redis_cached(key = "find:<name>", ttl = 60, cache_none, cache = self.cache)]
    #[tracing::instrument(skip(self))]
    async fn find(&self, name: &str) -> Option<u64> {
        name.parse().ok()
    }

    #[invalidates(Self::get_user(id), Self::find(name), cache = self.cache)]
    async fn rename(&self, id: u64, name: &str) -> Result<(), DbError> {
        Ok(())
    }

    #[cache_put(Self::get_user(id), cache = self.cache)]
    async fn replace(&self, id: u64, name: String) -> Result<String, DbError> {
        Ok(name)
    }
}

pub struct Below {
    tenant: String,
    cache: Cache,
}

#[async_trait]
#[cached_impl]
impl UserRepo for Below {
    #[redis_cached(key = "<self.tenant>:user:<id>", ttl = 60, cache = self.cache)]
    #[tracing::instrument(skip(self))]
    async fn get_user(&self, id: u64) -> Result<String, DbError> {
        Ok(format!("{}-{id}", self.tenant))
    }

    #[tracing::instrument(skip(self))]
    #[redis_cached(key = "find:<name>", ttl = 60, cache_none, cache = self.cache)]
    async fn find(&self, name: &str) -> Option<u64> {
        name.parse().ok()
    }

    #[invalidates(self.get_user(id), Self::find(name), cache = self.cache)]
    async fn rename(&self, id: u64, name: &str) -> Result<(), DbError> {
        Ok(())
    }

    #[cache_put(self.get_user(id), cache = self.cache)]
    async fn replace(&self, id: u64, name: String) -> Result<String, DbError> {
        Ok(name)
    }
}

pub struct WritersOnly {
    cache: Cache,
}

// Writers alone need no `#[cached_impl]`, under `#[async_trait]` too.
#[async_trait]
impl UserRepo for WritersOnly {
    async fn get_user(&self, id: u64) -> Result<String, DbError> {
        Ok(id.to_string())
    }

    async fn find(&self, _name: &str) -> Option<u64> {
        None
    }

    #[invalidates(Above::get_user(id), cache = self.cache)]
    async fn rename(&self, id: u64, _name: &str) -> Result<(), DbError> {
        Ok(())
    }

    #[cache_put(Above::get_user(id), cache = self.cache)]
    async fn replace(&self, id: u64, name: String) -> Result<String, DbError> {
        Ok(name)
    }
}

#[tokio::main]
async fn main() {
    let repos: Vec<Arc<dyn UserRepo>> = vec![
        Arc::new(Above { cache: Cache::memory() }),
        Arc::new(Below { tenant: "t".into(), cache: Cache::memory() }),
        Arc::new(WritersOnly { cache: Cache::memory() }),
    ];
    for repo in repos {
        // The futures are `Send`: `#[async_trait]` requires it.
        let handle = tokio::spawn(async move {
            repo.get_user(1).await.unwrap();
            repo.find("2").await;
            repo.rename(1, "2").await.unwrap();
            repo.replace(1, "x".into()).await.unwrap()
        });
        handle.await.unwrap();
    }
    assert_eq!(Above::get_user_cache_key(&1).as_str(), "user:1");
    let below = Below { tenant: "t".into(), cache: Cache::memory() };
    assert_eq!(below.get_user_cache_key(&1).as_str(), "t:user:1");
}

pub mod models {
    #[derive(serde::Serialize, serde::Deserialize)]
    pub struct Profile {
        pub id: u64,
    }
}

#[async_trait]
pub trait Profiles: Send + Sync {
    async fn profile(&self, id: u64) -> Result<self::models::Profile, DbError>;
}

pub struct ProfileRepo {
    cache: Cache,
}

// `#[async_trait]` expands first and renames the receiver to `__self`; a
// return type named by a `self::` path stays as written.
#[async_trait]
#[cached_impl]
impl Profiles for ProfileRepo {
    #[redis_cached(key = "profile:<id>", ttl = 60, cache = self.cache)]
    async fn profile(&self, id: u64) -> Result<self::models::Profile, DbError> {
        Ok(self::models::Profile { id })
    }
}
