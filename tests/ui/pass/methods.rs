use std::sync::Arc;

use cache_runtime::{Cache, CacheKey, redis_cached};

struct Users {
    tenant: String,
    cache: Cache,
}

impl Users {
    #[redis_cached(key = "tenant:<self.tenant>:user:<id>", ttl = 60, cache = self.cache)]
    async fn get_user(&self, id: u64) -> Option<String> {
        Some(format!("{}/{id}", self.tenant))
    }

    #[redis_cached(key = "count", ttl = "5m")]
    pub async fn count(&self) -> u64 {
        7
    }

    #[redis_cached(key = "arc:<self.tenant>:<id>", ttl = 60, cache = self.cache)]
    async fn shared(self: Arc<Self>, id: u32) -> u32 {
        id
    }

    #[redis_cached(key = "owned:<id>", ttl = 1, cache = self.cache)]
    async fn by_value(self, id: u32) -> u32 {
        let _moved = self.tenant;
        id
    }
}

#[tokio::main]
async fn main() {
    let users = Users { tenant: "acme".into(), cache: Cache::memory() };
    let key: CacheKey<String> = users.get_user_cache_key(&1);
    assert_eq!(key.as_str(), "tenant:acme:user:1");
    assert_eq!(Users::count_cache_key().as_str(), "count");
    assert_eq!(users.get_user(1).await.as_deref(), Some("acme/1"));
    assert_eq!(users.count().await, 7);
    let shared = Arc::new(Users { tenant: "t".into(), cache: Cache::memory() });
    assert_eq!(shared.shared_cache_key(&2).as_str(), "arc:t:2");
    assert_eq!(Arc::clone(&shared).shared(2).await, 2);
    assert_eq!(users.by_value(3).await, 3);
}
