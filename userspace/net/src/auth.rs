//! Mutual authentication: an HMAC-SHA256 challenge-response in both directions, carried
//! in a tiny fixed framing of its own before the first codec frame.
//!
//! # Why a framing of its own
//!
//! The codec's `Message` enum belongs to the protocol, and nothing from an unauthenticated
//! socket should reach its decoder: a stranger's bytes are judged by fixed-size reads of a
//! few dozen bytes, never by a parser that allocates payloads. Authenticating first also
//! means a stranger learns nothing about our versions or features.
//!
//! # Frames
//!
//! Every auth frame starts with the same 8-byte prefix. Integers are little-endian.
//!
//! | offset | size | field     | meaning                                                      |
//! |-------:|-----:|-----------|--------------------------------------------------------------|
//! |      0 |    4 | `magic`   | the bytes `"TNDA"` (the codec's frames start `"TNDM"`)       |
//! |      4 |    1 | `version` | auth framing version, [`AUTH_VERSION`] (1)                    |
//! |      5 |    1 | `kind`    | 1 challenge, 2 response, 3 reject                            |
//! |      6 |    1 | `node`    | the sender's node id                                         |
//! |      7 |    1 | `code`    | reject: the reason ([`REJECT_STAND_ALONE`]); otherwise 0     |
//!
//! followed, by kind, by:
//!
//! | kind      | rest                               | total |
//! |-----------|------------------------------------|------:|
//! | challenge | volume u64, nonce 32 bytes         |    48 |
//! | response  | mac 32 bytes                       |    40 |
//! | reject    | nothing                            |     8 |
//!
//! # Exchange
//!
//! 1. Both sides send a challenge with a fresh random nonce at once, without waiting.
//! 2. Each reads the peer's challenge and vets it: magic, version, volume, a node id that
//!    is not ours and that the caller expects (the node we dialed, or a configured peer
//!    that may dial us). A failure closes the connection with no answer.
//! 3. Each answers with `mac = HMAC-SHA256(secret, peer_nonce || own node id || volume)`.
//! 4. Each verifies the peer's mac over its own nonce, in constant time. Only now is the
//!    peer's node id trusted.
//!
//! The responder's node id inside the mac stops reflection (sending a node its own nonce
//! back on a second connection to get the answer computed for us: the answer would carry
//! the wrong id), and the volume keeps an answer from one volume's cluster from passing in
//! another that shares the secret.
//!
//! This authenticates the nodes at connection time; it neither encrypts nor protects the
//! frames that follow (a TLS transport would). A reject frame travels only after both
//! sides authenticated, in place of the acceptor's `Hello`: it tells the dialer why it is
//! turned away (for now only "stand-alone here") instead of leaving it to guess.

use crate::error::Refusal;
use crate::handshake::HandshakeIo;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tandem_core::types::NodeId;

pub const AUTH_MAGIC: [u8; 4] = *b"TNDA";
/// The codec's magic, recognised to tell an unauthenticated Tandem build from a stranger.
const CODEC_MAGIC: [u8; 4] = *b"TNDM";
pub const AUTH_VERSION: u8 = 1;
pub const NONCE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;
const PREFIX_LEN: usize = 8;
pub const CHALLENGE_LEN: usize = PREFIX_LEN + 8 + NONCE_LEN;
pub const RESPONSE_LEN: usize = PREFIX_LEN + MAC_LEN;
pub const REJECT_LEN: usize = PREFIX_LEN;

const KIND_CHALLENGE: u8 = 1;
const KIND_RESPONSE: u8 = 2;
const KIND_REJECT: u8 = 3;

/// Reject code: the sender holds us stand-alone until its operator reconnects us.
pub const REJECT_STAND_ALONE: u8 = 1;

/// Who we are, as far as authentication is concerned.
#[derive(Clone, Copy)]
pub(crate) struct Identity<'a> {
    pub node: NodeId,
    pub volume: u64,
    pub secret: &'a [u8],
}

fn prefix(kind: u8, node: NodeId, code: u8) -> [u8; PREFIX_LEN] {
    let mut p = [0; PREFIX_LEN];
    p[..4].copy_from_slice(&AUTH_MAGIC);
    p[4] = AUTH_VERSION;
    p[5] = kind;
    p[6] = node;
    p[7] = code;
    p
}

pub(crate) fn challenge_frame(node: NodeId, volume: u64, nonce: &[u8; NONCE_LEN]) -> [u8; CHALLENGE_LEN] {
    let mut f = [0; CHALLENGE_LEN];
    f[..PREFIX_LEN].copy_from_slice(&prefix(KIND_CHALLENGE, node, 0));
    f[PREFIX_LEN..PREFIX_LEN + 8].copy_from_slice(&volume.to_le_bytes());
    f[PREFIX_LEN + 8..].copy_from_slice(nonce);
    f
}

pub(crate) fn response_frame(node: NodeId, mac: &[u8; MAC_LEN]) -> [u8; RESPONSE_LEN] {
    let mut f = [0; RESPONSE_LEN];
    f[..PREFIX_LEN].copy_from_slice(&prefix(KIND_RESPONSE, node, 0));
    f[PREFIX_LEN..].copy_from_slice(mac);
    f
}

pub(crate) fn reject_frame(node: NodeId, code: u8) -> [u8; REJECT_LEN] {
    prefix(KIND_REJECT, node, code)
}

fn keyed(secret: &[u8], nonce: &[u8; NONCE_LEN], responder: NodeId, volume: u64) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(nonce);
    mac.update(&[responder]);
    mac.update(&volume.to_le_bytes());
    mac
}

/// The answer `responder` gives to the challenge `nonce`.
pub(crate) fn answer(secret: &[u8], nonce: &[u8; NONCE_LEN], responder: NodeId, volume: u64) -> [u8; MAC_LEN] {
    keyed(secret, nonce, responder, volume).finalize().into_bytes().into()
}

/// Whether `mac` is `responder`'s correct answer to `nonce`; constant-time.
pub(crate) fn verify(secret: &[u8], nonce: &[u8; NONCE_LEN], responder: NodeId, volume: u64, mac: &[u8]) -> bool {
    keyed(secret, nonce, responder, volume).verify_slice(mac).is_ok()
}

/// The checked prefix of an auth frame: its kind, sender node and code.
struct Prefix {
    kind: u8,
    node: NodeId,
    code: u8,
}

/// Reads and checks a prefix. The magic is read alone first so that a stranger sending a
/// few bytes of anything is refused at once instead of after the handshake timeout.
fn read_prefix(io: &mut HandshakeIo) -> Result<Prefix, Refusal> {
    let mut p = [0; PREFIX_LEN];
    io.read_exact(&mut p[..4])?;
    parse_magic(&p[..4])?;
    io.read_exact(&mut p[4..])?;
    parse_prefix(&p)
}

fn parse_magic(m: &[u8]) -> Result<(), Refusal> {
    let found: [u8; 4] = m.try_into().map_err(|_| Refusal::AuthMalformed("short magic"))?;
    match found {
        AUTH_MAGIC => Ok(()),
        CODEC_MAGIC => Err(Refusal::Unauthenticated),
        _ => Err(Refusal::NotTandem { found }),
    }
}

fn parse_prefix(p: &[u8; PREFIX_LEN]) -> Result<Prefix, Refusal> {
    parse_magic(&p[..4])?;
    if p[4] != AUTH_VERSION {
        return Err(Refusal::AuthVersion { theirs: p[4], ours: AUTH_VERSION });
    }
    Ok(Prefix { kind: p[5], node: p[6], code: p[7] })
}

/// Interprets a reject frame the acceptor sent in place of its `Hello`.
pub(crate) fn parse_reject(frame: &[u8; REJECT_LEN]) -> Refusal {
    match parse_prefix(frame) {
        Err(e) => e,
        Ok(Prefix { kind, .. }) if kind != KIND_REJECT => Refusal::AuthMalformed("auth frame after authentication"),
        Ok(Prefix { node, code: REJECT_STAND_ALONE, .. }) => Refusal::PeerStandAlone { node },
        Ok(Prefix { node, code, .. }) => Refusal::PeerRejected { node, code },
    }
}

/// Runs the exchange described in the module docs and returns the peer's authenticated
/// node id. `check_claim` vets the id the peer claims before we answer it.
pub(crate) fn authenticate(
    io: &mut HandshakeIo,
    ours: &Identity,
    check_claim: impl FnOnce(NodeId) -> Result<(), Refusal>,
) -> Result<NodeId, Refusal> {
    let mut nonce = [0; NONCE_LEN];
    getrandom::getrandom(&mut nonce).map_err(Refusal::Random)?;
    io.write_all(&challenge_frame(ours.node, ours.volume, &nonce))?;

    let p = read_prefix(io)?;
    if p.kind != KIND_CHALLENGE {
        return Err(Refusal::AuthMalformed("expected a challenge"));
    }
    let mut rest = [0; CHALLENGE_LEN - PREFIX_LEN];
    io.read_exact(&mut rest)?;
    let (volume, their_nonce) = rest.split_at(8);
    let volume = u64::from_le_bytes(volume.try_into().expect("8 bytes"));
    let their_nonce: [u8; NONCE_LEN] = their_nonce.try_into().expect("32 bytes");
    if volume != ours.volume {
        return Err(Refusal::WrongVolume { ours: ours.volume, theirs: volume });
    }
    if p.node == ours.node {
        return Err(Refusal::SameNode { node: p.node });
    }
    if their_nonce == nonce {
        return Err(Refusal::Reflected);
    }
    let claimed = p.node;
    check_claim(claimed)?;

    io.write_all(&response_frame(ours.node, &answer(ours.secret, &their_nonce, ours.node, ours.volume)))?;

    let p = read_prefix(io)?;
    if p.kind != KIND_RESPONSE {
        return Err(Refusal::AuthMalformed("expected a response"));
    }
    if p.node != claimed {
        return Err(Refusal::AuthMalformed("the response names another node than the challenge"));
    }
    let mut mac = [0; MAC_LEN];
    io.read_exact(&mut mac)?;
    if !verify(ours.secret, &nonce, claimed, ours.volume, &mac) {
        return Err(Refusal::BadMac { node: claimed });
    }
    Ok(claimed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_layouts_match_the_docs() {
        let nonce = [7; NONCE_LEN];
        let c = challenge_frame(3, 0x0102_0304_0506_0708, &nonce);
        assert_eq!(&c[..8], b"TNDA\x01\x01\x03\x00");
        assert_eq!(&c[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&c[16..], &nonce);
        let r = response_frame(2, &[9; MAC_LEN]);
        assert_eq!(&r[..8], b"TNDA\x01\x02\x02\x00");
        assert_eq!(&r[8..], &[9; MAC_LEN]);
        assert_eq!(&reject_frame(5, REJECT_STAND_ALONE), b"TNDA\x01\x03\x05\x01");
    }

    #[test]
    fn the_mac_binds_secret_nonce_responder_and_volume() {
        let n = [1; NONCE_LEN];
        let mac = answer(b"s3cret", &n, 1, 42);
        assert!(verify(b"s3cret", &n, 1, 42, &mac));
        assert!(!verify(b"other", &n, 1, 42, &mac));
        assert!(!verify(b"s3cret", &[2; NONCE_LEN], 1, 42, &mac));
        assert!(!verify(b"s3cret", &n, 0, 42, &mac), "a reflected answer carries the wrong node id");
        assert!(!verify(b"s3cret", &n, 1, 43, &mac));
        assert!(!verify(b"s3cret", &n, 1, 42, &mac[..31]));
    }

    #[test]
    fn rejects_are_read_back() {
        assert!(matches!(parse_reject(&reject_frame(4, REJECT_STAND_ALONE)), Refusal::PeerStandAlone { node: 4 }));
        assert!(matches!(parse_reject(&reject_frame(4, 9)), Refusal::PeerRejected { node: 4, code: 9 }));
        let mut bad = reject_frame(4, 1);
        bad[4] = 2;
        assert!(matches!(parse_reject(&bad), Refusal::AuthVersion { theirs: 2, ours: 1 }));
    }

    #[test]
    fn strangers_and_unauthenticated_builds_are_told_apart() {
        assert!(matches!(parse_magic(b"GET "), Err(Refusal::NotTandem { found }) if &found == b"GET "));
        assert!(matches!(parse_magic(b"TNDM"), Err(Refusal::Unauthenticated)));
        let msg = parse_magic(b"\x16\x03\x01\x00").unwrap_err().to_string();
        assert!(msg.contains(r"\x16\x03\x01\x00"), "{msg}");
    }
}
