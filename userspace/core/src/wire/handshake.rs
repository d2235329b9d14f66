//! Version and feature negotiation at the start of a connection.
//!
//! # Exchange
//!
//! 1. As soon as the transport is up, each node sends its [`Hello`] ([`hello`]) without
//!    waiting for the peer's. Nothing else may be sent before the handshake completes.
//! 2. Each node, on receiving the peer's `Hello`, calls [`negotiate`]. On error it closes
//!    the connection; the checks are symmetric, so the peer fails with the same error and
//!    both operators see the same diagnosis.
//! 3. The node with the lower node id ([`sends_ack`]) is the decider: it sends
//!    `HelloAck { version, features }` with its [`Negotiated`] result and may start the
//!    session (its `State`, ...) right behind it.
//! 4. The other node waits for that `HelloAck`, checks it with [`check_ack`] and uses the
//!    decider's choice, not its own result, from then on.
//!
//! Why asymmetric: one authoritative choice means two builds whose negotiation policies
//! differ (say, a later build that declines a feature both offer) still agree on what the
//! session uses, and the follower only has to verify that the choice is one it can live
//! with. Why the follower negotiates too: it must still vet the peer's `Hello` (volume,
//! node id, required features) and fail with a precise error instead of waiting for an
//! acknowledgment that will never come. Node ids are unique within a volume's cluster
//! (a shared id is itself a handshake error), so exactly one side is the decider.
//!
//! The whole exchange costs one round trip for the follower and none for the decider.

use super::codec::{MIN_VERSION, PROTOCOL_VERSION};
use super::message::{features, Hello};
use crate::types::NodeId;
use std::fmt;
use thiserror::Error;

/// Features without which two nodes cannot replicate at all: the synchronous modes.
pub const REQUIRED_FEATURES: u64 = features::MEMORY_MODE | features::DISK_MODE;

/// What a session runs with once the handshake has completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Negotiated {
    pub version: u16,
    pub features: u64,
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error(
        "no common protocol version: we speak {ours_min}..={ours_max}, \
         the peer {theirs_min}..={theirs_max}"
    )]
    NoCommonVersion { ours_min: u16, ours_max: u16, theirs_min: u16, theirs_max: u16 },
    #[error("volume mismatch: we serve volume {ours:#x}, the peer volume {theirs:#x}")]
    VolumeMismatch { ours: u64, theirs: u64 },
    #[error(
        "the peer claims our own node id {node}: connected to ourselves, or the peer's \
         configuration is wrong"
    )]
    SameNode { node: NodeId },
    #[error("required features {} not supported by both nodes", FeatureNames(*missing))]
    MissingFeatures { missing: u64 },
    #[error("the peer chose protocol version {version}, outside our range {min}..={max}")]
    AckVersionOutOfRange { version: u16, min: u16, max: u16 },
    #[error("the peer enabled features {} that we did not offer", FeatureNames(*unoffered))]
    AckUnofferedFeatures { unoffered: u64 },
}

/// Our `Hello` for `volume`: every version and feature this build implements.
pub fn hello(node: NodeId, volume: u64) -> Hello {
    Hello { min_version: MIN_VERSION, max_version: PROTOCOL_VERSION, features: features::SUPPORTED, node, volume }
}

/// Whether we are the decider that answers the peer's `Hello` with a `HelloAck`.
pub fn sends_ack(ours: &Hello, theirs: &Hello) -> bool {
    ours.node < theirs.node
}

/// Vets the peer's `Hello` and picks the session parameters: the highest version both
/// speak and the features both offer.
pub fn negotiate(ours: &Hello, theirs: &Hello) -> Result<Negotiated, HandshakeError> {
    if ours.node == theirs.node {
        return Err(HandshakeError::SameNode { node: ours.node });
    }
    if ours.volume != theirs.volume {
        return Err(HandshakeError::VolumeMismatch { ours: ours.volume, theirs: theirs.volume });
    }
    let low = ours.min_version.max(theirs.min_version);
    let high = ours.max_version.min(theirs.max_version);
    if low > high {
        return Err(HandshakeError::NoCommonVersion {
            ours_min: ours.min_version,
            ours_max: ours.max_version,
            theirs_min: theirs.min_version,
            theirs_max: theirs.max_version,
        });
    }
    let common = ours.features & theirs.features;
    let missing = REQUIRED_FEATURES & !common;
    if missing != 0 {
        return Err(HandshakeError::MissingFeatures { missing });
    }
    Ok(Negotiated { version: high, features: common })
}

/// Checks the decider's `HelloAck` against what we offered in `ours`.
pub fn check_ack(ours: &Hello, version: u16, features: u64) -> Result<Negotiated, HandshakeError> {
    if !(ours.min_version..=ours.max_version).contains(&version) {
        return Err(HandshakeError::AckVersionOutOfRange { version, min: ours.min_version, max: ours.max_version });
    }
    let unoffered = features & !ours.features;
    if unoffered != 0 {
        return Err(HandshakeError::AckUnofferedFeatures { unoffered });
    }
    let missing = REQUIRED_FEATURES & !features;
    if missing != 0 {
        return Err(HandshakeError::MissingFeatures { missing });
    }
    Ok(Negotiated { version, features })
}

/// Displays a feature bit set by name, e.g. `MEMORY_MODE|DISK_MODE`; bits this build does
/// not know are shown in hex so that a newer peer's offer is still legible.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureNames(pub u64);

impl fmt::Display for FeatureNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(u64, &str); 6] = [
            (features::MEMORY_MODE, "MEMORY_MODE"),
            (features::DISK_MODE, "DISK_MODE"),
            (features::ASYNC_MODE, "ASYNC_MODE"),
            (features::PREDICTIVE_MODE, "PREDICTIVE_MODE"),
            (features::SECONDARY_READS, "SECONDARY_READS"),
            (features::COUNTER_TOGGLE, "COUNTER_TOGGLE"),
        ];
        if self.0 == 0 {
            return f.write_str("(none)");
        }
        let mut rest = self.0;
        let mut sep = "";
        for (bit, name) in NAMES {
            if rest & bit != 0 {
                write!(f, "{sep}{name}")?;
                sep = "|";
                rest &= !bit;
            }
        }
        if rest != 0 {
            write!(f, "{sep}{rest:#x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use features::*;
    use proptest::prelude::*;

    fn with(node: NodeId, versions: (u16, u16), features: u64) -> Hello {
        Hello { min_version: versions.0, max_version: versions.1, features, node, volume: 7 }
    }

    #[test]
    fn hello_offers_everything_this_build_implements() {
        let h = hello(3, 0xabc);
        assert_eq!(
            h,
            Hello {
                min_version: MIN_VERSION,
                max_version: PROTOCOL_VERSION,
                features: SUPPORTED,
                node: 3,
                volume: 0xabc,
            }
        );
        assert_eq!(SUPPORTED & REQUIRED_FEATURES, REQUIRED_FEATURES);
    }

    #[test]
    fn two_current_builds_agree_on_everything() {
        let a = hello(0, 9);
        let b = hello(1, 9);
        let n = negotiate(&a, &b).unwrap();
        assert_eq!(n, Negotiated { version: PROTOCOL_VERSION, features: SUPPORTED });
        assert_eq!(negotiate(&b, &a), Ok(n));
        assert!(sends_ack(&a, &b));
        assert!(!sends_ack(&b, &a));
        assert_eq!(check_ack(&b, n.version, n.features), Ok(n));
    }

    #[test]
    fn picks_the_highest_common_version() {
        let a = with(0, (1, 3), SUPPORTED);
        let b = with(1, (2, 5), SUPPORTED);
        assert_eq!(negotiate(&a, &b).unwrap().version, 3);
        assert_eq!(negotiate(&b, &a).unwrap().version, 3);
        let c = with(1, (3, 3), SUPPORTED);
        assert_eq!(negotiate(&a, &c).unwrap().version, 3);
    }

    #[test]
    fn disjoint_versions_fail_and_show_both_ranges() {
        let a = with(0, (1, 1), SUPPORTED);
        let b = with(1, (2, 3), SUPPORTED);
        let err = negotiate(&a, &b).unwrap_err();
        assert_eq!(err, HandshakeError::NoCommonVersion { ours_min: 1, ours_max: 1, theirs_min: 2, theirs_max: 3 });
        assert_eq!(err.to_string(), "no common protocol version: we speak 1..=1, the peer 2..=3");
    }

    #[test]
    fn an_inverted_peer_range_offers_no_version() {
        let a = with(0, (1, 5), SUPPORTED);
        let b = with(1, (3, 2), SUPPORTED);
        assert!(matches!(negotiate(&a, &b), Err(HandshakeError::NoCommonVersion { .. })));
    }

    #[test]
    fn different_volumes_are_refused() {
        let a = hello(0, 1);
        let b = hello(1, 2);
        assert_eq!(negotiate(&a, &b), Err(HandshakeError::VolumeMismatch { ours: 1, theirs: 2 }));
    }

    #[test]
    fn talking_to_our_own_node_id_is_refused() {
        let a = hello(4, 1);
        let err = negotiate(&a, &a.clone()).unwrap_err();
        assert_eq!(err, HandshakeError::SameNode { node: 4 });
        assert!(err.to_string().contains("our own node id 4"));
    }

    #[test]
    fn features_are_the_intersection() {
        let a = with(0, (1, 1), MEMORY_MODE | DISK_MODE | ASYNC_MODE | SECONDARY_READS);
        let b = with(1, (1, 1), MEMORY_MODE | DISK_MODE | ASYNC_MODE | COUNTER_TOGGLE);
        assert_eq!(negotiate(&a, &b).unwrap().features, MEMORY_MODE | DISK_MODE | ASYNC_MODE);
    }

    #[test]
    fn a_peer_without_a_required_mode_is_refused() {
        let a = hello(0, 7);
        let b = with(1, (1, 1), MEMORY_MODE | ASYNC_MODE);
        let err = negotiate(&a, &b).unwrap_err();
        assert_eq!(err, HandshakeError::MissingFeatures { missing: DISK_MODE });
        assert_eq!(err.to_string(), "required features DISK_MODE not supported by both nodes");
    }

    #[test]
    fn ack_version_must_be_one_we_speak() {
        let ours = with(1, (2, 4), SUPPORTED);
        for v in [2, 3, 4] {
            assert_eq!(check_ack(&ours, v, SUPPORTED), Ok(Negotiated { version: v, features: SUPPORTED }));
        }
        for v in [0, 1, 5, u16::MAX] {
            assert_eq!(
                check_ack(&ours, v, SUPPORTED),
                Err(HandshakeError::AckVersionOutOfRange { version: v, min: 2, max: 4 })
            );
        }
    }

    #[test]
    fn ack_features_must_be_ours_and_include_the_required_ones() {
        let ours = hello(1, 7);
        assert_eq!(
            check_ack(&ours, 1, SUPPORTED | ASYNC_MODE | (1 << 40)),
            Err(HandshakeError::AckUnofferedFeatures { unoffered: ASYNC_MODE | (1 << 40) })
        );
        assert_eq!(check_ack(&ours, 1, MEMORY_MODE), Err(HandshakeError::MissingFeatures { missing: DISK_MODE }));
    }

    #[test]
    fn feature_names_display() {
        assert_eq!(FeatureNames(0).to_string(), "(none)");
        assert_eq!(FeatureNames(SUPPORTED).to_string(), "MEMORY_MODE|DISK_MODE");
        assert_eq!(FeatureNames(COUNTER_TOGGLE | (1 << 8)).to_string(), "COUNTER_TOGGLE|0x100");
        assert_eq!(FeatureNames(1 << 63).to_string(), "0x8000000000000000");
    }

    fn arb_hello() -> impl Strategy<Value = Hello> {
        // Small domains so that agreements, disagreements and equal ids all occur often.
        (0u16..4, 0u16..4, 0u64..64, 0u8..3, 0u64..2).prop_map(|(min_version, max_version, features, node, volume)| {
            Hello { min_version, max_version, features, node, volume }
        })
    }

    proptest! {
        /// Both sides reach the same verdict from the same pair of `Hello`s, and the
        /// decider's choice always passes the follower's check.
        #[test]
        fn negotiation_is_symmetric_and_acks_pass(a in arb_hello(), b in arb_hello()) {
            let ab = negotiate(&a, &b);
            let ba = negotiate(&b, &a);
            prop_assert_eq!(ab.is_ok(), ba.is_ok());
            if let (Ok(x), Ok(y)) = (ab, ba) {
                prop_assert_eq!(x, y);
                prop_assert!(sends_ack(&a, &b) != sends_ack(&b, &a));
                let follower = if sends_ack(&a, &b) { &b } else { &a };
                prop_assert_eq!(check_ack(follower, x.version, x.features), Ok(x));
                prop_assert!(x.version >= a.min_version.max(b.min_version));
                prop_assert!(x.version <= a.max_version.min(b.max_version));
            }
        }
    }
}
