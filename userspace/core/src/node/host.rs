//! The primary's host path: writes, discards and flushes.
//!
//! A write is sent to every connected peer and marked in every peer's record first; it goes
//! to the local device only once each connected peer acknowledged receipt (its record then
//! covers the tracks), so a crash of this node can never leave a difference no record holds.
//! With a peer absent, the write runs under a new generation and its tracks go into the
//! persisted `out_of_sync` set before the local write.
//!
//! Attach mode feeds writes that are already on the local device ([`super::Event::HostWritten`]):
//! they take the same path (records, `Data`, generations, completion) without a local write.

use super::local::{HardenFor, WriteFor};
use super::{Action, HardenScope, HostError, HostIoId, Node, Payload};
use crate::geometry::{Extent, TrackId, TrackSpan};
use crate::types::{ConnState, Mode, NodeId, Role};
use crate::wire::{Message, WriteId};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Local {
    /// Waiting for the peers' records to cover the write.
    Waiting,
    Admitted,
    Cached,
    Hardening,
    Hardened,
}

struct HostWrite {
    extent: Extent,
    span: TrackSpan,
    payload: Option<Payload>,
    wid: WriteId,
    receipt: BTreeSet<NodeId>,
    hardened: BTreeSet<NodeId>,
    /// The write completes (and, if still waiting, reaches the device) only once metadata
    /// of at least this version is durable.
    after_meta: u64,
    local: Local,
    need_hardened: bool,
    /// Already on the local device (attach mode): no local write is ever issued for it.
    on_device: bool,
}

struct HostFlush {
    local_done: bool,
    peers: BTreeSet<NodeId>,
}

enum Held {
    Write { id: HostIoId, extent: Extent, payload: Payload, fua: bool, on_device: bool },
    Flush { id: HostIoId },
}

#[derive(Default)]
pub(super) struct HostState {
    writes: BTreeMap<HostIoId, HostWrite>,
    by_wid: HashMap<WriteId, HostIoId>,
    flushes: BTreeMap<HostIoId, HostFlush>,
    /// Host writes per track, from arrival until their local write completed: a resync
    /// must not read such a track (it could ship data older than a write already sent).
    pending_tracks: HashMap<TrackId, u32>,
    /// Host requests arriving while a peer is handshaking, replayed when it is done.
    held: VecDeque<Held>,
}

impl HostState {
    pub fn in_flight(&self) -> usize {
        self.writes.len() + self.flushes.len() + self.held.len()
    }

    /// Host writes touching `extent` whose local write has not been admitted yet.
    pub fn waiting_for_receipt(&self, extent: Extent) -> BTreeSet<HostIoId> {
        self.writes
            .iter()
            .filter(|(_, w)| {
                w.local == Local::Waiting && w.extent.offset < extent.end() && extent.offset < w.extent.end()
            })
            .map(|(&id, _)| id)
            .collect()
    }

    pub fn track_busy(&self, track: TrackId) -> bool {
        self.pending_tracks.get(&track).is_some_and(|n| *n > 0)
    }
}

impl Node {
    fn host_gate(&self) -> Result<(), HostError> {
        if self.meta.role != Role::Primary {
            return Err(HostError::NotPrimary);
        }
        if self.meta.disk == crate::types::DiskState::Failed {
            return Err(HostError::DiskFailed("detached after an I/O error".into()));
        }
        if self.shutting_down {
            // Only an attached primary shuts down (others are secondaries, refused above):
            // nothing may arrive once the records are being persisted.
            return Err(HostError::ShuttingDown);
        }
        Ok(())
    }

    fn handshaking(&self) -> bool {
        self.peers.values().any(|p| p.conn == ConnState::Handshaking)
    }

    pub(super) fn host_write(&mut self, id: HostIoId, extent: Extent, payload: Payload, fua: bool) {
        self.host_write_as(id, extent, payload, fua, false)
    }

    /// A write an application already made to the local device (attach mode).
    pub(super) fn host_write_on_device(&mut self, id: HostIoId, extent: Extent, payload: Payload) {
        self.host_write_as(id, extent, payload, false, true)
    }

    fn host_write_as(&mut self, id: HostIoId, extent: Extent, payload: Payload, fua: bool, on_device: bool) {
        if let Err(e) = self.host_gate() {
            return self.emit(Action::CompleteHost { id, result: Err(e) });
        }
        let span = match self.cfg.geometry.span(extent) {
            Ok(span) => span,
            Err(e) => return self.emit(Action::CompleteHost { id, result: Err(e.into()) }),
        };
        if self.handshaking() {
            self.host.held.push_back(Held::Write { id, extent, payload, fua, on_device });
            return;
        }
        let wid = self.next_wid;
        self.next_wid += 1;
        for t in span.tracks() {
            *self.host.pending_tracks.entry(t).or_default() += 1;
        }
        self.resync_note_host_write(span);
        self.verify_note_host_write(span);
        for p in self.peers.values_mut() {
            p.record.mark_span(span);
        }
        let replicating = self.replicating_peers();
        let synchronous_hardening = self.cfg.mode == Mode::Disk || fua;
        let msg = match &payload {
            Payload::Data(data) => Message::Data { id: wid, offset: extent.offset, fua, payload: data.clone() },
            Payload::Zeroes { len, discard } => {
                Message::Discard { id: wid, offset: extent.offset, len: *len, zeroes: !discard }
            }
        };
        for &peer in &replicating {
            self.send(peer, msg.clone());
        }
        let apart = replicating.len() < self.peers.len();
        let after_meta = if apart { self.note_write_apart(span) } else { 0 };
        let write = HostWrite {
            extent,
            span,
            payload: Some(payload),
            wid,
            receipt: replicating.iter().copied().collect(),
            hardened: if synchronous_hardening { replicating.iter().copied().collect() } else { BTreeSet::new() },
            after_meta,
            local: Local::Waiting,
            // Alone in memory mode, a node that lost its peers hardens what only it holds; a
            // volume configured without peers is a plain local disk (flushes harden it).
            need_hardened: synchronous_hardening
                || (self.cfg.mode == Mode::Memory && !self.peers.is_empty() && replicating.is_empty()),
            on_device,
        };
        self.host.by_wid.insert(wid, id);
        self.host.writes.insert(id, write);
        if self.host.writes[&id].receipt.is_empty() || self.bugs.write_before_record {
            self.admit_host_write(id);
        }
    }

    /// A write some peer will not see: start a new generation (once per separation) and put
    /// its tracks into the persisted `out_of_sync` set. Returns the metadata version the
    /// write must wait for.
    fn note_write_apart(&mut self, span: TrackSpan) -> u64 {
        let mut changed = self.meta.mark_out_of_sync(span);
        let absent: Vec<NodeId> =
            self.peers.iter().filter(|(_, p)| !super::is_replicating(p.conn)).map(|(&id, _)| id).collect();
        let rotated = absent.iter().any(|q| !self.rotated_for.contains(q));
        if rotated {
            let next = self.fresh_gen();
            self.meta.generations.rotate(next);
            self.rotated_for.extend(absent);
            changed = true;
        }
        let version = if changed { self.persist_meta() } else { self.meta_version };
        if rotated {
            // Connected secondaries hold these writes: they join the new generation.
            self.broadcast_state();
        }
        version
    }

    fn admit_host_write(&mut self, id: HostIoId) {
        let w = self.host.writes.get_mut(&id).expect("host write");
        if w.local != Local::Waiting {
            return;
        }
        w.local = Local::Admitted;
        let (extent, payload, fua, after) =
            (w.extent, w.payload.take().expect("payload"), w.need_hardened, w.after_meta);
        if w.on_device {
            // The data is on the device already, and the application may have written newer
            // data since this copy was read: writing it back could undo that. Its durability
            // on this device is the application's (its flushes reach the device directly), so
            // the local half counts as hardened. A destage scan must still follow: only its
            // DestageDone lets the peers forget the tracks.
            let g = self.cfg.geometry;
            if let Ok(span) = g.span(extent) {
                for r in g.ranges_of(span) {
                    self.destage.scan_due[r as usize] = true;
                }
            }
            return self.host_local_done(id, true);
        }
        self.admit_write(extent, payload, fua, after, WriteFor::Host(id));
    }

    pub(super) fn on_receipt_ack(&mut self, peer: NodeId, wid: WriteId) {
        let Some(&id) = self.host.by_wid.get(&wid) else { return };
        let w = self.host.writes.get_mut(&id).expect("host write by wid");
        w.receipt.remove(&peer);
        if w.receipt.is_empty() {
            self.admit_host_write(id);
        }
        self.host_try_complete(id);
    }

    pub(super) fn on_hardened_ack(&mut self, peer: NodeId, wid: WriteId) {
        let Some(&id) = self.host.by_wid.get(&wid) else { return };
        self.host.writes.get_mut(&id).expect("host write by wid").hardened.remove(&peer);
        self.host_try_complete(id);
    }

    pub(super) fn host_local_done(&mut self, id: HostIoId, hardened: bool) {
        let Some(w) = self.host.writes.get_mut(&id) else { return };
        for t in w.span.tracks() {
            if let Some(n) = self.host.pending_tracks.get_mut(&t) {
                *n -= 1;
                if *n == 0 {
                    self.host.pending_tracks.remove(&t);
                }
            }
        }
        w.local = if hardened { Local::Hardened } else { Local::Cached };
        if w.local == Local::Cached && w.need_hardened {
            w.local = Local::Hardening;
            let extent = w.extent;
            self.harden(HardenScope::Extent(extent), HardenFor::HostWrite(id));
        }
        self.scan_host_write_done(id);
        self.host_try_complete(id);
        self.resync_pump_all();
    }

    pub(super) fn host_local_hardened(&mut self, id: HostIoId) {
        if let Some(w) = self.host.writes.get_mut(&id) {
            w.local = Local::Hardened;
            self.host_try_complete(id);
        }
    }

    fn host_try_complete(&mut self, id: HostIoId) {
        // A write already on the device completes as soon as it is admitted, which can be
        // before the caller that admitted it asks again.
        let Some(w) = self.host.writes.get(&id) else { return };
        let local_ok = w.local == Local::Hardened || (w.local == Local::Cached && !w.need_hardened);
        if local_ok && w.receipt.is_empty() && w.hardened.is_empty() && self.meta_durable >= w.after_meta {
            let w = self.host.writes.remove(&id).expect("host write");
            self.host.by_wid.remove(&w.wid);
            self.emit(Action::CompleteHost { id, result: Ok(()) });
        }
    }

    pub(super) fn host_meta_durable(&mut self) {
        let ids: Vec<HostIoId> = self.host.writes.keys().copied().collect();
        for id in ids {
            self.host_try_complete(id);
        }
    }

    pub(super) fn host_flush(&mut self, id: HostIoId) {
        if let Err(e) = self.host_gate() {
            return self.emit(Action::CompleteHost { id, result: Err(e) });
        }
        if self.handshaking() {
            self.host.held.push_back(Held::Flush { id });
            return;
        }
        let peers = self.replicating_peers();
        for &peer in &peers {
            self.send(peer, Message::Flush { id });
        }
        self.host.flushes.insert(id, HostFlush { local_done: false, peers: peers.into_iter().collect() });
        self.harden(HardenScope::All, HardenFor::HostFlush(id));
    }

    pub(super) fn host_flush_local_done(&mut self, id: HostIoId) {
        if let Some(f) = self.host.flushes.get_mut(&id) {
            f.local_done = true;
        }
        self.flush_try_complete(id);
    }

    pub(super) fn on_flush_ack(&mut self, peer: NodeId, id: HostIoId) {
        if let Some(f) = self.host.flushes.get_mut(&id) {
            f.peers.remove(&peer);
        }
        self.flush_try_complete(id);
    }

    fn flush_try_complete(&mut self, id: HostIoId) {
        if self.host.flushes.get(&id).is_some_and(|f| f.local_done && f.peers.is_empty()) {
            self.host.flushes.remove(&id);
            self.emit(Action::CompleteHost { id, result: Ok(()) });
        }
    }

    /// `peer` is gone: writes waiting for it complete without it, under a new generation,
    /// and in `memory` mode a node left without any peer hardens what only it now holds.
    pub(super) fn host_peer_lost(&mut self, peer: NodeId) {
        let ids: Vec<HostIoId> = self.host.writes.keys().copied().collect();
        for id in &ids {
            let w = self.host.writes.get_mut(id).expect("host write");
            let waited = w.receipt.remove(&peer) | w.hardened.remove(&peer);
            if waited {
                let span = w.span;
                let after = self.note_write_apart(span);
                let w = self.host.writes.get_mut(id).expect("host write");
                w.after_meta = w.after_meta.max(after);
            }
        }
        let alone = self.replicating_peers().is_empty();
        if alone && self.cfg.mode == Mode::Memory && self.meta.role == Role::Primary {
            self.harden(HardenScope::All, HardenFor::Degraded);
            for id in &ids {
                let w = self.host.writes.get_mut(id).expect("host write");
                w.need_hardened = true;
                if w.local == Local::Cached {
                    w.local = Local::Hardening;
                    let extent = w.extent;
                    self.harden(HardenScope::Extent(extent), HardenFor::HostWrite(*id));
                }
            }
        }
        for id in ids {
            if self.host.writes[&id].receipt.is_empty() {
                self.admit_host_write(id);
            }
            self.host_try_complete(id);
        }
        let flushes: Vec<HostIoId> = self.host.flushes.keys().copied().collect();
        for id in flushes {
            self.host.flushes.get_mut(&id).expect("flush").peers.remove(&peer);
            self.flush_try_complete(id);
        }
    }

    /// Replays host requests held while a peer was handshaking.
    pub(super) fn release_held(&mut self) {
        if self.handshaking() {
            return;
        }
        while let Some(h) = self.host.held.pop_front() {
            match h {
                Held::Write { id, extent, payload, fua, on_device } => {
                    self.host_write_as(id, extent, payload, fua, on_device)
                }
                Held::Flush { id } => self.host_flush(id),
            }
        }
    }

    /// Fails every host request (the disk is gone).
    pub(super) fn fail_all_host(&mut self, err: HostError) {
        let ids: Vec<HostIoId> = self
            .host
            .writes
            .keys()
            .chain(self.host.flushes.keys())
            .copied()
            .chain(self.host.held.iter().map(|h| match h {
                Held::Write { id, .. } | Held::Flush { id } => *id,
            }))
            .collect();
        self.host = HostState::default();
        for &id in &ids {
            self.scan_host_write_done(id);
        }
        for id in ids {
            self.emit(Action::CompleteHost { id, result: Err(err.clone()) });
        }
    }
}
