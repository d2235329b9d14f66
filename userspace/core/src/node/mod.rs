//! The replication state machine of one node for one volume (`memory` and `disk` modes).
//!
//! Sans-IO: [`Node::handle`] takes an [`Event`] and queues [`Action`]s that the caller
//! drains with [`Node::poll`]. The caller carries out the actions (local I/O, messages,
//! host completions, timers) and reports their completions back as events.
//!
//! The rule that keeps divergence visible (DESIGN.md invariant 2) lives in [`host`]: a host
//! write reaches the local device only once every connected peer's record holds its tracks
//! (the peer's `ReceiptAck`), or, with a peer absent, once the tracks are in the persisted
//! `out_of_sync` set under a new generation.

mod api;
mod connect;
mod destage;
mod host;
mod local;
mod meta;
mod replica;
mod resync;
#[cfg(test)]
mod tests;
mod verify;

pub use api::*;
pub use connect::{decide, Plan};
pub use meta::Meta;
pub use verify::track_digest;

use crate::bitmap::DirtyMap;
use crate::geometry::{Extent, Geometry, TrackId};
use crate::types::{ConnState, DiskState, GenId, Generations, Mode, NodeId, Role};
use crate::wire::{Message, StateReport, WriteId, MAX_NODES};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

struct Peer {
    conn: ConnState,
    /// A secondary's view: its primary said this peer does not receive replicated writes,
    /// so writes received from the primary are recorded for this peer too.
    missed_by: bool,
    record: DirtyMap,
    /// Last state the peer reported on the current connection.
    state: Option<StateReport>,
    handshake: Option<connect::Handshake>,
    resync: Option<resync::Resync>,
    last_resync: Option<u64>,
    /// Our half of the peer's destage scans (seed 003, Fig. 5), one per range; they start
    /// afresh with every connection.
    scans: Vec<crate::toggle::destage::Recorder>,
}

fn scan_recorders(geometry: &Geometry) -> Vec<crate::toggle::destage::Recorder> {
    (0..geometry.range_count()).map(crate::toggle::destage::Recorder::new).collect()
}

pub struct Node {
    cfg: NodeConfig,
    bugs: PlantedBugs,
    rng: u64,
    meta: Meta,
    meta_version: u64,
    meta_durable: u64,
    meta_inflight: Option<(IoId, u64)>,
    peers: BTreeMap<NodeId, Peer>,
    next_io: IoId,
    next_wid: WriteId,
    host: host::HostState,
    local: local::LocalIos,
    destage: destage::Destage,
    /// Absent peers a generation was already started for: writes they do not see run under
    /// a generation they never had. A peer leaving later needs a new one.
    rotated_for: BTreeSet<NodeId>,
    /// `shutdown` was called: no promotion any more.
    shutting_down: bool,
    /// The verify this node runs as source, and the last one that ended.
    verify: Option<verify::Verify>,
    last_verify: Option<VerifyReport>,
    /// A verify found differences with this peer: reconnect to resync them.
    verify_resync: Option<(NodeId, u64)>,
    /// Verify reads this node runs for its peers, and what waits for them.
    serving: verify::Serving,
    actions: VecDeque<Action>,
    now: u64,
}

impl Node {
    /// A node starting from persisted metadata. `seed` feeds the generation ids it creates
    /// and must differ between nodes and restarts (the daemon passes random bytes).
    pub fn new(cfg: NodeConfig, mut meta: Meta, seed: u64) -> Result<Self, ConfigError> {
        if matches!(cfg.mode, Mode::Async | Mode::Predictive) {
            return Err(ConfigError::ModeNotBuilt(cfg.mode));
        }
        if cfg.peers.contains(&cfg.node) || cfg.peers.iter().chain([&cfg.node]).any(|n| usize::from(*n) >= MAX_NODES) {
            return Err(ConfigError::NodeIds { node: cfg.node, peers: cfg.peers.clone() });
        }
        if meta.out_of_sync.len() as u64 != cfg.geometry.track_count() {
            return Err(ConfigError::MetaGeometry {
                tracks: meta.out_of_sync.len() as u64,
                expected: cfg.geometry.track_count(),
            });
        }
        let crashed_now = !meta.clean;
        if meta.disk == DiskState::Failed {
            // The device erred under the last run: nothing on it can be trusted, so it
            // comes back blank and takes a full resync from a peer.
            meta.disk = DiskState::Inconsistent;
            meta.generations = Generations::new(0);
            meta.out_of_sync.fill(true);
        }
        let peers = cfg
            .peers
            .iter()
            .map(|&p| {
                let mut record = DirtyMap::new(cfg.geometry);
                // The in-memory records did not survive; what was persisted did.
                for t in meta.out_of_sync.iter_ones() {
                    record.mark(t as TrackId);
                }
                let peer = Peer {
                    conn: ConnState::Connecting,
                    missed_by: false,
                    record,
                    state: None,
                    handshake: None,
                    resync: None,
                    last_resync: None,
                    scans: scan_recorders(&cfg.geometry),
                };
                (p, peer)
            })
            .collect();
        if crashed_now {
            meta.crashed = true;
            meta.role = Role::Secondary;
            if meta.disk == DiskState::UpToDate {
                meta.disk = DiskState::Consistent;
            }
        }
        meta.clean = false;
        let ranges = cfg.geometry.range_count();
        let mut node = Node {
            bugs: PlantedBugs::default(),
            rng: seed ^ 0x9E37_79B9_7F4A_7C15,
            meta,
            meta_version: 1,
            meta_durable: 0,
            meta_inflight: None,
            peers,
            next_io: 1,
            next_wid: 1,
            host: host::HostState::default(),
            local: local::LocalIos::default(),
            destage: destage::Destage::new(ranges),
            rotated_for: BTreeSet::new(),
            shutting_down: false,
            verify: None,
            last_verify: None,
            verify_resync: None,
            serving: verify::Serving::default(),
            actions: VecDeque::new(),
            now: 0,
            cfg,
        };
        node.persist_meta();
        Ok(node)
    }

    /// Breaks rules on purpose (tests of the simulator only).
    pub fn plant_bugs(&mut self, bugs: PlantedBugs) {
        self.bugs = bugs;
    }

    /// Arms the timers; call once before the first event.
    pub fn start(&mut self, now: u64) {
        self.now = now;
        self.emit(Action::SetTimer { timer: Timer::Destage, at: now + self.cfg.destage_interval });
    }

    pub fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn handle(&mut self, now: u64, event: Event) {
        self.now = now;
        match event {
            Event::HostWrite { id, offset, data, fua } => {
                let len = data.len() as u64;
                self.host_write(id, Extent::new(offset, len), Payload::Data(data), fua)
            }
            Event::HostDiscard { id, offset, len, zeroes } => {
                self.host_write(id, Extent::new(offset, len), Payload::Zeroes { len, discard: !zeroes }, false)
            }
            Event::HostWritten { id, offset, data } => {
                let len = data.len() as u64;
                self.host_write_on_device(id, Extent::new(offset, len), Payload::Data(data))
            }
            Event::HostFlush { id } => self.host_flush(id),
            Event::PeerConnected { peer } => self.peer_connected(peer),
            Event::PeerLost { peer } => self.peer_lost(peer),
            Event::Received { peer, msg } => self.received(peer, msg),
            Event::IoDone { io, result } => self.io_done(io, result),
            Event::Timer(Timer::Destage) => {
                self.destage_tick();
                self.emit(Action::SetTimer { timer: Timer::Destage, at: now + self.cfg.destage_interval });
            }
        }
        // Any event may complete the write a verify read waits for, or the read a held
        // message waits for.
        self.verify_release();
        self.verify_pump();
        self.verify_reconnect();
    }

    /// Orderly shutdown: hardens the cache, then persists the records into `out_of_sync`
    /// with the clean flag. The caller keeps feeding completions until [`Node::is_down`].
    pub fn shutdown(&mut self) -> Result<(), AdminError> {
        // An attached node is primary for good (it cannot demote), and stopping it loses no
        // acknowledged write: its writes are the application's, on the device already, and
        // those not shipped yet are in the kernel's record. New ones are refused from here on.
        if self.meta.role == Role::Primary && !self.cfg.attached {
            return Err(AdminError::IsPrimary);
        }
        if !self.shutting_down {
            self.shutting_down = true;
            // Nothing may arrive after the records are persisted: disconnect first.
            let linked: Vec<NodeId> = self.peers.iter().filter(|(_, p)| is_linked(p.conn)).map(|(&id, _)| id).collect();
            for peer in linked {
                self.drop_peer(peer, Refusal::Down, true);
            }
            for p in self.peers.values_mut() {
                p.conn = ConnState::StandAlone;
            }
            self.harden(HardenScope::All, local::HardenFor::Shutdown);
        }
        Ok(())
    }

    /// The cache is hardened; only now may the metadata say the node stopped cleanly, and
    /// it must carry the records, or the restarted node would claim records it lost.
    fn shutdown_hardened(&mut self) {
        for p in self.peers.values() {
            let unconfirmed = p.resync.as_ref().map(|r| r.unconfirmed()).unwrap_or_default();
            for t in p.record.union_tracks().chain(unconfirmed) {
                self.meta.out_of_sync.set(t as usize, true);
            }
        }
        self.meta.clean = true;
        self.persist_meta();
    }

    /// A shutdown finished: the clean flag is durable.
    pub fn is_down(&self) -> bool {
        self.meta.clean && self.meta_durable == self.meta_version
    }

    pub fn promote(&mut self, force: bool) -> Result<(), AdminError> {
        if self.meta.disk == DiskState::Failed {
            return Err(AdminError::DiskFailed);
        }
        if self.shutting_down {
            return Err(AdminError::ShuttingDown);
        }
        if self.meta.role == Role::Primary {
            return Ok(());
        }
        for (&id, p) in &self.peers {
            if p.conn == ConnState::Handshaking {
                return Err(AdminError::Handshaking);
            }
            if p.conn == ConnState::SyncTarget {
                // Resync copies would land on top of the new primary's own writes.
                return Err(AdminError::SyncTarget(id));
            }
            if is_linked(p.conn) && p.state.as_ref().is_some_and(|s| s.role == Role::Primary) {
                return Err(AdminError::PeerIsPrimary(id));
            }
        }
        match self.meta.disk {
            DiskState::UpToDate => {}
            other if !force => return Err(AdminError::NotUpToDate(other)),
            _ => {
                self.meta.disk = DiskState::UpToDate;
                if let Some(own) = self.meta.before_resync.take() {
                    // Half-synced: its data descends from its own lineage, not the source's.
                    self.meta.generations = own;
                    let next = self.fresh_gen();
                    self.meta.generations.rotate(next);
                }
            }
        }
        if self.meta.generations.current == 0 {
            // The operator declared a blank replica's data authoritative: it starts a lineage.
            self.meta.generations = Generations::new(self.fresh_gen());
        }
        self.meta.role = Role::Primary;
        self.persist_meta();
        // A secondary this node idled beside may miss writes of the old primary: handshake
        // again, now as its primary.
        self.drop_idle_peers(Refusal::Promoted);
        self.broadcast_state();
        if self.cfg.mode == Mode::Memory && self.replicating_peers().is_empty() {
            // Acknowledged writes of the old primary may sit only in this node's cache.
            self.harden(HardenScope::All, local::HardenFor::Degraded);
        }
        Ok(())
    }

    /// Attach mode, once before the first event: the attached device is the volume's data
    /// whatever the metadata says (the application kept writing it while no daemon ran, and
    /// the kernel's record, not this node's, knows where), so the node becomes primary of a
    /// new generation. A peer that stayed secondary is then behind it and takes the records'
    /// tracks from it; a peer promoted meanwhile that wrote has diverged and is refused as a
    /// split brain, never merged; one that did not write is refused as a primary that would
    /// be target. Either way nothing is ever written to the attached device.
    pub fn start_attached(&mut self) -> Result<(), AdminError> {
        if !self.cfg.attached {
            return Err(AdminError::NotAttached);
        }
        if self.meta.disk == DiskState::Failed {
            return Err(AdminError::DiskFailed);
        }
        if self.peers.values().any(|p| is_linked(p.conn)) {
            return Err(AdminError::Handshaking);
        }
        self.meta.disk = DiskState::UpToDate;
        self.meta.before_resync = None;
        let next = self.fresh_gen();
        if self.meta.generations.current == 0 {
            self.meta.generations = Generations::new(next);
        } else {
            self.meta.generations.rotate(next);
        }
        self.meta.role = Role::Primary;
        self.persist_meta();
        Ok(())
    }

    pub fn demote(&mut self) -> Result<(), AdminError> {
        if self.cfg.attached {
            return Err(AdminError::Attached);
        }
        if self.peers.values().any(|p| p.conn == ConnState::Handshaking) {
            return Err(AdminError::Handshaking);
        }
        if self.host.in_flight() > 0 {
            return Err(AdminError::Busy(self.host.in_flight()));
        }
        if self.meta.role == Role::Secondary {
            return Ok(());
        }
        self.meta.role = Role::Secondary;
        self.persist_meta();
        self.broadcast_state();
        Ok(())
    }

    /// Throws away this replica's claim to be current (split-brain recovery, or an operator's
    /// `invalidate`): it becomes Inconsistent with every track recorded, so the next
    /// connection resyncs all of it from the peer.
    pub fn invalidate(&mut self) -> Result<(), AdminError> {
        if self.meta.role == Role::Primary {
            return Err(AdminError::IsPrimary);
        }
        if self.peers.values().any(|p| p.conn == ConnState::Handshaking) {
            return Err(AdminError::Handshaking);
        }
        self.meta.disk = DiskState::Inconsistent;
        // An empty current generation that every peer is "ahead" of.
        self.meta.generations = Generations::new(0);
        for p in self.peers.values_mut() {
            p.record.mark_all();
        }
        self.persist_meta();
        // Connected peers must learn it: a new handshake resyncs this replica.
        let linked: Vec<NodeId> = self.peers.iter().filter(|(_, p)| is_linked(p.conn)).map(|(&id, _)| id).collect();
        for peer in linked {
            self.drop_peer(peer, Refusal::Invalidated, false);
        }
        Ok(())
    }

    pub fn role(&self) -> Role {
        self.meta.role
    }
    pub fn disk(&self) -> DiskState {
        self.meta.disk
    }
    pub fn generations(&self) -> &Generations {
        &self.meta.generations
    }
    pub fn meta(&self) -> &Meta {
        &self.meta
    }
    pub fn conn(&self, peer: NodeId) -> Option<ConnState> {
        self.peers.get(&peer).map(|p| p.conn)
    }
    pub fn peer_state(&self, peer: NodeId) -> Option<&StateReport> {
        self.peers.get(&peer).and_then(|p| p.state.as_ref())
    }
    /// The record of `peer`: tracks where it may hold data different from this node's.
    pub fn record(&self, peer: NodeId) -> Option<&DirtyMap> {
        self.peers.get(&peer).map(|p| &p.record)
    }
    /// Tracks of a resync with `peer` not yet confirmed in sync (empty without a resync).
    /// A target's pending tracks may already be gone from [`Node::record`] (the source's
    /// destage scans clear them), yet they still differ: a mirror of the records (the daemon's
    /// kernel map) must keep them, as [`Node::shutdown`] persists them.
    pub fn resync_unconfirmed(&self, peer: NodeId) -> Vec<TrackId> {
        self.peers.get(&peer).and_then(|p| p.resync.as_ref()).map(|r| r.unconfirmed()).unwrap_or_default()
    }
    /// Whether `track` is among [`Node::resync_unconfirmed`] of `peer`, without listing them
    /// (a full resync's list is the whole volume).
    pub fn resync_holds(&self, peer: NodeId, track: TrackId) -> bool {
        self.peers.get(&peer).and_then(|p| p.resync.as_ref()).is_some_and(|r| r.holds(track))
    }
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// True when nothing is in flight: no host request, local I/O, scan or resync.
    pub fn is_quiet(&self) -> bool {
        self.host.in_flight() == 0
            && self.local.is_empty()
            && self.meta_inflight.is_none()
            && self.meta_durable == self.meta_version
            && self.destage.is_idle()
            && self.peers.values().all(|p| p.resync.is_none() && p.handshake.is_none())
            && self.verify.is_none()
            && self.serving.is_idle()
    }

    pub fn status(&self) -> Status {
        Status {
            node: self.cfg.node,
            role: self.meta.role,
            disk: self.meta.disk,
            mode: self.cfg.mode,
            generations: self.meta.generations.clone(),
            peers: self
                .peers
                .iter()
                .map(|(&peer, p)| PeerStatus {
                    peer,
                    conn: p.conn,
                    role: p.state.as_ref().map(|s| s.role),
                    disk: p.state.as_ref().map(|s| s.disk),
                    out_of_sync_tracks: p.record.count(),
                    resync: p.resync.as_ref().map(|r| r.progress()),
                    last_resync: p.last_resync,
                })
                .collect(),
            verify: self.verify_report(),
        }
    }

    fn emit(&mut self, action: Action) {
        self.actions.push_back(action);
    }

    fn send(&mut self, peer: NodeId, msg: Message) {
        self.emit(Action::Send { peer, msg });
    }

    fn alloc_io(&mut self) -> IoId {
        let io = self.next_io;
        self.next_io += 1;
        io
    }

    fn fresh_gen(&mut self) -> GenId {
        // splitmix64: ids only need to be unique, not secret.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) | 1
    }

    /// Records that the metadata changed; returns the version a dependent write waits for.
    fn persist_meta(&mut self) -> u64 {
        self.meta_version += 1;
        self.flush_meta();
        self.meta_version
    }

    fn flush_meta(&mut self) {
        if self.meta_inflight.is_none() && self.meta_durable < self.meta_version {
            let io = self.alloc_io();
            self.meta_inflight = Some((io, self.meta_version));
            let meta = self.meta.clone();
            self.emit(Action::PersistMeta { io, meta });
        }
    }

    fn state_report(&self) -> StateReport {
        StateReport {
            node: self.cfg.node,
            role: self.meta.role,
            disk: self.meta.disk,
            mode: self.cfg.mode,
            generations: self.meta.generations.clone(),
            crashed: self.meta.crashed,
            volume_size: self.cfg.geometry.volume_size(),
            track_size: self.cfg.geometry.track_size(),
            primary: self.current_primary(),
            replicating: self.replicating_peers().iter().fold(0, |mask, p| mask | 1 << p),
        }
    }

    /// The primary this node replicates with: itself, or a replicating peer that is primary.
    fn current_primary(&self) -> Option<NodeId> {
        if self.meta.role == Role::Primary {
            return Some(self.cfg.node);
        }
        self.peers
            .iter()
            .find(|(_, p)| is_replicating(p.conn) && p.state.as_ref().is_some_and(|s| s.role == Role::Primary))
            .map(|(&id, _)| id)
    }

    fn broadcast_state(&mut self) {
        let report = self.state_report();
        let linked: Vec<NodeId> = self.peers.iter().filter(|(_, p)| is_linked(p.conn)).map(|(&id, _)| id).collect();
        for peer in linked {
            self.send(peer, Message::State(report.clone()));
        }
    }

    /// Peers that receive replicated writes now.
    fn replicating_peers(&self) -> Vec<NodeId> {
        self.peers.iter().filter(|(_, p)| is_replicating(p.conn)).map(|(&id, _)| id).collect()
    }

    fn received(&mut self, peer: NodeId, msg: Message) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        if p.conn == ConnState::Connecting || p.conn == ConnState::StandAlone {
            // A message from a connection already given up: the transport should not
            // deliver these, and nothing in it can be trusted to apply.
            return;
        }
        if let Some(msg) = self.verify_holds(peer, msg) {
            self.dispatch(peer, msg);
        }
    }

    fn dispatch(&mut self, peer: NodeId, msg: Message) {
        match msg {
            Message::State(report) => self.on_state(peer, report),
            Message::RecordPage { range, bits } => self.on_record_page(peer, range, bits),
            Message::RecordEnd { tracks } => self.on_record_end(peer, tracks),
            Message::Data { id, offset, fua, payload } => {
                self.on_replica_write(peer, id, Extent::new(offset, payload.len() as u64), Payload::Data(payload), fua)
            }
            Message::Discard { id, offset, len, zeroes } => self.on_replica_write(
                peer,
                id,
                Extent::new(offset, len),
                Payload::Zeroes { len, discard: !zeroes },
                false,
            ),
            Message::ReceiptAck { id } => self.on_receipt_ack(peer, id),
            Message::HardenedAck { id } => self.on_hardened_ack(peer, id),
            Message::Flush { id } => self.on_replica_flush(peer, id),
            Message::FlushAck { id } => self.on_flush_ack(peer, id),
            Message::DestageStart { range } => self.on_destage_start(peer, range),
            Message::DestageAck { range } => self.on_destage_ack(peer, range),
            Message::DestageDone { range } => self.on_destage_done(peer, range),
            Message::ResyncData { track, payload } => self.on_resync_data(peer, track, payload),
            Message::ResyncAck { track } => self.on_resync_ack(peer, track),
            Message::ResyncEnd { tracks } => self.on_resync_end(peer, tracks),
            Message::VerifyRequest { track, digest } => self.on_verify_request(peer, track, digest),
            Message::VerifyReply { track, same } => self.on_verify_reply(peer, track, same),
            Message::Ping { nonce } => self.send(peer, Message::Pong { nonce }),
            Message::Pong { .. } => {}
            other => self.protocol_error(peer, format!("{} is not supported in {} mode", other.name(), self.cfg.mode)),
        }
    }

    fn protocol_error(&mut self, peer: NodeId, why: String) {
        self.drop_peer(peer, Refusal::Protocol(why), false);
    }

    /// Ends the connection from our side and cleans up as if the transport had failed.
    fn drop_peer(&mut self, peer: NodeId, reason: Refusal, stand_alone: bool) {
        self.emit(Action::Disconnect { peer, reason, stand_alone });
        self.peer_lost(peer);
        if stand_alone {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.conn = ConnState::StandAlone;
            }
        }
    }

    fn drop_idle_peers(&mut self, reason: Refusal) {
        let idle: Vec<NodeId> =
            self.peers.iter().filter(|(_, p)| p.conn == ConnState::Idle).map(|(&id, _)| id).collect();
        for peer in idle {
            self.drop_peer(peer, reason.clone(), false);
        }
    }

    /// An operator's `connect` after a refusal (e.g. once a split brain was resolved).
    pub fn reconnect(&mut self, peer: NodeId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            if p.conn == ConnState::StandAlone {
                p.conn = ConnState::Connecting;
            }
        }
    }

    /// The local disk failed: stop using it. Host requests fail from now on; peers see it
    /// through the dropped connections, and their records cover what this node missed.
    fn disk_failed(&mut self, why: String) {
        if self.meta.disk == DiskState::Failed {
            return;
        }
        self.meta.disk = DiskState::Failed;
        self.persist_meta();
        self.fail_all_host(HostError::DiskFailed(why));
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for peer in peers {
            if self.peers[&peer].conn != ConnState::StandAlone && self.peers[&peer].conn != ConnState::Connecting {
                self.drop_peer(peer, Refusal::DiskFailed, true);
            } else if let Some(p) = self.peers.get_mut(&peer) {
                p.conn = ConnState::StandAlone;
            }
        }
    }
}

/// A transport is up (handshaking or past it).
fn is_linked(conn: ConnState) -> bool {
    !matches!(conn, ConnState::StandAlone | ConnState::Connecting)
}

/// The peer takes replicated writes.
fn is_replicating(conn: ConnState) -> bool {
    matches!(conn, ConnState::Connected | ConnState::SyncSource | ConnState::SyncTarget)
}
