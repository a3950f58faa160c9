//! The write attributes on free fns, methods, trait impls and through paths.
use cache_runtime::{Cache, cache_put, invalidates, redis_cached};

mod users {
    use cache_runtime::redis_cached;

    #[redis_cached(key = "user:<id>", ttl = 60)]
    pub async fn get_user(id: u64) -> Result<String, ()> {
        Ok(id.to_string())
    }

    #[redis_cached(key = "email:<email>", ttl = 60)]
    pub async fn by_email(email: &str) -> Option<u64> {
        email.len().try_into().ok()
    }
}

struct Request {
    id: u64,
    email: String,
}

#[invalidates(users::get_user(req.id), users::by_email(&req.email))]
async fn by_path(req: &Request) -> Result<(), ()> {
    Ok(())
}

#[invalidates(crate::users::get_user(id), users::by_email(email))]
#[invalidates(key = "user:<id>:friends")]
async fn borrowed(id: u64, email: &str) {
    let _ = email;
}

#[cache_put(users::get_user(id))]
async fn put(id: u64) -> Result<String, ()> {
    Ok(format!("{id}!"))
}

struct Repo {
    cache: Cache,
    tenant: u32,
}

impl Repo {
    #[redis_cached(key = "t:<self.tenant>:<id>", ttl = 60, cache = self.cache)]
    async fn get(&self, id: u64) -> Option<u64> {
        Some(id)
    }

    #[invalidates(self.get(id), Self::get(self, id + 1), cache = self.cache)]
    async fn write(&self, id: u64) {}

    #[cache_put(self.get(id), cache = self.cache)]
    async fn put(&self, id: u64) -> Option<u64> {
        Some(id)
    }
}

trait Store {
    async fn save(&self, id: u64) -> Result<(), ()>;
}

// Writers add no items, so they work in trait impls.
impl Store for Repo {
    #[invalidates(Repo::get(self, id), cache = self.cache)]
    async fn save(&self, id: u64) -> Result<(), ()> {
        Ok(())
    }
}

fn main() {}
