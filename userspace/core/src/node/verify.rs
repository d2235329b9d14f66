//! Online verify: this node compares its replica with a connected peer's, track by track,
//! by BLAKE3 digest, while the volume stays in use. Differing tracks are marked out of sync
//! (in the record of the peer and, persisted, in `out_of_sync`), and when the verify ends
//! the connection is dropped so the reconnection resyncs exactly those tracks.
//!
//! A digest is only worth comparing if both sides read the same writes. The source is the
//! node that writes (a primary, or a secondary when no primary is linked): it reads a track
//! only while no write to it is in flight, and reads it again if a host write arrives before
//! the read completes. Every write the source completed is already in the target's cache
//! (the source writes locally only after the target's receipt), and every later write to
//! the track reaches the target after the `VerifyRequest` on the same connection. The
//! target therefore holds back the messages of that connection, in order, while a write
//! they carry would overlap one of its verify reads, and it reads a track only once its own
//! writes to it completed. Holding messages back in order looks to the protocol exactly
//! like a slower network.

use super::local::OtherFor;
use super::{AdminError, IoId, Node, Refusal, VerifyReport, VerifyState};
use crate::bitmap::Bits;
use crate::geometry::{Extent, TrackId, TrackSpan};
use crate::types::{ConnState, NodeId, Role};
use crate::wire::Message;
use bitvec::prelude::*;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Verify reads in flight at once on the source.
const WINDOW: usize = 8;

/// The digest both sides compute over a track's bytes.
pub fn track_digest(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// The source side of a running verify.
pub(super) struct Verify {
    peer: NodeId,
    first: TrackId,
    end: TrackId,
    /// Next track never read yet.
    next: TrackId,
    /// Tracks whose read a host write overtook: read again.
    retry: BTreeSet<TrackId>,
    /// Reads in flight, and whether a host write touched the track since.
    reading: BTreeMap<TrackId, (IoId, bool)>,
    /// Digests sent, replies outstanding.
    awaiting: BTreeSet<TrackId>,
    compared: u64,
    differing: Bits,
}

impl Verify {
    fn finished(&self) -> bool {
        self.next == self.end && self.retry.is_empty() && self.reading.is_empty() && self.awaiting.is_empty()
    }

    fn report(&self, state: VerifyState) -> VerifyReport {
        VerifyReport {
            peer: self.peer,
            first: self.first,
            tracks: self.end - self.first,
            compared: self.compared,
            differing: self.differing.iter_ones().map(|t| t as TrackId).collect(),
            state,
        }
    }
}

/// The target side: verify reads in flight, and the messages held back behind them.
#[derive(Default)]
pub(super) struct Serving {
    /// Verify reads in flight per track.
    reads: BTreeMap<TrackId, u32>,
    held: BTreeMap<NodeId, VecDeque<Message>>,
}

impl Serving {
    pub fn is_idle(&self) -> bool {
        self.reads.is_empty() && self.held.values().all(VecDeque::is_empty)
    }
}

impl Node {
    /// `tandem verify`: compares `tracks` (first, count; all by default) with `peer` (the
    /// only connected peer by default). Progress and the result are in [`Node::status`].
    pub fn verify(&mut self, peer: Option<NodeId>, tracks: Option<(TrackId, u64)>) -> Result<NodeId, AdminError> {
        if self.shutting_down {
            return Err(AdminError::ShuttingDown);
        }
        if self.meta.disk == crate::types::DiskState::Failed {
            return Err(AdminError::DiskFailed);
        }
        if let Some(v) = &self.verify {
            return Err(AdminError::Verifying(v.peer));
        }
        let all = self.cfg.geometry.track_count();
        let (first, count) = tracks.unwrap_or((0, all));
        if count == 0 || first.checked_add(count).is_none_or(|end| end > all) {
            return Err(AdminError::TrackRange { first, count, tracks: all });
        }
        let connected: Vec<NodeId> =
            self.peers.iter().filter(|(_, p)| p.conn == ConnState::Connected).map(|(&id, _)| id).collect();
        let peer = match peer {
            Some(id) if connected.contains(&id) => id,
            Some(id) => return Err(AdminError::NotConnected(id)),
            None => *connected.first().ok_or(AdminError::NoVerifyPeer)?,
        };
        // Only the node that writes can keep its reads and the target's in step.
        if let Some(writer) = self.current_primary().filter(|&p| p != self.cfg.node) {
            return Err(AdminError::VerifyOnPrimary(writer));
        }
        if self.peers[&peer].state.as_ref().is_some_and(|s| s.role == Role::Primary) {
            return Err(AdminError::VerifyOnPrimary(peer));
        }
        if let Some((&id, _)) = self.peers.iter().find(|(_, p)| p.conn == ConnState::SyncTarget) {
            return Err(AdminError::SyncTarget(id));
        }
        self.verify = Some(Verify {
            peer,
            first,
            end: first + count,
            next: first,
            retry: BTreeSet::new(),
            reading: BTreeMap::new(),
            awaiting: BTreeSet::new(),
            compared: 0,
            differing: bitvec![u64, Lsb0; 0; all as usize],
        });
        self.last_verify = None;
        self.verify_pump();
        Ok(peer)
    }

    /// `tandem verify --stop`. Differences found so far stay marked.
    pub fn stop_verify(&mut self) -> bool {
        let running = self.verify.is_some();
        self.verify_abort("stopped by the operator".into());
        self.verify_reconnect();
        running
    }

    /// The running verify, or the last one.
    pub(super) fn verify_report(&self) -> Option<VerifyReport> {
        match &self.verify {
            Some(v) => Some(v.report(VerifyState::Running)),
            None => self.last_verify.clone(),
        }
    }

    pub(super) fn verify_abort(&mut self, why: String) {
        if let Some(v) = self.verify.take() {
            self.verify_ended(v, VerifyState::Aborted(why));
        }
    }

    /// Keeps the report; differences found (all of them, or those found before an abort)
    /// are resynced by a new connection, dropped once the current event is handled.
    fn verify_ended(&mut self, v: Verify, state: VerifyState) {
        self.last_verify = Some(v.report(state));
        if v.differing.not_any() {
            return;
        }
        // Destage scans may have cleared some marks from the record since; the record is
        // what the next handshake resyncs.
        let p = self.peers.get_mut(&v.peer).expect("peer");
        for t in v.differing.iter_ones() {
            p.record.mark(t as TrackId);
        }
        self.verify_resync = Some((v.peer, v.differing.count_ones() as u64));
    }

    /// Drops the connection a verify found differences on (not from inside the handlers
    /// that end a verify: they go on using the peer).
    pub(super) fn verify_reconnect(&mut self) {
        if let Some((peer, tracks)) = self.verify_resync.take() {
            if super::is_linked(self.peers[&peer].conn) {
                self.drop_peer(peer, Refusal::VerifyDiffers { tracks }, false);
            }
        }
    }

    /// Starts reads up to the window; ends the verify once every track is compared.
    pub(super) fn verify_pump(&mut self) {
        let Some(v) = &self.verify else { return };
        if let Some((&id, _)) = self.peers.iter().find(|(_, p)| p.conn == ConnState::SyncTarget) {
            return self.verify_abort(format!("this node started receiving a resync from node {id}"));
        }
        let geometry = self.cfg.geometry;
        let busy = |node: &Node, t: TrackId| {
            let extent = geometry.track_extent(t).expect("verified track exists");
            node.host.track_busy(t) || !node.local.writes_touching(extent).is_empty()
        };
        let mut free = WINDOW.saturating_sub(v.reading.len() + v.awaiting.len());
        let mut reads: Vec<TrackId> = v.retry.iter().copied().filter(|&t| !busy(self, t)).take(free).collect();
        free -= reads.len();
        let mut next = v.next;
        // A busy track ends the sweep for now: it is read once its write completes.
        while free > 0 && next < v.end && !busy(self, next) {
            reads.push(next);
            next += 1;
            free -= 1;
        }
        for &t in &reads {
            let extent = geometry.track_extent(t).expect("verified track exists");
            let io = self.read_local(extent, OtherFor::VerifyRead { track: t });
            let v = self.verify.as_mut().expect("verify");
            v.retry.remove(&t);
            v.reading.insert(t, (io, false));
        }
        let v = self.verify.as_mut().expect("verify");
        v.next = next;
        if v.finished() {
            self.verify_finished();
        }
    }

    fn verify_finished(&mut self) {
        let v = self.verify.take().expect("verify");
        self.verify_ended(v, VerifyState::Finished);
    }

    pub(super) fn verify_note_host_write(&mut self, span: TrackSpan) {
        if let Some(v) = &mut self.verify {
            for t in span.tracks() {
                if let Some((_, superseded)) = v.reading.get_mut(&t) {
                    *superseded = true;
                }
            }
        }
    }

    pub(super) fn verify_read_done(&mut self, track: TrackId, io: IoId, data: Bytes) {
        let Some(v) = &mut self.verify else { return };
        match v.reading.get(&track) {
            Some(&(read_io, superseded)) if read_io == io => {
                v.reading.remove(&track);
                if superseded {
                    v.retry.insert(track);
                } else {
                    v.awaiting.insert(track);
                    let peer = v.peer;
                    self.send(peer, Message::VerifyRequest { track, digest: track_digest(&data) });
                }
            }
            _ => return,
        }
        self.verify_pump();
    }

    pub(super) fn on_verify_reply(&mut self, peer: NodeId, track: TrackId, same: bool) {
        let Some(v) = self.verify.as_mut().filter(|v| v.peer == peer) else {
            // A verify stopped or aborted while replies were on their way.
            return;
        };
        if !v.awaiting.remove(&track) {
            return self.protocol_error(peer, format!("VerifyReply for track {track}, never requested"));
        }
        v.compared += 1;
        if !same {
            v.differing.set(track as usize, true);
            self.peers.get_mut(&peer).expect("peer").record.mark(track);
            // A crash before the resync must not forget it: the records are in memory only.
            if self.meta.mark_out_of_sync(TrackSpan::new(track, 1)) {
                self.persist_meta();
            }
        }
        self.verify_pump();
    }

    /// Target side: reads the track once no write to it is in flight here (the message is
    /// held back until then, see [`Node::verify_holds`]).
    pub(super) fn on_verify_request(&mut self, peer: NodeId, track: TrackId, digest: [u8; 32]) {
        if self.peers[&peer].conn != ConnState::Connected {
            return self.protocol_error(peer, "VerifyRequest while not connected and in sync".into());
        }
        let extent = match self.cfg.geometry.track_extent(track) {
            Ok(e) => e,
            Err(e) => return self.protocol_error(peer, format!("VerifyRequest: {e}")),
        };
        *self.serving.reads.entry(track).or_default() += 1;
        self.read_local(extent, OtherFor::VerifyServe { peer: Some(peer), track, digest });
    }

    pub(super) fn verify_serve_done(&mut self, peer: Option<NodeId>, track: TrackId, digest: [u8; 32], data: Bytes) {
        if let Some(n) = self.serving.reads.get_mut(&track) {
            *n -= 1;
            if *n == 0 {
                self.serving.reads.remove(&track);
            }
        }
        if let Some(peer) = peer {
            let same = track_digest(&data) == digest;
            if !same {
                // Our record of the source marks it too, so either side's handshake resyncs it.
                self.peers.get_mut(&peer).expect("peer").record.mark(track);
            }
            self.send(peer, Message::VerifyReply { track, same });
        }
    }

    /// True (and the message queued) when `msg` from `peer` must wait for a verify read:
    /// a write overlapping a track being read, a verify request for a track still being
    /// written or before this node's resync is hardened, or anything behind a held message.
    pub(super) fn verify_holds(&mut self, peer: NodeId, msg: Message) -> Option<Message> {
        let queued = self.serving.held.get(&peer).is_some_and(|q| !q.is_empty());
        if queued || self.verify_blocked(peer, &msg) {
            self.serving.held.entry(peer).or_default().push_back(msg);
            return None;
        }
        Some(msg)
    }

    fn verify_blocked(&self, peer: NodeId, msg: &Message) -> bool {
        let overlaps_read = |extent: Extent| {
            self.cfg.geometry.span(extent).is_ok_and(|span| span.tracks().any(|t| self.serving.reads.contains_key(&t)))
        };
        let hold_races = !self.bugs.verify_without_hold;
        match msg {
            Message::Data { offset, payload, .. } => {
                hold_races && overlaps_read(Extent::new(*offset, payload.len() as u64))
            }
            Message::Discard { offset, len, .. } => hold_races && overlaps_read(Extent::new(*offset, *len)),
            // The source is in sync once every copy is acknowledged, this node once they
            // are hardened: a request may arrive in between.
            Message::VerifyRequest { .. } if self.peers[&peer].conn == ConnState::SyncTarget => true,
            Message::VerifyRequest { track, .. } => {
                hold_races
                    && self
                        .cfg
                        .geometry
                        .track_extent(*track)
                        .is_ok_and(|extent| !self.local.writes_touching(extent).is_empty())
            }
            _ => false,
        }
    }

    /// Delivers held messages whose reason to wait is gone, in order.
    pub(super) fn verify_release(&mut self) {
        let peers: Vec<NodeId> = self.serving.held.keys().copied().collect();
        for peer in peers {
            while let Some(front) = self.serving.held.get(&peer).and_then(VecDeque::front) {
                if self.verify_blocked(peer, front) {
                    break;
                }
                let msg = self.serving.held.get_mut(&peer).and_then(VecDeque::pop_front).expect("front");
                self.dispatch(peer, msg);
            }
        }
        self.serving.held.retain(|_, q| !q.is_empty());
    }

    /// The connection to `peer` is gone: its held messages die with it, a verify with it
    /// ends, and replies to it are not sent.
    pub(super) fn verify_peer_lost(&mut self, peer: NodeId) {
        self.serving.held.remove(&peer);
        self.local.retarget(|o| match o {
            OtherFor::VerifyServe { peer: Some(q), track, digest } if *q == peer => {
                Some(OtherFor::VerifyServe { peer: None, track: *track, digest: *digest })
            }
            _ => None,
        });
        if self.verify.as_ref().is_some_and(|v| v.peer == peer) {
            self.verify_abort(format!("the connection to node {peer} was lost"));
        }
    }

    /// A peer's new state: a verify against a primary would race with its writes.
    pub(super) fn verify_peer_state(&mut self, peer: NodeId) {
        let promoted = self.peers[&peer].state.as_ref().is_some_and(|s| s.role == Role::Primary);
        if promoted && self.verify.as_ref().is_some_and(|v| v.peer == peer) {
            self.verify_abort(format!("node {peer} became primary: run verify there"));
        }
    }
}
