//! Property tests of key rendering through the generated `<fn>_cache_key`:
//! distinct arguments never share a key, and no value can inject key
//! structure.

use std::collections::HashMap;

use cache_runtime::redis_cached;
use proptest::prelude::*;

#[redis_cached(key = "t:<a>:<b>:<c>:<d>:<e>", ttl = 60)]
async fn many(a: String, b: Option<String>, c: char, d: Vec<u8>, e: Option<Option<i64>>) -> u8 {
    let _ = (a, b, c, d, e);
    0
}

#[redis_cached(key = "one:<value>", ttl = 60)]
async fn one(value: String) -> u8 {
    let _ = value;
    0
}

#[redis_cached(key = "s:<a>:<b>", ttl = 60)]
async fn pair(a: String, b: Option<String>) -> u8 {
    let _ = (a, b);
    0
}

type Args = (String, Option<String>, char, Vec<u8>, Option<Option<i64>>);

/// A small alphabet of the characters most likely to collide after
/// escaping: separators, the escape character, hex digits, the None mark.
fn tricky_string() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a:%_3A*?{}\\[\\] \\n~.-]{0,5}").unwrap()
}

fn args() -> impl Strategy<Value = Args> {
    (
        tricky_string(),
        proptest::option::of(tricky_string()),
        prop_oneof![Just(':'), Just('%'), Just('_'), Just('a'), any::<char>()],
        proptest::collection::vec(
            prop_oneof![Just(b':'), Just(b'%'), Just(0xff_u8), any::<u8>()],
            0..4,
        ),
        proptest::option::of(proptest::option::of(-3i64..3)),
    )
}

fn key(args: &Args) -> String {
    many_cache_key(&args.0, &args.1, &args.2, &args.3, &args.4).into_string()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn distinct_argument_tuples_never_share_a_key(batch in proptest::collection::vec(args(), 1..64)) {
        let mut seen: HashMap<String, Args> = HashMap::new();
        for args in batch {
            let key = key(&args);
            if let Some(previous) = seen.get(&key) {
                prop_assert_eq!(previous, &args, "two different argument tuples rendered {}", key);
            }
            seen.insert(key, args);
        }
    }

    /// A dense space (four characters, length up to 2): a batch holds many
    /// near-collisions such as `("a:", "")` / `("a", ":")` or `None` /
    /// `Some("%_")`, so broken escaping is found, not just possible.
    #[test]
    fn dense_pairs_never_share_a_key(
        batch in proptest::collection::vec(
            (
                proptest::string::string_regex("[a:%_]{0,2}").unwrap(),
                proptest::option::of(proptest::string::string_regex("[a:%_]{0,2}").unwrap()),
            ),
            128,
        )
    ) {
        let mut seen: HashMap<String, (String, Option<String>)> = HashMap::new();
        for args in batch {
            let key = pair_cache_key(&args.0, &args.1).into_string();
            if let Some(previous) = seen.get(&key) {
                prop_assert_eq!(previous, &args, "two different argument pairs rendered {}", key);
            }
            seen.insert(key, args);
        }
    }

    #[test]
    fn rendered_values_contain_no_structure_characters(value in any::<String>(), tricky in tricky_string()) {
        for value in [value, tricky] {
            let key = one_cache_key(&value).into_string();
            let rendered = key.strip_prefix("one:").unwrap();
            // An over-long key keeps its first bytes and ends in `:#` and
            // the SHA-256 of the whole (see `Keys` in the README): the
            // readable part is what must hold no structure character.
            let rendered = match rendered.rsplit_once(":#") {
                Some((head, hash)) if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => head,
                _ => rendered,
            };
            for forbidden in [':', '*', '?', '[', ']', '{', '}'] {
                prop_assert!(!rendered.contains(forbidden), "{:?} rendered {:?}", value, rendered);
            }
            prop_assert!(rendered.bytes().all(|b| b.is_ascii_graphic()), "{:?} rendered {:?}", value, rendered);
        }
    }

    #[test]
    fn a_key_has_exactly_the_templates_separators(args in args()) {
        prop_assert_eq!(key(&args).matches(':').count(), 5);
    }
}

#[redis_cached(key = "n:<a>:<b>:<c>", ttl = 60)]
async fn integers(a: i64, b: u64, c: i128) -> u8 {
    let _ = (a, b, c);
    0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Integers render as their `Display` text (keys stay readable, and
    /// keys written by earlier versions are still found).
    #[test]
    fn integers_render_as_their_display(a in any::<i64>(), b in any::<u64>(), c in any::<i128>()) {
        let key = integers_cache_key(&a, &b, &c).into_string();
        prop_assert_eq!(key, format!("n:{a}:{b}:{c}"));
    }
}
