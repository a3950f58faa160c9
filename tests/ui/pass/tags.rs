//! Tags on free fns and methods, over fields and `self`, with writes.
use cache_runtime::{Cache, invalidates, redis_cached};

struct Org {
    id: u64,
}

#[redis_cached(key = "member:<org.id>:<user_id>", ttl = 60, tags = ["org:<org.id>", "members", "{org}:<org.id>"])]
async fn member(org: &Org, user_id: u64) -> Result<u64, ()> {
    Ok(org.id + user_id)
}

#[invalidates(tag = "org:<org.id>", tag = "members")]
#[invalidates(member(org, user_id))]
async fn remove_member(org: &Org, user_id: u64) -> Result<(), ()> {
    let _ = (org, user_id);
    Ok(())
}

/// Tags the value names: a list, or any iterator of strings.
#[redis_cached(key = "listing:<category>", ttl = 60, tags_from = listing_tags, single_flight, stale = "30s")]
async fn listing(category: &str) -> Result<Vec<u64>, std::io::Error> {
    Ok(vec![category.len() as u64])
}

fn listing_tags(ids: &[u64]) -> impl IntoIterator<Item = String> + use<'_> {
    ids.iter().map(|id| format!("product:{id}"))
}

#[redis_cached(key = "by_sku:<sku>", ttl = 60, tags = ["skus"], tags_from = sku_tags, local = "5s")]
async fn by_sku(sku: &str) -> Option<u64> {
    Some(sku.len() as u64)
}

/// A batch's values name their tags too, each its own.
#[redis_cached(key = "by_sku:<skus>", ttl = 60, batch, tags = ["skus"], tags_from = sku_tags)]
async fn by_skus(skus: &[String]) -> std::collections::HashMap<String, u64> {
    skus.iter().map(|sku| (sku.clone(), sku.len() as u64)).collect()
}

fn sku_tags(id: &u64) -> [String; 1] {
    [format!("product:{id}")]
}

struct Repo {
    cache: Cache,
    tenant: String,
}

impl Repo {
    #[redis_cached(key = "<self.tenant>:doc:<id>", ttl = 60, tags = ["<self.tenant>:docs"], cache = self.cache)]
    async fn doc(&self, id: u64) -> Option<String> {
        Some(id.to_string())
    }

    #[redis_cached(key = "<self.tenant>:title:<id>", ttl = 60, tags_from = Self::title_tags, cache = self.cache)]
    async fn title(&self, id: u64) -> String {
        id.to_string()
    }

    fn title_tags(title: &String) -> Vec<String> {
        vec![format!("title:{title}")]
    }

    #[invalidates(key = "<self.tenant>:doc:<id>", tag = "<self.tenant>:docs", cache = self.cache)]
    async fn drop_docs(&self, id: u64) {
        let _ = id;
    }
}

fn main() {
    let key = member_cache_key(&Org { id: 4 }, &2);
    assert_eq!(
        key.tags().collect::<Vec<_>>(),
        ["org:4", "members", "{org}:4"]
    );
    let _ = Repo::doc_cache_key;
    let _ = remove_member;
    let _ = (listing, by_sku, by_skus, Repo::title);
    let _ = Repo::drop_docs;
}
