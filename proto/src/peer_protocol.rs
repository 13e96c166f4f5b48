//! Versions of the peer protocol: the Raft, forwarding, read-index and
//! join RPCs between nodes. Each build speaks a range of versions and says
//! so in every message and every reply; two nodes talk when their ranges
//! overlap, and a message from a node whose range does not is refused with
//! an error that says why. A release that changes what peers send adds a
//! version at the top of the range and keeps the one below until the
//! release after (expand, migrate, contract: docs/ARCHITECTURE.md,
//! "Versions and upgrades").

use std::fmt;

/// The versions this build speaks. 1: JSON payloads of openraft 0.9's
/// messages and of this crate's requests, with no versions on the wire
/// (builds before 0.2.0). 2: the same payloads, and the sender's range in
/// every message and reply. 3: the same payloads; a leader proposes the
/// commands of 0.3.0 (deletion, retention) only to members heard speaking
/// it. Version 1 (builds before 0.2.0) is no longer spoken.
pub const PEER_PROTOCOL: Versions = Versions { min: 2, max: 3 };

/// A range of peer protocol versions, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    pub min: u32,
    pub max: u32,
}

impl Versions {
    /// What a message carries. Builds before the fields send none (0, 0):
    /// they speak version 1.
    pub fn of(min: u32, max: u32) -> Versions {
        if max == 0 {
            Versions { min: 1, max: 1 }
        } else {
            Versions {
                min: min.max(1),
                max,
            }
        }
    }

    /// The newest version both ranges hold, if any.
    pub fn common(self, other: Versions) -> Option<u32> {
        let newest = self.max.min(other.max);
        (newest >= self.min.max(other.min)).then_some(newest)
    }

    /// The newest version this build shares with `peer`'s range, or why
    /// they cannot talk.
    pub fn agree(self, peer: u64, theirs: Versions) -> Result<u32, String> {
        self.common(theirs).ok_or_else(|| {
            format!(
                "node {peer} speaks peer protocol {theirs}, this node {self}: nodes more than one \
                 release apart cannot run in one cluster; upgrade one release at a time"
            )
        })
    }
}

impl fmt::Display for Versions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "v{}", self.max)
        } else {
            write!(f, "v{}..=v{}", self.min, self.max)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_without_versions_is_version_one() {
        assert_eq!(Versions::of(0, 0), Versions { min: 1, max: 1 });
        assert_eq!(Versions::of(0, 3), Versions { min: 1, max: 3 });
        assert_eq!(Versions::of(2, 3), Versions { min: 2, max: 3 });
    }

    #[test]
    fn builds_talk_in_the_newest_version_both_speak() {
        let v = |min, max| Versions { min, max };
        // The previous release (v1..=v2), this one, the next (v3..=v4).
        assert_eq!(PEER_PROTOCOL.common(v(1, 2)), Some(2));
        assert_eq!(PEER_PROTOCOL.common(v(3, 4)), Some(3));
        assert_eq!(PEER_PROTOCOL.common(PEER_PROTOCOL), Some(3));
        // Builds before 0.2.0 (v1 only) are two releases back.
        assert_eq!(PEER_PROTOCOL.common(v(1, 1)), None);
        // Two releases apart: nothing in common, in either direction.
        assert_eq!(v(1, 1).common(v(2, 3)), None);
        assert_eq!(v(2, 3).common(v(1, 1)), None);
        let e = v(1, 1).agree(4, v(2, 3)).unwrap_err();
        assert!(
            e.contains("node 4 speaks peer protocol v2..=v3, this node v1"),
            "{e}"
        );
        assert!(e.contains("upgrade one release at a time"), "{e}");
    }
}
