//! How values are turned into bytes for the cache.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The encoding of cached values. JSON by default, so `redis-cli get` shows
/// what is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Codec {
    /// `serde_json`: readable in `redis-cli`, tolerant of added fields.
    #[default]
    Json,
    /// MessagePack with field names (`rmp-serde`): smaller and faster than
    /// JSON, still tolerant of added fields. Needs the `msgpack` feature.
    #[cfg(feature = "msgpack")]
    MessagePack,
}

/// A value could not be encoded or decoded. The codec library's own error
/// is its `source()`: no type of `serde_json` or `rmp-serde` is part of
/// this API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The value could not be encoded (its `Serialize` impl failed, or the
    /// codec cannot represent it, such as a JSON map with non-string keys).
    #[error("{codec:?} encoding failed: {source}")]
    Encode {
        /// The codec.
        codec: Codec,
        /// The codec library's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The bytes are not a value of the type in this codec (written by
    /// another codec or another version of the type, or garbage).
    #[error("{codec:?} decoding failed: {source}")]
    Decode {
        /// The codec.
        codec: Codec,
        /// The codec library's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A compressed entry (`CacheBuilder::compress_above`) did not
    /// decompress.
    #[error("compression: {0}")]
    Compression(&'static str),
}

impl Codec {
    /// Encodes a value.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| CodecError::Encode {
            codec: self,
            source,
        };
        match self {
            Codec::Json => serde_json::to_vec(value).map_err(|e| failed(e.into())),
            #[cfg(feature = "msgpack")]
            Codec::MessagePack => rmp_serde::to_vec_named(value).map_err(|e| failed(e.into())),
        }
    }

    /// Decodes a value; any malformed input is an error, never a panic.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| CodecError::Decode {
            codec: self,
            source,
        };
        match self {
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| failed(e.into())),
            #[cfg(feature = "msgpack")]
            Codec::MessagePack => rmp_serde::from_slice(bytes).map_err(|e| failed(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct User {
        id: u64,
        name: String,
    }

    #[test]
    fn json_round_trips_and_is_readable() {
        let user = User {
            id: 7,
            name: "Ada".into(),
        };
        let bytes = Codec::Json.encode(&user).unwrap();
        assert_eq!(bytes, br#"{"id":7,"name":"Ada"}"#);
        assert_eq!(Codec::Json.decode::<User>(&bytes).unwrap(), user);
    }

    #[test]
    fn garbage_is_an_error() {
        for bytes in [&b""[..], b"{", b"\xff\xfe", br#"{"id":"x"}"#] {
            assert!(Codec::Json.decode::<User>(bytes).is_err());
        }
    }

    #[cfg(feature = "msgpack")]
    #[test]
    fn msgpack_round_trips() {
        let user = User {
            id: 7,
            name: "Ada".into(),
        };
        let bytes = Codec::MessagePack.encode(&user).unwrap();
        assert_eq!(Codec::MessagePack.decode::<User>(&bytes).unwrap(), user);
        assert!(Codec::MessagePack.decode::<User>(b"\xc1").is_err());
    }
}
