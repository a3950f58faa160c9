//! Whether a faster JSON decoder is worth adopting: `serde_json` against
//! `sonic-rs` and `simd-json` on the benchmark's ~1 KB value
//! (`bench/src/bin/bench.rs`), decoding the same bytes in interleaved rounds;
//! then what the best one would change in a Redis hit, measured in the
//! same run with a bare `GET` of those bytes and the hand-written
//! cache-aside hit (GET + `serde_json` decode).
//!
//! ```text
//! cargo run --release -p cache-bench --bin json_decoders
//! ```

use std::hint::black_box;
use std::time::Instant;

type Error = Box<dyn std::error::Error + Send + Sync>;

use cache_bench::{User, row};

/// One decoder of the benchmark's value.
type Decode = fn(&[u8]) -> User;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let bytes = serde_json::to_vec(&row(7))?;
    let decoders: [(&str, Decode); 3] = [
        ("serde_json", |b| {
            serde_json::from_slice(b).expect("decodes")
        }),
        ("sonic-rs", |b| sonic_rs::from_slice(b).expect("decodes")),
        ("simd-json", |b| {
            // simd-json decodes in place: a copy of the bytes first.
            let mut owned = b.to_vec();
            simd_json::serde::from_slice(&mut owned).expect("decodes")
        }),
    ];
    let reps = 20_000;
    let mut times = vec![Vec::new(); decoders.len()];
    for round in 0..15 {
        for i in 0..decoders.len() {
            let at = (round + i) % decoders.len();
            let started = Instant::now();
            for _ in 0..reps {
                black_box(decoders[at].1(black_box(&bytes)));
            }
            times[at].push(started.elapsed().as_secs_f64() * 1e9 / reps as f64);
        }
    }
    let medians: Vec<f64> = times.into_iter().map(median).collect();
    println!(
        "decoding the {} B value (median of 15 interleaved rounds):",
        bytes.len()
    );
    for ((name, _), ns) in decoders.iter().zip(&medians) {
        println!(
            "  {name:10} {ns:7.0} ns  ({:.2}× serde_json)",
            ns / medians[0]
        );
    }

    // What the fastest would save on a Redis hit, in the same run.
    let (url, _server) = cache_harness::benchmark_redis()?;
    let mut conn = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    redis::cmd("SET")
        .arg("json:user")
        .arg(&bytes)
        .query_async::<()>(&mut conn)
        .await?;
    let mut hits = Vec::new();
    for _ in 0..20_000 {
        let started = Instant::now();
        let got: Vec<u8> = redis::cmd("GET")
            .arg("json:user")
            .query_async(&mut conn)
            .await?;
        black_box(serde_json::from_slice::<User>(&got)?);
        hits.push(started.elapsed().as_secs_f64() * 1e9);
    }
    let hit = median(hits);
    let best = medians.iter().copied().fold(f64::INFINITY, f64::min);
    if best < medians[0] {
        println!(
            "a Redis hit (GET + serde_json decode) takes {:.1} µs at the median: the fastest decoder would save {:.0} ns of it ({:.1} %)",
            hit / 1e3,
            medians[0] - best,
            (medians[0] - best) / hit * 100.0
        );
    } else {
        println!(
            "a Redis hit (GET + serde_json decode) takes {:.1} µs at the median; serde_json is the fastest decoder of this value: nothing to gain",
            hit / 1e3
        );
    }
    Ok(())
}
