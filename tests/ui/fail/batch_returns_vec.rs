use std::collections::HashMap;

use cache_runtime::redis_cached;

#[derive(serde::Serialize, serde::Deserialize)]
struct Product {
    id: u64,
}

#[derive(Debug)]
struct DbError;

// A batch answers with the ids it found: a map, not a list.
#[redis_cached(key = "product:<ids>", ttl = 60, batch)]
async fn products(ids: &[u64]) -> Result<Vec<Product>, DbError> {
    Ok(ids.iter().map(|&id| Product { id }).collect())
}

// Nor a set.
#[redis_cached(key = "tag:<ids>", ttl = 60, batch)]
async fn tags(ids: Vec<String>) -> std::collections::HashSet<String> {
    ids.into_iter().collect()
}

// An alias of a list is found by rustc, at the return type.
type Products = Vec<Product>;

#[redis_cached(key = "product:<ids>", ttl = 60, batch)]
async fn aliased(ids: &[u64]) -> Result<Products, DbError> {
    Ok(ids.iter().map(|&id| Product { id }).collect())
}

// A map's values must be cacheable too.
struct Price(u64);

#[redis_cached(key = "price:<ids>", ttl = 60, batch)]
async fn prices(ids: &[u64]) -> HashMap<u64, Price> {
    ids.iter().map(|&id| (id, Price(id))).collect()
}

fn main() {}
