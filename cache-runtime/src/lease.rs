//! Leases: the placeholder a caller writes into a missing key before it
//! computes the value, so that a write in the meantime can take the right to
//! store away ("Scaling Memcache at Facebook", NSDI 2013, §3.2.1).
//!
//! The whole protocol lives in one key:
//!
//! 1. A miss takes the lease: `SET key <placeholder> NX PX <lease>`.
//! 2. The holder computes, then stores with a compare-and-set: only if the key
//!    still holds *its* placeholder.
//! 3. An invalidation `DEL`s the key, placeholder included, so a value
//!    computed from data read before the write is never stored.
//! 4. A caller that finds someone else's placeholder computes without storing.
//!
//! A placeholder is `\0lease:<deadline ms since the epoch>:<token>`. No
//! encoded value can be mistaken for one: JSON never starts with a NUL byte,
//! and a MessagePack value that starts with one (the integer 0) is that one
//! byte long. The deadline lets a reader recognise a stray placeholder that
//! has no expiry (written by hand, or by a foreign client) and overwrite it;
//! correctness never depends on clocks, only that clean-up does.

use std::time::Duration;

use crate::clock::{millis, now_millis};

const MARK: &[u8] = b"\0lease:";

/// How long a placeholder may outlive its deadline before a reader treats it
/// as stray: generous, for clock skew between machines.
const STRAY_AFTER: Duration = Duration::from_secs(60);

/// One caller's claim on a missing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    placeholder: Vec<u8>,
}

/// What a value read from the cache is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// An encoded value.
    Value,
    /// A live placeholder: someone is computing this key.
    Leased,
    /// A placeholder that is malformed or long past its deadline: garbage to
    /// overwrite.
    Stray,
}

impl Lease {
    /// A new lease that its holder expects to keep for `duration`.
    pub(crate) fn new(duration: Duration) -> Lease {
        let deadline = now_millis().saturating_add(millis(duration));
        let token = fastrand::u128(..);
        let placeholder = format!("{deadline}:{token:032x}");
        let mut bytes = Vec::with_capacity(MARK.len() + placeholder.len());
        bytes.extend_from_slice(MARK);
        bytes.extend_from_slice(placeholder.as_bytes());
        Lease { placeholder: bytes }
    }

    /// The bytes stored in the key while the lease is held.
    pub(crate) fn placeholder(&self) -> &[u8] {
        &self.placeholder
    }
}

/// Classifies bytes read from the cache.
pub(crate) fn inspect(bytes: &[u8]) -> Stored {
    let Some(rest) = bytes.strip_prefix(MARK) else {
        return Stored::Value;
    };
    let deadline = std::str::from_utf8(rest)
        .ok()
        .and_then(|rest| rest.split_once(':'))
        .filter(|(_, token)| token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|(deadline, _)| deadline.parse::<u64>().ok());
    match deadline {
        Some(deadline) if now_millis() <= deadline.saturating_add(millis(STRAY_AFTER)) => {
            Stored::Leased
        }
        _ => Stored::Stray,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_placeholder_is_a_live_lease_and_unique() {
        let a = Lease::new(Duration::from_secs(5));
        let b = Lease::new(Duration::from_secs(5));
        assert_eq!(inspect(a.placeholder()), Stored::Leased);
        assert_ne!(a, b, "tokens differ");
    }

    #[test]
    fn malformed_or_expired_placeholders_are_stray() {
        assert_eq!(inspect(b"\0lease:"), Stored::Stray);
        assert_eq!(inspect(b"\0lease:12:zz"), Stored::Stray);
        let expired = format!("\0lease:1000:{:032x}", 7);
        assert_eq!(inspect(expired.as_bytes()), Stored::Stray);
    }

    proptest::proptest! {
        /// No encoded value, of any codec, is ever taken for a placeholder
        /// (which would turn a hit into a miss that never stores).
        #[test]
        fn no_encoded_value_looks_like_a_lease(
            text in ".*",
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            number in proptest::prop_oneof![-3i64..3, proptest::num::i64::ANY],
            pairs in proptest::collection::vec((".*", 0u64..3), 0..4),
            maybe in proptest::option::of(".*"),
        ) {
            let codecs = [
                crate::Codec::Json,
                #[cfg(feature = "msgpack")]
                crate::Codec::MessagePack,
            ];
            for codec in codecs {
                let encoded = [
                    codec.encode(&text).unwrap(),
                    codec.encode(&bytes).unwrap(),
                    codec.encode(&number).unwrap(),
                    codec.encode(&pairs).unwrap(),
                    codec.encode(&maybe).unwrap(),
                    codec.encode(&(number, &text)).unwrap(),
                ];
                for value in encoded {
                    proptest::prop_assert_eq!(inspect(&value), Stored::Value, "{:?}", codec);
                }
            }
        }

        #[test]
        fn every_placeholder_is_a_live_lease(millis in 1u64..86_400_000) {
            let lease = Lease::new(Duration::from_millis(millis));
            proptest::prop_assert_eq!(inspect(lease.placeholder()), Stored::Leased);
        }
    }

    #[test]
    fn values_are_values() {
        for bytes in [&b""[..], b"\0", b"0", b"{\"a\":1}", b"\"\\u0000lease:\""] {
            assert_eq!(inspect(bytes), Stored::Value, "{bytes:?}");
        }
    }
}
