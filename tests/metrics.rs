//! The `metrics` feature: every counter reaches the installed recorder
//! with the labels the README's table documents (`function`, `outcome`),
//! and each completed call's duration goes to a histogram. Checked with
//! `metrics-util`'s debugging recorder, on a real `redis-server`.

use cache_harness::RedisServer;
use cache_runtime::{Cache, invalidates, redis_cached};
use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

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
        cache: Cache::connect(&server.url()).await.unwrap(),
    };
    users.user(1).await; // miss
    users.user(1).await; // hit
    users.user(1).await; // hit
    users.rename(1).await; // invalidation
    users.user(1).await; // miss

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
}
