//! When a stored value stops being fresh, for functions with `stale` or
//! `early_refresh`. Such values are stored for their TTL plus a *kept*
//! window (the stale window, or one lease for an early refresh to finish),
//! and carry a one-line header before the encoded value:
//!
//! ```text
//! \x01fresh:<recompute time Δ, ms>:<token>:<stored at, ms since the epoch>\n{"id":42,...}
//! ```
//!
//! so `redis-cli get` still shows the JSON. Freshness is read from the
//! server's remaining TTL (`PTTL`, in the same step as `GET`): fresh while
//! more than the kept window is left. No host's clock is compared with
//! another's; the stored-at time is for people and nothing reads it back.
//!
//! No encoded value starts like a header: JSON never starts with byte 1, and
//! a MessagePack value that does (the integer 1) is one byte long. The token
//! makes each stored value distinct, so that a refresh stores only over the
//! very value it refreshed (compare-and-set on the header): a write's `DEL`
//! in the meantime wins.
//!
//! Early refresh is XFetch (Vattani, Chierichetti, Lowenstein, "Optimal
//! Probabilistic Cache Stampede Prevention", VLDB 2015): a reader recomputes
//! before expiry when `Δ·β·(−ln rand) ≥ time left`, so the chance grows as
//! expiry nears and with the cost of the recomputation.

use std::time::Duration;

use crate::clock::{WallClock, millis};

const MARK: &[u8] = b"\x01fresh:";

/// The header of a stored value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Freshness {
    /// How long computing it took, in ms.
    delta: u64,
    token: u64,
    /// When it was stored, by the writer's clock: for people only.
    stored_at: u64,
}

/// What a reader should do with a value it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Serve it.
    Fresh,
    /// Serve it, but XFetch drew this caller to recompute it now.
    RefreshEarly,
    /// Past its TTL, inside the kept window: one caller recomputes it, the
    /// others are served it meanwhile.
    Stale,
    /// Past its stale window too, inside the fail-safe window: recomputed
    /// like a miss, served only if the body fails (`fail_safe`).
    Expired,
}

impl Freshness {
    /// The header of a value computed in `delta`.
    pub(crate) fn new(delta: Duration, clock: WallClock) -> Freshness {
        Freshness {
            delta: millis(delta),
            token: fastrand::u64(..),
            stored_at: clock.now_millis(),
        }
    }

    /// How long computing it took, and when it was stored (ms since the
    /// epoch, by the writer's clock): for people.
    pub(crate) fn parts(&self) -> (Duration, u64) {
        (Duration::from_millis(self.delta), self.stored_at)
    }

    /// Header and value, as stored.
    pub(crate) fn wrap(&self, value: &[u8]) -> Vec<u8> {
        let mut bytes = MARK.to_vec();
        bytes.extend_from_slice(
            format!("{}:{:016x}:{}\n", self.delta, self.token, self.stored_at).as_bytes(),
        );
        bytes.extend_from_slice(value);
        bytes
    }

    /// `ttl_left`: the server's remaining TTL (`None`: no expiry, which only
    /// someone else can have set). `kept`: how much of it is past the fresh
    /// period, of which the last `fail_safe` is the fail-safe window.
    /// `beta`: XFetch's β, `None` without early refresh.
    pub(crate) fn verdict(
        &self,
        ttl_left: Option<u64>,
        kept: u64,
        fail_safe: u64,
        beta: Option<f64>,
    ) -> Verdict {
        let fresh_left = match window(ttl_left, kept, fail_safe) {
            Ok(fresh_left) => fresh_left,
            Err(verdict) => return verdict,
        };
        let early = beta.is_some_and(|beta| {
            // 1 − [0, 1) is in (0, 1]: ln is finite and ≤ 0.
            let gap = self.delta as f64 * beta * -(1.0 - fastrand::f64()).ln();
            gap >= fresh_left as f64
        });
        if early {
            Verdict::RefreshEarly
        } else {
            Verdict::Fresh
        }
    }
}

/// Where a value with `ttl_left` (see [`Freshness::verdict`]) stands:
/// fresh for `Ok(ms)` more, or past its fresh period (`Err`: stale, or
/// expired into its fail-safe window).
pub(crate) fn window(ttl_left: Option<u64>, kept: u64, fail_safe: u64) -> Result<u64, Verdict> {
    let Some(left) = ttl_left else {
        return Err(Verdict::Stale);
    };
    match left.checked_sub(kept).filter(|&l| l > 0) {
        Some(fresh_left) => Ok(fresh_left),
        None if fail_safe == 0 || left > fail_safe => Err(Verdict::Stale),
        None => Err(Verdict::Expired),
    }
}

/// A header that does not parse: garbage to overwrite.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MalformedHeader;

/// Splits stored bytes into the parsed header, if any, and where the
/// encoded value starts.
pub(crate) fn split(bytes: &[u8]) -> Result<Option<(Freshness, usize)>, MalformedHeader> {
    let Some(rest) = bytes.strip_prefix(MARK) else {
        return Ok(None);
    };
    let newline = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(MalformedHeader)?;
    let line = std::str::from_utf8(&rest[..newline]).map_err(|_| MalformedHeader)?;
    let mut fields = line.split(':');
    let (Some(delta), Some(token), Some(stored_at), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(MalformedHeader);
    };
    let freshness = Freshness {
        delta: delta.parse().map_err(|_| MalformedHeader)?,
        token: u64::from_str_radix(token, 16).map_err(|_| MalformedHeader)?,
        stored_at: stored_at.parse().map_err(|_| MalformedHeader)?,
    };
    Ok(Some((freshness, MARK.len() + newline + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(delta: u64) -> Freshness {
        Freshness {
            delta,
            token: 1,
            stored_at: 0,
        }
    }

    #[test]
    fn a_wrapped_value_splits_back() {
        let freshness = Freshness::new(Duration::from_millis(50), WallClock::default());
        let stored = freshness.wrap(br#"{"id":1}"#);
        let (parsed, value_at) = split(&stored).unwrap().unwrap();
        assert_eq!(parsed, freshness);
        assert_eq!(&stored[value_at..], br#"{"id":1}"#);
        assert_eq!(split(br#"{"id":1}"#), Ok(None));
        assert_eq!(split(b"\x01"), Ok(None), "MessagePack 1");
    }

    #[test]
    fn malformed_headers_are_garbage() {
        for bytes in [
            &b"\x01fresh:"[..],
            b"\x01fresh:1:2\n",
            b"\x01fresh:a:2:3\n{}",
            b"\x01fresh:1:2:3:4\n{}",
        ] {
            assert!(split(bytes).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn verdicts_follow_the_servers_ttl() {
        let h = header(0);
        assert_eq!(h.verdict(Some(60_000), 0, 0, None), Verdict::Fresh);
        assert_eq!(
            h.verdict(Some(60_000), 0, 0, Some(1.0)),
            Verdict::Fresh,
            "Δ = 0 never refreshes early"
        );
        // Stored for TTL + 30 s stale: 31 s left is fresh, 29 s is stale.
        assert_eq!(h.verdict(Some(31_000), 30_000, 0, None), Verdict::Fresh);
        assert_eq!(h.verdict(Some(29_000), 30_000, 0, None), Verdict::Stale);
        assert_eq!(h.verdict(Some(30_000), 30_000, 0, None), Verdict::Stale);
        assert_eq!(
            h.verdict(None, 30_000, 0, None),
            Verdict::Stale,
            "no expiry"
        );
        // 30 s kept: 10 s stale window, then 20 s of fail-safe.
        assert_eq!(
            h.verdict(Some(25_000), 30_000, 20_000, None),
            Verdict::Stale
        );
        assert_eq!(
            h.verdict(Some(20_000), 30_000, 20_000, None),
            Verdict::Expired
        );
        assert_eq!(h.verdict(Some(1), 30_000, 20_000, None), Verdict::Expired);
        assert_eq!(h.verdict(Some(0), 30_000, 0, None), Verdict::Stale);
    }

    #[test]
    fn xfetch_refreshes_more_often_as_expiry_nears() {
        let share = |remaining_ms: u64| {
            let early = (0..2_000)
                .filter(|_| {
                    header(100).verdict(Some(remaining_ms), 0, 0, Some(1.0))
                        == Verdict::RefreshEarly
                })
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
