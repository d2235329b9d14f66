//! The node's interface: configuration, the events it takes, the actions it asks for, and
//! the errors and status it reports.

use super::Meta;
use crate::geometry::{Extent, Geometry, GeometryError, RangeId, TrackId};
use crate::types::{ConnState, DiskState, GenId, Generations, Mode, NodeId, Role};
use crate::wire::{Message, MAX_NODES};
use bytes::Bytes;
use thiserror::Error;

/// Identifies one local I/O (write, read, harden, metadata write) between action and event.
pub type IoId = u64;
/// Identifies one host request (write, discard, flush) between event and completion.
pub type HostIoId = u64;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node: NodeId,
    pub peers: Vec<NodeId>,
    pub geometry: Geometry,
    pub mode: Mode,
    /// How often (in the caller's time unit) a destage scan may start.
    pub destage_interval: u64,
    /// Resync reads in flight at once.
    pub resync_window: usize,
    /// Attach mode (docs/attach.md): the local device is written by an application Tandem
    /// does not sit in front of. The node ships what it reads back from the device
    /// ([`Event::HostWritten`]) and must never write the device itself, so it stays primary:
    /// [`Node::demote`] is refused, and as a primary it refuses replicated writes and resyncs
    /// into it (`BothPrimary`, `PrimaryWouldBeTarget`).
    pub attached: bool,
}

impl NodeConfig {
    pub fn new(node: NodeId, peers: Vec<NodeId>, geometry: Geometry, mode: Mode) -> Self {
        NodeConfig { node, peers, geometry, mode, destage_interval: 1_000_000_000, resync_window: 8, attached: false }
    }
}

/// Data of a local write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    Data(Bytes),
    /// Zeroes of this length; `discard` says the host discarded rather than wrote zeroes (the
    /// store may punch a hole, but must read back zeroes so replicas stay identical).
    Zeroes {
        len: u64,
        discard: bool,
    },
}

impl Payload {
    pub fn len(&self) -> u64 {
        match self {
            Payload::Data(b) => b.len() as u64,
            Payload::Zeroes { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a harden covers. Like a FLUSH on Linux, it hardens only writes that completed
/// before it was issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HardenScope {
    All,
    Range(RangeId),
    Extent(Extent),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Timer {
    Destage,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    HostWrite {
        id: HostIoId,
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    HostDiscard {
        id: HostIoId,
        offset: u64,
        len: u64,
        zeroes: bool,
    },
    HostFlush {
        id: HostIoId,
    },
    /// Attach mode: `data` is already on the local device (an application wrote it there, and
    /// the block layer's record marked its tracks when the write was queued, before the device
    /// write: that mark, not this node's, is what keeps invariant 2). Handled like a host write
    /// (records marked, `Data` sent to replicating peers, `out_of_sync` and a new generation
    /// for absent ones, completion per mode) except that no local write is issued: writing the
    /// copy back could overwrite newer data of the application.
    HostWritten {
        id: HostIoId,
        offset: u64,
        data: Bytes,
    },
    /// The transport to `peer` is up and authenticated.
    PeerConnected {
        peer: NodeId,
    },
    /// The transport to `peer` failed or timed out.
    PeerLost {
        peer: NodeId,
    },
    Received {
        peer: NodeId,
        msg: Message,
    },
    /// A local I/O finished; reads carry their data.
    IoDone {
        io: IoId,
        result: Result<Option<Bytes>, IoError>,
    },
    Timer(Timer),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    WriteLocal {
        io: IoId,
        offset: u64,
        payload: Payload,
        fua: bool,
    },
    ReadLocal {
        io: IoId,
        offset: u64,
        len: u64,
    },
    Harden {
        io: IoId,
        scope: HardenScope,
    },
    /// Write the metadata durably; at most one is in flight.
    PersistMeta {
        io: IoId,
        meta: Meta,
    },
    Send {
        peer: NodeId,
        msg: Message,
    },
    CompleteHost {
        id: HostIoId,
        result: Result<(), HostError>,
    },
    SetTimer {
        timer: Timer,
        at: u64,
    },
    /// Drop the connection to `peer`; with `stand_alone` do not reconnect until told.
    Disconnect {
        peer: NodeId,
        reason: Refusal,
        stand_alone: bool,
    },
}

impl Action {
    /// The local I/O this action asks for (its completion comes back as `Event::IoDone`), if
    /// it is one: the edges that carry it out must report a refusal against this id.
    pub fn local_io(&self) -> Option<IoId> {
        match self {
            Action::WriteLocal { io, .. }
            | Action::ReadLocal { io, .. }
            | Action::Harden { io, .. }
            | Action::PersistMeta { io, .. } => Some(*io),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct IoError(pub String);

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("replication mode {0} is not built yet (memory and disk are)")]
    ModeNotBuilt(Mode),
    #[error("node {node} with peers {peers:?}: ids must be distinct and below {MAX_NODES}")]
    NodeIds { node: NodeId, peers: Vec<NodeId> },
    #[error("metadata records {tracks} tracks, the volume has {expected}")]
    MetaGeometry { tracks: u64, expected: u64 },
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum HostError {
    #[error("this node is not primary")]
    NotPrimary,
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    #[error("the local disk failed: {0}")]
    DiskFailed(String),
    #[error("this node is shutting down")]
    ShuttingDown,
}

/// Why a connection was refused or dropped by the protocol (not by the transport).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("split brain: both replicas accepted writes while apart (generations {ours:#x} and {theirs:#x})")]
    SplitBrain { ours: GenId, theirs: GenId },
    #[error("unrelated data: no common generation ({ours:#x} vs {theirs:#x})")]
    UnrelatedData { ours: GenId, theirs: GenId },
    #[error("both nodes are primary")]
    BothPrimary,
    #[error("the primary would have to become sync target; demote it first")]
    PrimaryWouldBeTarget,
    #[error("neither replica holds valid data")]
    NoValidData,
    #[error("peer configuration differs: {0}")]
    Mismatch(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("local disk failed")]
    DiskFailed,
    #[error("this replica was invalidated; reconnecting to resync it")]
    Invalidated,
    #[error("the primary both nodes replicated with is gone; reconnecting to compare records")]
    PrimaryLost,
    #[error("this node was promoted; reconnecting to resync its peers")]
    Promoted,
    #[error("already taking data from node {other}; one source at a time")]
    SecondSource { other: NodeId },
    #[error("this node is going down")]
    Down,
    #[error("verify found {tracks} differing tracks; reconnecting to resync them")]
    VerifyDiffers { tracks: u64 },
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum AdminError {
    #[error("peer {0} is primary; demote it first")]
    PeerIsPrimary(NodeId),
    #[error("local disk is {0}; promoting needs --force")]
    NotUpToDate(DiskState),
    #[error("{0} host writes are still in flight")]
    Busy(usize),
    #[error("a connection handshake is in progress")]
    Handshaking,
    #[error("this node is receiving a resync from peer {0}; wait for it to finish")]
    SyncTarget(NodeId),
    #[error("the local disk failed")]
    DiskFailed,
    #[error("this node is primary; demote it first")]
    IsPrimary,
    #[error("this node is shutting down")]
    ShuttingDown,
    #[error("a verify against node {0} is running (stop it with `tandem verify --stop`)")]
    Verifying(NodeId),
    #[error("tracks {first}..+{count} are not within the volume's {tracks} tracks")]
    TrackRange { first: TrackId, count: u64, tracks: u64 },
    #[error("node {0} is not connected and in sync")]
    NotConnected(NodeId),
    #[error("no peer is connected and in sync to verify against")]
    NoVerifyPeer,
    #[error("node {0} is primary: run verify there (only the writing node can keep a verify free of races)")]
    VerifyOnPrimary(NodeId),
    #[error(
        "this node replicates an attached device and stays primary while attached: as a secondary it \
         would take writes under the application (stop the daemon to detach; docs/attach.md)"
    )]
    Attached,
    #[error("this node is not configured to replicate an attached device")]
    NotAttached,
}

/// What `tandem status` shows about one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub peer: NodeId,
    pub conn: ConnState,
    pub role: Option<Role>,
    pub disk: Option<DiskState>,
    /// Tracks in the record of this peer (current ∪ old).
    pub out_of_sync_tracks: u64,
    /// (shipped or received, total) while a resync runs.
    pub resync: Option<(u64, u64)>,
    /// Tracks the last completed resync with this peer shipped (as source) or received.
    pub last_resync: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyState {
    Running,
    /// Every track was compared. Differing tracks are resynced by the reconnection that
    /// followed.
    Finished,
    Aborted(String),
}

/// A running or the last verify this node ran as source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub peer: NodeId,
    pub first: TrackId,
    pub tracks: u64,
    pub compared: u64,
    pub differing: Vec<TrackId>,
    pub state: VerifyState,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub node: NodeId,
    pub role: Role,
    pub disk: DiskState,
    pub mode: Mode,
    pub generations: Generations,
    pub peers: Vec<PeerStatus>,
    pub verify: Option<VerifyReport>,
}

/// Test-only switches that break one rule on purpose, so tests can show the simulator
/// catches the violation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlantedBugs {
    /// Write locally in parallel with sending to peers, before their records cover it.
    pub write_before_record: bool,
    /// Clear the old bitmap when a destage scan starts instead of when it is done.
    pub clear_old_on_start: bool,
    /// Harden a destaged range without waiting for writes still in flight to it.
    pub skip_destage_drain: bool,
    /// Serve verify requests without holding back the writes that race with their reads.
    pub verify_without_hold: bool,
}
