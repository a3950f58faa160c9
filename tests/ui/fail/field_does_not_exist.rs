use cache_runtime::redis_cached;

struct Org {
    id: u64,
}

#[redis_cached(key = "org:<org.idd>", ttl = 60)]
async fn get_org(org: &Org) -> u64 {
    org.id
}

fn main() {}
