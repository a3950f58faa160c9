use std::fmt::Display;

use cache_runtime::{KeyPart, redis_cached};

trait Db: Sync {
    fn name(&self) -> String;
}

struct Postgres;

impl Db for Postgres {
    fn name(&self) -> String {
        "pg".into()
    }
}

// `D` appears only in a skipped parameter: the key fn does not carry it.
#[redis_cached(key = "label:<id>", ttl = 60, skip(db))]
async fn label<D: Db, K>(db: &D, id: K) -> String
where
    K: KeyPart + Display + Send,
{
    format!("{}:{id}", db.name())
}

#[redis_cached(key = "echo:<value>", ttl = 60)]
async fn echo<'a>(value: &'a str) -> String {
    value.to_owned()
}

#[redis_cached(key = "pair:<pair.0>:<pair.1>", ttl = 60)]
async fn pair(pair: (u8, char)) -> String {
    format!("{}{}", pair.0, pair.1)
}

#[redis_cached(key = "imp:<id>", ttl = 60)]
async fn with_impl(id: impl KeyPart + Copy + Into<u64>) -> u64 {
    id.into()
}

#[tokio::main]
async fn main() {
    assert_eq!(label_cache_key(&5u8).as_str(), "label:5");
    assert_eq!(label(&Postgres, 5u8).await, "pg:5");
    assert_eq!(echo_cache_key(&"a:b").as_str(), "echo:a%3Ab");
    assert_eq!(echo("x").await, "x");
    assert_eq!(pair_cache_key(&(1, 'z')).as_str(), "pair:1:z");
    assert_eq!(pair((1, 'z')).await, "1z");
    assert_eq!(with_impl(4u32).await, 4);
}
