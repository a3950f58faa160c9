//! `crate = "..."` for crates that re-export cache_runtime under another path.
mod facade {
    pub use ::cache_runtime as cache;
}

#[facade::cache::redis_cached(key = "user:<id>", ttl = 60, crate = "facade::cache")]
async fn get_user(id: u64) -> u64 {
    id
}

fn main() {
    let _ = get_user_cache_key(&1);
}
