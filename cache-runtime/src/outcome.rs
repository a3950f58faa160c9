//! Which part of a function's result is cached, chosen by the macro from the
//! declared return type.

use serde::Serialize;
use serde::de::DeserializeOwned;

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

/// Maps a return type `R` to the value that is stored and back.
#[doc(hidden)]
pub trait Outcome<R> {
    /// What is stored in the cache.
    type Value: Serialize + DeserializeOwned;
    /// The value to store, or `None` when this result must not be cached
    /// (an `Err`, a `None`).
    fn cacheable(result: &R) -> Option<&Self::Value>;
    /// The result a cache hit returns.
    fn from_hit(value: Self::Value) -> R;
}

/// `Result<T, E>`: `Ok` is cached, `Err` never.
#[doc(hidden)]
pub struct ResultShape;

impl<T: Serialize + DeserializeOwned, E> Outcome<Result<T, E>> for ResultShape {
    type Value = T;
    fn cacheable(result: &Result<T, E>) -> Option<&T> {
        result.as_ref().ok()
    }
    fn from_hit(value: T) -> Result<T, E> {
        Ok(value)
    }
}

/// `Option<T>`: `Some` is cached.
#[doc(hidden)]
pub struct OptionShape;

impl<T: Serialize + DeserializeOwned> Outcome<Option<T>> for OptionShape {
    type Value = T;
    fn cacheable(result: &Option<T>) -> Option<&T> {
        result.as_ref()
    }
    fn from_hit(value: T) -> Option<T> {
        Some(value)
    }
}

/// `Result<Option<T>, E>`: `Ok(Some)` is cached.
#[doc(hidden)]
pub struct ResultOptionShape;

impl<T: Serialize + DeserializeOwned, E> Outcome<Result<Option<T>, E>> for ResultOptionShape {
    type Value = T;
    fn cacheable(result: &Result<Option<T>, E>) -> Option<&T> {
        result.as_ref().ok().and_then(Option::as_ref)
    }
    fn from_hit(value: T) -> Result<Option<T>, E> {
        Ok(Some(value))
    }
}

/// Any other type: cached as is.
#[doc(hidden)]
pub struct PlainShape;

impl<T: Serialize + DeserializeOwned> Outcome<T> for PlainShape {
    type Value = T;
    fn cacheable(result: &T) -> Option<&T> {
        Some(result)
    }
    fn from_hit(value: T) -> T {
        value
    }
}

/// Whether a write function's result means the write happened, so that its
/// keys are invalidated: `Ok` for `Result`s, any value otherwise.
#[doc(hidden)]
pub trait Completion<R> {
    /// The write succeeded.
    fn succeeded(result: &R) -> bool;
}

impl<T, E> Completion<Result<T, E>> for ResultShape {
    fn succeeded(result: &Result<T, E>) -> bool {
        result.is_ok()
    }
}

impl<T, E> Completion<Result<T, E>> for ResultOptionShape {
    fn succeeded(result: &Result<T, E>) -> bool {
        result.is_ok()
    }
}

impl<R> Completion<R> for OptionShape {
    fn succeeded(_: &R) -> bool {
        true
    }
}

impl<R> Completion<R> for PlainShape {
    fn succeeded(_: &R) -> bool {
        true
    }
}
