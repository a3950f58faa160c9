//! The `debug` span of each cached call: its function, its outcome and
//! OpenTelemetry's database attributes; the key only when the cache is
//! told to (`trace_keys`). Captured with a `tracing-subscriber` layer, on
//! a real `redis-server`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use cache_harness::RedisServer;
use cache_runtime::{Cache, redis_cached};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};

/// A span's name and fields.
type Captured = (String, BTreeMap<String, String>);

/// Every span's name and fields, by span id.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<HashMap<u64, Captured>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let name = attrs.metadata().name().to_owned();
        self.0.lock().unwrap().insert(id.into_u64(), (name, fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some((_, fields)) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }
}

impl Spans {
    /// The fields of every span named `name`, in creation order.
    fn named(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        let spans = self.0.lock().unwrap();
        let mut found: Vec<_> = spans
            .iter()
            .filter(|(_, (n, _))| n == name)
            .map(|(id, (_, fields))| (*id, fields.clone()))
            .collect();
        found.sort_by_key(|(id, _)| *id);
        found.into_iter().map(|(_, fields)| fields).collect()
    }
}

struct Users {
    cache: Cache,
}

impl Users {
    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    async fn user(&self, id: u64) -> u64 {
        id
    }

    #[redis_cached(key = "near:<id>", ttl = 60, local = "10s", cache = self.cache)]
    async fn near(&self, id: u64) -> u64 {
        id
    }

    #[redis_cached(key = "user:<ids>", ttl = 60, batch, cache = self.cache)]
    async fn users(&self, ids: &[u64]) -> HashMap<u64, u64> {
        ids.iter().map(|&id| (id, id)).collect()
    }
}

#[tokio::test]
async fn each_call_has_a_span_with_its_outcome() {
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(
        spans
            .clone()
            .with_filter(tracing_subscriber::filter::LevelFilter::DEBUG),
    );
    // This test's thread only: every call below is polled on it.
    let _default = tracing::subscriber::set_default(subscriber);
    let server = RedisServer::start();
    let users = Users {
        cache: Cache::connect(&server.url()).await.unwrap(),
    };
    users.user(1).await;
    users.user(1).await;
    users.users(&[1, 2, 3]).await;
    for _ in 0..200 {
        users.near(5).await;
        if users.cache.stats().total.local_hits > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let calls = spans.named("cache.call");
    let outcomes: Vec<&str> = calls.iter().map(|f| f["outcome"].as_str()).collect();
    println!("outcomes: {outcomes:?}");
    assert_eq!(&outcomes[..2], ["miss", "hit"]);
    assert_eq!(outcomes.last(), Some(&"local"));
    let first = &calls[0];
    assert!(first["function"].ends_with("::user"), "{first:?}");
    assert_eq!(first["db.system.name"], "redis");
    assert_eq!(first["db.operation.name"], "GETRANGE");
    assert!(!first.contains_key("cache.key"), "keys only when asked for");
    let batches = spans.named("cache.batch");
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0]["cache.batch.size"], "3");
    assert_eq!(batches[0]["db.operation.name"], "BATCH GETRANGE");

    // Asked for: the key is on the span.
    let keyed = Users {
        cache: Cache::builder()
            .url(server.url())
            .trace_keys(true)
            .build()
            .await
            .unwrap(),
    };
    keyed.user(9).await;
    let last = spans.named("cache.call").pop().unwrap();
    assert_eq!(last["cache.key"], "user:9");
}
