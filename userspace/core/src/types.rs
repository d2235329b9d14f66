//! Small vocabulary types shared by the state machines, the wire codec and the tools.

use std::fmt;

/// A node's identity inside one volume's cluster (0, 1, 2 ...), from the configuration.
pub type NodeId = u8;

/// Identifier of one data generation of a replica (DRBD operators know them as UUIDs).
///
/// A node that starts accepting writes its peers do not see begins a new generation; two
/// replicas whose current generations are neither equal nor ancestors of each other have
/// diverged (split brain).
pub type GenId = u64;

/// Role of a node for one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Secondary,
}

/// State of the local replica, named as DRBD names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DiskState {
    /// Holds the newest data of the cluster.
    UpToDate,
    /// A valid image, but whether it is the newest is unknown (e.g. after a crash).
    Consistent,
    /// A valid image known to be older than a peer's.
    Outdated,
    /// Partially resynced or otherwise not a valid image: must not be promoted.
    Inconsistent,
    /// The backing device reported an error; the node stopped using it.
    Failed,
}

/// Connection state towards one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnState {
    /// Not connected and not trying (split brain or operator `down`).
    StandAlone,
    /// Waiting for the transport to connect.
    Connecting,
    /// Transport up; exchanging state and records.
    Handshaking,
    /// Connected, replicas in sync (records may hold unhardened tracks).
    Connected,
    /// Connected, shipping recorded tracks to the peer.
    SyncSource,
    /// Connected, receiving recorded tracks from the peer.
    SyncTarget,
    /// Connected to another secondary while a primary elsewhere replicates to both: no data
    /// flows here. Re-handshaken when that primary is lost.
    Idle,
}

/// Replication mode of a volume (see DESIGN.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Acknowledged once the data is in the primary's and the secondary's volatile caches.
    Memory,
    /// Acknowledged once the data is hardened on both nodes.
    Disk,
    /// Acknowledged from the primary's cache; shipped later in consistency-group order.
    Async,
    /// Asynchronous inside the secondary's predicted record, synchronous extension outside.
    Predictive,
}

/// Data generations of one replica: the current one and its ancestors, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Generations {
    pub current: GenId,
    pub history: Vec<GenId>,
}

impl Generations {
    /// Ancestors kept; older ones are forgotten (a peer that far behind needs a full resync).
    pub const HISTORY: usize = 8;

    pub fn new(current: GenId) -> Self {
        Generations { current, history: Vec::new() }
    }

    /// Starts a new generation whose parent is the current one.
    pub fn rotate(&mut self, next: GenId) {
        self.history.insert(0, self.current);
        self.history.truncate(Self::HISTORY);
        self.current = next;
    }

    /// How this replica's data relates to a peer's, judged by generations alone.
    pub fn compare(&self, peer: &Generations) -> GenRelation {
        if self.current == peer.current {
            GenRelation::Same
        } else if peer.history.contains(&self.current) {
            GenRelation::Behind
        } else if self.history.contains(&peer.current) {
            GenRelation::Ahead
        } else if self.history.iter().any(|g| peer.history.contains(g)) {
            GenRelation::Diverged
        } else {
            GenRelation::Unrelated
        }
    }
}

/// Result of [`Generations::compare`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenRelation {
    Same,
    /// This replica is an ancestor of the peer's: it must be the resync target.
    Behind,
    /// The peer's replica is an ancestor of this one: this node is the resync source.
    Ahead,
    /// Both moved on from a common ancestor: split brain.
    Diverged,
    /// No common ancestor known: different data sets, or too far apart to tell.
    Unrelated,
}

macro_rules! display_as_debug {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    )*};
}
display_as_debug!(Role, DiskState, ConnState, Mode, GenRelation);
