use async_trait::async_trait;
use cache_runtime::redis_cached;

#[async_trait]
pub trait UserRepo: Send + Sync {
    async fn get_user(&self, id: u64) -> Option<String>;
}

pub struct Repo;

// Under `#[async_trait]`: `#[redis_cached]` says what to add.
#[async_trait]
impl UserRepo for Repo {
    #[redis_cached(key = "user:<id>", ttl = 60)]
    async fn get_user(&self, id: u64) -> Option<String> {
        Some(id.to_string())
    }
}

#[allow(async_fn_in_trait)]
pub trait Native {
    async fn count(&self) -> u64;
}

// Native `async fn` in a trait: rustc's own error, at the attribute.
impl Native for Repo {
    #[redis_cached(key = "count", ttl = 60)]
    async fn count(&self) -> u64 {
        7
    }
}

fn main() {}
