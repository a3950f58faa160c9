//! What stored bytes are, told apart the way the read path tells them
//! (the entry format is on the guide's operations page), and what a
//! reader would do with them. Pure: no I/O.

use std::fmt;
use std::time::Duration;

use crate::codec::Codec;
use crate::holder::Holder;
use crate::outcome::NOTHING;
use crate::read::freshness::{self, Verdict as Freshness};
use crate::write::lease::{self, Found};

/// One key as the cache sees it ([`Cache::inspect`](crate::Cache::inspect)).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Inspection {
    /// The Redis key, the cache's prefix included.
    pub key: String,
    /// What the key holds.
    pub entry: Entry,
    /// How long the key has left, by the server's clock; `None` when it
    /// has no expiry or is absent.
    pub expires_in: Option<Duration>,
    /// How many bytes are stored (0 when absent).
    pub size: usize,
    /// The refresh lock of the entry (functions with `stale`,
    /// `early_refresh` or `fail_safe`), when someone holds it: a caller is
    /// recomputing the entry while the others are served it.
    pub refresh_lock: Option<Lease>,
}

/// What a key holds.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Entry {
    /// Nothing: the next call is a miss.
    Absent,
    /// A value (or a cached `None`).
    Value(Box<Value>),
    /// A lease placeholder: a caller is computing the value.
    Lease(Lease),
    /// Not an entry the cache can serve (it says why): the next call
    /// recomputes it and overwrites it.
    Garbage(String),
}

/// A stored value, decoded.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Value {
    /// The value as JSON text (a MessagePack value turned into JSON);
    /// `None` for a cached `None` (`cache_none`).
    pub json: Option<String>,
    /// The codec that decodes it: the cache's, or else the other one (a
    /// tool does not know the service's codec).
    pub codec: Codec,
    /// Stored compressed (`compress_above`): how long it is decompressed.
    pub compressed: Option<usize>,
    /// The freshness header of a function with `stale`, `early_refresh`
    /// or `fail_safe`.
    pub freshness: Option<Stamp>,
    /// The tags it was stored with, in the order of its header.
    pub tags: Vec<Tag>,
}

/// A freshness header: how long the value took to compute, and when it
/// was stored by the writer's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stamp {
    /// How long the body took.
    pub computed_in: Duration,
    /// When it was stored, in ms since the Unix epoch, by the writing
    /// host's clock (for people: the cache never compares it).
    pub stored_at_millis: u64,
}

/// A tag of a stored value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tag {
    /// The tag, as rendered (`org:42`).
    pub name: String,
    /// Named by the value (`tags_from`), not by the function's `tags`.
    pub from_value: bool,
    /// Whether the tag still holds the token the value was stored with.
    pub state: TagState,
    /// The token the value was stored with.
    pub(crate) token: String,
}

/// Whether a value's tag was invalidated since the value was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TagState {
    /// The tag holds the token the value was stored with.
    Current,
    /// The tag was invalidated (or expired, or evicted) since: the value
    /// is never served again.
    Invalidated,
    /// Not read.
    Unknown,
}

/// A lease placeholder (or refresh lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// Who took it.
    pub holder: Holder,
    /// When, in ms since the Unix epoch, by the taker's clock (0: the
    /// placeholder does not say).
    pub taken_at_millis: u64,
    /// How long it has left; `None` without expiry (never ours: garbage).
    pub expires_in: Option<Duration>,
}

/// The windows an entry of a function is kept for after its TTL: they
/// are the function's (`stale`, `fail_safe`), not the entry's, so an
/// inspection asks for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Windows {
    /// `stale = "..."`; with `early_refresh`, the larger of it and the
    /// lease (`CacheBuilder::lease`, 10 s unless set), which an early
    /// refresh has to finish in.
    pub stale: Duration,
    /// `fail_safe = "..."`.
    pub fail_safe: Duration,
}

impl Windows {
    /// A function's windows.
    pub fn new(stale: Duration, fail_safe: Duration) -> Windows {
        Windows { stale, fail_safe }
    }
}

/// What the next call of the entry's function would do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// A miss: the body runs, takes the lease and stores its value.
    Miss,
    /// Served, for this long more (`None`: no expiry).
    Fresh(Option<Duration>),
    /// Served, for this long more (`None`: no expiry), while one caller
    /// recomputes it.
    Stale(Option<Duration>),
    /// Past its stale window: recomputed like a miss, and served only if
    /// the body fails (`fail_safe`), for this long more.
    FailSafe(Duration),
    /// Served for this long more, fresh for part of it: how much depends
    /// on the function's windows, which were not given.
    Kept(Duration),
    /// A caller is computing it (for this long more, at most): others
    /// compute without storing, or, with `single_flight = "distributed"`,
    /// wait for its value.
    Leased(Option<Duration>),
    /// Never served again: this tag was invalidated since it was stored.
    /// The next call is a miss.
    Invalidated(String),
    /// Not servable: the next call recomputes it and overwrites it.
    Replaced(String),
}

impl Inspection {
    /// What the next call of the entry's function would do with it, for
    /// a function kept `windows` past its TTL (`None`: not known).
    pub fn verdict(&self, windows: Option<Windows>) -> Verdict {
        let value = match &self.entry {
            Entry::Absent => return Verdict::Miss,
            Entry::Garbage(why) => return Verdict::Replaced(why.clone()),
            Entry::Lease(lease) => return Verdict::Leased(lease.expires_in),
            Entry::Value(value) => value,
        };
        if let Some(tag) = value.tags.iter().find(|t| t.state == TagState::Invalidated) {
            return Verdict::Invalidated(tag.name.clone());
        }
        let Some(left) = self.expires_in else {
            // A value with a freshness header and no expiry (someone
            // else's `PERSIST`) is recomputed, as a stale one is.
            return match value.freshness {
                None => Verdict::Fresh(None),
                Some(_) => Verdict::Stale(None),
            };
        };
        if value.freshness.is_none() {
            return Verdict::Fresh(Some(left));
        }
        let Some(windows) = windows else {
            return Verdict::Kept(left);
        };
        let (stale, fail_safe) = (
            crate::clock::millis(windows.stale),
            crate::clock::millis(windows.fail_safe),
        );
        let kept = stale.saturating_add(fail_safe);
        let left_ms = crate::clock::millis(left);
        let ms = Duration::from_millis;
        match freshness::window(Some(left_ms), kept, fail_safe) {
            Ok(fresh_left) => Verdict::Fresh(Some(ms(fresh_left))),
            Err(Freshness::Expired) => Verdict::FailSafe(left),
            Err(_) => Verdict::Stale(Some(ms(left_ms.saturating_sub(fail_safe)))),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = |d: &Duration| HumanDuration(*d);
        match self {
            Verdict::Miss => write!(f, "absent: the next call is a miss"),
            Verdict::Fresh(None) => write!(f, "fresh, served (no expiry: not set by this cache)"),
            Verdict::Fresh(Some(d)) => write!(f, "fresh, served for {} more", secs(d)),
            Verdict::Stale(Some(d)) => write!(
                f,
                "stale, served for {} more while one caller recomputes it",
                secs(d)
            ),
            Verdict::Stale(None) => write!(
                f,
                "stale (no expiry: not set by this cache), served while one caller recomputes it"
            ),
            Verdict::FailSafe(d) => write!(
                f,
                "expired, recomputed by the next call; served only if that fails (fail_safe), for {} more",
                secs(d)
            ),
            Verdict::Kept(d) => write!(
                f,
                "served for {} more, fresh for the part of it before the function's stale and \
                 fail_safe windows (give them to tell)",
                secs(d)
            ),
            Verdict::Leased(Some(d)) => write!(
                f,
                "a caller is computing it (lease, {} left): other callers compute without storing, \
                 or wait (single_flight = \"distributed\")",
                secs(d)
            ),
            Verdict::Leased(None) => write!(f, "a lease without expiry: not ours, replaced"),
            Verdict::Invalidated(tag) => write!(
                f,
                "invalidated by tag `{tag}`: never served again, the next call is a miss"
            ),
            Verdict::Replaced(why) => write!(f, "not servable ({why}): recomputed and overwritten"),
        }
    }
}

/// A duration as people read it: `850 ms`, `41.2 s`, `3 min 5 s`,
/// `3 h 12 min`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            0..1_000 => write!(f, "{ms} ms"),
            1_000..60_000 => write!(f, "{:.1} s", self.0.as_secs_f64()),
            60_000..3_600_000 => write!(f, "{} min {} s", ms / 60_000, ms % 60_000 / 1_000),
            _ => write!(f, "{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
        }
    }
}

/// What `bytes` stored under a key with `ttl_millis` left hold, the value
/// decoded as [`to_json`] does (`codec` first); compressed values are
/// decompressed up to `limit` bytes. Tags come back [`TagState::Unknown`].
pub(crate) fn parse(bytes: &[u8], ttl_millis: Option<u64>, codec: Codec, limit: usize) -> Entry {
    match lease::inspect(bytes) {
        Found::Placeholder if ttl_millis.is_none() => {
            return Entry::Garbage("a lease placeholder without expiry".into());
        }
        Found::Placeholder => {
            let Some((holder, taken_at_millis)) = Holder::of_placeholder(bytes) else {
                return Entry::Garbage("a malformed lease placeholder".into());
            };
            return Entry::Lease(Lease {
                holder,
                taken_at_millis,
                expires_in: ttl_millis.map(Duration::from_millis),
            });
        }
        Found::Malformed => return Entry::Garbage("a malformed lease placeholder".into()),
        Found::Value => {}
    }
    let Some(tags_end) = crate::tag::header_len(bytes) else {
        return Entry::Garbage("a malformed tag header".into());
    };
    let Some(tags) = crate::tag::parse_header(&bytes[..tags_end]) else {
        return Entry::Garbage("a malformed tag header".into());
    };
    let rest = &bytes[tags_end..];
    let (freshness, rest) = match freshness::split(rest) {
        Ok(None) => (None, rest),
        Ok(Some((header, at))) => {
            let (computed_in, stored_at_millis) = header.parts();
            let stamp = Stamp {
                computed_in,
                stored_at_millis,
            };
            (Some(stamp), &rest[at..])
        }
        Err(freshness::MalformedHeader) => {
            return Entry::Garbage("a malformed freshness header".into());
        }
    };
    let tags = tags
        .into_iter()
        .map(|(token, name, from_value)| Tag {
            name,
            from_value,
            state: TagState::Unknown,
            token,
        })
        .collect();
    let mut value = Value {
        json: None,
        codec: Codec::Json,
        compressed: None,
        freshness,
        tags,
    };
    if rest == NOTHING {
        return Entry::Value(Box::new(value));
    }
    let decompressed;
    let encoded = if crate::compression::is_compressed(rest) {
        match crate::compression::decompress(rest, limit) {
            Ok(bytes) => {
                decompressed = bytes;
                value.compressed = Some(decompressed.len());
                &decompressed[..]
            }
            Err(error) => return Entry::Garbage(error.to_string()),
        }
    } else {
        rest
    };
    match to_json(encoded, codec) {
        Ok((json, codec)) => {
            value.json = Some(json);
            value.codec = codec;
            Entry::Value(Box::new(value))
        }
        Err(error) => Entry::Garbage(format!("undecodable: {error}")),
    }
}

/// `encoded` as JSON text, and the codec that decoded it: `preferred`
/// first, then the other. A codec decodes only if it reads all of the
/// bytes as one value (a MessagePack decoder alone reads `{"id":1}` as
/// the integer 123 and stops there), so that a value of one codec is
/// never shown as a value of the other; the error is `preferred`'s.
fn to_json(encoded: &[u8], preferred: Codec) -> Result<(String, Codec), crate::CodecError> {
    let others = [
        Codec::Json,
        #[cfg(feature = "msgpack")]
        Codec::MessagePack,
    ];
    let mut error = None;
    for codec in std::iter::once(preferred).chain(others.into_iter().filter(|&c| c != preferred)) {
        match transcode(encoded, codec) {
            Ok(json) => return Ok((json.0.to_string(), codec)),
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    Err(error.expect("one codec at least"))
}

/// `encoded`, all of it, as one value of `codec`, in JSON.
fn transcode(encoded: &[u8], codec: Codec) -> Result<Json, crate::CodecError> {
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| crate::CodecError::Decode {
        codec,
        source,
    };
    match codec {
        // `from_slice` rejects what follows the value.
        Codec::Json => serde_json::from_slice(encoded).map_err(|e| failed(e.into())),
        #[cfg(feature = "msgpack")]
        Codec::MessagePack => {
            use serde::Deserialize as _;
            let mut decoder = rmp_serde::Deserializer::new(std::io::Cursor::new(encoded));
            let json = Json::deserialize(&mut decoder).map_err(|e| failed(e.into()))?;
            if decoder.position() != encoded.len() as u64 {
                return Err(failed("bytes after the value".into()));
            }
            Ok(json)
        }
    }
}

/// A value of any serde format, as JSON: map keys that are not strings
/// (a `HashMap<u64, _>` in MessagePack) become their JSON text, bytes
/// become arrays of numbers.
struct Json(serde_json::Value);

impl<'de> serde::Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Json, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> serde::de::Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(Json(v.into()))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json(v.into()))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Json, E> {
        Ok(Json(
            v.iter().map(|&b| serde_json::Value::from(b)).collect(),
        ))
    }
    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json(serde_json::Value::Null))
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json(serde_json::Value::Null))
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
        serde::Deserialize::deserialize(d)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(Json(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json(serde_json::Value::Array(items)))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some((Json(key), Json(value))) = map.next_entry()? {
            let key = match key {
                serde_json::Value::String(key) => key,
                key => key.to_string(),
            };
            object.insert(key, value);
        }
        Ok(Json(serde_json::Value::Object(object)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inspection(entry: Entry, expires_ms: Option<u64>) -> Inspection {
        Inspection {
            key: "k".into(),
            entry,
            expires_in: expires_ms.map(Duration::from_millis),
            size: 0,
            refresh_lock: None,
        }
    }

    fn value(bytes: &[u8]) -> Entry {
        parse(bytes, Some(1_000), Codec::Json, 1 << 20)
    }

    #[test]
    fn every_kind_of_entry_is_told_apart() {
        let Entry::Value(plain) = value(br#"{"id":1}"#) else {
            panic!()
        };
        assert_eq!(plain.json.as_deref(), Some(r#"{"id":1}"#));
        let Entry::Value(none) = value(b"\x02none") else {
            panic!()
        };
        assert_eq!(none.json, None);
        let fresh = b"\x01fresh:12:00000000000000ff:1700000000000\n{\"id\":2}";
        let Entry::Value(fresh) = value(fresh) else {
            panic!()
        };
        assert_eq!(
            fresh.freshness,
            Some(Stamp {
                computed_in: Duration::from_millis(12),
                stored_at_millis: 1_700_000_000_000
            })
        );
        let tagged = b"\x04tags:00000000000000aa org:1 | 00000000000000bb row:2\n[1]";
        let Entry::Value(tagged) = value(tagged) else {
            panic!()
        };
        let names: Vec<_> = tagged
            .tags
            .iter()
            .map(|t| (t.name.as_str(), t.from_value))
            .collect();
        assert_eq!(names, [("org:1", false), ("row:2", true)]);
        let lease = format!("\0lease:{:08x}{:08x}{:016x}:1700000000000", 42, 7, 9);
        assert_eq!(
            value(lease.as_bytes()),
            Entry::Lease(Lease {
                holder: Holder {
                    pid: 42,
                    instance: 7
                },
                taken_at_millis: 1_700_000_000_000,
                expires_in: Some(Duration::from_secs(1)),
            })
        );
        #[cfg(feature = "msgpack")]
        {
            let by_id: std::collections::HashMap<u64, &str> = [(7, "a")].into();
            let packed = Codec::MessagePack.encode(&by_id).unwrap();
            let Entry::Value(map) = value(&packed) else {
                panic!()
            };
            assert_eq!(
                (map.json.as_deref(), map.codec),
                (Some(r#"{"7":"a"}"#), Codec::MessagePack)
            );
        }
        for garbage in [&b"\0lease:zz"[..], b"\x01fresh:x\n1", b"\x04tags:aa", b"{x"] {
            assert!(matches!(value(garbage), Entry::Garbage(_)), "{garbage:?}");
        }
        assert!(matches!(
            parse(lease.as_bytes(), None, Codec::Json, 100),
            Entry::Garbage(_)
        ));
    }

    #[test]
    fn verdicts_follow_the_windows() {
        let fresh = value(b"\x01fresh:12:00000000000000ff:1\n1");
        let s = Duration::from_secs;
        let windows = Some(Windows::new(s(30), s(60)));
        let at = |left_s: u64| inspection(fresh.clone(), Some(left_s * 1_000)).verdict(windows);
        assert_eq!(at(100), Verdict::Fresh(Some(s(10))));
        assert_eq!(at(80), Verdict::Stale(Some(s(20))));
        assert_eq!(
            inspection(fresh.clone(), None).verdict(windows),
            Verdict::Stale(None)
        );
        assert_eq!(at(50), Verdict::FailSafe(s(50)));
        assert_eq!(
            inspection(fresh.clone(), Some(100_000)).verdict(None),
            Verdict::Kept(s(100))
        );
        let plain = inspection(value(b"1"), Some(5_000));
        assert_eq!(plain.verdict(windows), Verdict::Fresh(Some(s(5))));
        assert_eq!(inspection(Entry::Absent, None).verdict(None), Verdict::Miss);
        let mut tagged = value(b"\x04tags:00000000000000aa org:1\n1");
        if let Entry::Value(v) = &mut tagged {
            v.tags[0].state = TagState::Invalidated;
        }
        assert_eq!(
            inspection(tagged, Some(1)).verdict(None),
            Verdict::Invalidated("org:1".into())
        );
        assert_eq!(
            HumanDuration(Duration::from_millis(41_230)).to_string(),
            "41.2 s"
        );
        assert_eq!(
            HumanDuration(Duration::from_millis(850)).to_string(),
            "850 ms"
        );
    }
}
