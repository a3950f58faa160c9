//! What a hit costs the CPU, without a network: `Cache::memory()`, one
//! task, one key, a small value (a `u64`, so that decoding is not what is
//! measured), with and without `single_flight`. Prints nanoseconds per
//! hit, the median of 7 rounds of 200,000 hits.
//!
//! ```text
//! cargo run --release -p cache-bench --bin hit_cpu
//! ```
//!
//! Used for A/B runs of the read path between two builds (run each
//! build's binary in turn).

use std::time::Instant;

use cache_runtime::{Cache, redis_cached};

#[redis_cached(key = "plain:<id>", ttl = 600)]
async fn plain(id: u64) -> Result<u64, std::io::Error> {
    Ok(id)
}

#[redis_cached(key = "flight:<id>", ttl = 600, single_flight)]
async fn flight(id: u64) -> Result<u64, std::io::Error> {
    Ok(id)
}

const HITS: u32 = 200_000;
const ROUNDS: usize = 7;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), std::io::Error> {
    Cache::memory().install();
    plain(7).await?;
    flight(7).await?;
    let (mut plain_ns, mut flight_ns) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let started = Instant::now();
        for _ in 0..HITS {
            std::hint::black_box(plain(std::hint::black_box(7)).await?);
        }
        plain_ns.push(started.elapsed().as_nanos() as f64 / f64::from(HITS));
        let started = Instant::now();
        for _ in 0..HITS {
            std::hint::black_box(flight(std::hint::black_box(7)).await?);
        }
        flight_ns.push(started.elapsed().as_nanos() as f64 / f64::from(HITS));
    }
    plain_ns.sort_by(f64::total_cmp);
    flight_ns.sort_by(f64::total_cmp);
    println!(
        "memory-backend hit, ns per call (median of {ROUNDS}): plain {:.0}, single_flight {:.0}",
        plain_ns[ROUNDS / 2],
        flight_ns[ROUNDS / 2]
    );
    Ok(())
}
