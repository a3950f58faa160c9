//! Cache keys and how argument values are rendered into them.
//!
//! A value can never forge key structure: everything other than ASCII
//! letters, digits and `-_.~` is percent-encoded, so a value contains no
//! `:`, glob character (`*?[]`), hash tag brace, whitespace or control
//! character. Integers render as themselves (`user:42`).
//!
//! A key is at most [`MAX_KEY_LEN`] bytes: a longer one (a 10 KB search
//! string in the key) keeps its first [`KEPT_WHEN_HASHED`] bytes, readable,
//! and replaces the rest with `:#` and the SHA-256 of the whole key. A
//! hashed key is always longer than `MAX_KEY_LEN`, and a kept one never
//! is, so the two kinds cannot collide; two hashed keys collide only if
//! SHA-256 does.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode};
use sha2::{Digest, Sha256};

use crate::outcome::ByValue;
use crate::site::Site;

/// Bytes that are escaped in rendered values: all but `A-Z a-z 0-9 - _ . ~`.
const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The longest key (before the cache's prefix) that a generated key
/// function returns as rendered; longer ones are hashed (see the module
/// docs). A key written by hand with [`CacheKey::new`] is used as is.
pub const MAX_KEY_LEN: usize = 256;

/// What a tag's key starts with (after the cache's prefix): no template
/// renders a NUL byte, so it never collides with an entry (see
/// [`crate::tag`]).
pub(crate) const TAG_MARK: &str = "\0tag:";

/// A tag's key (before the cache's prefix).
pub(crate) fn tag_key(tag: &str) -> String {
    let mut key = String::with_capacity(TAG_MARK.len() + tag.len());
    key.push_str(TAG_MARK);
    key.push_str(tag);
    key
}

/// The tag a tag key (before or after the cache's prefix) stands for.
pub(crate) fn tag_of(key: &str) -> &str {
    key.find(TAG_MARK)
        .map_or(key, |at| &key[at + TAG_MARK.len()..])
}

/// How much of an over-long key stays readable before its hash (`:#` and 64
/// hex digits follow).
pub const KEPT_WHEN_HASHED: usize = 200;

/// How `None` renders. `%_` is never produced by percent-encoding, so it
/// cannot collide with any `Some` value.
const NONE_MARK: &str = "%_";

/// A rendered cache key, as `#[redis_cached]`'s generated `<fn>_cache_key`
/// returns it. The cache's prefix, if any, is added when Redis is called.
///
/// `V` is the type of the value cached under the key (`CacheKey<User>` for a
/// function returning `Result<User, E>`), so that `#[cache_put]` cannot store
/// a value of the wrong type; it is [`Untyped`] for keys written by hand.
/// A key from a generated function also knows that function's TTL.
pub struct CacheKey<V = Untyped> {
    key: String,
    site: Option<&'static Site>,
    /// The function's tags for these arguments (`tags = [...]`), as tag
    /// keys (see [`crate::tag`]) separated by newlines (no key holds
    /// one); empty for an untagged function. One buffer, not one per tag:
    /// every tagged call renders them.
    tags: String,
    /// What the function's values decide (`ttl_from`, `unless`): a
    /// `#[cache_put]` of the key obeys them.
    rules: ByValue<V>,
    value: PhantomData<fn() -> V>,
}

/// The value type of a [`CacheKey`] that does not say what it holds: one
/// written by hand, or one from [`CacheKey::untyped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Untyped {}

impl CacheKey {
    /// A key written by hand, used as is (no escaping): for keys that do not
    /// come from a template, e.g. `CacheKey::new("config:flags")`.
    pub fn new(key: impl Into<String>) -> Self {
        CacheKey {
            key: key.into(),
            site: None,
            tags: String::new(),
            rules: ByValue::new(),
            value: PhantomData,
        }
    }

    /// The key that stands for a tag: deleting it invalidates every entry
    /// stored with the tag (see [`Cache::invalidate_tag`](crate::Cache::invalidate_tag)).
    /// Bounded to [`MAX_KEY_LEN`] as a rendered tag is.
    pub(crate) fn of_tag(tag: &str) -> Self {
        let mut key = tag_key(tag);
        bound_length(&mut key);
        CacheKey::new(key)
    }
}

impl<V> CacheKey<V> {
    /// The key without the cache's prefix.
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// The key as an owned string.
    pub fn into_string(self) -> String {
        self.key
    }

    /// The same key without its value type, e.g. to keep keys of different
    /// functions in one list.
    pub fn untyped(self) -> CacheKey {
        CacheKey {
            key: self.key,
            site: self.site,
            tags: self.tags,
            rules: ByValue::new(),
            value: PhantomData,
        }
    }

    /// The key, with what its function's values decide.
    pub(crate) fn with_rules(mut self, rules: ByValue<V>) -> Self {
        self.rules = rules;
        self
    }

    /// What its function's values decide (nothing, for a key written by
    /// hand or untyped).
    pub(crate) fn rules(&self) -> ByValue<V> {
        self.rules
    }

    /// The tags an entry under this key is stored with (`tags = [...]` on
    /// its function), as written in its template: `["org:42", "members"]`.
    pub fn tags(&self) -> impl Iterator<Item = &str> + '_ {
        self.tag_keys().map(tag_of)
    }

    /// Whether the key's function has tags.
    pub(crate) fn has_tags(&self) -> bool {
        !self.tags.is_empty()
    }

    /// The tag keys (before the cache's prefix).
    pub(crate) fn tag_keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.tags.split('\n').filter(|tag| !tag.is_empty())
    }

    /// The generated function's static configuration, if the key came from one.
    pub(crate) fn site(&self) -> Option<&'static Site> {
        self.site
    }
}

// By hand: derives would require `V` to implement each trait.
impl<V> Clone for CacheKey<V> {
    fn clone(&self) -> Self {
        CacheKey {
            key: self.key.clone(),
            site: self.site,
            tags: self.tags.clone(),
            rules: self.rules,
            value: PhantomData,
        }
    }
}

impl<V> fmt::Debug for CacheKey<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CacheKey").field(&self.key).finish()
    }
}

impl<V> PartialEq for CacheKey<V> {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl<V> Eq for CacheKey<V> {}

impl<V> Hash for CacheKey<V> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

impl<V> PartialOrd for CacheKey<V> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<V> Ord for CacheKey<V> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

impl<V> fmt::Display for CacheKey<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

impl<V> AsRef<str> for CacheKey<V> {
    fn as_ref(&self) -> &str {
        &self.key
    }
}

/// The output a [`KeyPart`] writes into. Everything written through it is
/// escaped, so an implementation cannot break the key's structure.
pub struct KeyWriter<'a> {
    buf: &'a mut String,
}

impl KeyWriter<'_> {
    /// Writes text, escaped.
    pub fn write_str(&mut self, s: &str) {
        self.write_bytes(s.as_bytes());
    }

    /// Writes bytes (which need not be UTF-8), escaped.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for chunk in percent_encode(bytes, ESCAPED) {
            self.buf.push_str(chunk);
        }
    }

    /// Writes a value's `Display` output, escaped.
    pub fn write_display(&mut self, value: impl fmt::Display) {
        struct Escaping<'w, 'a>(&'w mut KeyWriter<'a>);
        impl fmt::Write for Escaping<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                self.0.write_str(s);
                Ok(())
            }
        }
        // Writing into a String cannot fail.
        let _ = write!(Escaping(self), "{value}");
    }

    /// Integers and booleans: their characters never need escaping.
    fn write_unescaped_display(&mut self, value: impl fmt::Display) {
        let _ = write!(self.buf, "{value}");
    }

    /// An integer, in decimal: the same text as its `Display`.
    fn write_integer(&mut self, value: impl itoa::Integer) {
        self.buf.push_str(itoa::Buffer::new().format(value));
    }
}

thread_local! {
    /// The buffer of a key this thread is done with, for its next key: a
    /// local hit would otherwise spend about a tenth of its time
    /// allocating and freeing its key.
    static SPARE: std::cell::Cell<String> = const { std::cell::Cell::new(String::new()) };
}

/// A buffer longer than this is freed rather than kept.
const SPARE_CAPACITY: usize = 512;

/// An empty buffer with room for `capacity` bytes: the one this thread
/// kept (see [`recycle`]), or a new one.
pub(crate) fn buffer(capacity: usize) -> String {
    let mut buf = SPARE.try_with(std::cell::Cell::take).unwrap_or_default();
    buf.reserve(capacity);
    buf
}

/// Keeps the buffer of a key the caller is done with for this thread's
/// next key.
pub(crate) fn recycle(mut key: String) {
    if (1..=SPARE_CAPACITY).contains(&key.capacity()) {
        key.clear();
        // During thread teardown the buffer is simply freed.
        let _ = SPARE.try_with(|spare| spare.set(key));
    }
}

/// A type that can be rendered into a cache key.
///
/// Implemented for integers, `bool`, `char`, `str`, `String`, byte strings,
/// `Option<T>`, references and smart pointers to these, and `uuid::Uuid`
/// with the `uuid` feature. Rendering must be injective: two different values
/// must write different output, or two calls would share one cache entry.
///
/// ```
/// use cache_runtime::{KeyPart, KeyWriter};
///
/// struct Email(String);
///
/// impl KeyPart for Email {
///     fn write_key_part(&self, out: &mut KeyWriter<'_>) {
///         // Addresses are case-insensitive: one entry for all spellings.
///         out.write_str(&self.0.to_ascii_lowercase());
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be part of a cache key",
    label = "named in the key template, so its type must implement `cache_runtime::KeyPart`",
    note = "`KeyPart` is implemented for integers, `bool`, `char`, `str`, `String`, `Vec<u8>`, `Option<T>` and references to these",
    note = "name a field instead (`<user.id>`), implement `cache_runtime::KeyPart` for `{Self}`, or `skip(...)` the parameter if it cannot change the result"
)]
pub trait KeyPart {
    /// Writes this value into the key.
    fn write_key_part(&self, out: &mut KeyWriter<'_>);
}

macro_rules! unescaped_display {
    ($($t:ty),*) => {$(
        impl KeyPart for $t {
            fn write_key_part(&self, out: &mut KeyWriter<'_>) {
                out.write_unescaped_display(self);
            }
        }
    )*};
}

macro_rules! integer {
    ($($t:ty),*) => {$(
        impl KeyPart for $t {
            fn write_key_part(&self, out: &mut KeyWriter<'_>) {
                out.write_integer(*self);
            }
        }
    )*};
}

// Every key of a function with an integer id renders one: `itoa` takes a
// fraction of `Display`'s time.
integer!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);
unescaped_display!(bool);

macro_rules! nonzero {
    ($($t:ident),*) => {$(
        impl KeyPart for std::num::$t {
            fn write_key_part(&self, out: &mut KeyWriter<'_>) {
                out.write_unescaped_display(self);
            }
        }
    )*};
}

nonzero!(
    NonZeroU8,
    NonZeroU16,
    NonZeroU32,
    NonZeroU64,
    NonZeroU128,
    NonZeroUsize,
    NonZeroI8,
    NonZeroI16,
    NonZeroI32,
    NonZeroI64,
    NonZeroI128,
    NonZeroIsize
);

impl KeyPart for char {
    fn write_key_part(&self, out: &mut KeyWriter<'_>) {
        out.write_str(self.encode_utf8(&mut [0; 4]));
    }
}

impl KeyPart for str {
    fn write_key_part(&self, out: &mut KeyWriter<'_>) {
        out.write_str(self);
    }
}

impl KeyPart for String {
    fn write_key_part(&self, out: &mut KeyWriter<'_>) {
        out.write_str(self);
    }
}

impl KeyPart for [u8] {
    fn write_key_part(&self, out: &mut KeyWriter<'_>) {
        out.write_bytes(self);
    }
}

impl KeyPart for Vec<u8> {
    fn write_key_part(&self, out: &mut KeyWriter<'_>) {
        out.write_bytes(self);
    }
}

impl<T: KeyPart + ?Sized> KeyPart for &T {
    fn write_key_part(&self, out: &mut KeyWriter<'_>) {
        (**self).write_key_part(out);
    }
}

impl<T: KeyPart + ?Sized> KeyPart for &mut T {
    fn write_key_part(&self, out: &mut KeyWriter<'_>) {
        (**self).write_key_part(out);
    }
}

impl<T: KeyPart + ?Sized> KeyPart for Box<T> {
    fn write_key_part(&self, out: &mut KeyWriter<'_>) {
        (**self).write_key_part(out);
    }
}

impl<T: KeyPart + ?Sized> KeyPart for Arc<T> {
    fn write_key_part(&self, out: &mut KeyWriter<'_>) {
        (**self).write_key_part(out);
    }
}

impl<T: KeyPart + ?Sized> KeyPart for Rc<T> {
    fn write_key_part(&self, out: &mut KeyWriter<'_>) {
        (**self).write_key_part(out);
    }
}

impl<T: KeyPart + ToOwned + ?Sized> KeyPart for Cow<'_, T> {
    fn write_key_part(&self, out: &mut KeyWriter<'_>) {
        (**self).write_key_part(out);
    }
}

/// `None` renders as `%_`. `Some(v)` renders as `v`, except that when `v`
/// itself starts with `%_` (a nested `None`) it is prefixed with another
/// `%_`, which keeps `Option<Option<T>>` injective.
impl<T: KeyPart> KeyPart for Option<T> {
    fn write_key_part(&self, out: &mut KeyWriter<'_>) {
        match self {
            None => out.buf.push_str(NONE_MARK),
            Some(value) => {
                let start = out.buf.len();
                value.write_key_part(out);
                if out.buf[start..].starts_with(NONE_MARK) {
                    out.buf.insert_str(start, NONE_MARK);
                }
            }
        }
    }
}

#[cfg(feature = "uuid")]
impl KeyPart for uuid::Uuid {
    fn write_key_part(&self, out: &mut KeyWriter<'_>) {
        out.write_unescaped_display(self.hyphenated());
    }
}

/// Builds a [`CacheKey`] from a template's pieces; used by generated code.
#[doc(hidden)]
pub struct KeyBuilder {
    buf: String,
    site: Option<&'static Site>,
    /// With `tags = [...]`: where the key ends in `buf`; its tags follow,
    /// each after a newline.
    key_end: Option<usize>,
}

impl KeyBuilder {
    /// A builder with room for `capacity` bytes, for the function `site`
    /// (none for an `#[invalidates(key = "...")]` template).
    pub fn new(capacity: usize, site: Option<&'static Site>) -> Self {
        KeyBuilder {
            buf: buffer(capacity),
            site,
            key_end: None,
        }
    }

    /// A builder of a tag's key, for `#[invalidates(tag = "...")]`.
    pub fn new_tag(capacity: usize) -> Self {
        let mut builder = KeyBuilder::new(capacity + TAG_MARK.len(), None);
        builder.buf.push_str(TAG_MARK);
        builder
    }

    /// Ends the key (or the tag before), and begins a tag of the key's
    /// function (`tags = [...]`), written like the key.
    pub fn tag(&mut self, capacity: usize) {
        if self.key_end.is_none() {
            self.key_end = Some(self.buf.len());
        }
        self.buf.reserve(1 + TAG_MARK.len() + capacity);
        self.buf.push('\n');
        self.buf.push_str(TAG_MARK);
    }

    /// Template text, checked at compile time, written as is.
    pub fn literal(&mut self, text: &str) {
        self.buf.push_str(text);
    }

    /// An argument value, escaped.
    pub fn part<T: KeyPart + ?Sized>(&mut self, value: &T) {
        value.write_key_part(&mut KeyWriter { buf: &mut self.buf });
    }

    /// The finished key; `version = N` appends `:vN`. Bounded to
    /// [`MAX_KEY_LEN`] (see the module docs).
    pub fn finish<V>(self, version: Option<u32>) -> CacheKey<V> {
        let key = self.finish_untyped(version);
        CacheKey {
            key: key.key,
            site: key.site,
            tags: key.tags,
            rules: ByValue::new(),
            value: PhantomData,
        }
    }

    /// [`KeyBuilder::finish`], compiled once rather than for each value
    /// type.
    fn finish_untyped(self, version: Option<u32>) -> CacheKey {
        let (mut key, tags) = match self.key_end {
            None => (self.buf, String::new()),
            Some(end) => {
                let mut key = self.buf;
                let tags = key.split_off(end);
                (key, bounded_tags(tags))
            }
        };
        if let Some(version) = version {
            let _ = write!(key, ":v{version}");
        }
        bound_length(&mut key);
        CacheKey {
            key,
            site: self.site,
            tags,
            rules: ByValue::new(),
            value: PhantomData,
        }
    }
}

/// Tags as [`KeyBuilder::tag`] wrote them (each after a newline), each
/// bounded to [`MAX_KEY_LEN`] as a key is.
fn bounded_tags(tags: String) -> String {
    if tags.split('\n').all(|tag| tag.len() <= MAX_KEY_LEN) {
        return tags;
    }
    let mut bounded = String::with_capacity(tags.len());
    for tag in tags.split('\n').filter(|tag| !tag.is_empty()) {
        let mut tag = tag.to_owned();
        bound_length(&mut tag);
        bounded.push('\n');
        bounded.push_str(&tag);
    }
    bounded
}

/// Replaces the tail of a key longer than [`MAX_KEY_LEN`] with the hash of
/// the whole key; the result is `KEPT_WHEN_HASHED + 2 + 64` bytes.
fn bound_length(key: &mut String) {
    if key.len() <= MAX_KEY_LEN {
        return;
    }
    let digest = Sha256::digest(key.as_bytes());
    // Rendered keys are ASCII; a hand-written part may not be.
    let mut kept = KEPT_WHEN_HASHED;
    while !key.is_char_boundary(kept) {
        kept -= 1;
    }
    key.truncate(kept);
    key.push_str(":#");
    for byte in digest {
        let _ = write!(key, "{byte:02x}");
    }
}

/// The companion key of `key` that holds its refresh lock (`stale`,
/// `early_refresh`). No template renders a NUL byte, so it never collides
/// with a real key. It is in `key`'s Redis Cluster slot, so that the value
/// and its lock live and fail over together: a key with a hash tag keeps
/// it, any other is wrapped in one (`{user:42}\0refresh` hashes as
/// `user:42`). The one exception is a key with a `}` but no hash tag (a
/// prefix or literal text with an unmatched brace), whose companion may be
/// in another slot; the lock then works the same, on another node.
///
/// It starts with the cache's `prefix` (`app:{app:user:42}\0refresh`), as
/// every key the cache touches does: an ACL user fenced to `~app:*` may
/// take it, and `SCAN app:*` finds it.
pub(crate) fn refresh_lock_key(prefix: Option<&str>, key: &str) -> String {
    if crate::slot::hash_tag(key.as_bytes()).is_some() || key.contains('}') {
        format!("{key}\0refresh")
    } else {
        match prefix {
            Some(prefix) => format!("{prefix}:{{{key}}}\0refresh"),
            None => format!("{{{key}}}\0refresh"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render<T: KeyPart + ?Sized>(value: &T) -> String {
        let mut b = KeyBuilder::new(0, None);
        b.part(value);
        b.finish::<Untyped>(None).into_string()
    }

    #[test]
    fn a_recycled_buffer_is_handed_out_empty() {
        let mut key = String::with_capacity(64);
        key.push_str("user:42");
        let ptr = key.as_ptr();
        recycle(key);
        let buf = buffer(16);
        assert!(buf.is_empty());
        assert_eq!(buf.as_ptr(), ptr, "the spare was not reused");
        let mut b = KeyBuilder::new(4, None);
        b.literal("t:");
        b.part(&7u8);
        assert_eq!(b.finish::<Untyped>(None).as_str(), "t:7");
    }

    #[test]
    fn integers_and_plain_words_stay_readable() {
        assert_eq!(render(&42u64), "42");
        assert_eq!(render(&-7i32), "-7");
        assert_eq!(render(&true), "true");
        assert_eq!(render("alice_b.c-d~e"), "alice_b.c-d~e");
    }

    #[test]
    fn integers_render_as_their_display_at_the_extremes() {
        // Keys written before integers were rendered with `itoa` must
        // still be found: the text is `Display`'s.
        fn same<T: KeyPart + std::fmt::Display>(values: &[T]) {
            for value in values {
                assert_eq!(render(value), value.to_string());
            }
        }
        same(&[u8::MIN, u8::MAX]);
        same(&[i8::MIN, -1, 0, i8::MAX]);
        same(&[u64::MIN, 1, 10, 99, 100, u64::MAX]);
        same(&[i64::MIN, -1, i64::MAX]);
        same(&[u128::MAX]);
        same(&[i128::MIN, i128::MAX]);
        same(&[usize::MAX]);
        same(&[isize::MIN]);
        same(&[u16::MAX]);
        same(&[i16::MIN]);
        same(&[u32::MAX]);
        same(&[i32::MIN]);
    }

    #[test]
    fn structure_characters_are_escaped() {
        assert_eq!(render("a:b"), "a%3Ab");
        assert_eq!(render("*?[]{}"), "%2A%3F%5B%5D%7B%7D");
        assert_eq!(render("a b\n\t"), "a%20b%0A%09");
        assert_eq!(render("100%"), "100%25");
        assert_eq!(render("é"), "%C3%A9");
        assert_eq!(render(&b"\xff\x00".to_vec()), "%FF%00");
    }

    #[test]
    fn options_are_injective_even_when_nested() {
        let cases: Vec<Option<Option<&str>>> = vec![
            None,
            Some(None),
            Some(Some("")),
            Some(Some("%_")),
            Some(Some("x")),
        ];
        let rendered: Vec<String> = cases.iter().map(render).collect();
        for (i, a) in rendered.iter().enumerate() {
            for b in &rendered[i + 1..] {
                assert_ne!(a, b, "{rendered:?}");
            }
        }
        assert_eq!(render(&Some(5u8)), "5");
        assert_eq!(render(&None::<u8>), "%_");
    }

    #[test]
    fn version_is_a_suffix() {
        let mut b = KeyBuilder::new(0, None);
        b.literal("user:");
        b.part(&1u8);
        assert_eq!(b.finish::<Untyped>(Some(3)).as_str(), "user:1:v3");
    }

    #[test]
    fn long_keys_are_bounded_and_stay_distinct() {
        let long = |tail: &str| {
            let mut b = KeyBuilder::new(0, None);
            b.literal("search:");
            b.part(&format!("{}{tail}", "q".repeat(10_000)));
            b.finish::<Untyped>(None).into_string()
        };
        let (a, b) = (long("a"), long("b"));
        assert_ne!(a, b, "keys that differ only at the end stay apart");
        assert_eq!(a.len(), KEPT_WHEN_HASHED + 2 + 64);
        assert!(a.len() > MAX_KEY_LEN, "never the length of a kept key");
        assert!(a.starts_with("search:qqq"), "{a}");
        assert_eq!(a, long("a"), "deterministic");

        let at_limit = "k".repeat(MAX_KEY_LEN);
        let mut b = KeyBuilder::new(0, None);
        b.literal(&at_limit);
        assert_eq!(b.finish::<Untyped>(None).as_str(), at_limit, "kept as is");
    }

    #[test]
    fn hashing_cuts_at_a_character_boundary() {
        let mut key = format!("{}é{}", "x".repeat(KEPT_WHEN_HASHED - 1), "y".repeat(300));
        bound_length(&mut key);
        assert!(key.starts_with(&"x".repeat(KEPT_WHEN_HASHED - 1)));
        assert_eq!(key.len(), KEPT_WHEN_HASHED - 1 + 2 + 64);
    }

    #[test]
    fn custom_impls_are_escaped_too() {
        struct Tricky;
        impl KeyPart for Tricky {
            fn write_key_part(&self, out: &mut KeyWriter<'_>) {
                out.write_display("x:*");
            }
        }
        assert_eq!(render(&Tricky), "x%3A%2A");
    }

    #[test]
    fn the_refresh_lock_is_in_the_slot_of_its_key() {
        use crate::slot::slot_of;
        for key in [
            "user:42",
            "svc:user:42",
            "svc:{tenant}:user:42",
            "a{b",
            "{user}",
            "x{y}z{w}",
        ] {
            for prefix in [None, Some("svc")] {
                let lock = refresh_lock_key(prefix, key);
                assert!(lock.ends_with("\0refresh"), "{lock:?}");
                assert_ne!(lock, key);
                assert_eq!(
                    slot_of(lock.as_bytes()),
                    slot_of(key.as_bytes()),
                    "{key} -> {lock:?}"
                );
            }
        }
        // Under the cache's prefix, as the key is.
        assert_eq!(
            refresh_lock_key(Some("svc"), "svc:user:42"),
            "svc:{svc:user:42}\0refresh"
        );
        // Unmatched `}` without a tag: appended, the slot may differ.
        assert_eq!(refresh_lock_key(None, "a}b"), "a}b\0refresh");
        assert_eq!(refresh_lock_key(None, "{}:user:42"), "{}:user:42\0refresh");
    }
}
