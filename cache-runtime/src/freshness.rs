//! When a stored value stops being fresh, for functions with `stale` or
//! `early_refresh`: such values carry a one-line header before the encoded
//! value,
//!
//! ```text
//! \x01fresh:<fresh until, ms since the epoch>:<recompute time Δ, ms>:<token>\n{"id":42,...}
//! ```
//!
//! so `redis-cli get` still shows the JSON. No encoded value starts like a
//! header: JSON never starts with byte 1, and a MessagePack value that does
//! (the integer 1) is one byte long. The token makes each stored value
//! distinct, so that a refresh stores only over the very value it refreshed
//! (compare-and-set on the header): a write's `DEL` in the meantime wins.
//!
//! Early refresh is XFetch (Vattani, Chierichetti, Lowenstein, "Optimal
//! Probabilistic Cache Stampede Prevention", VLDB 2015): a reader recomputes
//! before expiry when `now − Δ·β·ln(rand) ≥ expiry`, so the chance grows as
//! expiry nears and with the cost of the recomputation.

use std::time::Duration;

use crate::clock::{millis, now_millis};

const MARK: &[u8] = b"\x01fresh:";

/// The header of a stored value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Freshness {
    /// Until when the value is fresh, in ms since the Unix epoch.
    pub(crate) fresh_until: u64,
    /// How long computing it took, in ms.
    pub(crate) delta: u64,
    token: u64,
}

/// What a reader should do with a value it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Serve it.
    Fresh,
    /// Serve it, but XFetch drew this caller to recompute it now.
    RefreshEarly,
    /// Past its TTL, inside the stale window: serve it while one caller
    /// recomputes.
    Stale,
    /// Past its TTL, inside the grace an early refresh gets to finish: serve
    /// it only if a refresh is running, else recompute.
    Grace,
    /// Past its TTL and its stale window (clocks disagree with Redis): a miss.
    Expired,
}

impl Freshness {
    /// The header of a value computed in `delta` and fresh for `ttl` from now.
    pub(crate) fn new(ttl: Duration, delta: Duration) -> Freshness {
        let now = now_millis();
        Freshness {
            fresh_until: now.saturating_add(millis(ttl)),
            delta: millis(delta),
            token: fastrand::u64(..),
        }
    }

    /// The header's bytes, `\n` included: the prefix a refresh compares.
    pub(crate) fn header(&self) -> Vec<u8> {
        let mut header = MARK.to_vec();
        header.extend_from_slice(
            format!("{}:{}:{:016x}\n", self.fresh_until, self.delta, self.token).as_bytes(),
        );
        header
    }

    /// Header and value, as stored.
    pub(crate) fn wrap(&self, value: &[u8]) -> Vec<u8> {
        let mut bytes = self.header();
        bytes.extend_from_slice(value);
        bytes
    }

    /// `beta` is XFetch's β (`None`: no early refresh); `stale_window` how
    /// long past the TTL an old value may be served; `grace` how long past
    /// it an early refresh may still be finishing.
    pub(crate) fn verdict(&self, beta: Option<f64>, stale_window: u64, grace: u64) -> Verdict {
        let now = now_millis();
        if now < self.fresh_until {
            let early = beta.is_some_and(|beta| {
                // 1 − [0, 1) is in (0, 1]: ln is finite and ≤ 0.
                let gap = self.delta as f64 * beta * -(1.0 - fastrand::f64()).ln();
                now as f64 + gap >= self.fresh_until as f64
            });
            return if early {
                Verdict::RefreshEarly
            } else {
                Verdict::Fresh
            };
        }
        if stale_window > 0 && now < self.fresh_until.saturating_add(stale_window) {
            Verdict::Stale
        } else if beta.is_some() && now < self.fresh_until.saturating_add(grace) {
            Verdict::Grace
        } else {
            Verdict::Expired
        }
    }
}

/// Stored bytes, split into header (if any) and encoded value.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Parts<'a> {
    /// The parsed header and its bytes.
    pub(crate) header: Option<(Freshness, &'a [u8])>,
    pub(crate) value: &'a [u8],
}

/// A header that does not parse: garbage to overwrite.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MalformedHeader;

/// Splits stored bytes; a value without header is all value.
pub(crate) fn split(bytes: &[u8]) -> Result<Parts<'_>, MalformedHeader> {
    let Some(rest) = bytes.strip_prefix(MARK) else {
        return Ok(Parts {
            header: None,
            value: bytes,
        });
    };
    let newline = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(MalformedHeader)?;
    let line = std::str::from_utf8(&rest[..newline]).map_err(|_| MalformedHeader)?;
    let mut fields = line.split(':');
    let (Some(until), Some(delta), Some(token), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(MalformedHeader);
    };
    let freshness = Freshness {
        fresh_until: until.parse().map_err(|_| MalformedHeader)?,
        delta: delta.parse().map_err(|_| MalformedHeader)?,
        token: u64::from_str_radix(token, 16).map_err(|_| MalformedHeader)?,
    };
    let (header, value) = bytes.split_at(MARK.len() + newline + 1);
    Ok(Parts {
        header: Some((freshness, header)),
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_value_splits_back() {
        let freshness = Freshness::new(Duration::from_secs(60), Duration::from_millis(50));
        let stored = freshness.wrap(br#"{"id":1}"#);
        let parts = split(&stored).unwrap();
        let header = freshness.header();
        assert_eq!(parts.header, Some((freshness, &header[..])));
        assert_eq!(parts.value, br#"{"id":1}"#);
        let plain = |bytes: &'static [u8]| Parts {
            header: None,
            value: bytes,
        };
        assert_eq!(split(br#"{"id":1}"#).unwrap(), plain(br#"{"id":1}"#));
        assert_eq!(split(b"\x01").unwrap(), plain(b"\x01"), "MessagePack 1");
    }

    #[test]
    fn malformed_headers_are_garbage() {
        for bytes in [
            &b"\x01fresh:"[..],
            b"\x01fresh:1:2\n",
            b"\x01fresh:a:2:3\n{}",
        ] {
            assert!(split(bytes).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn verdicts_follow_the_clock() {
        let fresh = Freshness::new(Duration::from_secs(60), Duration::ZERO);
        assert_eq!(fresh.verdict(None, 0, 0), Verdict::Fresh);
        assert_eq!(
            fresh.verdict(Some(1.0), 0, 0),
            Verdict::Fresh,
            "Δ = 0 never refreshes early"
        );
        let expired = Freshness {
            fresh_until: now_millis() - 1_000,
            delta: 10,
            token: 1,
        };
        assert_eq!(expired.verdict(None, 30_000, 0), Verdict::Stale);
        assert_eq!(expired.verdict(None, 500, 0), Verdict::Expired);
        assert_eq!(expired.verdict(None, 0, 10_000), Verdict::Expired);
        assert_eq!(expired.verdict(Some(1.0), 0, 10_000), Verdict::Grace);
        assert_eq!(expired.verdict(Some(1.0), 0, 500), Verdict::Expired);
    }

    #[test]
    fn xfetch_refreshes_more_often_as_expiry_nears() {
        let share = |remaining_ms: u64| {
            let freshness = Freshness {
                fresh_until: now_millis() + remaining_ms,
                delta: 100,
                token: 1,
            };
            let early = (0..2_000)
                .filter(|_| freshness.verdict(Some(1.0), 0, 0) == Verdict::RefreshEarly)
                .count();
            early as f64 / 2_000.0
        };
        // P(early) = exp(-remaining / (Δ·β)): ~0 at 1 s, ~0.37 at 100 ms, ~0.9 at 10 ms.
        let (far, mid, near) = (share(1_000), share(100), share(10));
        assert!(far < 0.01, "{far}");
        assert!((0.25..0.5).contains(&mid), "{mid}");
        assert!(near > 0.8, "{near}");
    }
}
