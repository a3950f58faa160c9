use cache_runtime::{cache_put, invalidates};

#[invalidates]
async fn no_target(id: u64) {
    let _ = id;
}

#[invalidates(42, ttl = 60, cahce = CACHE)]
async fn not_a_target(id: u64) {
    let _ = id;
}

#[invalidates(get_user(id))]
fn not_async(id: u64) {
    let _ = id;
}

#[cache_put(key = "user:<id>")]
async fn put_template(id: u64) -> u64 {
    id
}

#[cache_put(get_user(id), get_user(id))]
async fn put_twice(id: u64) -> u64 {
    id
}

fn main() {}
