//! The backend contract (documented in `cache-runtime/src/backend.rs`),
//! checked operation by operation on every backend: a real `redis-server`
//! and `Cache::memory()`. Whatever the docs call "the same semantics" is
//! asserted here, once, for both.

use std::time::Duration;

use cache_harness::on_every_backend;
use cache_runtime::Cache;
use cache_runtime::testing::{Fetched, backend_ops};

/// Time for an expiry to pass on a shared, busy machine.
const EXPIRED: Duration = Duration::from_millis(120);

async fn get_returns_what_set_stored_byte_for_byte(cache: Cache) {
    let ops = backend_ops(&cache);
    assert_eq!(ops.get("k").await.unwrap(), None);
    for value in [&b"\0"[..], b"\0lease:x", b"{\"a\":1}", &[0xff; 1000]] {
        ops.set("k", value, 60_000).await.unwrap();
        assert_eq!(ops.get("k").await.unwrap().as_deref(), Some(value));
    }
    // `get` cannot tell an empty value from none (the cache never stores
    // one); `get_with_ttl` can.
    ops.set("k", b"", 60_000).await.unwrap();
    assert_eq!(ops.get("k").await.unwrap(), None);
    let (bytes, _) = ops.get_with_ttl("k").await.unwrap().unwrap();
    assert!(bytes.is_empty());
}

async fn reads_stop_at_their_limit(cache: Cache) {
    let ops = backend_ops(&cache);
    ops.set("big", &[b'x'; 101], 60_000).await.unwrap();
    ops.set("fits", &[b'y'; 100], 60_000).await.unwrap();
    assert_eq!(
        ops.get_limited("big", 100).await.unwrap(),
        Fetched::TooLarge
    );
    assert_eq!(
        ops.get_limited("fits", 100).await.unwrap(),
        Fetched::Found(vec![b'y'; 100])
    );
    assert_eq!(ops.get_limited("none", 100).await.unwrap(), Fetched::Absent);
    assert_eq!(
        ops.get_with_ttl_limited("big", 100).await.unwrap(),
        Fetched::TooLarge
    );
    assert!(matches!(
        ops.get_with_ttl_limited("fits", 100).await.unwrap(),
        Fetched::Found((bytes, Some(_))) if bytes.len() == 100
    ));
    let expected = vec![
        Fetched::Found(vec![b'y'; 100]),
        Fetched::TooLarge,
        Fetched::Absent,
    ];
    // On a cluster, three slots.
    let keys = ["fits", "big", "none"].map(String::from);
    assert_eq!(ops.get_many(&keys, 100).await.unwrap(), expected);
    // One slot on a cluster: the keys of one hash tag.
    let tagged = ["{t}fits", "{t}big", "{t}none"].map(String::from);
    ops.set("{t}big", &[b'x'; 101], 60_000).await.unwrap();
    ops.set("{t}fits", &[b'y'; 100], 60_000).await.unwrap();
    assert_eq!(ops.get_many(&tagged, 100).await.unwrap(), expected);
}

/// A tagged entry's read: the entry (up to its limit) and its tags'
/// tokens, absent or found, whatever slots they are in.
async fn get_tagged_reads_an_entry_and_its_tags(cache: Cache) {
    let ops = backend_ops(&cache);
    ops.set("entry", &[b'e'; 50], 60_000).await.unwrap();
    ops.set("tag-a", b"0123456789abcdef", 60_000).await.unwrap();
    ops.set("huge", &[b'x'; 101], 60_000).await.unwrap();
    let (entry, tokens) = ops
        .get_tagged("entry", &["tag-a", "tag-b"], 100)
        .await
        .unwrap();
    assert_eq!(entry, Fetched::Found(vec![b'e'; 50]));
    assert_eq!(
        tokens,
        [
            Fetched::Found(b"0123456789abcdef".to_vec()),
            Fetched::Absent
        ]
    );
    let (entry, tokens) = ops.get_tagged("huge", &["tag-b"], 100).await.unwrap();
    assert_eq!((entry, tokens), (Fetched::TooLarge, vec![Fetched::Absent]));
    let (entry, _) = ops.get_tagged("none", &["tag-a"], 100).await.unwrap();
    assert_eq!(entry, Fetched::Absent);
}

async fn set_if_longer_replaces_only_a_value_past_the_limit(cache: Cache) {
    let ops = backend_ops(&cache);
    assert!(
        !ops.set_if_longer("k", 3, b"new", 60_000).await.unwrap(),
        "absent"
    );
    ops.set("k", b"abc", 60_000).await.unwrap();
    assert!(!ops.set_if_longer("k", 3, b"new", 60_000).await.unwrap());
    assert_eq!(ops.get("k").await.unwrap().as_deref(), Some(&b"abc"[..]));
    ops.set("k", b"abcd", 60_000).await.unwrap();
    assert!(ops.set_if_longer("k", 3, b"new", 5_000).await.unwrap());
    let (bytes, ttl) = ops.get_with_ttl("k").await.unwrap().unwrap();
    assert_eq!(
        (bytes.as_slice(), ttl.unwrap() <= 5_000),
        (&b"new"[..], true),
        "value and expiry replaced"
    );
}

async fn get_with_ttl_reports_the_time_left(cache: Cache) {
    let ops = backend_ops(&cache);
    assert_eq!(ops.get_with_ttl("k").await.unwrap(), None);
    ops.set("k", b"v", 10_000).await.unwrap();
    let (bytes, ttl) = ops.get_with_ttl("k").await.unwrap().unwrap();
    assert_eq!(bytes, b"v");
    let ttl = ttl.expect("an expiry");
    assert!((9_000..=10_000).contains(&ttl), "{ttl}");
}

async fn values_expire_after_px(cache: Cache) {
    let ops = backend_ops(&cache);
    ops.set("k", b"v", 50).await.unwrap();
    tokio::time::sleep(EXPIRED).await;
    assert_eq!(ops.get("k").await.unwrap(), None);
    assert_eq!(ops.get_with_ttl("k").await.unwrap(), None);
}

async fn set_if_absent_stores_only_on_an_absent_or_expired_key(cache: Cache) {
    let ops = backend_ops(&cache);
    assert!(ops.set_if_absent("k", b"one", 50).await.unwrap());
    assert!(!ops.set_if_absent("k", b"two", 60_000).await.unwrap());
    assert_eq!(ops.get("k").await.unwrap().as_deref(), Some(&b"one"[..]));
    tokio::time::sleep(EXPIRED).await;
    assert!(
        ops.set_if_absent("k", b"three", 60_000).await.unwrap(),
        "expired is absent"
    );
    assert_eq!(ops.get("k").await.unwrap().as_deref(), Some(&b"three"[..]));
}

async fn compare_and_set_compares_a_prefix(cache: Cache) {
    let ops = backend_ops(&cache);
    assert!(
        !ops.compare_and_set("k", b"", b"x", 60_000).await.unwrap(),
        "absent"
    );
    ops.set("k", b"header\nvalue", 60_000).await.unwrap();
    assert!(
        !ops.compare_and_set("k", b"other", b"x", 60_000)
            .await
            .unwrap()
    );
    assert!(
        !ops.compare_and_set("k", b"header\nvalue+", b"x", 60_000)
            .await
            .unwrap(),
        "longer than the value"
    );
    assert_eq!(
        ops.get("k").await.unwrap().as_deref(),
        Some(&b"header\nvalue"[..])
    );
    assert!(
        ops.compare_and_set("k", b"header\n", b"new", 5_000)
            .await
            .unwrap()
    );
    let (bytes, ttl) = ops.get_with_ttl("k").await.unwrap().unwrap();
    assert_eq!(
        (bytes.as_slice(), ttl.unwrap() <= 5_000),
        (&b"new"[..], true),
        "value and expiry replaced"
    );
    assert!(
        ops.compare_and_set("k", b"new", b"exact", 60_000)
            .await
            .unwrap(),
        "the whole value is a prefix"
    );
}

async fn compare_and_delete_compares_a_prefix(cache: Cache) {
    let ops = backend_ops(&cache);
    assert!(!ops.compare_and_delete("k", b"a").await.unwrap(), "absent");
    ops.set("k", b"abc", 60_000).await.unwrap();
    assert!(!ops.compare_and_delete("k", b"b").await.unwrap());
    assert!(!ops.compare_and_delete("k", b"abcd").await.unwrap());
    assert!(ops.compare_and_delete("k", b"ab").await.unwrap());
    assert_eq!(ops.get("k").await.unwrap(), None);
}

async fn compare_and_expire_sets_the_expiry_only_on_a_match(cache: Cache) {
    let ops = backend_ops(&cache);
    assert!(
        !ops.compare_and_expire("k", b"a", 50).await.unwrap(),
        "absent"
    );
    ops.set("k", b"abc", 60_000).await.unwrap();
    assert!(!ops.compare_and_expire("k", b"x", 50).await.unwrap());
    assert!(ops.get_with_ttl("k").await.unwrap().unwrap().1.unwrap() > 50_000);
    assert!(ops.compare_and_expire("k", b"a", 50).await.unwrap());
    assert_eq!(
        ops.get("k").await.unwrap().as_deref(),
        Some(&b"abc"[..]),
        "the value stays"
    );
    tokio::time::sleep(EXPIRED).await;
    assert_eq!(ops.get("k").await.unwrap(), None);
}

async fn delete_counts_the_keys_that_existed(cache: Cache) {
    let ops = backend_ops(&cache);
    ops.set("a", b"1", 60_000).await.unwrap();
    ops.set("b", b"2", 60_000).await.unwrap();
    let keys = ["a", "b", "c"].map(String::from);
    assert_eq!(ops.delete(&keys).await.unwrap(), 2);
    assert_eq!(ops.delete(&keys).await.unwrap(), 0);
    assert_eq!(ops.get("a").await.unwrap(), None);
}

async fn check_succeeds_on_a_healthy_backend(cache: Cache) {
    backend_ops(&cache).check().await.unwrap();
}

on_every_backend!(
    get_returns_what_set_stored_byte_for_byte,
    reads_stop_at_their_limit,
    get_with_ttl_reports_the_time_left,
    values_expire_after_px,
    set_if_absent_stores_only_on_an_absent_or_expired_key,
    compare_and_set_compares_a_prefix,
    compare_and_delete_compares_a_prefix,
    compare_and_expire_sets_the_expiry_only_on_a_match,
    set_if_longer_replaces_only_a_value_past_the_limit,
    delete_counts_the_keys_that_existed,
    check_succeeds_on_a_healthy_backend,
    get_tagged_reads_an_entry_and_its_tags,
);

/// Only another client can leave a key without expiry; the backend says so.
#[tokio::test]
async fn a_key_without_expiry_has_no_ttl() {
    let server = cache_harness::RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    server.command("SET k v").unwrap();
    let (bytes, ttl) = backend_ops(&cache)
        .get_with_ttl("k")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((bytes.as_slice(), ttl), (&b"v"[..], None));
}
