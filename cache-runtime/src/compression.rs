//! Compression of large values (`CacheBuilder::compress_above`), with
//! lz4 (`lz4_flex`, pure Rust).
//!
//! A compressed entry is self-describing: byte 3, the uncompressed length
//! (4 bytes, little-endian), then the lz4 block. No JSON value starts with
//! byte 3, and a MessagePack value that does (the integer 3) is that one
//! byte long, so compressed and uncompressed entries coexist: a cache that
//! compresses reads entries written before, and one that does not still
//! reads compressed ones. `redis-cli get` of an uncompressed entry stays
//! readable JSON.
//!
//! Why lz4 and not zstd: see the table on the guide's
//! [operations](crate::guide::operations) page. A cache decompresses on
//! every hit, so lz4's speed on the sizes worth compressing wins over
//! zstd's ratio, and it needs no C library.

use crate::codec::CodecError;

/// The first byte of a compressed entry.
const MARK: u8 = 3;
/// The mark and the uncompressed length.
const HEADER: usize = 5;

/// `encoded` compressed, with its header; `None` when compressing does not
/// make it smaller.
pub(crate) fn compress(encoded: &[u8]) -> Option<Vec<u8>> {
    let length = u32::try_from(encoded.len()).ok()?;
    let block = lz4_flex::block::compress(encoded);
    if HEADER + block.len() >= encoded.len() {
        return None;
    }
    let mut entry = Vec::with_capacity(HEADER + block.len());
    entry.push(MARK);
    entry.extend_from_slice(&length.to_le_bytes());
    entry.extend_from_slice(&block);
    Some(entry)
}

/// Whether `bytes` is a compressed entry.
pub(crate) fn is_compressed(bytes: &[u8]) -> bool {
    bytes.len() > 1 && bytes[0] == MARK
}

/// The value inside a compressed entry, at most `limit` bytes long: a
/// header that claims more (garbage, or a decompression bomb) is an
/// error, never an allocation of that size.
pub(crate) fn decompress(entry: &[u8], limit: usize) -> Result<Vec<u8>, CodecError> {
    let malformed = || CodecError::Compression("malformed compressed entry");
    let length = entry
        .get(1..HEADER)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or_else(malformed)?;
    let length = usize::try_from(length).map_err(|_| malformed())?;
    if length > limit {
        return Err(CodecError::Compression(
            "compressed entry larger than max_value_size once decompressed",
        ));
    }
    let mut value = vec![0; length];
    let written =
        lz4_flex::block::decompress_into(&entry[HEADER..], &mut value).map_err(|_| malformed())?;
    if written != length {
        return Err(malformed());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let json =
            br#"{"rows":["#.iter().chain(&[b'7'; 4000]).chain(b"]}").copied().collect::<Vec<u8>>();
        let entry = compress(&json).expect("compressible");
        assert!(entry.len() < json.len() / 10);
        assert!(is_compressed(&entry));
        assert_eq!(decompress(&entry, json.len()).unwrap(), json);
        // Over the limit, truncated, corrupted, a bomb: errors.
        assert!(decompress(&entry, json.len() - 1).is_err());
        assert!(decompress(&entry[..entry.len() - 3], json.len()).is_err());
        let mut bomb = entry.clone();
        bomb[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decompress(&bomb, 32 << 20).is_err());
        let mut flipped = entry;
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        let _ = decompress(&flipped, json.len()); // an error or other bytes, never a panic
        assert!(decompress(&[MARK], 100).is_err());
        // Not worth it: nothing.
        assert!(compress(b"{}").is_none());
        // JSON never starts with the mark; a one-byte MessagePack 3 is not
        // an entry.
        assert!(!is_compressed(b"{\"a\":1}"));
        assert!(!is_compressed(&[MARK]));
    }
}
