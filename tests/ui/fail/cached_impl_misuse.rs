use cache_runtime::cached_impl;

pub struct Repo;

#[cached_impl]
async fn not_an_impl() {}

#[cached_impl(single_flight)]
impl Repo {
    async fn get(&self) -> u64 {
        1
    }
}

fn main() {}
