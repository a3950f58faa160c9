//! The load generator: real HTTP over loopback against the service, rounds
//! of a fixed mix, every read checked against the database's row versions.
//!
//! The mix: 75 % lookups of existing ids, 5 % lookups of ids that do not
//! exist, 10 % batch lookups (`GET /users?ids=`, 18 existing ids and 2
//! missing ones), 10 % renames. Ids are Zipf-distributed (s = 1.0), so a
//! few users are hot, as in real traffic; the workers' random streams are
//! seeded, so every arm of a round sees the same requests.
//!
//! The arms take turns in rounds. Every cached arm starts each of its rounds
//! on an empty cache (a fresh key prefix): the uncached arm's renames go
//! around the cache, which would otherwise hold rows they changed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_harness::history::{self, Event, History, Op, read_your_writes};
use cache_runtime::Cache;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};

use crate::db::{Db, User};

/// Any failure of a run.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// How much load, of what shape.
#[derive(Debug, Clone)]
pub struct Config {
    /// Existing ids are `1..=users`.
    pub users: i64,
    /// Ids `users + 1..=users + missing` never exist.
    pub missing: i64,
    /// Concurrent HTTP clients.
    pub concurrency: usize,
    /// Each arm's turn ends after this long...
    pub round: Duration,
    /// ...or after this many requests, whichever comes first.
    pub requests_per_round: u64,
    /// Turns of each arm.
    pub rounds: usize,
}

/// One way of serving the same API.
pub struct Arm {
    /// For the table.
    pub name: &'static str,
    /// Where its server listens.
    pub address: SocketAddr,
    /// Whether its repository caches: it then gets a fresh installed cache
    /// each round.
    pub cached: bool,
}

/// Where the cached arms' cache lives.
pub enum CacheAt {
    /// A Redis server.
    Redis(String),
    /// The in-process cache.
    Memory,
}

impl CacheAt {
    async fn fresh(&self, tag: &str) -> Result<Cache, Error> {
        Ok(match self {
            CacheAt::Redis(url) => Cache::builder().url(url).prefix(tag).build().await?,
            CacheAt::Memory => Cache::memory(),
        })
    }
}

/// What one arm did over all its rounds.
#[derive(Debug, Default)]
pub struct Report {
    /// The arm's name.
    pub name: &'static str,
    /// Requests completed.
    pub requests: u64,
    /// Requests that failed (transport error or a 5xx).
    pub failed: u64,
    /// Time under load.
    pub seconds: f64,
    /// Request latencies, ms, sorted.
    pub latencies: Vec<f64>,
    /// The same by kind of request (`KINDS`), sorted.
    pub latencies_by_kind: [Vec<f64>; 4],
    /// SQL queries the database ran.
    pub sql_queries: u64,
    /// Lookups answered by the cache (cached arms).
    pub served: u64,
    /// All lookups (cached arms).
    pub lookups: u64,
    /// Reads checked against the renames.
    pub reads: usize,
    /// Reads older than a rename that had completed before they started.
    pub stale_reads: usize,
    /// A 404 for an existing id, or a row for an id that does not exist.
    pub wrong_answers: u64,
    /// After the last round, with no load: ids whose answer differs from
    /// the database (only for the arm that ran last).
    pub stale_at_rest: Option<usize>,
}

impl Report {
    /// Requests per second.
    pub fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }

    /// A latency percentile (`p` in 0..=1), ms.
    pub fn percentile(&self, p: f64) -> f64 {
        percentile(&self.latencies, p)
    }

    /// SQL queries per second.
    pub fn sql_per_second(&self) -> f64 {
        self.sql_queries as f64 / self.seconds.max(1e-9)
    }

    /// Served / lookups, for the cached arms.
    pub fn hit_ratio(&self) -> Option<f64> {
        (self.lookups > 0).then(|| self.served as f64 / self.lookups as f64)
    }
}

/// The kinds of request, in the mix's order.
pub const KINDS: [&str; 4] = ["read", "read of a missing id", "batch of 20", "rename"];

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// What one worker saw in one turn.
#[derive(Default)]
struct Seen {
    requests: u64,
    failed: u64,
    wrong: u64,
    latencies: [Vec<f64>; 4],
}

/// Runs every arm's rounds, then checks the histories and the last arm at
/// rest.
pub async fn run(
    config: &Config,
    arms: &[Arm],
    cache_at: &CacheAt,
    db: &Db,
) -> Result<Vec<Report>, Error> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(config.concurrency)
        .timeout(Duration::from_secs(10))
        .build()?;
    let history = Arc::new(History::default());
    let mut reports: Vec<Report> = arms
        .iter()
        .map(|arm| Report {
            name: arm.name,
            ..Report::default()
        })
        .collect();
    // Which arm made each read.
    let mut reads_of: Vec<Vec<Event>> = vec![Vec::new(); arms.len()];

    for round in 0..config.rounds {
        for (index, arm) in arms.iter().enumerate() {
            let cache = if arm.cached {
                let cache = cache_at
                    .fresh(&format!("service-r{round}-a{index}"))
                    .await?;
                cache.install();
                Some(cache)
            } else {
                None
            };
            let arm_history = Arc::new(History::default());
            let queries_before = db.queries();
            let started = Instant::now();
            let seen = turn(config, &client, arm.address, round, &arm_history).await?;
            let report = &mut reports[index];
            report.seconds += started.elapsed().as_secs_f64();
            report.sql_queries += db.queries() - queries_before;
            report.requests += seen.requests;
            report.failed += seen.failed;
            report.wrong_answers += seen.wrong;
            for (all, part) in report.latencies_by_kind.iter_mut().zip(seen.latencies) {
                report.latencies.extend(&part);
                all.extend(part);
            }
            if let Some(cache) = cache {
                let counts = cache.stats().total;
                let served = counts.hits + counts.stale_hits + counts.coalesced;
                report.served += served;
                report.lookups += served + counts.misses + counts.refreshes;
            }
            for event in arm_history.events() {
                match event.op {
                    Op::Read => reads_of[index].push(event),
                    Op::Write => history.record_event(event),
                }
            }
        }
    }

    let writes = history.events();
    for (report, reads) in reports.iter_mut().zip(reads_of) {
        let mut events = writes.clone();
        events.extend(reads);
        let verdict = read_your_writes(&events);
        report.reads = verdict.reads;
        report.stale_reads = verdict.stale_reads;
        for (read, write) in verdict.examples.iter().take(2) {
            eprintln!(
                "{}: stale read of user {}: version {} after version {} was written",
                report.name, read.row, read.version, write.version
            );
        }
        report.latencies.sort_by(f64::total_cmp);
        for kind in &mut report.latencies_by_kind {
            kind.sort_by(f64::total_cmp);
        }
    }
    if let (Some(arm), Some(report)) = (arms.last(), reports.last_mut()) {
        report.stale_at_rest = Some(at_rest(config, &client, arm.address, db).await?);
    }
    Ok(reports)
}

/// One arm's turn: `concurrency` workers until the round's time or request
/// budget is spent.
async fn turn(
    config: &Config,
    client: &reqwest::Client,
    address: SocketAddr,
    round: usize,
    history: &Arc<History>,
) -> Result<Seen, Error> {
    let deadline = Instant::now() + config.round;
    let budget = Arc::new(AtomicU64::new(config.requests_per_round));
    let existing = Zipf::new(config.users as f64, 1.0)?;
    let missing = Zipf::new(config.missing as f64, 1.0)?;
    let mut workers = Vec::new();
    for worker in 0..config.concurrency {
        let client = client.clone();
        let budget = Arc::clone(&budget);
        let history = Arc::clone(history);
        let users = config.users;
        let base = format!("http://{address}");
        workers.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64((round * 1_000 + worker) as u64);
            let mut seen = Seen::default();
            while Instant::now() < deadline
                && budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
            {
                let existing_id = |rng: &mut SmallRng| existing.sample(rng) as i64;
                let missing_id = |rng: &mut SmallRng| users + missing.sample(rng) as i64;
                let roll: u32 = rng.random_range(0..100);
                let start = history::now();
                let clock = Instant::now();
                let kind = match roll {
                    0..75 => 0,
                    75..80 => 1,
                    80..90 => 2,
                    _ => 3,
                };
                let outcome = match roll {
                    0..75 => {
                        read(&client, &base, existing_id(&mut rng), true, &history, start).await
                    }
                    75..80 => {
                        read(&client, &base, missing_id(&mut rng), false, &history, start).await
                    }
                    80..90 => {
                        let mut ids: Vec<i64> = (0..18).map(|_| existing_id(&mut rng)).collect();
                        ids.extend((0..2).map(|_| missing_id(&mut rng)));
                        batch(&client, &base, &ids, users, &history, start).await
                    }
                    _ => {
                        let id = existing_id(&mut rng);
                        let name =
                            format!("User {id} renamed {}", rng.random_range(0..1_000_000u32));
                        write(&client, &base, id, &name, &history, start).await
                    }
                };
                seen.latencies[kind].push(clock.elapsed().as_secs_f64() * 1e3);
                seen.requests += 1;
                match outcome {
                    Ok(wrong) => seen.wrong += wrong,
                    Err(_) => seen.failed += 1,
                }
            }
            seen
        }));
    }
    let mut seen = Seen::default();
    for worker in workers {
        let part = worker.await?;
        seen.requests += part.requests;
        seen.failed += part.failed;
        seen.wrong += part.wrong;
        for (all, part) in seen.latencies.iter_mut().zip(part.latencies) {
            all.extend(part);
        }
    }
    Ok(seen)
}

/// `GET /users/{id}`: records the version read; the number of wrong answers.
async fn read(
    client: &reqwest::Client,
    base: &str,
    id: i64,
    exists: bool,
    history: &History,
    start: u128,
) -> Result<u64, Error> {
    let response = client.get(format!("{base}/users/{id}")).send().await?;
    match response.status() {
        reqwest::StatusCode::OK => {
            let user: User = response.json().await?;
            history.record(Op::Read, id as u64, start, user.version as u64);
            Ok(u64::from(!exists || user.id != id))
        }
        reqwest::StatusCode::NOT_FOUND => Ok(u64::from(exists)),
        status => Err(format!("GET /users/{id}: {status}").into()),
    }
}

/// `GET /users?ids=`: records a read per row; ids above `users` must be
/// absent, the others present.
async fn batch(
    client: &reqwest::Client,
    base: &str,
    ids: &[i64],
    users: i64,
    history: &History,
    start: u128,
) -> Result<u64, Error> {
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    let response = client
        .get(format!("{base}/users?ids={}", list.join(",")))
        .send()
        .await?;
    if !response.status().is_success() {
        return Err(format!("GET /users?ids=: {}", response.status()).into());
    }
    let rows: std::collections::HashMap<i64, User> = response.json().await?;
    let mut wrong = 0;
    for id in ids {
        match rows.get(id) {
            Some(user) => {
                history.record(Op::Read, *id as u64, start, user.version as u64);
                wrong += u64::from(*id > users || user.id != *id);
            }
            None => wrong += u64::from(*id <= users),
        }
    }
    Ok(wrong)
}

/// `PUT /users/{id}`: records the version written.
async fn write(
    client: &reqwest::Client,
    base: &str,
    id: i64,
    name: &str,
    history: &History,
    start: u128,
) -> Result<u64, Error> {
    let response = client
        .put(format!("{base}/users/{id}"))
        .json(&serde_json::json!({ "name": name }))
        .send()
        .await?;
    match response.status() {
        reqwest::StatusCode::OK => {
            let user: User = response.json().await?;
            history.record(Op::Write, id as u64, start, user.version as u64);
            Ok(0)
        }
        reqwest::StatusCode::NOT_FOUND => Ok(1),
        status => Err(format!("PUT /users/{id}: {status}").into()),
    }
}

/// With no load running: asks the service for every existing id and counts
/// the answers that differ from the database.
async fn at_rest(
    config: &Config,
    client: &reqwest::Client,
    address: SocketAddr,
    db: &Db,
) -> Result<usize, Error> {
    let truth = db.versions().await?;
    let base = format!("http://{address}");
    let ids: Vec<i64> = (1..=config.users).collect();
    let mut stale = 0;
    for chunk in ids.chunks(config.concurrency.max(1) * 8) {
        let answers = futures_util::future::join_all(chunk.iter().map(|&id| {
            let url = format!("{base}/users/{id}");
            async move {
                let user: User = client
                    .get(url)
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                Ok::<_, reqwest::Error>(user)
            }
        }))
        .await;
        for (id, answer) in chunk.iter().zip(answers) {
            let user = answer?;
            if truth.get(id) != Some(&user.version) {
                stale += 1;
            }
        }
    }
    Ok(stale)
}

/// The results as a Markdown table, with each arm's ratio to the first.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::from(
        "| arm | requests | req/s | p50 ms | p99 ms | SQL queries/s | SQL per request | hit ratio | reads checked | stale reads | wrong answers | failed |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.3} | {} | {} | {} | {} | {} |\n",
            r.name,
            r.requests,
            r.requests_per_second(),
            r.percentile(0.50),
            r.percentile(0.99),
            r.sql_per_second(),
            r.sql_queries as f64 / r.requests.max(1) as f64,
            r.hit_ratio()
                .map_or("-".to_owned(), |h| format!("{:.1} %", h * 100.0)),
            r.reads,
            r.stale_reads,
            r.wrong_answers,
            r.failed,
        ));
    }
    if let Some(base) = reports.first() {
        for r in &reports[1..] {
            out.push_str(&format!(
                "| {} / {} | | {:.2}x | {:.2}x | {:.2}x | {:.3}x | | | | | | |\n",
                r.name,
                base.name,
                r.requests_per_second() / base.requests_per_second(),
                r.percentile(0.50) / base.percentile(0.50),
                r.percentile(0.99) / base.percentile(0.99),
                r.sql_per_second() / base.sql_per_second(),
            ));
        }
    }
    out.push_str("\n| p50 / p99 ms |");
    for kind in KINDS {
        out.push_str(&format!(" {kind} |"));
    }
    out.push_str("\n|---|---|---|---|---|\n");
    for r in reports {
        out.push_str(&format!("| {} |", r.name));
        for kind in &r.latencies_by_kind {
            out.push_str(&format!(
                " {:.2} / {:.2} |",
                percentile(kind, 0.5),
                percentile(kind, 0.99)
            ));
        }
        out.push('\n');
    }
    out
}
