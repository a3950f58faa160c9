//! `ttl_from` and `unless`: paths to functions of the cached value, whose
//! wrong signatures are reported at the path.

use std::time::Duration;

use cache_runtime::{cache_put, redis_cached};

/// A string is not a path.
#[redis_cached(key = "a:<id>", ttl = 60, ttl_from = "order_ttl", unless = "is_draft")]
async fn a(id: u64) -> u64 {
    id
}

/// `ttl_from` returns `Option<Duration>`, not seconds.
#[redis_cached(key = "b:<id>", ttl = 60, ttl_from = seconds)]
async fn b(id: u64) -> Result<u64, ()> {
    Ok(id)
}

fn seconds(_: &u64) -> u64 {
    60
}

/// `unless` takes the value, not the whole result.
#[redis_cached(key = "c:<id>", ttl = 60, unless = failed)]
async fn c(id: u64) -> Result<u64, ()> {
    Ok(id)
}

fn failed(result: &Result<u64, ()>) -> bool {
    result.is_err()
}

/// A put of `c` obeys `c`'s `unless`; its own mistakes are `c`'s.
#[cache_put(c(id))]
async fn put_c(id: u64) -> Result<u64, ()> {
    Ok(id)
}

fn ok_ttl(_: &u64) -> Option<Duration> {
    None
}

/// Right signatures compile.
#[redis_cached(key = "d:<id>", ttl = 60, ttl_from = ok_ttl, unless = never)]
async fn d(id: u64) -> u64 {
    id
}

fn never(_: &u64) -> bool {
    false
}

fn main() {}
