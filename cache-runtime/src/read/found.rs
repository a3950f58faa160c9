//! What one read of a key found: the step between the backend's reply
//! and the read path's decision ([`crate::read::lookup`]), shared with
//! the batch and with tags.

pub(crate) use crate::backend::Ttl;
use crate::read::freshness::Freshness;
use crate::write::lease::Take;

/// What one read of the key found.
pub(crate) enum Read {
    /// The stored bytes, kept whole so a hit copies nothing: from `value_at`
    /// the encoded value; before it a freshness header, if any.
    Value {
        bytes: Vec<u8>,
        value_at: usize,
        freshness: Option<(Freshness, Ttl)>,
        /// How long the key has left (known for reads with their TTL).
        ttl: Ttl,
    },
    /// A lease placeholder with a TTL (or not yet known to have one).
    Leased {
        placeholder: Vec<u8>,
        ttl: Ttl,
    },
    Absent,
    /// Neither a value nor a live lease of another caller (counted and
    /// logged, unless it is this process's own abandoned lease): replaced.
    Garbage(Garbage),
    /// The cache cannot be reached (counted and logged), or (`pending_write`)
    /// this process still has to deliver an invalidation of the key: run
    /// uncached, coalesced with this process's other callers of the key.
    Unavailable {
        pending_write: bool,
    },
}

pub(crate) enum Garbage {
    /// Replaced only if the key still holds these bytes.
    Bytes(Vec<u8>),
    /// `GET` fails on it (`WRONGTYPE`): overwritten.
    Unreadable,
    /// Longer than a read transfers: replaced only if it still is.
    TooLarge,
}

impl Garbage {
    /// How a lease is taken over it.
    pub(crate) fn take(self) -> Take {
        match self {
            Garbage::Bytes(seen) => Take::Replacing(seen),
            Garbage::Unreadable => Take::Overwriting,
            Garbage::TooLarge => Take::ReplacingTooLarge,
        }
    }
}
