//! The expansion compiles cleanly under strict lints (clippy's pedantic
//! group is checked by `tests/lint_pedantic.rs` under `cargo clippy`).
#![deny(warnings, missing_docs, unused_qualifications, unused_results)]

//! Crate docs.

use cache_runtime::{cache_put, invalidates, redis_cached};

/// A user id.
#[redis_cached(key = "user:<id>", ttl = 60, jitter = 0.1, version = 3)]
pub async fn get_user(id: u64) -> Result<u64, ()> {
    Ok(id)
}

/// Renames a user.
#[invalidates(get_user(id), key = "user:<id>:friends")]
pub async fn rename_user(id: u64, name: String) -> Result<(), ()> {
    drop(name);
    Ok(())
}

/// Stores a user.
#[cache_put(get_user(id))]
pub async fn put_user(id: u64) -> Result<u64, ()> {
    Ok(id)
}

fn main() {
    let _ = get_user_cache_key(&1);
}
