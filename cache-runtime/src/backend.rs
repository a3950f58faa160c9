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
    /// Whether the backend can be used again after failures (the circuit
    /// breaker's probe). Memory always can.
    pub(crate) async fn check(&self) -> Result<(), CacheError> {
        match self {
            Backend::Redis(r) => r.check().await,
            Backend::Memory(_) => Ok(()),
        }
    }

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

    pub(crate) async fn set_if_absent(
        &self,
        key: &str,
        value: &[u8],
        ttl_millis: u64,
    ) -> Result<bool, CacheError> {
        match self {
            Backend::Redis(r) => r.set_if_absent(key, value, ttl_millis).await,
            Backend::Memory(m) => Ok(m.set_if_absent(key, value.to_vec(), ttl_millis)),
        }
    }

    /// Sets `value` only if the stored value starts with `expected`.
    pub(crate) async fn compare_and_set(
        &self,
        key: &str,
        expected: &[u8],
        value: Vec<u8>,
        ttl_millis: u64,
    ) -> Result<bool, CacheError> {
        match self {
            Backend::Redis(r) => r.compare_and_set(key, expected, &value, ttl_millis).await,
            Backend::Memory(m) => Ok(m.compare_and_set(key, expected, value, ttl_millis)),
        }
    }

    pub(crate) async fn compare_and_delete(
        &self,
        key: &str,
        expected: &[u8],
    ) -> Result<bool, CacheError> {
        match self {
            Backend::Redis(r) => r.compare_and_delete(key, expected).await,
            Backend::Memory(m) => Ok(m.compare_and_delete(key, expected)),
        }
    }

    /// Deletes keys; how many existed.
    pub(crate) async fn delete(&self, keys: &[String]) -> Result<u64, CacheError> {
        match self {
            Backend::Redis(r) => r.delete(keys).await,
            Backend::Memory(m) => Ok(m.delete(keys)),
        }
    }
}
