//! The expansion is clean under `clippy::pedantic`: `cargo clippy
//! --all-targets -- -D warnings` (run by `.ci/run`) checks this file with the
//! lints denied below.
#![deny(warnings, clippy::pedantic)]

use cache_runtime::{Cache, KeyPart, cache_put, invalidates, redis_cached};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct User {
    id: u64,
}

#[derive(Debug)]
struct DbError;

struct Org {
    id: u32,
}

struct Repo {
    tenant: String,
    cache: Cache,
}

impl Repo {
    #[redis_cached(key = "t:<self.tenant>:user:<id>", ttl = 60, tags = ["t:<self.tenant>"], cache = self.cache, jitter = 0.1)]
    async fn user(&self, id: u64) -> Result<User, DbError> {
        Ok(User { id })
    }

    #[redis_cached(key = "t:org:<org.id>", ttl = "5m", version = 2, tags = ["org:<org.id>"], cache = self.cache)]
    async fn org_size(&self, org: &Org) -> Option<u32> {
        Some(org.id)
    }

    #[redis_cached(key = "t:find:<name>", ttl = 60, tags_from = user_tags, ttl_from = user_ttl, unless = is_root, cache = self.cache)]
    async fn find(&self, name: &str) -> Result<Option<User>, DbError> {
        Ok((!name.is_empty()).then_some(User { id: 1 }))
    }

    #[invalidates(self.user(id), Self::find(name), key = "t:org:<id>", tag = "org:<id>", cache = self.cache)]
    async fn rename(&self, id: u64, name: &str) -> Result<(), DbError> {
        let _ = (id, name);
        Ok(())
    }

    #[invalidates(self.user(ret.id), cache = self.cache)]
    async fn create(&self) -> Result<User, DbError> {
        Ok(User { id: 7 })
    }

    #[cache_put(self.user(id), cache = self.cache)]
    async fn put(&self, id: u64) -> Result<User, DbError> {
        Ok(User { id })
    }
}

#[redis_cached(key = "fs:<id>", ttl = 60, fail_safe = "1h", soft_timeout = "150ms", skip(cache), cache = cache)]
async fn fail_safe_user(cache: Cache, id: u64) -> Result<User, DbError> {
    Ok(User { id })
}

fn user_ttl(user: &User) -> Option<std::time::Duration> {
    (user.id > 1).then_some(std::time::Duration::from_secs(5))
}

fn is_root(user: &User) -> bool {
    user.id == 0
}

fn user_tags(user: &User) -> [String; 1] {
    [format!("user:{}", user.id)]
}

#[redis_cached(key = "g:<id>", ttl = 60, skip(label))]
async fn generic<K: KeyPart + Into<u64> + Copy + Send>(id: K, label: &str) -> u64 {
    let _ = label;
    id.into()
}

#[redis_cached(key = "unit:<flag>", ttl = 60)]
async fn unit(flag: bool) {
    let _ = flag;
}

#[tokio::test]
async fn pedantic_expansions_run() {
    let repo = Repo {
        tenant: "acme".to_owned(),
        cache: Cache::memory(),
    };
    assert_eq!(repo.user(1).await.unwrap().id, 1);
    assert_eq!(repo.org_size(&Org { id: 3 }).await, Some(3));
    assert!(repo.find("x").await.unwrap().is_some());
    assert_eq!(generic(5u8, "x").await, 5);
    unit(true).await;
    assert_eq!(repo.user_cache_key(&1).as_str(), "t:acme:user:1");
    repo.rename(1, "x").await.unwrap();
    repo.put(2).await.unwrap();
    assert_eq!(repo.cache.stats().total.sets, 4, "three misses and one put");
}
