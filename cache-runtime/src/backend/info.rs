//! What a server says about itself (`INFO`): which server it is, its
//! memory against `maxmemory`, its eviction policy, its evictions and hit
//! ratio; and what of that an operator should be warned about. Pure: the
//! reading is `Cache::server_reports` (`cache/servers.rs`).

use std::fmt;

/// One server's `INFO`, as [`Cache::server_reports`](crate::Cache::server_reports)
/// reads it (on a cluster, one per primary).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerReport {
    /// The primary's address on a cluster (`host:port`); `None` for the
    /// server of a standalone or Sentinel deployment.
    pub address: Option<String>,
    /// Which server it is.
    pub server: Server,
    /// What the server's process changes when it restarts (`run_id`).
    pub run_id: String,
    /// Bytes used (`used_memory`).
    pub used_memory: u64,
    /// The memory limit (`maxmemory`); 0: none.
    pub maxmemory: u64,
    /// What the server does when memory is full (`maxmemory_policy`).
    pub maxmemory_policy: String,
    /// Keys evicted since the server started, all of its keys, not only
    /// this cache's (`evicted_keys`).
    pub evicted_keys: u64,
    /// Reads that found their key since the server started, every
    /// client's (`keyspace_hits`).
    pub keyspace_hits: u64,
    /// Reads that did not (`keyspace_misses`).
    pub keyspace_misses: u64,
}

/// Which server a deployment runs, told at connect from `INFO server`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Server {
    /// Its name.
    pub kind: ServerKind,
    /// Its version (`7.0.15`, `8.0.1`).
    pub version: String,
}

/// The Redis-compatible servers the cache is tested on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerKind {
    /// Redis (`redis_version`, and no `server_name` of another server).
    Redis,
    /// Valkey (`server_name:valkey`, `valkey_version`).
    Valkey,
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.kind {
            ServerKind::Redis => "Redis",
            ServerKind::Valkey => "Valkey",
        };
        write!(f, "{name} {}", self.version)
    }
}

/// What an operator should know about a server that serves a cache.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Warning {
    /// `maxmemory-policy noeviction` with a `maxmemory`: once memory is
    /// full, every cache write fails (`OOM`) and new entries are never
    /// stored.
    NoEviction,
    /// `noeviction` and no `maxmemory`: the server grows until its host
    /// runs out of memory.
    Unbounded,
    /// Fewer than 70 % of the server's reads found their key (over at
    /// least 1,000 reads): mostly misses, so the cache costs more than it
    /// saves, or its TTLs are too short for how often keys are read.
    LowHitRatio(f64),
}

/// Below this share of hits, [`Warning::LowHitRatio`].
const LOW_HIT_RATIO: f64 = 0.7;
/// Reads before a hit ratio is worth a warning.
const FEWEST_READS: u64 = 1_000;

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::NoEviction => write!(
                f,
                "maxmemory-policy is noeviction: once memory is full every cache write fails \
                 (OOM); use allkeys-lru or allkeys-lfu for a cache"
            ),
            Warning::Unbounded => write!(
                f,
                "maxmemory-policy is noeviction and maxmemory is not set: the server grows until \
                 its host runs out of memory; set maxmemory and allkeys-lru or allkeys-lfu"
            ),
            Warning::LowHitRatio(ratio) => write!(
                f,
                "hit ratio {:.1} % is below 70 %: mostly misses (TTLs too short for how often \
                 keys are read, or keys that are rarely read twice)",
                ratio * 100.0
            ),
        }
    }
}

impl ServerReport {
    /// A report from `INFO`'s text (its server, memory and stats sections
    /// at least); what it lacks is empty or zero.
    pub(crate) fn parse(address: Option<String>, info: &str) -> ServerReport {
        let field = |name: &str| {
            info.lines().find_map(|line| {
                let (key, value) = line.trim_end().split_once(':')?;
                (key == name).then_some(value)
            })
        };
        let number = |name: &str| field(name).and_then(|v| v.parse().ok()).unwrap_or(0);
        let server = match (field("server_name"), field("valkey_version")) {
            (Some("valkey"), _) | (_, Some(_)) => Server {
                kind: ServerKind::Valkey,
                version: field("valkey_version")
                    .or(field("redis_version"))
                    .unwrap_or("?")
                    .to_owned(),
            },
            _ => Server {
                kind: ServerKind::Redis,
                version: field("redis_version").unwrap_or("?").to_owned(),
            },
        };
        ServerReport {
            address,
            server,
            run_id: field("run_id").unwrap_or_default().to_owned(),
            used_memory: number("used_memory"),
            maxmemory: number("maxmemory"),
            maxmemory_policy: field("maxmemory_policy").unwrap_or_default().to_owned(),
            evicted_keys: number("evicted_keys"),
            keyspace_hits: number("keyspace_hits"),
            keyspace_misses: number("keyspace_misses"),
        }
    }

    /// The share of the server's reads that found their key; `None`
    /// before any read.
    pub fn hit_ratio(&self) -> Option<f64> {
        let reads = self.keyspace_hits + self.keyspace_misses;
        (reads > 0).then(|| self.keyspace_hits as f64 / reads as f64)
    }

    /// What an operator should be warned of.
    pub fn warnings(&self) -> Vec<Warning> {
        let mut warnings = Vec::new();
        if self.maxmemory_policy == "noeviction" {
            warnings.push(if self.maxmemory > 0 {
                Warning::NoEviction
            } else {
                Warning::Unbounded
            });
        }
        if self.keyspace_hits + self.keyspace_misses >= FEWEST_READS
            && let Some(ratio) = self.hit_ratio().filter(|&r| r < LOW_HIT_RATIO)
        {
            warnings.push(Warning::LowHitRatio(ratio));
        }
        warnings
    }

    /// Whether cache writes will fail once memory is full: what the cache
    /// warns of when it connects.
    pub(crate) fn refuses_writes_when_full(&self) -> bool {
        self.maxmemory_policy == "noeviction" && self.maxmemory > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REDIS: &str = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc\r\n# Memory\r\nused_memory:1048576\r\nmaxmemory:2097152\r\nmaxmemory_policy:noeviction\r\n# Stats\r\nkeyspace_hits:600\r\nkeyspace_misses:400\r\nevicted_keys:3\r\n";
    const VALKEY: &str = "# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:8.0.1\r\n# Memory\r\nmaxmemory:0\r\nmaxmemory_policy:allkeys-lru\r\n";

    #[test]
    fn info_is_read_and_warned_of() {
        let redis = ServerReport::parse(None, REDIS);
        assert_eq!(redis.server.to_string(), "Redis 7.0.15");
        assert_eq!(
            (redis.used_memory, redis.maxmemory, redis.evicted_keys),
            (1 << 20, 2 << 20, 3)
        );
        assert_eq!(redis.hit_ratio(), Some(0.6));
        assert_eq!(
            redis.warnings(),
            [Warning::NoEviction, Warning::LowHitRatio(0.6)]
        );
        assert!(redis.refuses_writes_when_full());
        let valkey = ServerReport::parse(Some("n:1".into()), VALKEY);
        assert_eq!(valkey.server.to_string(), "Valkey 8.0.1");
        assert_eq!(valkey.hit_ratio(), None);
        assert!(valkey.warnings().is_empty());
        let unbounded = REDIS.replace("maxmemory:2097152", "maxmemory:0");
        let unbounded = ServerReport::parse(None, &unbounded);
        assert_eq!(unbounded.warnings()[0], Warning::Unbounded);
        assert!(!unbounded.refuses_writes_when_full());
        assert_eq!(
            ServerReport::parse(None, "# Server\r\n").server.version,
            "?"
        );
    }
}
