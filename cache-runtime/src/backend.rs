//! Where bytes are stored: Redis or process memory. Static dispatch over an
//! enum; the `Cache` adds timeouts, the circuit breaker and the codec.

mod memory;
mod redis;

pub(crate) use self::memory::MemoryBackend;
pub(crate) use self::redis::RedisBackend;

use crate::error::CacheError;

#[derive(Debug)]
pub(crate) enum Backend {
    Redis(RedisBackend),
    Memory(MemoryBackend),
}

impl Backend {
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        match self {
            Backend::Redis(r) => r.get(key).await,
            Backend::Memory(m) => Ok(m.get(key)),
        }
    }

    pub(crate) async fn set(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl_millis: u64,
    ) -> Result<(), CacheError> {
        match self {
            Backend::Redis(r) => r.set(key, &value, ttl_millis).await,
            Backend::Memory(m) => {
                m.set(key, value, ttl_millis);
                Ok(())
            }
        }
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        match self {
            Backend::Redis(r) => r.delete(key).await,
            Backend::Memory(m) => Ok(m.delete(key)),
        }
    }
}
