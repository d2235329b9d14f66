//! Resync: the source ships every recorded track; the target writes them and confirms.
//!
//! A resync copy is read from the source's device, so it must not be read while a host
//! write to the same track is on its way (the copy could be older than a write already
//! sent to the peer, and would land after it). Such tracks wait; a copy whose track is
//! written while the read is in flight is dropped and read again.

use super::local::{HardenFor, OtherFor, WriteFor};
use super::{HardenScope, IoId, Node, Payload};
use crate::bitmap::Bits;
use crate::geometry::{TrackId, TrackSpan};
use crate::types::{ConnState, DiskState, Mode, NodeId};
use crate::wire::Message;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};

pub(super) enum Resync {
    Source {
        todo: BTreeSet<TrackId>,
        /// Reads in flight, and whether a host write touched the track since.
        reading: BTreeMap<TrackId, (IoId, bool)>,
        awaiting: BTreeSet<TrackId>,
        total: u64,
        confirmed: u64,
    },
    Target {
        /// Tracks still to arrive. The source's destage scans may clear them from our
        /// record of it before the copies come; if the source then loses its own record
        /// (a crash), this is all that says they differ.
        pending: Bits,
        total: u64,
        written: u64,
        /// Resync writes wait for the Inconsistent disk state to be durable: a crash in the
        /// middle must never leave a half-copied replica that claims to be consistent.
        after_meta: u64,
    },
}

impl Resync {
    pub fn source(todo: BTreeSet<TrackId>) -> Self {
        let total = todo.len() as u64;
        Resync::Source { todo, reading: BTreeMap::new(), awaiting: BTreeSet::new(), total, confirmed: 0 }
    }

    pub fn target(pending: Bits, after_meta: u64) -> Self {
        let total = pending.count_ones() as u64;
        Resync::Target { pending, total, written: 0, after_meta }
    }

    /// (done, total).
    pub fn progress(&self) -> (u64, u64) {
        match self {
            Resync::Source { total, confirmed, .. } => (*confirmed, *total),
            Resync::Target { total, written, .. } => (*written, *total),
        }
    }

    /// Whether `track` is among [`Resync::unconfirmed`], without listing them.
    pub fn holds(&self, track: TrackId) -> bool {
        match self {
            Resync::Source { todo, reading, awaiting, .. } => {
                todo.contains(&track) || reading.contains_key(&track) || awaiting.contains(&track)
            }
            Resync::Target { pending, .. } => pending.get(track as usize).is_some_and(|b| *b),
        }
    }

    /// Tracks not yet confirmed in sync: they stay recorded when the resync is cut short.
    pub fn unconfirmed(&self) -> Vec<TrackId> {
        match self {
            Resync::Source { todo, reading, awaiting, .. } => {
                todo.iter().chain(reading.keys()).chain(awaiting).copied().collect()
            }
            Resync::Target { pending, .. } => pending.iter_ones().map(|t| t as TrackId).collect(),
        }
    }
}

impl Node {
    pub(super) fn resync_pump_all(&mut self) {
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.resync_pump(peer);
        }
    }

    /// Starts reads up to the window; finishes the resync when everything is confirmed.
    pub(super) fn resync_pump(&mut self, peer: NodeId) {
        let window = self.cfg.resync_window;
        let mut reads = Vec::new();
        let finished = {
            let Some(Resync::Source { todo, reading, awaiting, .. }) =
                &mut self.peers.get_mut(&peer).expect("peer").resync
            else {
                return;
            };
            let free = window.saturating_sub(reading.len() + awaiting.len());
            let ready: Vec<TrackId> = todo.iter().copied().filter(|t| !self.host.track_busy(*t)).take(free).collect();
            for t in ready {
                todo.remove(&t);
                reads.push(t);
            }
            todo.is_empty() && reading.is_empty() && awaiting.is_empty() && reads.is_empty()
        };
        for track in reads {
            let extent = self.cfg.geometry.track_extent(track).expect("recorded track exists");
            let io = self.read_local(extent, OtherFor::ResyncRead { peer, track });
            if let Some(Resync::Source { reading, .. }) = &mut self.peers.get_mut(&peer).expect("peer").resync {
                reading.insert(track, (io, false));
            }
        }
        if finished {
            let p = self.peers.get_mut(&peer).expect("peer");
            let (_, total) = p.resync.take().expect("resync").progress();
            p.last_resync = Some(total);
            p.conn = ConnState::Connected;
            self.send(peer, Message::ResyncEnd { tracks: total });
            self.resync_finished();
        }
    }

    pub(super) fn resync_note_host_write(&mut self, span: TrackSpan) {
        for p in self.peers.values_mut() {
            if let Some(Resync::Source { reading, .. }) = &mut p.resync {
                for t in span.tracks() {
                    if let Some((_, superseded)) = reading.get_mut(&t) {
                        *superseded = true;
                    }
                }
            }
        }
    }

    pub(super) fn resync_read_done(&mut self, peer: NodeId, track: TrackId, io: IoId, data: Bytes) {
        let p = self.peers.get_mut(&peer).expect("peer");
        let Some(Resync::Source { todo, reading, awaiting, .. }) = &mut p.resync else {
            return;
        };
        match reading.get(&track) {
            Some((read_io, superseded)) if *read_io == io => {
                let superseded = *superseded;
                reading.remove(&track);
                if superseded {
                    todo.insert(track);
                } else {
                    awaiting.insert(track);
                    // Like any data sent, the copy is recorded until the target hardens it:
                    // the union mark from the handshake may sit in an old bitmap that the
                    // target's next destage scan clears before this copy is hardened.
                    p.record.mark(track);
                    self.send(peer, Message::ResyncData { track, payload: data });
                }
            }
            _ => return,
        }
        self.resync_pump(peer);
    }

    pub(super) fn on_resync_ack(&mut self, peer: NodeId, track: TrackId) {
        match &mut self.peers.get_mut(&peer).expect("peer").resync {
            Some(Resync::Source { awaiting, confirmed, .. }) if awaiting.contains(&track) => {
                awaiting.remove(&track);
                *confirmed += 1;
            }
            _ => return self.protocol_error(peer, format!("ResyncAck for track {track} never shipped")),
        }
        self.resync_pump(peer);
    }

    pub(super) fn on_resync_data(&mut self, peer: NodeId, track: TrackId, payload: Bytes) {
        let after_meta = match &self.peers[&peer].resync {
            Some(Resync::Target { after_meta, .. }) => *after_meta,
            _ => return self.protocol_error(peer, "ResyncData while not sync target".into()),
        };
        let extent = match self.cfg.geometry.track_extent(track) {
            Ok(e) if e.len == payload.len() as u64 => e,
            Ok(e) => {
                return self.protocol_error(
                    peer,
                    format!("ResyncData for track {track}: {} bytes, expected {}", payload.len(), e.len),
                )
            }
            Err(e) => return self.protocol_error(peer, format!("ResyncData: {e}")),
        };
        let after_missed = self.record_received(peer, crate::geometry::TrackSpan::new(track, 1));
        let fua = self.cfg.mode == Mode::Disk;
        let after = after_meta.max(after_missed);
        self.admit_write(extent, Payload::Data(payload), fua, after, WriteFor::Resync { peer, track });
    }

    pub(super) fn resync_write_done(&mut self, peer: NodeId, track: TrackId) {
        if let Some(Resync::Target { written, pending, .. }) = &mut self.peers.get_mut(&peer).expect("peer").resync {
            *written += 1;
            pending.set(track as usize, false);
            self.send(peer, Message::ResyncAck { track });
        }
    }

    pub(super) fn on_resync_end(&mut self, peer: NodeId, tracks: u64) {
        match &self.peers[&peer].resync {
            Some(Resync::Target { written, .. }) if *written == tracks => {}
            Some(Resync::Target { written, .. }) => {
                let why = format!("ResyncEnd after {tracks} tracks, {written} written here");
                return self.protocol_error(peer, why);
            }
            _ => return self.protocol_error(peer, "ResyncEnd while not sync target".into()),
        }
        // The copies may sit in the cache; the replica claims to equal the source only once
        // they are hardened, or a power loss of both nodes could make it a stale source.
        self.harden(HardenScope::All, HardenFor::ResyncEnd(peer));
    }

    pub(super) fn resync_hardened(&mut self, peer: NodeId) {
        let p = self.peers.get_mut(&peer).expect("peer");
        let Some(Resync::Target { written, .. }) = p.resync else {
            return;
        };
        p.last_resync = Some(written);
        p.resync = None;
        p.conn = ConnState::Connected;
        let source = p.state.clone().expect("state from handshake");
        // The source holds the newest data both sides know of (it became UpToDate when
        // the handshake chose it), and this replica now equals it.
        self.meta.disk = DiskState::UpToDate;
        self.meta.generations = source.generations;
        self.meta.before_resync = None;
        self.meta.crashed = false;
        self.persist_meta();
        self.resync_finished();
        self.broadcast_state();
        if source.role == crate::types::Role::Primary {
            self.follow_primary(peer);
        }
    }

    /// Once every peer is connected and in sync, nothing written apart remains unshipped
    /// and the records are whole again.
    fn resync_finished(&mut self) {
        // Idle peers do not count: a secondary's out_of_sync may hold what an idle peer lacks.
        if self.peers.values().all(|p| p.conn == ConnState::Connected) {
            let changed = self.meta.crashed || self.meta.out_of_sync.any();
            self.meta.crashed = false;
            self.meta.out_of_sync.fill(false);
            if changed {
                self.persist_meta();
            }
        }
    }
}
