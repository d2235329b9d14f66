//! The messages nodes exchange. The byte layout is in [`super::codec`].

use crate::geometry::{RangeId, TrackId};
use crate::types::{DiskState, Generations, Mode, NodeId, Role};
use bytes::Bytes;

/// Identifies one replicated host write (or discard) for its acknowledgments.
pub type WriteId = u64;

/// Protocol features a node offers in its [`Hello`]; the session uses the intersection.
pub mod features {
    pub const MEMORY_MODE: u64 = 1 << 0;
    pub const DISK_MODE: u64 = 1 << 1;
    pub const ASYNC_MODE: u64 = 1 << 2;
    pub const PREDICTIVE_MODE: u64 = 1 << 3;
    pub const SECONDARY_READS: u64 = 1 << 4;
    pub const COUNTER_TOGGLE: u64 = 1 << 5;
    /// What this build implements.
    pub const SUPPORTED: u64 = MEMORY_MODE | DISK_MODE;
}

/// First message on a connection, before anything else: versions and features.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub features: u64,
    pub node: NodeId,
    pub volume: u64,
}

/// A node's view of itself, sent after the handshake and on every change that matters to
/// the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateReport {
    pub node: NodeId,
    pub role: Role,
    pub disk: DiskState,
    pub mode: Mode,
    pub generations: Generations,
    /// The node restarted after a crash and has not completed a resync since: its records
    /// were lost, and so was whatever its volatile cache held.
    pub crashed: bool,
    pub volume_size: u64,
    pub track_size: u32,
    /// The primary this node replicates with now: itself, a connected peer, or none.
    pub primary: Option<NodeId>,
    /// Bit `n` set: this node exchanges replicated writes with node `n` right now. A
    /// secondary learns from its primary's mask which other secondaries miss writes.
    pub replicating: u64,
}

/// Node ids are below this, so that they fit the `replicating` mask (and 0xFF can mean
/// "no primary" on the wire).
pub const MAX_NODES: usize = 64;

/// Everything nodes say to each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Version and feature negotiation (first frame on a connection).
    Hello(Hello),
    /// The answer to a `Hello`: the chosen version and the common features.
    HelloAck {
        version: u16,
        features: u64,
    },
    /// The sender's state; starts the record exchange after a (re)connect.
    State(StateReport),
    /// One range of the sender's record (current ∪ old), one bit per track, LSB first.
    RecordPage {
        range: RangeId,
        bits: Bytes,
    },
    /// The sender's record is complete; `tracks` is its count, checked by the receiver.
    RecordEnd {
        tracks: u64,
    },
    /// A host write to replicate.
    Data {
        id: WriteId,
        offset: u64,
        fua: bool,
        payload: Bytes,
    },
    /// A host discard (`zeroes == false`) or write-zeroes (`zeroes == true`) to replicate.
    Discard {
        id: WriteId,
        offset: u64,
        len: u64,
        zeroes: bool,
    },
    /// The receiver recorded the write; in `memory` mode it also holds it in its cache.
    ReceiptAck {
        id: WriteId,
    },
    /// The receiver hardened the write.
    HardenedAck {
        id: WriteId,
    },
    /// Harden everything written so far (a host FLUSH).
    Flush {
        id: u64,
    },
    FlushAck {
        id: u64,
    },
    /// Seed 003 Fig. 5: the sender is about to destage `range`; toggle your record of it.
    DestageStart {
        range: RangeId,
    },
    /// The record of `range` was toggled.
    DestageAck {
        range: RangeId,
    },
    /// The sender hardened `range`: clear its old bitmap.
    DestageDone {
        range: RangeId,
    },
    /// Seed 003 Fig. 6: the sender switches to a new bitmap for `range`.
    ToggleNotice {
        range: RangeId,
    },
    ToggleAck {
        range: RangeId,
    },
    /// Seed 003 Fig. 6: counter M reached zero, clear the old bitmap of `range`.
    ClearOld {
        range: RangeId,
    },
    /// Seed 001: add tracks (the written ones and the predicted neighbours) to the
    /// receiver's record, in generation `generation`.
    RecordExtend {
        generation: u64,
        first: TrackId,
        count: u32,
    },
    RecordExtendAck {
        generation: u64,
    },
    /// Seed 001: remove every entry added in `generation` (now in sync on both sides).
    RecordTrim {
        generation: u64,
    },
    /// Ask the peer to ship these tracks (a targeted resync, e.g. after `verify`).
    ResyncRequest {
        first: TrackId,
        count: u32,
    },
    /// One track's content, shipped by a resync.
    ResyncData {
        track: TrackId,
        payload: Bytes,
    },
    ResyncAck {
        track: TrackId,
    },
    /// The source shipped every recorded track (`tracks` of them); the target is in sync.
    ResyncEnd {
        tracks: u64,
    },
    /// Online verify: "this is the digest of `track` on my device; compare yours".
    VerifyRequest {
        track: TrackId,
        digest: [u8; 32],
    },
    /// The target compared its copy of `track` with the request's digest.
    VerifyReply {
        track: TrackId,
        same: bool,
    },
    /// Seed 002: a read at the secondary of a track its record marks stale.
    ReadRequest {
        id: u64,
        offset: u64,
        len: u32,
    },
    ReadReply {
        id: u64,
        payload: Bytes,
    },
    /// Seed 004: the writes of consistency-set cycle `cycle` in group `group` are all sent;
    /// commit them atomically.
    AsyncCommit {
        group: u32,
        cycle: u64,
        writes: u32,
    },
    AsyncCommitAck {
        group: u32,
        cycle: u64,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
}

impl Message {
    /// Short name for logs and traces.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::HelloAck { .. } => "HelloAck",
            Message::State(_) => "State",
            Message::RecordPage { .. } => "RecordPage",
            Message::RecordEnd { .. } => "RecordEnd",
            Message::Data { .. } => "Data",
            Message::Discard { .. } => "Discard",
            Message::ReceiptAck { .. } => "ReceiptAck",
            Message::HardenedAck { .. } => "HardenedAck",
            Message::Flush { .. } => "Flush",
            Message::FlushAck { .. } => "FlushAck",
            Message::DestageStart { .. } => "DestageStart",
            Message::DestageAck { .. } => "DestageAck",
            Message::DestageDone { .. } => "DestageDone",
            Message::ToggleNotice { .. } => "ToggleNotice",
            Message::ToggleAck { .. } => "ToggleAck",
            Message::ClearOld { .. } => "ClearOld",
            Message::RecordExtend { .. } => "RecordExtend",
            Message::RecordExtendAck { .. } => "RecordExtendAck",
            Message::RecordTrim { .. } => "RecordTrim",
            Message::ResyncRequest { .. } => "ResyncRequest",
            Message::ResyncData { .. } => "ResyncData",
            Message::ResyncAck { .. } => "ResyncAck",
            Message::ResyncEnd { .. } => "ResyncEnd",
            Message::VerifyRequest { .. } => "VerifyRequest",
            Message::VerifyReply { .. } => "VerifyReply",
            Message::ReadRequest { .. } => "ReadRequest",
            Message::ReadReply { .. } => "ReadReply",
            Message::AsyncCommit { .. } => "AsyncCommit",
            Message::AsyncCommitAck { .. } => "AsyncCommitAck",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
        }
    }
}
