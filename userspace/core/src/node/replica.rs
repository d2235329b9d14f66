//! The receiving side of replication: writes and flushes from the primary.
//!
//! The record of the sender is marked on receipt, before anything else: from then on this
//! node can tell, should the sender crash, which tracks the sender may hold differently.

use super::local::{HardenFor, WriteFor};
use super::{is_replicating, HardenScope, Node, Payload};
use crate::geometry::{Extent, TrackSpan};
use crate::types::{Mode, NodeId, Role};
use crate::wire::{Message, WriteId};

impl Node {
    pub(super) fn on_replica_write(&mut self, peer: NodeId, id: WriteId, extent: Extent, payload: Payload, fua: bool) {
        if self.meta.role == Role::Primary {
            // Both sides were promoted at once, each before it heard of the other.
            return self.drop_peer(peer, super::Refusal::BothPrimary, true);
        }
        if !is_replicating(self.peers[&peer].conn) {
            return self.protocol_error(peer, "replicated write before the handshake finished".into());
        }
        let span = match self.cfg.geometry.span(extent) {
            Ok(span) => span,
            Err(e) => return self.protocol_error(peer, format!("replicated write: {e}")),
        };
        if self.verify.is_some() {
            self.verify_abort(format!("node {peer} is primary and writes here: run verify there"));
        }
        let after_meta = self.record_received(peer, span);
        let disk_mode = self.cfg.mode == Mode::Disk;
        if disk_mode {
            // The record covers it now; the primary may write its own copy in parallel.
            self.send(peer, Message::ReceiptAck { id });
        }
        self.admit_write(extent, payload, fua || disk_mode, after_meta, WriteFor::Replica { peer, id, fua });
    }

    /// Marks tracks received from `peer` in its record, and in the records of the peers the
    /// primary says miss its writes. Returns the metadata version the local write waits
    /// for: with a peer missing the write, this replica will hold data that peer lacks,
    /// which must survive this node's crash in `out_of_sync` like a primary's write apart.
    pub(super) fn record_received(&mut self, peer: NodeId, span: TrackSpan) -> u64 {
        let mut missed = false;
        for (&q, p) in self.peers.iter_mut() {
            if q == peer || p.missed_by {
                p.record.mark_span(span);
            }
            missed |= p.missed_by;
        }
        if missed && self.meta.mark_out_of_sync(span) {
            self.persist_meta()
        } else if missed {
            self.meta_version
        } else {
            0
        }
    }

    pub(super) fn replica_write_done(&mut self, peer: NodeId, id: WriteId, fua: bool) {
        if self.cfg.mode == Mode::Disk {
            self.send(peer, Message::HardenedAck { id });
            return;
        }
        self.send(peer, Message::ReceiptAck { id });
        if fua {
            self.send(peer, Message::HardenedAck { id });
        }
    }

    pub(super) fn on_replica_flush(&mut self, peer: NodeId, id: u64) {
        if !is_replicating(self.peers[&peer].conn) {
            return self.protocol_error(peer, "flush before the handshake finished".into());
        }
        self.harden(HardenScope::All, HardenFor::ReplicaFlush { peer, id });
    }
}
