use cache_runtime::redis_cached;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct User {
    id: u64,
}

type AppResult<T> = Result<T, String>;

#[redis_cached(key = "a:<id>", ttl = 60)]
async fn with_anyhow(id: u64) -> anyhow::Result<User> {
    if id == 0 {
        anyhow::bail!("no user 0");
    }
    Ok(User { id })
}

#[redis_cached(key = "io:<id>", ttl = 60)]
async fn with_io(id: u64) -> std::io::Result<Option<User>> {
    let parsed: u64 = "1".parse().map_err(std::io::Error::other)?;
    Ok(Some(User { id: id + parsed }))
}

#[redis_cached(key = "app:<id>", ttl = 60)]
async fn with_alias(id: u64) -> AppResult<User> {
    let _check = u8::try_from(id).map_err(|e| e.to_string())?;
    Ok(User { id })
}

#[redis_cached(key = "early:<id>", ttl = 60)]
async fn early_return(id: u64) -> Result<u64, String> {
    if id > 10 {
        return Err("too big".into());
    }
    Ok(id)
}

#[tokio::main]
async fn main() {
    assert!(with_anyhow(0).await.is_err());
    assert_eq!(with_anyhow(1).await.unwrap().id, 1);
    assert_eq!(with_io(1).await.unwrap().unwrap().id, 2);
    assert!(with_alias(300).await.is_err());
    assert!(early_return(11).await.is_err());
}
