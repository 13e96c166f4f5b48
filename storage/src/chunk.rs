use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A BLAKE3 name: 32 bytes, shown as 64 hex digits. Two kinds, kept apart
/// by type: [`ChunkId`] names a chunk, [`SnapshotId`] a snapshot (the hash
/// of its encoded manifest).
macro_rules! blake3_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// Names `data` by its BLAKE3 hash.
            pub fn of(data: &[u8]) -> Self {
                $name(*blake3::hash(data).as_bytes())
            }

            /// The raw 32 bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Builds an id from exactly 32 bytes read from disk or the network.
            pub fn from_slice(bytes: &[u8]) -> Result<Self> {
                let arr: [u8; 32] = bytes.try_into().map_err(|_| {
                    Error::InvalidArgument(format!(
                        "{} id must be 32 bytes, got {}",
                        $what,
                        bytes.len()
                    ))
                })?;
                Ok($name(arr))
            }

            /// Lower-case hex form.
            pub fn to_hex(&self) -> String {
                blake3::Hash::from(self.0).to_hex().to_string()
            }

            /// `true` when `data` hashes to this id.
            pub fn verify(&self, data: &[u8]) -> bool {
                // blake3::Hash compares in constant time; cheap and harmless here.
                blake3::hash(data) == blake3::Hash::from(self.0)
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                blake3::Hash::from_hex(s.trim())
                    .map(|h| $name(*h.as_bytes()))
                    .map_err(|_| {
                        Error::InvalidArgument(format!(
                            "{s:?} is not a 64-digit hex BLAKE3 {} id",
                            $what
                        ))
                    })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        /// As its hex form: records that outlive a process stay readable.
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

blake3_id!(
    /// The BLAKE3 name of a chunk.
    ChunkId,
    "chunk"
);
blake3_id!(
    /// A snapshot's name: the BLAKE3 of its encoded manifest.
    SnapshotId,
    "snapshot"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_verify() {
        let id = ChunkId::of(b"hello");
        let parsed: ChunkId = id.to_hex().parse().unwrap();
        assert_eq!(parsed, id);
        assert!(id.verify(b"hello"));
        assert!(!id.verify(b"hellO"));
        assert!("xyz".parse::<ChunkId>().is_err());
        assert!(ChunkId::from_slice(&[0u8; 31]).is_err());
    }
}
