//! Redis Cluster's key slots: which of the 16384 slots a key belongs to,
//! by its hash tag. The backends route by it, and the keys the cache makes
//! for itself (refresh locks) stay in their key's slot by it.

/// The number of slots of a Redis Cluster.
pub(crate) const SLOTS: usize = 16384;

/// The slot of a key, as Redis Cluster computes it: CRC16 (XMODEM) of the
/// key's hash tag (the text between the first `{` and the next `}`, if not
/// empty), or of the whole key.
pub(crate) fn slot_of(key: &[u8]) -> u16 {
    let hashed = hash_tag(key).unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(hashed) % (SLOTS as u16)
}

/// The hash tag of a key, if it has one.
pub(crate) fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let close = key[open + 1..].iter().position(|&b| b == b'}')?;
    let tag = &key[open + 1..open + 1 + close];
    (!tag.is_empty()).then_some(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_redis_cluster_specification() {
        // Examples from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        // CRC16/XMODEM check value of "123456789" is 0x31C3.
        assert_eq!(slot_of(b"123456789"), 0x31C3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
        assert_eq!(slot_of(b"foo{bar}{zap}"), slot_of(b"bar"));
    }
}
