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

struct Repo {
    cache: Cache,
    tenant: String,
}

impl Repo {
    #[redis_cached(key = "<self.tenant>:doc:<id>", ttl = 60, tags = ["<self.tenant>:docs"], cache = self.cache)]
    async fn doc(&self, id: u64) -> Option<String> {
        Some(id.to_string())
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
    let _ = Repo::drop_docs;
}
