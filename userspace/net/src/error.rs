//! Typed errors: why `Net::start` failed, why a connection was refused during its
//! handshake, and why an established link was lost. The latter two end up as the `reason`
//! strings of `NetEvent::Refused` and `NetEvent::Lost`, so their messages are written for
//! an operator reading one log line.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tandem_core::types::NodeId;
use tandem_core::wire::{DecodeError, EncodeError, HandshakeError};
use thiserror::Error;

/// `Net::start` could not bring the node up.
#[derive(Debug, Error)]
pub enum NetError {
    #[error("invalid network configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(
        "cannot listen on {addr}: the address is already in use (another tandem daemon, or another \
         program, listens on that port)"
    )]
    AddrInUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot start a network thread: {0}")]
    Spawn(io::Error),
}

/// A `NetConfig` that cannot work; caught at start rather than as odd behaviour later.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("timeout {0:?} is out of range: it must be above zero and at most {max:?}", max = crate::config::MAX_TIMEOUT)]
    Timeout(Duration),
    #[error("keepalive interval {keepalive:?} must be above zero and below the timeout {timeout:?}")]
    Keepalive { keepalive: Duration, timeout: Duration },
    #[error("reconnect backoff {min:?}..{max:?} must have 0 < min <= max")]
    Backoff { min: Duration, max: Duration },
    #[error("the shared secret is empty: it would authenticate anyone")]
    EmptySecret,
    #[error("node id {node} is out of range: node ids are below {max}")]
    NodeOutOfRange { node: NodeId, max: usize },
    #[error("peer node id {node} is listed twice")]
    DuplicatePeer { node: NodeId },
    #[error("our own node id {node} is listed as a peer")]
    SelfAsPeer { node: NodeId },
    #[error("the send queue limit must be above zero")]
    QueueLimit,
}

/// Why a new connection was closed before it became a link. Every variant names what the
/// operator should look at; the address is added by the caller.
#[derive(Debug, Error)]
pub enum Refusal {
    #[error("handshake timed out during {stage} (limit {limit:?}): the peer is silent or not a Tandem node")]
    Timeout { stage: &'static str, limit: Duration },
    #[error("the peer closed the connection during {stage} (it refused us: its log says why)")]
    Closed { stage: &'static str },
    #[error("I/O error during {stage}: {source}")]
    Io { stage: &'static str, source: io::Error },
    #[error("not a Tandem peer: it opened with \"{}\" instead of the auth magic \"TNDA\"", .found.escape_ascii())]
    NotTandem { found: [u8; 4] },
    #[error("the peer sends Tandem frames without authenticating first (a build without auth?)")]
    Unauthenticated,
    #[error("the peer speaks auth framing version {theirs}, this build speaks {ours}")]
    AuthVersion { theirs: u8, ours: u8 },
    #[error("malformed auth frame: {0}")]
    AuthMalformed(&'static str),
    #[error("the peer echoed our own challenge nonce (a reflection attempt?)")]
    Reflected,
    #[error("volume mismatch: we serve volume {ours:#x}, the peer volume {theirs:#x}")]
    WrongVolume { ours: u64, theirs: u64 },
    #[error("the peer claims our own node id {node}: connected to ourselves, or its configuration is wrong")]
    SameNode { node: NodeId },
    #[error("the peer claims node id {node}, which is not a configured peer")]
    UnknownNode { node: NodeId },
    #[error("we dialed node {expected} but the peer claims node id {found}")]
    UnexpectedNode { expected: NodeId, found: NodeId },
    #[error(
        "node {node} dialed us, but only a node with a lower id than ours ({ours}) dials: \
         both nodes must list each other with the same ids"
    )]
    WrongDirection { node: NodeId, ours: NodeId },
    #[error("authentication failed: node {node}'s answer to our challenge is wrong (different shared secret?)")]
    BadMac { node: NodeId },
    #[error("cannot draw a random nonce: {0}")]
    Random(getrandom::Error),
    #[error("undecodable frame during the version exchange: {0}")]
    Decode(#[from] DecodeError),
    #[error("cannot encode our {message}: {source}")]
    Encode { message: &'static str, source: EncodeError },
    #[error("expected {expected} (seq {seq}) during the version exchange, got {got}")]
    UnexpectedFrame { expected: &'static str, seq: u64, got: String },
    #[error("node {authenticated} authenticated, but its Hello claims node {claimed}")]
    HelloNodeMismatch { authenticated: NodeId, claimed: NodeId },
    #[error("protocol negotiation failed: {0}")]
    Negotiation(#[from] HandshakeError),
    #[error("node {node} is stand-alone here: no connection until the operator reconnects it")]
    StandAlone { node: NodeId },
    #[error("node {node} refuses us: we are stand-alone on its side until its operator reconnects us")]
    PeerStandAlone { node: NodeId },
    #[error("node {node} refuses us (reject code {code})")]
    PeerRejected { node: NodeId, code: u8 },
    #[error("too many connections are in their handshake ({limit}): dropped")]
    Busy { limit: usize },
    #[error("the local node is shutting down")]
    ShuttingDown,
}

impl Refusal {
    /// Refusals that follow from an operator's decision rather than a fault: logged at
    /// info, not warn, so that a stand-alone pair does not flood the log with warnings.
    pub fn is_administrative(&self) -> bool {
        matches!(self, Refusal::StandAlone { .. } | Refusal::PeerStandAlone { .. } | Refusal::ShuttingDown)
    }

    /// Maps an I/O error of a handshake step onto the refusal an operator understands.
    pub(crate) fn from_io(e: io::Error, stage: &'static str, limit: Duration) -> Refusal {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Refusal::Timeout { stage, limit },
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Refusal::Closed { stage },
            _ => Refusal::Io { stage, source: e },
        }
    }
}

/// Why an established link ended: the `reason` of `NetEvent::Lost`.
#[derive(Debug, Error)]
pub enum LinkError {
    #[error("nothing received from the peer for {0:?} (keepalive timeout): peer dead or network partitioned")]
    Silent(Duration),
    #[error("the peer closed the connection")]
    PeerClosed,
    #[error("the peer closed the connection in the middle of a frame ({buffered} bytes of it received)")]
    Truncated { buffered: usize },
    #[error("receive failed: {0}")]
    Read(io::Error),
    #[error("send failed: {0}")]
    Write(io::Error),
    #[error("a send made no progress for {0:?}: the peer does not read, or the network is partitioned")]
    Stalled(Duration),
    #[error("protocol error: undecodable frame: {0}")]
    Decode(DecodeError),
    #[error("protocol error: frame seq {got}, expected {expected} (frames lost or reordered)")]
    SeqGap { expected: u64, got: u64 },
    #[error("protocol error: frame for volume {theirs:#x} on the link of volume {ours:#x}")]
    WrongVolume { ours: u64, theirs: u64 },
    #[error("protocol error: {0} received after the handshake")]
    LateHandshake(&'static str),
    #[error("cannot encode {message} (a bug in the sender): {source}")]
    Encode { message: &'static str, source: EncodeError },
    #[error("send queue overflow ({queued} bytes queued, limit {limit}): the peer does not keep up")]
    QueueFull { queued: usize, limit: usize },
    #[error("disconnected by the local operator{}", stand_alone_note(*.stand_alone))]
    Disconnected { stand_alone: bool },
    #[error("replaced by a new connection from the same peer (it restarted or lost the old one)")]
    Replaced,
    #[error("the local node is shutting down")]
    ShuttingDown,
}

impl LinkError {
    /// Losses the local operator asked for: logged at info, not warn.
    pub fn is_local(&self) -> bool {
        matches!(self, LinkError::Disconnected { .. } | LinkError::ShuttingDown)
    }
}

fn stand_alone_note(stand_alone: bool) -> &'static str {
    if stand_alone {
        " (stand-alone until reconnect)"
    } else {
        ""
    }
}
