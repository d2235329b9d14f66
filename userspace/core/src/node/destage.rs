//! Destage scans (seed 003, Fig. 5), both halves.
//!
//! This node hardens one range of its cache at a time: it tells every connected peer it is
//! starting (each peer turns its current bitmap of the range into old), waits for them all,
//! waits for the writes to the range already admitted to complete (a harden covers only
//! completed writes), hardens the range, and tells the peers they may clear old.
//! The other half answers a peer's scan on this node's record of that peer.

use super::local::HardenFor;
use super::{HardenScope, HostIoId, IoId, Node};
use crate::geometry::{Extent, RangeId};
use crate::toggle::ToggleMsg;
use crate::types::NodeId;
use crate::wire::Message;
use std::collections::BTreeSet;

/// What a scan waits for before it hardens: admitted local writes to the range, and host
/// writes to it still waiting for their peers' receipts (their marks are in the peers' old
/// bitmaps, and in `memory` mode a peer's receipt can arrive after its `DestageAck`).
#[derive(Debug, Default)]
struct Barrier {
    ios: BTreeSet<IoId>,
    host: BTreeSet<HostIoId>,
}

impl Barrier {
    fn is_empty(&self) -> bool {
        self.ios.is_empty() && self.host.is_empty()
    }
}

#[derive(Debug)]
enum Phase {
    Starting,
    Draining(Barrier),
    Hardening,
}

#[derive(Debug)]
struct Scan {
    range: RangeId,
    awaiting: BTreeSet<NodeId>,
    peers: BTreeSet<NodeId>,
    phase: Phase,
}

pub(super) struct Destage {
    /// Ranges written since their last scan hardened them.
    pub scan_due: Vec<bool>,
    next: RangeId,
    scan: Option<Scan>,
}

impl Destage {
    pub fn new(ranges: u32) -> Self {
        Destage { scan_due: vec![false; ranges as usize], next: 0, scan: None }
    }

    pub fn is_idle(&self) -> bool {
        self.scan.is_none()
    }
}

impl Node {
    fn range_extent(&self, range: RangeId) -> Extent {
        let g = &self.cfg.geometry;
        let tracks = g.tracks_in_range(range);
        let start = tracks.start * u64::from(g.track_size());
        let end = (tracks.end * u64::from(g.track_size())).min(g.volume_size());
        Extent::new(start, end - start)
    }

    /// Starts a scan of the next range with unhardened writes, if none is running.
    pub(super) fn destage_tick(&mut self) {
        if self.destage.scan.is_some() || self.meta.disk == crate::types::DiskState::Failed {
            return;
        }
        let n = self.destage.scan_due.len() as RangeId;
        let Some(range) = (0..n).map(|i| (self.destage.next + i) % n).find(|r| self.destage.scan_due[*r as usize])
        else {
            return;
        };
        self.destage.next = (range + 1) % n;
        let peers: BTreeSet<NodeId> = self.replicating_peers().into_iter().collect();
        for &peer in &peers {
            self.send(peer, Message::DestageStart { range });
        }
        self.destage.scan = Some(Scan { range, awaiting: peers.clone(), peers, phase: Phase::Starting });
        self.scan_progress();
    }

    pub(super) fn on_destage_ack(&mut self, peer: NodeId, range: RangeId) {
        match &mut self.destage.scan {
            Some(scan) if scan.range == range && matches!(scan.phase, Phase::Starting) => {
                scan.awaiting.remove(&peer);
            }
            _ => return self.protocol_error(peer, format!("DestageAck for range {range} without a scan")),
        }
        self.scan_progress();
    }

    /// Moves the scan forward as far as its conditions allow.
    fn scan_progress(&mut self) {
        let Some(scan) = &self.destage.scan else { return };
        let range = scan.range;
        match &scan.phase {
            Phase::Starting if scan.awaiting.is_empty() => {
                // Every peer has toggled: what they hold in old was written before this
                // point, so everything admitted so far must reach stable storage.
                let barrier = if self.bugs.skip_destage_drain {
                    Barrier::default()
                } else {
                    let extent = self.range_extent(range);
                    Barrier {
                        ios: self.local.writes_touching(extent).into_iter().collect(),
                        host: self.host.waiting_for_receipt(extent),
                    }
                };
                self.destage.scan.as_mut().expect("scan").phase = Phase::Draining(barrier);
                self.scan_progress();
            }
            Phase::Draining(barrier) if barrier.is_empty() => {
                self.destage.scan.as_mut().expect("scan").phase = Phase::Hardening;
                self.harden(HardenScope::Range(range), HardenFor::Scan(range));
            }
            _ => {}
        }
    }

    pub(super) fn scan_write_done(&mut self, io: IoId) {
        if let Some(Scan { phase: Phase::Draining(barrier), .. }) = &mut self.destage.scan {
            if barrier.ios.remove(&io) {
                self.scan_progress();
            }
        }
    }

    /// A host write's local write completed, or the write was dropped.
    pub(super) fn scan_host_write_done(&mut self, id: HostIoId) {
        if let Some(Scan { phase: Phase::Draining(barrier), .. }) = &mut self.destage.scan {
            if barrier.host.remove(&id) {
                self.scan_progress();
            }
        }
    }

    pub(super) fn scan_hardened(&mut self, range: RangeId) {
        let Some(scan) = self.destage.scan.take() else { return };
        debug_assert_eq!(scan.range, range);
        for peer in scan.peers {
            self.send(peer, Message::DestageDone { range });
        }
    }

    pub(super) fn scan_peer_lost(&mut self, peer: NodeId) {
        if let Some(scan) = &mut self.destage.scan {
            scan.awaiting.remove(&peer);
            scan.peers.remove(&peer);
        }
        self.scan_progress();
    }

    pub(super) fn on_destage_start(&mut self, peer: NodeId, range: RangeId) {
        self.on_peer_scan(peer, range, ToggleMsg::DestageStart { range });
    }

    pub(super) fn on_destage_done(&mut self, peer: NodeId, range: RangeId) {
        self.on_peer_scan(peer, range, ToggleMsg::DestageDone { range });
    }

    /// The peer's destage scan, applied to our record of the peer.
    fn on_peer_scan(&mut self, peer: NodeId, range: RangeId, msg: ToggleMsg) {
        if let Err(e) = self.cfg.geometry.check_range(range) {
            return self.protocol_error(peer, format!("{}: {e}", msg.name()));
        }
        let bug = self.bugs.clear_old_on_start && matches!(msg, ToggleMsg::DestageStart { .. });
        let p = self.peers.get_mut(&peer).expect("peer");
        match p.scans[range as usize].on_message(&mut p.record, msg) {
            Ok(reply) => {
                if bug {
                    p.record.clear_old(range);
                }
                if let Some(reply) = reply {
                    self.send(peer, reply.into());
                }
            }
            Err(e) => self.protocol_error(peer, e.to_string()),
        }
    }
}
