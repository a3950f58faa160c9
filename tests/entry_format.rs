//! The entry format is pinned: services deploy by rolling restart, so two
//! releases of the runtime share one Redis for a while, and each must read
//! what the other wrote, or miss, never misread it as a wrong value.
//!
//! `tests/entries/v1/` holds the bytes of every kind of entry, format 1:
//! a JSON value, a MessagePack value, a negative entry (`\x02none`), a
//! value and a negative entry behind a freshness header (`stale`,
//! `early_refresh`), a compressed value (`compress_above`), a tagged value
//! (`tags`, and `tags_from`), and a lease placeholder (which a refresh
//! lock is too). Random fields (tokens,
//! clocks) are written there as `<TOKEN>`, `<DELTA>`, `<AT>`.
//!
//! - What this release writes must equal the fixtures (random fields
//!   aside; of a compressed value, the header: the lz4 block is lz4's, and
//!   any version of it decodes the fixture's). A change here means a new format: bump the directory, keep a
//!   reader for the old one, and keep the old fixtures in `reads_...`.
//! - What the fixtures hold must be read as their value (or, for a
//!   placeholder, as another caller's lease: computed, not stored over).
//!
//! `ENTRY_FIXTURES=write cargo test -p cache-harness --test entry_format`
//! writes the fixtures from this release (for a new format only).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cache_harness::{RedisServer, raw_connection};
use cache_runtime::{Cache, Codec, redis_cached};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Row {
    id: u64,
    name: String,
    tags: Vec<String>,
}

/// A row of the users table.
fn row(id: u64, tags: usize) -> Row {
    Row {
        id,
        name: format!("user {id}"),
        tags: (0..tags).map(|t| format!("tag-{t}")).collect(),
    }
}

static BODY_RUNS: AtomicU64 = AtomicU64::new(0);
/// What the bodies add to an id: 1000 when the fixtures are written (they
/// hold row 1042), 2000 when they are read, so that a value served from a
/// fixture cannot be mistaken for a computed one.
static BODY_OFFSET: AtomicU64 = AtomicU64::new(1000);
/// The two tests share the body counter: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// How long a body takes, ms (the placeholder is read while one runs).
static BODY_MILLIS: AtomicU64 = AtomicU64::new(0);

async fn body(id: u64, tags: usize) -> Option<Row> {
    BODY_RUNS.fetch_add(1, Ordering::SeqCst);
    let millis = BODY_MILLIS.load(Ordering::SeqCst);
    if millis > 0 {
        tokio::time::sleep(Duration::from_millis(millis)).await;
    }
    (id != 0).then(|| row(id + BODY_OFFSET.load(Ordering::SeqCst), tags))
}

#[redis_cached(key = "plain:<id>:<tags>", ttl = 600, cache_none, skip(cache), cache = cache)]
async fn plain(cache: &Cache, id: u64, tags: usize) -> Option<Row> {
    body(id, tags).await
}

#[redis_cached(key = "fresh:<id>", ttl = 600, stale = "60s", cache_none, skip(cache), cache = cache)]
async fn fresh(cache: &Cache, id: u64) -> Option<Row> {
    body(id, 2).await
}

#[redis_cached(key = "tagged:<id>", ttl = 600, tags = ["org:<id>", "members"], skip(cache), cache = cache)]
async fn tagged(cache: &Cache, id: u64) -> Option<Row> {
    body(id, 2).await
}

#[redis_cached(key = "derived:<id>", ttl = 600, tags = ["members"], tags_from = row_tags, skip(cache), cache = cache)]
async fn derived(cache: &Cache, id: u64) -> Option<Row> {
    body(id, 2).await
}

/// The tags a row names (`tags_from`).
fn row_tags(row: &Row) -> Vec<String> {
    row.tags.iter().map(|tag| format!("row-{tag}")).collect()
}

/// The tags of `tagged(42)` and `derived(42)`, under the prefix `fmt`.
const TAG_KEYS: [&str; 4] = [
    "fmt:\0tag:org:42",
    "fmt:\0tag:members",
    "fmt:\0tag:row-tag-0",
    "fmt:\0tag:row-tag-1",
];

const TTL_MS: u64 = 600_000;

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/entries/v1")
        .join(name)
}

/// Random fields of written bytes replaced by their names, so that two
/// writes of one kind compare equal.
fn normalised(bytes: &[u8]) -> Vec<u8> {
    // `<token, 16 hex digits> <tag> ...`, with `|` before the tags a value
    // named: every token is random.
    if let Some(rest) = bytes.strip_prefix(b"\x04tags:") {
        let line_end = rest
            .iter()
            .position(|&b| b == b'\n')
            .expect("a tag header ends its line");
        let words: Vec<&[u8]> = rest[..line_end]
            .split(|&b| b == b' ')
            .map(|word| {
                if word.len() == 16 && word.iter().all(u8::is_ascii_hexdigit) {
                    &b"<TOKEN>"[..]
                } else {
                    word
                }
            })
            .collect();
        let mut out = b"\x04tags:".to_vec();
        out.extend_from_slice(&words.join(&b' '));
        out.push(b'\n');
        out.extend_from_slice(&normalised(&rest[line_end + 1..]));
        return out;
    }
    if let Some(rest) = bytes.strip_prefix(b"\x01fresh:") {
        let line_end = rest
            .iter()
            .position(|&b| b == b'\n')
            .expect("a freshness header ends its line");
        // `<delta ms>:<token, 16 hex digits>:<stored at, ms>`
        let fields: Vec<&[u8]> = rest[..line_end].split(|&b| b == b':').collect();
        let digits = |f: &[u8], hex: bool| {
            !f.is_empty()
                && f.iter().all(|b| {
                    if hex {
                        b.is_ascii_hexdigit()
                    } else {
                        b.is_ascii_digit()
                    }
                })
        };
        assert!(
            fields.len() == 3
                && digits(fields[0], false)
                && fields[1].len() == 16
                && digits(fields[1], true)
                && digits(fields[2], false),
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
        let mut out = b"\x01fresh:<DELTA>:<TOKEN>:<AT>\n".to_vec();
        out.extend_from_slice(&rest[line_end + 1..]);
        return out;
    }
    if let Some(rest) = bytes.strip_prefix(b"\0lease:") {
        let text = std::str::from_utf8(rest).expect("a placeholder is text");
        let (token, at) = text.split_once(':').expect("token:at");
        assert!(token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!at.is_empty() && at.bytes().all(|b| b.is_ascii_digit()));
        return b"\0lease:<TOKEN>:<AT>".to_vec();
    }
    bytes.to_vec()
}

/// A fixture with its random fields filled in, as an earlier writer would
/// have written it.
fn concrete(fixture: &[u8]) -> Vec<u8> {
    let text = fixture.to_vec();
    // Every occurrence: a tag header has a token per tag.
    let replace = |mut bytes: Vec<u8>, from: &str, to: &str| -> Vec<u8> {
        while let Some(at) = bytes.windows(from.len()).position(|w| w == from.as_bytes()) {
            let mut out = bytes[..at].to_vec();
            out.extend_from_slice(to.as_bytes());
            out.extend_from_slice(&bytes[at + from.len()..]);
            bytes = out;
        }
        bytes
    };
    let text = replace(text, "<DELTA>", "7");
    let is_lease = text.starts_with(b"\0lease:");
    let text = replace(
        text,
        "<TOKEN>",
        if is_lease {
            "0123456789abcdef0123456789abcdef"
        } else {
            "0123456789abcdef"
        },
    );
    replace(text, "<AT>", "1767225600000")
}

/// `ENTRY_FIXTURES=write`: the fixtures are being written.
fn writing() -> bool {
    std::env::var_os("ENTRY_FIXTURES").is_some_and(|v| v == "write")
}

/// Compares `written` with the fixture `name`, or writes it with
/// `ENTRY_FIXTURES=write`.
fn pin(name: &str, written: &[u8]) {
    let path = fixture_path(name);
    let written = normalised(written);
    if writing() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &written).unwrap();
        return;
    }
    let fixture = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        String::from_utf8_lossy(&written),
        String::from_utf8_lossy(&fixture),
        "{name}: this release writes another format than the fixture; an older \
         release would misread it (see the module docs)"
    );
    assert_eq!(written, fixture, "{name}: bytes differ");
    println!("{name}: {} bytes, as pinned", fixture.len());
}

fn fixture(name: &str) -> Vec<u8> {
    let path = fixture_path(name);
    concrete(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// Caches on `server` with the default JSON codec (prefix `fmt`),
/// MessagePack (`mp`) and compression above 256 bytes (`z`). Their op
/// timeout is long: a call that failed open on a busy machine would store
/// nothing (or read nothing), which is not what this test is about.
async fn caches(server: &RedisServer) -> [Cache; 3] {
    let build = |prefix: &str, codec: Codec, compress: Option<usize>| {
        let mut builder = Cache::builder()
            .url(server.url())
            .prefix(prefix)
            .codec(codec)
            .op_timeout(Duration::from_secs(5));
        if let Some(bytes) = compress {
            builder = builder.compress_above(bytes);
        }
        builder.build()
    };
    [
        build("fmt", Codec::Json, None).await.unwrap(),
        build("mp", Codec::MessagePack, None).await.unwrap(),
        build("z", Codec::Json, Some(256)).await.unwrap(),
    ]
}

/// The bytes this release writes for each kind of entry are the fixtures'.
#[tokio::test]
async fn this_release_writes_the_pinned_format() {
    let _serial = SERIAL.lock().await;
    BODY_OFFSET.store(1000, Ordering::SeqCst);
    let server = RedisServer::start();
    let mut raw = raw_connection(&server).await;
    let [json, msgpack, compressed] = caches(&server).await;

    assert!(plain(&json, 42, 2).await.is_some());
    json.settled().await;
    let bytes: Vec<u8> = raw.get("fmt:plain:42:2").await.unwrap();
    pin("value.json", &bytes);

    assert!(plain(&msgpack, 42, 2).await.is_some());
    msgpack.settled().await;
    let bytes: Vec<u8> = raw.get("mp:plain:42:2").await.unwrap();
    pin("value.msgpack", &bytes);

    assert_eq!(plain(&json, 0, 2).await, None);
    json.settled().await;
    let bytes: Vec<u8> = raw.get("fmt:plain:0:2").await.unwrap();
    pin("negative", &bytes);

    assert!(fresh(&json, 42).await.is_some());
    json.settled().await;
    let bytes: Vec<u8> = raw.get("fmt:fresh:42").await.unwrap();
    pin("fresh_value.json", &bytes);

    assert_eq!(fresh(&json, 0).await, None);
    json.settled().await;
    let bytes: Vec<u8> = raw.get("fmt:fresh:0").await.unwrap();
    pin("fresh_negative", &bytes);

    assert!(plain(&compressed, 42, 40).await.is_some());
    compressed.settled().await;
    let bytes: Vec<u8> = raw.get("z:plain:42:40").await.unwrap();
    // The header is the format; the lz4 block after it is lz4's (a newer
    // lz4_flex may encode the same value differently, and any version
    // decodes it): the reading test reads the fixture's block.
    if writing() {
        pin("compressed.json", &bytes);
    } else {
        let fixture = std::fs::read(fixture_path("compressed.json")).unwrap();
        assert_eq!(
            bytes[..5],
            fixture[..5],
            "compressed.json: the header (mark, length)"
        );
        println!("compressed.json: header as pinned");
    }

    // Tagged entries: the tokens of their tags, and of the tags their
    // value names after the mark of `tags_from`.
    assert!(tagged(&json, 42).await.is_some());
    json.settled().await;
    let bytes: Vec<u8> = raw.get("fmt:tagged:42").await.unwrap();
    pin("tagged.json", &bytes);
    assert!(derived(&json, 42).await.is_some());
    json.settled().await;
    let bytes: Vec<u8> = raw.get("fmt:derived:42").await.unwrap();
    pin("tagged_from.json", &bytes);

    // A lease placeholder, read while its holder computes.
    BODY_MILLIS.store(2_000, Ordering::SeqCst);
    let slow = tokio::spawn({
        let json = json.clone();
        async move { plain(&json, 44, 2).await }
    });
    let placeholder = loop {
        let bytes: Option<Vec<u8>> = raw.get("fmt:plain:44:2").await.unwrap();
        if let Some(bytes) = bytes {
            break bytes;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    BODY_MILLIS.store(0, Ordering::SeqCst);
    pin("placeholder", &placeholder);
    assert!(slow.await.unwrap().is_some());
}

/// What the fixtures hold is read as its value, or as another caller's
/// lease: never as another value, never as garbage to overwrite.
#[tokio::test]
async fn this_release_reads_the_pinned_format() {
    if writing() {
        return;
    }
    let _serial = SERIAL.lock().await;
    BODY_OFFSET.store(2000, Ordering::SeqCst);
    let server = RedisServer::start();
    let mut raw = raw_connection(&server).await;
    let [json, msgpack, compressed] = caches(&server).await;
    let pinned_row = |tags| Some(row(1042, tags));
    let plant = |key: &'static str, name: &'static str| {
        let mut raw = raw.clone();
        async move {
            let _: () = raw.pset_ex(key, fixture(name), TTL_MS).await.unwrap();
        }
    };

    // Values: served as the fixture's row, without running the body.
    let cases: [(&Cache, &str, &str, usize); 3] = [
        (&json, "fmt:plain:42:2", "value.json", 2),
        (&msgpack, "mp:plain:42:2", "value.msgpack", 2),
        (&compressed, "z:plain:42:40", "compressed.json", 40),
    ];
    for (cache, key, name, tags) in cases {
        plant(key, name).await;
        let runs = BODY_RUNS.load(Ordering::SeqCst);
        assert_eq!(plain(cache, 42, tags).await, pinned_row(tags), "{name}");
        assert_eq!(
            BODY_RUNS.load(Ordering::SeqCst),
            runs,
            "{name}: served, not computed"
        );
        println!("{name}: read as its value");
    }

    let runs = BODY_RUNS.load(Ordering::SeqCst);
    let served = |name: &str| {
        assert_eq!(
            BODY_RUNS.load(Ordering::SeqCst),
            runs,
            "{name}: served, not computed"
        );
        println!("{name}: read as its value");
    };
    plant("fmt:plain:0:2", "negative").await;
    assert_eq!(plain(&json, 0, 2).await, None);
    served("negative");
    plant("fmt:fresh:42", "fresh_value.json").await;
    assert_eq!(fresh(&json, 42).await, pinned_row(2), "fresh value");
    served("fresh_value.json");
    plant("fmt:fresh:0", "fresh_negative").await;
    assert_eq!(fresh(&json, 0).await, None, "fresh negative");
    served("fresh_negative");
    // A function without `stale` reads a headed value too (a release that
    // added `stale` to a function shares its keys with one that did not).
    plant("fmt:plain:42:2", "fresh_value.json").await;
    assert_eq!(
        plain(&json, 42, 2).await,
        pinned_row(2),
        "headed value, no stale"
    );
    served("fresh_value.json, read without stale");

    // Tagged entries, their tags holding the fixtures' token.
    for key in TAG_KEYS {
        let _: () = raw
            .clone()
            .pset_ex(key, concrete(b"<TOKEN>"), TTL_MS)
            .await
            .unwrap();
    }
    plant("fmt:tagged:42", "tagged.json").await;
    assert_eq!(tagged(&json, 42).await, pinned_row(2), "tagged value");
    served("tagged.json");
    plant("fmt:derived:42", "tagged_from.json").await;
    assert_eq!(
        derived(&json, 42).await,
        pinned_row(2),
        "tags from the value"
    );
    served("tagged_from.json");

    // Another caller's lease: this call computes and does not store over it.
    plant("fmt:plain:45:2", "placeholder").await;
    assert_eq!(plain(&json, 45, 2).await, Some(row(2045, 2)));
    assert_eq!(
        BODY_RUNS.load(Ordering::SeqCst),
        runs + 1,
        "placeholder: computed"
    );
    let left: Vec<u8> = raw.get("fmt:plain:45:2").await.unwrap();
    assert_eq!(
        left,
        fixture("placeholder"),
        "the lease is left to its holder"
    );
}
