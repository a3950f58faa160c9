//! Generated code must not depend on the user's names for prelude items.
#![allow(dead_code)]

use ::cache_runtime::redis_cached;

struct Result;
struct Option;
struct String;
struct Box;
struct Some;
struct None;
struct Ok;
mod core {}
mod std {}
mod cache_runtime {}

#[::cache_runtime::redis_cached(key = "user:<id>", ttl = 60)]
async fn get_user(id: u64) -> ::core::result::Result<u64, ()> {
    ::core::result::Result::Ok(id)
}

#[redis_cached(key = "maybe:<id>", ttl = 60)]
async fn maybe(id: u64) -> ::core::option::Option<u64> {
    ::core::option::Option::Some(id)
}

#[::cache_runtime::invalidates(get_user(id), key = "user:<id>")]
async fn rename(id: u64) -> ::core::result::Result<(), ()> {
    ::core::result::Result::Ok(())
}

#[::cache_runtime::cache_put(get_user(id))]
async fn put(id: u64) -> ::core::result::Result<u64, ()> {
    ::core::result::Result::Ok(id)
}

fn main() {
    let _ = get_user_cache_key(&1);
    let _ = maybe_cache_key(&1);
}
