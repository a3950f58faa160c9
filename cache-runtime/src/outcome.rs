//! Which part of a function's result is cached, chosen by the macro from the
//! declared return type, and how an answer of nothing is stored.
//!
//! # Negative entries
//!
//! With `cache_none` (or `none_ttl`), an answer of `None` / `Ok(None)` is
//! stored as the five bytes `\x02none` (after the freshness header, if the
//! function has one), which `redis-cli get` shows as `"\x02none"`. No
//! encoded value reads the same: JSON never starts with byte 2, and a
//! MessagePack value that does (the integer 2) is that one byte long.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A type that a cached function can return: implemented for every type
/// that is `Serialize` and `DeserializeOwned` (serde's derives give both).
/// It exists so that a value that is not says so at the function's return
/// type; there is nothing to implement.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be cached: it must be `serde::Serialize` and `serde::Deserialize`",
    label = "the cached value",
    note = "derive both on the type: `#[derive(serde::Serialize, serde::Deserialize)]`, or cache a type that has them"
)]
pub trait Cacheable {
    /// Names the check in generated code.
    #[doc(hidden)]
    const CACHEABLE: () = ();
}

impl<T: Serialize + DeserializeOwned> Cacheable for T {}

/// Names the cached part of a return type, without requiring anything of
/// it: the generated key function's `CacheKey<V>` names `V` this way, so a
/// value that is not `Serialize` is reported once, at the cached call.
#[doc(hidden)]
pub trait ValueOf<R> {
    /// The cached part of `R`.
    type Value;
}

impl<T, E> ValueOf<Result<T, E>> for ResultShape {
    type Value = T;
}

impl<T> ValueOf<Option<T>> for OptionShape {
    type Value = T;
}

impl<T, E> ValueOf<Result<Option<T>, E>> for ResultOptionShape {
    type Value = T;
}

impl<T> ValueOf<T> for PlainShape {
    type Value = T;
}

/// How an answer of nothing (`None`) is stored; see the module docs.
pub(crate) const NOTHING: &[u8] = b"\x02none";

/// What a function's result says about the key.
#[doc(hidden)]
#[derive(Debug)]
pub enum Answer<'a, V> {
    /// A value to cache.
    Value(&'a V),
    /// An answer that there is nothing (`None`, `Ok(None)`): it replaces a
    /// cached value, it is not a failure.
    Nothing,
    /// The computation failed (`Err`): nothing is learned about the key.
    Failed,
}

/// What a body's output says about the key, with its value encoded.
pub(crate) enum Encoded {
    /// A value, and how long it is stored.
    Value(Result<Vec<u8>, crate::codec::CodecError>, Life),
    /// An answer that there is nothing (`None`).
    Nothing,
    /// The body failed (`Err`).
    Failed,
}

impl Encoded {
    /// `answer`, encoded with `codec`, stored as `rules` say.
    pub(crate) fn of<V: Serialize>(
        codec: crate::codec::Codec,
        answer: Answer<'_, V>,
        rules: &ByValue<V>,
    ) -> Encoded {
        match answer {
            Answer::Value(value) => Encoded::Value(codec.encode(value), rules.life(value)),
            Answer::Nothing => Encoded::Nothing,
            Answer::Failed => Encoded::Failed,
        }
    }
}

/// The longest TTL `ttl_from` can give, in milliseconds (ten years): a
/// longer one (`Duration::MAX` for "forever") is cut to it, so that the
/// server never refuses the expiry.
pub(crate) const LONGEST_TTL: u64 = 10 * 365 * 24 * 3600 * 1000;

/// How long a computed value is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Life {
    /// For the function's TTL (`ttl = ...`).
    Ttl,
    /// For what `ttl_from` answered, in milliseconds (at least 1).
    Millis(u64),
    /// Not at all: `unless` said so, or `ttl_from` answered zero. The value
    /// is still the call's answer, and that of the callers waiting for it.
    Unstored,
}

/// What a cached function's value decides about its own entry: the tags it
/// names (`tags_from`), its TTL (`ttl_from`), whether it is stored
/// (`unless`). Generated code builds it with the user's functions, called
/// at the user's paths, so that a function of the wrong signature is
/// reported there.
#[doc(hidden)]
pub struct ByValue<V> {
    tags: Option<fn(&V, &mut Vec<String>)>,
    ttl: Option<fn(&V) -> Option<std::time::Duration>>,
    unless: Option<fn(&V) -> bool>,
}

// By hand: derives would require `V: Clone`.
impl<V> Clone for ByValue<V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<V> Copy for ByValue<V> {}

impl<V> Default for ByValue<V> {
    fn default() -> Self {
        ByValue::new()
    }
}

impl<V> ByValue<V> {
    /// A value that decides nothing: the attribute's TTL and tags.
    pub const fn new() -> Self {
        ByValue {
            tags: None,
            ttl: None,
            unless: None,
        }
    }

    /// `tags_from = path`: adds the tags the value names to the list.
    pub const fn tags_from(mut self, tags: fn(&V, &mut Vec<String>)) -> Self {
        self.tags = Some(tags);
        self
    }

    /// `ttl_from = path`: the value's TTL; `None` keeps the attribute's.
    pub const fn ttl_from(mut self, ttl: fn(&V) -> Option<std::time::Duration>) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// `unless = path`: `true` if the value is not to be stored.
    pub const fn unless(mut self, unless: fn(&V) -> bool) -> Self {
        self.unless = Some(unless);
        self
    }

    /// The tags `value` names (`tags_from`), added to `tags`.
    pub(crate) fn tags_of(&self, value: &V, tags: &mut Vec<String>) {
        if let Some(derive) = self.tags {
            derive(value, tags);
        }
    }

    /// How long `value` is stored. `unless` is asked first: a value it
    /// rejects is not stored whatever its TTL would be.
    pub(crate) fn life(&self, value: &V) -> Life {
        if self.unless.is_some_and(|unless| unless(value)) {
            return Life::Unstored;
        }
        match self.ttl.and_then(|ttl| ttl(value)) {
            None => Life::Ttl,
            Some(ttl) if ttl.is_zero() => Life::Unstored,
            // Rounded up: a TTL under a millisecond is still a TTL.
            Some(ttl) => {
                let millis = ttl.as_nanos().div_ceil(1_000_000);
                Life::Millis(u64::try_from(millis).map_or(LONGEST_TTL, |m| m.min(LONGEST_TTL)))
            }
        }
    }
}

/// Maps a return type `R` to the value that is stored and back.
#[doc(hidden)]
pub trait Outcome<R> {
    /// What is stored in the cache.
    type Value: Serialize + DeserializeOwned;
    /// What this result says about the key.
    fn answer(result: &R) -> Answer<'_, Self::Value>;
    /// The result a cache hit returns.
    fn from_hit(value: Self::Value) -> R;
    /// The result for [`Answer::Nothing`], for callers given another
    /// caller's answer (`None` for types that have no such answer).
    fn nothing() -> Option<R>;
}

/// `Result<T, E>`: `Ok` is cached, `Err` never.
#[doc(hidden)]
pub struct ResultShape;

impl<T: Serialize + DeserializeOwned, E> Outcome<Result<T, E>> for ResultShape {
    type Value = T;
    fn answer(result: &Result<T, E>) -> Answer<'_, T> {
        match result {
            Ok(value) => Answer::Value(value),
            Err(_) => Answer::Failed,
        }
    }
    fn from_hit(value: T) -> Result<T, E> {
        Ok(value)
    }
    fn nothing() -> Option<Result<T, E>> {
        None
    }
}

/// `Option<T>`: `Some` is cached; `None` is an answer.
#[doc(hidden)]
pub struct OptionShape;

impl<T: Serialize + DeserializeOwned> Outcome<Option<T>> for OptionShape {
    type Value = T;
    fn answer(result: &Option<T>) -> Answer<'_, T> {
        result.as_ref().map_or(Answer::Nothing, Answer::Value)
    }
    fn from_hit(value: T) -> Option<T> {
        Some(value)
    }
    fn nothing() -> Option<Option<T>> {
        Some(None)
    }
}

/// `Result<Option<T>, E>`: `Ok(Some)` is cached; `Ok(None)` is an answer.
#[doc(hidden)]
pub struct ResultOptionShape;

impl<T: Serialize + DeserializeOwned, E> Outcome<Result<Option<T>, E>> for ResultOptionShape {
    type Value = T;
    fn answer(result: &Result<Option<T>, E>) -> Answer<'_, T> {
        match result {
            Ok(Some(value)) => Answer::Value(value),
            Ok(None) => Answer::Nothing,
            Err(_) => Answer::Failed,
        }
    }
    fn from_hit(value: T) -> Result<Option<T>, E> {
        Ok(Some(value))
    }
    fn nothing() -> Option<Result<Option<T>, E>> {
        Some(Ok(None))
    }
}

/// Any other type: cached as is.
#[doc(hidden)]
pub struct PlainShape;

impl<T: Serialize + DeserializeOwned> Outcome<T> for PlainShape {
    type Value = T;
    fn answer(result: &T) -> Answer<'_, T> {
        Answer::Value(result)
    }
    fn from_hit(value: T) -> T {
        value
    }
    fn nothing() -> Option<T> {
        None
    }
}

/// Whether a write function's result means the write happened, so that its
/// keys are invalidated: `Ok` for `Result`s, any value otherwise.
#[doc(hidden)]
pub trait Completion<R> {
    /// What a target names as `ret`: the `Ok` value, or the whole result.
    type Done;
    /// The write's result, if it succeeded.
    fn done(result: &R) -> Option<&Self::Done>;

    /// The write succeeded.
    fn succeeded(result: &R) -> bool {
        Self::done(result).is_some()
    }
}

impl<T, E> Completion<Result<T, E>> for ResultShape {
    type Done = T;
    fn done(result: &Result<T, E>) -> Option<&T> {
        result.as_ref().ok()
    }
}

impl<T, E> Completion<Result<T, E>> for ResultOptionShape {
    type Done = T;
    fn done(result: &Result<T, E>) -> Option<&T> {
        result.as_ref().ok()
    }
}

impl<R> Completion<R> for OptionShape {
    type Done = R;
    fn done(result: &R) -> Option<&R> {
        Some(result)
    }
}

impl<R> Completion<R> for PlainShape {
    type Done = R;
    fn done(result: &R) -> Option<&R> {
        Some(result)
    }
}

/// The map a batch function returns (`HashMap` or `BTreeMap`): the ids it
/// found and their values.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "a `batch` function returns a map from each id to its value, not `{Self}`",
    label = "not a `HashMap` or a `BTreeMap`",
    note = "return `HashMap<Id, V>` or `BTreeMap<Id, V>` (or a `Result` of one); the body leaves out the ids it did not find"
)]
pub trait BatchMap: Default {
    /// The id (an element of the batch parameter).
    type Key;
    /// The cached value of one id.
    type Value;
    /// The value of `key`, if the body returned one.
    fn lookup(&self, key: &Self::Key) -> Option<&Self::Value>;
    /// Adds a cached value.
    fn put(&mut self, key: Self::Key, value: Self::Value);
}

impl<K: Eq + std::hash::Hash, V, H: std::hash::BuildHasher + Default> BatchMap
    for std::collections::HashMap<K, V, H>
{
    type Key = K;
    type Value = V;
    fn lookup(&self, key: &K) -> Option<&V> {
        self.get(key)
    }
    fn put(&mut self, key: K, value: V) {
        self.insert(key, value);
    }
}

impl<K: Ord, V> BatchMap for std::collections::BTreeMap<K, V> {
    type Key = K;
    type Value = V;
    fn lookup(&self, key: &K) -> Option<&V> {
        self.get(key)
    }
    fn put(&mut self, key: K, value: V) {
        self.insert(key, value);
    }
}

/// Maps a batch function's return type `R` to its map: `Result<M, E>`
/// (an `Err` caches nothing) or `M` itself.
#[doc(hidden)]
pub trait BatchOutcome<R> {
    /// The map of ids to values.
    type Map: BatchMap;
    /// The map, or `None` when the body failed.
    fn map_mut(result: &mut R) -> Option<&mut Self::Map>;
    /// The result for a batch served from the cache alone.
    fn from_map(map: Self::Map) -> R;
}

impl<M: BatchMap, E> BatchOutcome<Result<M, E>> for ResultShape {
    type Map = M;
    fn map_mut(result: &mut Result<M, E>) -> Option<&mut M> {
        result.as_mut().ok()
    }
    fn from_map(map: M) -> Result<M, E> {
        Ok(map)
    }
}

impl<M: BatchMap> BatchOutcome<M> for PlainShape {
    type Map = M;
    fn map_mut(result: &mut M) -> Option<&mut M> {
        Some(result)
    }
    fn from_map(map: M) -> M {
        map
    }
}

/// Names the value type of one id of a batch function's result, for its
/// key function's `CacheKey<V>`.
#[doc(hidden)]
pub trait BatchValueOf<R> {
    /// The cached value of one id.
    type Value;
}

impl<M: BatchMap, E> BatchValueOf<Result<M, E>> for ResultShape {
    type Value = M::Value;
}

impl<M: BatchMap> BatchValueOf<M> for PlainShape {
    type Value = M::Value;
}
