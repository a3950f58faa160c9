//! `#[redis_cached]` and the write attributes on methods of trait impls with
//! native `async fn` in traits: a generic impl, keys that read `self`,
//! `#[tracing::instrument]` above and below, writers in the same and in
//! another impl.

use cache_runtime::{Cache, CacheKey, cache_put, cached_impl, invalidates, redis_cached};

#[derive(Debug)]
pub struct DbError;

pub trait Db: Send + Sync {
    fn name(&self, id: u64) -> Option<String>;
}

pub struct Memory;

impl Db for Memory {
    fn name(&self, id: u64) -> Option<String> {
        (id != 0).then(|| format!("user-{id}"))
    }
}

#[allow(async_fn_in_trait)]
pub trait UserRepo {
    async fn get_user(&self, id: u64) -> Result<Option<String>, DbError>;
    async fn count(&self) -> u64;
    async fn rename(&self, id: u64, name: &str) -> Result<(), DbError>;
    async fn replace(&self, id: u64, name: String) -> Result<Option<String>, DbError>;
}

pub struct Repo<D> {
    db: D,
    tenant: String,
    cache: Cache,
}

#[cached_impl]
impl<D: Db> UserRepo for Repo<D> {
    #[tracing::instrument(skip(self))]
    #[redis_cached(key = "<self.tenant>:user:<id>", ttl = 60, cache_none, cache = self.cache)]
    async fn get_user(&self, id: u64) -> Result<Option<String>, DbError> {
        Ok(self.db.name(id))
    }

    #[redis_cached(key = "count", ttl = 60, cache = self.cache)]
    #[tracing::instrument(skip(self))]
    async fn count(&self) -> u64 {
        7
    }

    #[invalidates(Self::get_user(self, id), Self::count(), cache = self.cache)]
    async fn rename(&self, id: u64, name: &str) -> Result<(), DbError> {
        let _ = name;
        Ok(())
    }

    #[cache_put(self.get_user(id), cache = self.cache)]
    async fn replace(&self, id: u64, name: String) -> Result<Option<String>, DbError> {
        Ok(Some(name))
    }
}

#[allow(async_fn_in_trait)]
pub trait Admin {
    async fn delete(&self, id: u64) -> Result<(), DbError>;
}

// Another trait's impl names the first one's cached method: a writer needs
// no `#[cached_impl]`, it generates no item.
impl<D: Db> Admin for Repo<D> {
    #[invalidates(self.get_user(id), cache = self.cache)]
    async fn delete(&self, id: u64) -> Result<(), DbError> {
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let repo = Repo { db: Memory, tenant: "acme".into(), cache: Cache::memory() };
    let key: CacheKey<String> = repo.get_user_cache_key(&1);
    assert_eq!(key.as_str(), "acme:user:1");
    assert_eq!(Repo::<Memory>::count_cache_key().as_str(), "count");
    assert_eq!(repo.get_user(1).await.unwrap().as_deref(), Some("user-1"));
    assert_eq!(repo.get_user(0).await.unwrap(), None);
    assert_eq!(repo.count().await, 7);
    repo.rename(1, "x").await.unwrap();
    repo.replace(1, "y".into()).await.unwrap();
    repo.delete(1).await.unwrap();
}
