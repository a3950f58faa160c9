//! The `metrics` feature: every counter reaches the installed recorder
//! with the labels the README's table documents (`function`, `outcome`),
//! each completed call's duration goes to a histogram, and so does each
//! Redis operation's, labelled by `operation`. Checked with
//! `metrics-util`'s debugging recorder, on a real `redis-server`.

use std::time::Duration;

use cache_harness::RedisServer;
use cache_runtime::{Cache, invalidates, redis_cached};
use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

const OP_TIMEOUT: Duration = Duration::from_millis(100);

struct Users {
    cache: Cache,
}

impl Users {
    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    async fn user(&self, id: u64) -> u64 {
        id
    }

    #[invalidates(Self::user(id), cache = self.cache)]
    async fn rename(&self, id: u64) {
        let _ = id;
    }
}

#[tokio::test]
async fn counters_and_durations_reach_the_recorder() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Installed before the first cached call, as the README says.
    recorder
        .install()
        .expect("the only recorder of this test binary");
    let server = RedisServer::start();
    let users = Users {
        cache: Cache::builder()
            .url(server.url())
            .op_timeout(OP_TIMEOUT)
            .build()
            .await
            .unwrap(),
    };
    users.user(1).await; // miss
    users.user(1).await; // hit
    users.user(1).await; // hit
    users.rename(1).await; // invalidation
    users.user(1).await; // miss
    users.cache.settled().await;

    let snapshot = snapshotter.snapshot().into_vec();
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<&DebugValue> {
        snapshot.iter().find_map(|(key, _, _, value)| {
            let key = key.key();
            let matches = key.name() == name
                && labels.iter().all(|(k, v)| {
                    key.labels().any(|l| {
                        l.key() == *k && (l.value() == *v || l.value().ends_with(&format!("::{v}")))
                    })
                });
            matches.then_some(value)
        })
    };
    for (key, _, _, value) in &snapshot {
        if key.kind() == MetricKind::Counter {
            println!("{:?} = {value:?}", key.key());
        }
    }
    assert_eq!(
        value(
            "cache_calls_total",
            &[("function", "user"), ("outcome", "hit")]
        ),
        Some(&DebugValue::Counter(2))
    );
    assert_eq!(
        value(
            "cache_calls_total",
            &[("function", "user"), ("outcome", "miss")]
        ),
        Some(&DebugValue::Counter(2))
    );
    assert_eq!(
        value("cache_invalidations_total", &[("function", "rename")]),
        Some(&DebugValue::Counter(1))
    );
    match value("cache_call_duration_seconds", &[("function", "user")]) {
        Some(DebugValue::Histogram(samples)) => assert_eq!(samples.len(), 4),
        other => panic!("no duration histogram: {other:?}"),
    }
    // Each operation of the lease protocol, timed: a GET per call, a lease
    // (SET NX) and its compare-and-set per miss, one DEL.
    let mut operations = Vec::new();
    for (key, _, _, value) in &snapshot {
        if key.key().name() == "cache_operation_duration_seconds"
            && let DebugValue::Histogram(samples) = value
        {
            let label = key.key().labels().next().expect("the operation label");
            assert_eq!(label.key(), "operation");
            assert!(samples.iter().all(|s| s.into_inner() > 0.0));
            operations.push((label.value().to_owned(), samples.len()));
        }
    }
    operations.sort();
    println!("operations timed: {operations:?}");
    let expected = [
        ("compare_and_set", 2),
        ("delete", 1),
        ("get", 4),
        ("set_if_absent", 2),
    ];
    let expected: Vec<(String, usize)> = expected
        .iter()
        .map(|(op, n)| ((*op).to_owned(), *n))
        .collect();
    assert_eq!(operations, expected);

    // An operation given up at the op timeout is timed too: a hung server
    // shows in the histogram's tail rather than vanishing from it.
    server.freeze();
    assert_eq!(users.user(2).await, 2, "fails open");
    server.thaw();
    let timeout = OP_TIMEOUT.as_secs_f64();
    let slowest_get = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| {
            key.key().name() == "cache_operation_duration_seconds"
                && key.key().labels().any(|l| l.value() == "get")
        })
        .flat_map(|(.., value)| match value {
            DebugValue::Histogram(samples) => samples,
            _ => Vec::new(),
        })
        .map(|s| s.into_inner())
        .fold(0.0, f64::max);
    println!("slowest GET timed: {slowest_get:.3} s (op timeout {timeout} s)");
    assert!(slowest_get >= timeout);
}
