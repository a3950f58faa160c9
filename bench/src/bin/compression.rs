//! Which compressor `CacheBuilder::compress_above` should use: lz4_flex
//! (pure Rust) against zstd (levels 1 and 3), on JSON of 1 KB, 64 KB and
//! 1 MB (rows of a users table, as a service caches them), zstd with a
//! context kept per thread. Prints, for
//! each, the compressed size and the median time to compress and to
//! decompress, measured in rounds with the arms interleaved.
//!
//! ```text
//! cargo run --release -p cache-bench --bin compression
//! ```

use std::hint::black_box;
use std::time::Instant;

use serde::Serialize;

#[derive(Serialize)]
struct Row {
    id: u64,
    name: String,
    email: String,
    bio: String,
    roles: Vec<&'static str>,
    active: bool,
}

/// JSON rows up to about `size` bytes.
fn json_of(size: usize) -> Vec<u8> {
    let words = [
        "cache",
        "redis",
        "tokio",
        "serde",
        "lease",
        "stampede",
        "replica",
        "cluster",
        "sentinel",
        "latency",
        "throughput",
        "invalidation",
        "database",
        "service",
    ];
    let mut rows = Vec::new();
    let mut id = 0u64;
    loop {
        let bio: Vec<&str> = (0..24)
            .map(|i| words[((id * 7 + i * 13) % words.len() as u64) as usize])
            .collect();
        rows.push(Row {
            id,
            name: format!("User Number {id}"),
            email: format!("user{id}@example.com"),
            bio: bio.join(" "),
            roles: if id.is_multiple_of(3) {
                vec!["admin", "user"]
            } else {
                vec!["user"]
            },
            active: !id.is_multiple_of(5),
        });
        id += 1;
        let json = serde_json::to_vec(&rows).expect("rows encode");
        if json.len() >= size {
            return json;
        }
    }
}

type Compress = fn(&[u8]) -> Vec<u8>;
type Decompress = fn(&[u8]) -> Vec<u8>;

fn arms() -> [(&'static str, Compress, Decompress); 3] {
    [
        (
            "lz4_flex",
            |b| lz4_flex::compress_prepend_size(b),
            |b| lz4_flex::decompress_size_prepended(b).expect("lz4 round trip"),
        ),
        ("zstd -1", |b| zstd_compress(b, 1), zstd_decompress),
        ("zstd -3", |b| zstd_compress(b, 3), zstd_decompress),
    ]
}

thread_local! {
    /// A context per level and thread, as a cache would keep them: a new
    /// one per call costs more than the work on small values.
    static COMPRESSORS: std::cell::RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn zstd_compress(bytes: &[u8], level: i32) -> Vec<u8> {
    COMPRESSORS.with(|all| {
        let mut all = all.borrow_mut();
        if !all.iter().any(|(l, _)| *l == level) {
            all.push((
                level,
                zstd::bulk::Compressor::new(level).expect("zstd context"),
            ));
        }
        let (_, compressor) = all
            .iter_mut()
            .find(|(l, _)| *l == level)
            .expect("made above");
        compressor.compress(bytes).expect("zstd")
    })
}

fn zstd_decompress(bytes: &[u8]) -> Vec<u8> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        let decompressor =
            d.get_or_insert_with(|| zstd::bulk::Decompressor::new().expect("zstd context"));
        // The frame says how large its content is (a fixed 64 MiB bound
        // would allocate that much per call).
        let size = zstd::zstd_safe::get_frame_content_size(bytes)
            .ok()
            .flatten()
            .expect("zstd frames carry their size");
        decompressor
            .decompress(bytes, usize::try_from(size).expect("fits"))
            .expect("zstd round trip")
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    println!(
        "| JSON | compressor | compressed | ratio | compress (median) | decompress (median) |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for size in [1 << 10, 64 << 10, 1 << 20] {
        let json = json_of(size);
        let reps = (4 << 20) / json.len() + 1;
        let arms = arms();
        let mut times = vec![(Vec::new(), Vec::new()); arms.len()];
        for round in 0..15 {
            for i in 0..arms.len() {
                let at = (round + i) % arms.len();
                let (_, compress, decompress) = arms[at];
                let started = Instant::now();
                let mut packed = Vec::new();
                for _ in 0..reps {
                    packed = black_box(compress(black_box(&json)));
                }
                times[at]
                    .0
                    .push(started.elapsed().as_secs_f64() * 1e6 / reps as f64);
                let started = Instant::now();
                for _ in 0..reps {
                    let unpacked = black_box(decompress(black_box(&packed)));
                    assert_eq!(unpacked.len(), json.len());
                }
                times[at]
                    .1
                    .push(started.elapsed().as_secs_f64() * 1e6 / reps as f64);
            }
        }
        for (at, (name, compress, _)) in arms.iter().enumerate() {
            let packed = compress(&json).len();
            let (c, d) = std::mem::take(&mut times[at]);
            println!(
                "| {} B | {name} | {packed} B | {:.1}× | {:.1} µs | {:.1} µs |",
                json.len(),
                json.len() as f64 / packed as f64,
                median(c),
                median(d)
            );
        }
    }
}
