//! `cachectl`, the operator's view of a `cache-runtime` cache: the command
//! line ([`Cli`]) and what each command prints ([`run`]). The reading
//! itself is the runtime's ([`cache_runtime::inspect`]); this crate is its
//! command line and its text.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cache_runtime::inspect::{
    Entry, HumanDuration, Inspection, ServerReport, TagState, Verdict, Windows,
};
use cache_runtime::{Cache, CacheError, CacheKey, Codec};
use clap::{Args, Parser, Subcommand};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "cachectl",
    version,
    about = "Inspect and invalidate the entries of a cache-runtime cache in Redis or Valkey",
    after_help = "Keys are given as the cache's functions render them, without the prefix: \
                  `get user:42` reads `<prefix>:user:42`."
)]
pub struct Cli {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

/// Where the cache is, as the service's `Cache::builder()` has it.
#[derive(Debug, Args)]
struct Connection {
    /// The server: `redis://[user:password@]host:port[/db]`, or `rediss://`
    /// for TLS.
    #[arg(
        long,
        env = "CACHE_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379",
        global = true
    )]
    url: String,
    /// A Redis Cluster: the URL of a node (repeat for more); instead of
    /// `--url`.
    #[arg(long = "cluster", value_name = "URL", global = true)]
    cluster: Vec<String>,
    /// A Sentinel service's name; its Sentinels with `--sentinel-node`.
    #[arg(
        long,
        value_name = "SERVICE",
        requires = "sentinel_node",
        global = true
    )]
    sentinel: Option<String>,
    /// A Sentinel's URL (repeat for more).
    #[arg(long, value_name = "URL", global = true)]
    sentinel_node: Vec<String>,
    /// The Sentinels' password, if they have one.
    #[arg(
        long,
        env = "CACHE_SENTINEL_PASSWORD",
        hide_env_values = true,
        global = true
    )]
    sentinel_password: Option<String>,
    /// The cache's prefix (`CacheBuilder::prefix`).
    #[arg(long, env = "CACHE_PREFIX", global = true)]
    prefix: Option<String>,
    /// A private CA's certificate (PEM file) for `rediss://`.
    #[arg(long, value_name = "PEM", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM file) for mutual TLS; with `--tls-key`.
    #[arg(long, value_name = "PEM", requires = "tls_key", global = true)]
    tls_cert: Option<std::path::PathBuf>,
    /// The client certificate's key (PEM file).
    #[arg(long, value_name = "PEM", requires = "tls_cert", global = true)]
    tls_key: Option<std::path::PathBuf>,
    /// The service uses `LocalInvalidation::Broadcast`: invalidations are
    /// announced to its processes' local tiers on pub/sub, as its writes
    /// do.
    #[arg(long, global = true)]
    broadcast: bool,
    /// The codec the service stores values with: tried first, then the
    /// other one.
    #[arg(long, value_parser = ["json", "msgpack"], default_value = "json", global = true)]
    codec: String,
    /// How long one command may take (`2s`, `500ms`).
    #[arg(long, value_parser = duration, default_value = "2s", global = true)]
    timeout: Duration,
}

/// What the entry's function keeps past its TTL: the verdict needs them.
#[derive(Debug, Args)]
struct Kept {
    /// The function's `stale = "..."` (`30s`, `5m`).
    #[arg(long, value_parser = duration)]
    stale: Option<Duration>,
    /// The function's `fail_safe = "..."`.
    #[arg(long, value_parser = duration)]
    fail_safe: Option<Duration>,
}

impl Kept {
    fn windows(&self) -> Option<Windows> {
        if self.stale.is_none() && self.fail_safe.is_none() {
            return None;
        }
        Some(Windows::new(
            self.stale.unwrap_or_default(),
            self.fail_safe.unwrap_or_default(),
        ))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// What the cache holds under a key, and what the next call would do
    /// with it.
    Get {
        /// The key, without the prefix (`user:42`).
        key: String,
        #[command(flatten)]
        kept: Kept,
    },
    /// The entries of a key template (`user:<id>`) or glob (`user:4*`),
    /// found with SCAN.
    List {
        /// A key template or a SCAN glob, without the prefix.
        pattern: String,
        /// List at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        kept: Kept,
    },
    /// Invalidate keys, or a tag, as `#[invalidates]` does (leases
    /// respected: a value being computed from older data is not stored).
    Invalidate {
        /// The keys, without the prefix.
        #[arg(required_unless_present = "tag")]
        keys: Vec<String>,
        /// A tag (`org:42`) instead: every entry stored with it.
        #[arg(long, conflicts_with = "keys")]
        tag: Option<String>,
    },
    /// The servers' memory, eviction policy, evictions and hit ratio, with
    /// what to fix.
    Server,
    /// The dead letters of a write-behind queue: changes whose flush kept
    /// failing, with the last error.
    DeadLetters {
        /// The queue's name (`WriteQueue::new("users")`: `users`).
        queue: String,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Appends a write-behind queue's dead letters to the queue again, as
    /// the newest change of their keys, for its flushers to retry.
    Replay {
        /// The queue's name.
        queue: String,
    },
}

/// Why `cachectl` failed.
#[derive(Debug)]
pub enum Error {
    /// A bad command line, or `--help` / `--version` (printed by
    /// [`clap::Error::exit`]).
    Usage(clap::Error),
    /// A file named on the command line could not be read.
    File(std::path::PathBuf, std::io::Error),
    /// The cache failed.
    Cache(CacheError),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Usage(e) => write!(f, "{e}"),
            Error::File(path, e) => write!(f, "{}: {e}", path.display()),
            Error::Cache(CacheError::CircuitOpen) => {
                write!(f, "the server did not answer (see --url, --timeout)")
            }
            Error::Cache(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<CacheError> for Error {
    fn from(error: CacheError) -> Self {
        Error::Cache(error)
    }
}

/// Runs `cachectl` with these arguments (the first is the program's
/// name) and returns what it prints.
pub async fn run<I, T>(args: I) -> Result<String, Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args).map_err(Error::Usage)?;
    let cache = connect(&cli.connection).await?;
    let mut out = String::new();
    match cli.command {
        Command::Get { key, kept } => {
            let inspection = cache.inspect(&key).await?;
            show(&mut out, &inspection, kept.windows());
        }
        Command::List {
            pattern,
            limit,
            kept,
        } => {
            let keys = cache.entries(&pattern, limit).await?;
            let width = keys.iter().map(String::len).max().unwrap_or(0).max(3);
            for key in &keys {
                let inspection = cache.inspect(key).await?;
                let _ = writeln!(
                    out,
                    "{key:width$}  {}",
                    summary(&inspection, kept.windows())
                );
            }
            let more = if keys.len() == limit {
                " (the limit: --limit for more)"
            } else {
                ""
            };
            let _ = writeln!(out, "{} entries of `{pattern}`{more}", keys.len());
        }
        Command::Invalidate { keys, tag: None } => {
            for key in keys {
                let existed = cache.invalidate(&CacheKey::new(key.as_str())).await?;
                let what = if existed { "deleted" } else { "absent" };
                let _ = writeln!(out, "invalidated {key} ({what})");
            }
        }
        Command::Invalidate { tag: Some(tag), .. } => {
            cache.invalidate_tag(&tag).await?;
            let _ = writeln!(
                out,
                "invalidated tag {tag}: its entries are misses from now on, in every process"
            );
        }
        Command::Server => {
            for report in cache.server_reports().await? {
                server(&mut out, &report);
            }
        }
        Command::DeadLetters { queue, limit } => {
            let letters = cache.dead_letters(&queue, limit).await?;
            let _ = writeln!(out, "{} dead letter(s) in queue {queue}", letters.len());
            for letter in letters {
                let version = letter.version.map(|v| v.to_string()).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{} (version {version}, {} failures): {}\n  value: {}",
                    letter.key,
                    letter.failures,
                    letter.error,
                    String::from_utf8_lossy(&letter.value)
                );
            }
        }
        Command::Replay { queue } => {
            let replayed = cache.replay_dead_letters(&queue).await?;
            let _ = writeln!(out, "replayed {replayed} change(s) of queue {queue}");
        }
    }
    Ok(out)
}

async fn connect(c: &Connection) -> Result<Cache, Error> {
    let codec = if c.codec == "msgpack" {
        Codec::MessagePack
    } else {
        Codec::Json
    };
    let mut builder = Cache::builder().op_timeout(c.timeout).codec(codec);
    if c.broadcast {
        builder = builder.local_invalidation(cache_runtime::LocalInvalidation::Broadcast);
    }
    builder = if !c.cluster.is_empty() {
        builder.cluster(c.cluster.iter().cloned())
    } else if let Some(service) = &c.sentinel {
        let mut builder = builder.sentinel(service.clone(), c.sentinel_node.iter().cloned());
        if let Some(password) = &c.sentinel_password {
            builder = builder.sentinel_password(password.clone());
        }
        builder
    } else {
        builder.url(c.url.clone())
    };
    if let Some(prefix) = &c.prefix {
        builder = builder.prefix(prefix.clone());
    }
    let read =
        |path: &std::path::PathBuf| std::fs::read(path).map_err(|e| Error::File(path.clone(), e));
    if let Some(ca) = &c.tls_ca {
        builder = builder.tls_root_certificate(read(ca)?);
    }
    if let (Some(cert), Some(key)) = (&c.tls_cert, &c.tls_key) {
        builder = builder.tls_client_certificate(read(cert)?, read(key)?);
    }
    Ok(builder.build().await?)
}

/// `get`: one entry, field by field, then its value.
fn show(out: &mut String, inspection: &Inspection, windows: Option<Windows>) {
    let mut line = |name: &str, text: &str| {
        let _ = writeln!(out, "{name:<9} {text}");
    };
    line("key", &inspection.key);
    line("state", &inspection.verdict(windows).to_string());
    match inspection.expires_in {
        Some(left) => line("ttl", &format!("{} left", human(left))),
        None if inspection.entry != Entry::Absent => line("ttl", "none (not set by this cache)"),
        None => {}
    }
    let mut value_json = None;
    match &inspection.entry {
        Entry::Value(value) => {
            let codec = match value.codec {
                Codec::Json => "JSON",
                _ => "MessagePack",
            };
            let size = match value.compressed {
                Some(plain) => format!(
                    "{} bytes, lz4-compressed from {plain}, {codec}",
                    inspection.size
                ),
                None => format!("{} bytes, {codec}", inspection.size),
            };
            line("stored", &size);
            if let Some(stamp) = value.freshness {
                line(
                    "computed",
                    &format!(
                        "in {}, stored {} (by the writer's clock)",
                        human(stamp.computed_in),
                        ago(stamp.stored_at_millis)
                    ),
                );
            }
            if !value.tags.is_empty() {
                let tags: Vec<String> = value
                    .tags
                    .iter()
                    .map(|tag| {
                        let state = match tag.state {
                            TagState::Current => "current",
                            TagState::Invalidated => "invalidated",
                            _ => "not read",
                        };
                        let from = if tag.from_value {
                            "from the value, "
                        } else {
                            ""
                        };
                        format!("{} ({from}{state})", tag.name)
                    })
                    .collect();
                line("tags", &tags.join(", "));
            }
            value_json = Some(value.json.clone());
        }
        Entry::Lease(lease) => line(
            "lease",
            &format!(
                "held by {}, taken {} (by its clock)",
                lease.holder,
                ago(lease.taken_at_millis)
            ),
        ),
        Entry::Absent | Entry::Garbage(_) => {}
        _ => line("entry", &format!("{:?}", inspection.entry)),
    }
    if let Some(lock) = &inspection.refresh_lock {
        let left = lock
            .expires_in
            .map_or(String::new(), |d| format!(", {} left", human(d)));
        line(
            "refresh",
            &format!("being recomputed by {}{left}", lock.holder),
        );
    }
    match value_json {
        Some(Some(json)) => {
            let pretty = serde_json::from_str::<serde_json::Value>(&json)
                .and_then(|v| serde_json::to_string_pretty(&v))
                .unwrap_or(json);
            let _ = writeln!(out, "value\n{pretty}");
        }
        Some(None) => {
            let _ = writeln!(out, "value     None (cache_none)");
        }
        None => {}
    }
}

/// `list`: one entry on one line.
fn summary(inspection: &Inspection, windows: Option<Windows>) -> String {
    let left =
        |d: &Option<Duration>| d.map_or("no expiry".to_owned(), |d| format!("{} left", human(d)));
    let none = matches!(&inspection.entry, Entry::Value(v) if v.json.is_none());
    let what = if none { "None" } else { "value" };
    match inspection.verdict(windows) {
        Verdict::Miss => "absent".to_owned(),
        Verdict::Fresh(d) => format!("fresh {what}, {}", left(&d)),
        Verdict::Stale(Some(d)) => format!("stale {what}, served {} more", human(d)),
        Verdict::Stale(None) => format!("stale {what}, no expiry"),
        Verdict::FailSafe(d) => format!("expired {what}, kept for fail_safe {} more", human(d)),
        Verdict::Kept(d) => format!("{what} (stale windows not given), {} left", human(d)),
        Verdict::Leased(d) => match &inspection.entry {
            Entry::Lease(lease) => format!("lease of {}, {}", lease.holder, left(&d)),
            _ => format!("lease, {}", left(&d)),
        },
        Verdict::Invalidated(tag) => format!("invalidated by tag {tag}"),
        Verdict::Replaced(why) => format!("garbage: {why}"),
        verdict => verdict.to_string(),
    }
}

/// `server`: one server's report and its warnings.
fn server(out: &mut String, report: &ServerReport) {
    let mut line = |name: &str, text: &str| {
        let _ = writeln!(out, "{name:<13} {text}");
    };
    let server = match &report.address {
        Some(address) => format!("{} at {address}", report.server),
        None => report.server.to_string(),
    };
    line("server", &server);
    let memory = if report.maxmemory > 0 {
        format!(
            "{} used of maxmemory {} ({:.0} %)",
            bytes(report.used_memory),
            bytes(report.maxmemory),
            report.used_memory as f64 * 100.0 / report.maxmemory as f64
        )
    } else {
        format!("{} used, no maxmemory", bytes(report.used_memory))
    };
    line("memory", &memory);
    line("policy", &report.maxmemory_policy);
    line(
        "evicted keys",
        &format!("{} since the server started", report.evicted_keys),
    );
    let ratio = match report.hit_ratio() {
        Some(ratio) => format!(
            "{:.1} % ({} hits, {} misses since the server started)",
            ratio * 100.0,
            report.keyspace_hits,
            report.keyspace_misses
        ),
        None => "no reads yet".to_owned(),
    };
    line("hit ratio", &ratio);
    for warning in report.warnings() {
        let _ = writeln!(out, "warning: {warning}");
    }
}

/// A duration as people read it.
fn human(d: Duration) -> String {
    HumanDuration(d).to_string()
}

/// How long ago a time in ms since the epoch was, by this host's clock.
fn ago(at_millis: u64) -> String {
    if at_millis == 0 {
        return "at a time it does not say".to_owned();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    match now.checked_sub(at_millis) {
        Some(past) => format!("{} ago", human(Duration::from_millis(past))),
        None => format!(
            "{} from now (the clocks differ)",
            human(Duration::from_millis(at_millis - now))
        ),
    }
}

/// Bytes as people read them.
fn bytes(n: u64) -> String {
    match n {
        0..1_024 => format!("{n} B"),
        1_024..1_048_576 => format!("{:.1} KiB", n as f64 / 1_024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

/// `150ms`, `30s`, `5m`, `1h`.
fn duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` has no unit: ms, s, m or h"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` does not start with a number"))?;
    let millis = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("`{unit}` is not a unit: ms, s, m or h")),
    };
    Ok(Duration::from_millis(number.saturating_mul(millis)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(duration("150ms"), Ok(Duration::from_millis(150)));
        assert_eq!(duration("5m"), Ok(Duration::from_secs(300)));
        assert!(duration("5").is_err());
        assert!(duration("5d").is_err());
        assert_eq!(human(Duration::from_millis(41_230)), "41.2 s");
        assert_eq!(bytes(2 << 20), "2.0 MiB");
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
