use std::collections::{BTreeMap, HashMap, HashSet};

use cache_runtime::{CacheKey, invalidates, redis_cached};

#[derive(Debug)]
pub struct DbError;

#[redis_cached(key = "user:<ids>", ttl = 60, batch)]
async fn get_users(ids: &[u64]) -> Result<HashMap<u64, String>, DbError> {
    Ok(ids.iter().map(|id| (*id, id.to_string())).collect())
}

#[redis_cached(key = "tenant:<tenant>:user:<ids>", ttl = 60, batch, single_flight, cache_none)]
async fn tenant_users(tenant: &str, mut ids: Vec<u64>) -> BTreeMap<u64, String> {
    ids.sort_unstable();
    ids.into_iter().map(|id| (id, format!("{tenant}/{id}"))).collect()
}

#[redis_cached(key = "name:<names>", ttl = "1m", batch)]
async fn by_name(names: impl IntoIterator<Item = String> + Send) -> HashMap<String, u64> {
    names.into_iter().map(|n| (n, 1)).collect()
}

#[redis_cached(key = "set:<ids>", ttl = 60, batch)]
async fn from_set(ids: &HashSet<u32>) -> HashMap<u32, u32> {
    ids.iter().map(|id| (*id, *id)).collect()
}

#[invalidates(get_users(id), tenant_users(tenant, id))]
async fn rename(tenant: &str, id: u64) -> Result<(), DbError> {
    Ok(())
}

#[tokio::main]
async fn main() {
    let key: CacheKey<String> = get_users_cache_key(&4);
    assert_eq!(key.as_str(), "user:4");
    assert_eq!(get_users(&[1, 2]).await.unwrap().len(), 2);
    assert_eq!(tenant_users("t", vec![2, 1]).await.len(), 2);
    assert_eq!(by_name(vec!["a".to_owned()]).await.len(), 1);
    assert_eq!(from_set(&HashSet::from([1])).await.len(), 1);
    rename("t", 1).await.unwrap();
}
