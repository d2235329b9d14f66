//! Connecting to a peer: the state and record exchange, the decision of who resyncs whom,
//! and what a lost connection leaves behind.
//!
//! Each side sends its state and its record of the other, then decides with the same pure
//! function ([`decide`]) on the same inputs, so both reach the same verdict without another
//! round trip. Generations decide the direction; two replicas that both moved on from a
//! common generation have both taken writes while apart and are refused, never merged.

use super::local::{HardenFor, OtherFor, WriteFor};
use super::resync::Resync;
use super::{is_linked, is_replicating, Node, Refusal};
use crate::bitmap::{Bits, DirtyMap};
use crate::geometry::RangeId;
use crate::types::{ConnState, DiskState, GenRelation, NodeId, Role};
use crate::wire::{Message, StateReport};
use bytes::Bytes;

pub(super) struct Handshake {
    /// What this node sent: the decision must use it, not the state of the moment, so that
    /// both ends decide on the same inputs.
    sent_state: StateReport,
    sent_record: DirtyMap,
    /// The peer's first report (the one its record pages follow) and its latest one.
    state: Option<StateReport>,
    latest: Option<StateReport>,
    record: DirtyMap,
}

/// The verdict of a handshake: who ships which tracks to whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub source: NodeId,
    pub target: NodeId,
    /// Every track is shipped: no surviving record can say which ones differ.
    pub full: bool,
}

fn disk_rank(d: DiskState) -> u8 {
    match d {
        DiskState::UpToDate => 4,
        DiskState::Consistent => 3,
        DiskState::Outdated => 2,
        DiskState::Inconsistent => 1,
        DiskState::Failed => 0,
    }
}

/// Decides a connection from both nodes' reports. Symmetric: `decide(a, b) == decide(b, a)`.
/// `Ok(None)`: two secondaries of a primary elsewhere, which keeps both in sync; they idle.
pub fn decide(a: &StateReport, b: &StateReport) -> Result<Option<Plan>, Refusal> {
    let (lo, hi) = if a.node <= b.node { (a, b) } else { (b, a) };
    if lo.mode != hi.mode {
        return Err(Refusal::Mismatch(format!("replication mode {} vs {}", lo.mode, hi.mode)));
    }
    if lo.volume_size != hi.volume_size || lo.track_size != hi.track_size {
        return Err(Refusal::Mismatch(format!(
            "volume {} bytes / track {} vs volume {} bytes / track {}",
            lo.volume_size, lo.track_size, hi.volume_size, hi.track_size
        )));
    }
    if lo.role == Role::Primary && hi.role == Role::Primary {
        return Err(Refusal::BothPrimary);
    }
    let elsewhere = |s: &StateReport| s.primary.is_some_and(|p| p != lo.node && p != hi.node);
    if lo.role == Role::Secondary && hi.role == Role::Secondary && (elsewhere(lo) || elsewhere(hi)) {
        return Ok(None);
    }
    // An invalidated replica (generation 0) is behind everyone, whatever its history.
    let relation = match (lo.generations.current, hi.generations.current) {
        (0, 0) => GenRelation::Same,
        (0, _) => GenRelation::Behind,
        (_, 0) => GenRelation::Ahead,
        _ => lo.generations.compare(&hi.generations),
    };
    let (ours, theirs) = (lo.generations.current, hi.generations.current);
    // Both lost their in-memory records (or one has no data at all): no record can say
    // which tracks differ.
    let full = ours == 0 || theirs == 0 || (lo.crashed && hi.crashed);
    let source = match relation {
        GenRelation::Diverged => return Err(Refusal::SplitBrain { ours, theirs }),
        GenRelation::Unrelated => return Err(Refusal::UnrelatedData { ours, theirs }),
        GenRelation::Ahead => lo,
        GenRelation::Behind => hi,
        // Same generation: whoever crashed lost cached writes the other still holds.
        GenRelation::Same => match (valid(lo), valid(hi), lo.crashed, hi.crashed) {
            (true, false, ..) => lo,
            (false, true, ..) => hi,
            (_, _, true, false) => hi,
            (_, _, false, true) => lo,
            _ => tie_break(lo, hi),
        },
    };
    let target = if source.node == lo.node { hi } else { lo };
    if !valid(source) {
        return Err(Refusal::NoValidData);
    }
    if target.role == Role::Primary {
        return Err(Refusal::PrimaryWouldBeTarget);
    }
    Ok(Some(Plan { source: source.node, target: target.node, full }))
}

/// Holds an image that could serve as a resync source.
fn valid(s: &StateReport) -> bool {
    !matches!(s.disk, DiskState::Inconsistent | DiskState::Failed)
}

fn tie_break<'a>(lo: &'a StateReport, hi: &'a StateReport) -> &'a StateReport {
    let key = |s: &StateReport| (disk_rank(s.disk), s.role == Role::Primary);
    if key(hi) > key(lo) {
        hi
    } else {
        lo
    }
}

impl Node {
    pub(super) fn peer_connected(&mut self, peer: NodeId) {
        let Some(p) = self.peers.get(&peer) else { return };
        if p.conn == ConnState::StandAlone || self.meta.disk == DiskState::Failed {
            let reason = if self.meta.disk == DiskState::Failed {
                Refusal::DiskFailed
            } else {
                Refusal::Protocol("stand-alone until reconnected by the operator".into())
            };
            self.emit(super::Action::Disconnect { peer, reason, stand_alone: true });
            return;
        }
        if is_linked(p.conn) {
            self.peer_lost(peer);
        }
        // Every record this node keeps: with several peers, a track another peer may hold
        // differently may differ here too (the peer is told the union, a superset).
        let geometry = self.cfg.geometry;
        let mut all = DirtyMap::new(geometry);
        for q in self.peers.values() {
            all.merge(&q.record).expect("same geometry");
        }
        let report = self.state_report();
        self.send(peer, Message::State(report.clone()));
        for range in (0..geometry.range_count()).filter(|r| all.range_count(*r) > 0) {
            let bits = bits_to_bytes(&all.range_union(range));
            self.send(peer, Message::RecordPage { range, bits });
        }
        self.send(peer, Message::RecordEnd { tracks: all.count() });
        let p = self.peers.get_mut(&peer).expect("peer");
        p.conn = ConnState::Handshaking;
        p.handshake = Some(Handshake {
            sent_state: report,
            sent_record: all,
            state: None,
            latest: None,
            record: DirtyMap::new(geometry),
        });
    }

    pub(super) fn on_state(&mut self, peer: NodeId, report: StateReport) {
        let p = self.peers.get_mut(&peer).expect("peer");
        if let Some(hs) = &mut p.handshake {
            if hs.state.is_none() {
                hs.state = Some(report);
            } else {
                hs.latest = Some(report);
            }
            return;
        }
        if report.role == Role::Primary && self.meta.role == Role::Primary {
            return self.drop_peer(peer, Refusal::BothPrimary, true);
        }
        let was_primary = p.state.as_ref().is_some_and(|s| s.role == Role::Primary);
        let in_sync = (p.conn == ConnState::Connected && self.meta.disk == DiskState::UpToDate)
            || p.conn == ConnState::SyncTarget;
        let adopt = self.meta.role == Role::Secondary
            && report.role == Role::Primary
            && in_sync
            && report.generations != self.meta.generations;
        let is_primary = report.role == Role::Primary;
        p.state = Some(report);
        self.verify_peer_state(peer);
        if adopt {
            // The primary started a generation for writes another peer misses; this node
            // has those writes, so it belongs to the new generation too.
            self.meta.generations = self.peers[&peer].state.as_ref().expect("state").generations.clone();
            self.persist_meta();
        }
        if is_primary {
            self.follow_primary(peer);
        } else if was_primary && self.meta.role == Role::Secondary {
            // The primary stepped down: the secondaries idling beside it compare records.
            self.lost_primary();
        }
    }

    /// A secondary learns from its primary's report which other secondaries miss writes:
    /// for those it records what it receives from now on, and what it has not seen the
    /// primary harden yet (the primary's record of this node may be all that covers it).
    pub(super) fn follow_primary(&mut self, primary: NodeId) {
        if self.meta.role != Role::Secondary || !is_replicating(self.peers[&primary].conn) {
            return;
        }
        let mask = self.peers[&primary].state.as_ref().map_or(0, |s| s.replicating);
        let from_primary = self.peers[&primary].record.clone();
        let me = self.cfg.node;
        let mut newly_missed = false;
        for (&q, p) in self.peers.iter_mut() {
            if q == primary || q == me {
                continue;
            }
            let missed = mask & (1 << q) == 0;
            if missed && !p.missed_by {
                p.record.merge(&from_primary).expect("same geometry");
                newly_missed = true;
            }
            p.missed_by = missed;
        }
        if newly_missed {
            // What this node holds and the missed peer may lack must outlive this node.
            let mut grew = false;
            for t in from_primary.union_tracks() {
                grew |= self.meta.mark_out_of_sync(crate::geometry::TrackSpan::new(t, 1));
            }
            if grew {
                self.persist_meta();
            }
        }
    }

    /// Secondaries that idled beside a primary that is gone must now compare records.
    fn lost_primary(&mut self) {
        for p in self.peers.values_mut() {
            p.missed_by = false;
        }
        self.drop_idle_peers(Refusal::PrimaryLost);
    }

    pub(super) fn on_record_page(&mut self, peer: NodeId, range: RangeId, bits: Bytes) {
        let Some(hs) = self.peers.get_mut(&peer).and_then(|p| p.handshake.as_mut()) else {
            return self.protocol_error(peer, "RecordPage outside a handshake".into());
        };
        let g = *hs.record.geometry();
        if let Err(e) = g.check_range(range) {
            return self.protocol_error(peer, format!("RecordPage: {e}"));
        }
        let len = g.tracks_in_range(range).count();
        if bits.len() != len.div_ceil(8) {
            return self.protocol_error(
                peer,
                format!("RecordPage for range {range}: {} bytes, expected {}", bits.len(), len.div_ceil(8)),
            );
        }
        let mut page = Bits::from_iter((0..len).map(|i| bits[i / 8] & (1 << (i % 8)) != 0));
        page.truncate(len);
        if let Err(e) = hs.record.mark_range_bits(range, &page) {
            self.protocol_error(peer, format!("RecordPage: {e}"));
        }
    }

    pub(super) fn on_record_end(&mut self, peer: NodeId, tracks: u64) {
        let Some(hs) = self.peers.get_mut(&peer).and_then(|p| p.handshake.take()) else {
            return self.protocol_error(peer, "RecordEnd outside a handshake".into());
        };
        let Some(theirs) = hs.state else {
            return self.protocol_error(peer, "RecordEnd before State".into());
        };
        if hs.record.count() != tracks {
            return self
                .protocol_error(peer, format!("record announced {tracks} tracks, pages held {}", hs.record.count()));
        }
        let plan = match decide(&hs.sent_state, &theirs) {
            // With several peers, only a primary resyncs: two secondaries syncing each other
            // could make one node the target of two sources at once. (Both ends share the
            // cluster's shape, so both conclude the same.)
            Ok(_)
                if self.peers.len() > 1 && hs.sent_state.role == Role::Secondary && theirs.role == Role::Secondary =>
            {
                None
            }
            Ok(plan) => plan,
            Err(refusal) => {
                self.drop_peer(peer, refusal, true);
                return self.release_held();
            }
        };
        let me = self.cfg.node;
        if let Some(plan) = plan.filter(|p| p.target == me) {
            // One source at a time: copies from two nodes would interleave, and a second
            // primary means the primaries have split.
            let other = self.peers.iter().find(|(&q, p)| {
                q != peer
                    && (p.conn == ConnState::SyncTarget
                        || (is_replicating(p.conn) && p.state.as_ref().is_some_and(|s| s.role == Role::Primary)))
            });
            if let Some((&other, _)) = other {
                let stand_alone = theirs.role == Role::Primary;
                self.drop_peer(plan.source, Refusal::SecondSource { other }, stand_alone);
                return self.release_held();
            }
        }
        let mut union = hs.sent_record;
        union.merge(&hs.record).expect("same geometry");
        let p = self.peers.get_mut(&peer).expect("peer");
        p.state = Some(hs.latest.unwrap_or(theirs));
        match plan {
            None => p.conn = ConnState::Idle,
            Some(plan) => {
                // The peer now records these tracks for us; only our destage scans clear them,
                // and a node with nothing new to write would never scan: schedule them.
                let g = self.cfg.geometry;
                for r in (0..g.range_count()).filter(|r| union.range_count(*r) > 0) {
                    self.destage.scan_due[r as usize] = true;
                }
                let p = self.peers.get_mut(&peer).expect("peer");
                // Tracks recorded since the snapshot was sent are shipped too.
                p.record.merge(&union).expect("same geometry");
                if plan.full {
                    p.record.mark_all();
                }
                if plan.source == me {
                    let todo = p.record.union_tracks().collect();
                    p.conn = ConnState::SyncSource;
                    p.resync = Some(Resync::source(todo));
                    if matches!(self.meta.disk, DiskState::Consistent | DiskState::Outdated) {
                        // Both sides agree this replica holds the newest data there is.
                        self.meta.disk = DiskState::UpToDate;
                        self.persist_meta();
                    }
                } else {
                    p.conn = ConnState::SyncTarget;
                    let mut pending = Bits::repeat(false, self.cfg.geometry.track_count() as usize);
                    for t in p.record.union_tracks() {
                        pending.set(t as usize, true);
                    }
                    // A half-copied replica must never claim to be consistent after a crash;
                    // with nothing recorded on either side there is nothing to half-copy.
                    // From now on this replica takes the source's writes, so it belongs to the
                    // source's generation: a later handshake elsewhere must see that.
                    let source_gens = self.peers[&peer].state.as_ref().expect("state").generations.clone();
                    let adopt = source_gens != self.meta.generations;
                    if adopt && self.meta.before_resync.is_none() {
                        self.meta.before_resync = Some(self.meta.generations.clone());
                    }
                    self.meta.generations = source_gens;
                    let after = if plan.full || !union.is_clean() || self.meta.disk != DiskState::UpToDate {
                        self.meta.disk = DiskState::Inconsistent;
                        self.persist_meta()
                    } else if adopt {
                        self.persist_meta()
                    } else {
                        0
                    };
                    self.peers.get_mut(&peer).expect("peer").resync = Some(Resync::target(pending, after));
                }
            }
        }
        if is_replicating(self.peers[&peer].conn) {
            self.rotated_for.remove(&peer);
        }
        if self.meta.role == Role::Primary {
            self.broadcast_state();
        } else if p_is_primary(self, peer) {
            self.follow_primary(peer);
        }
        self.resync_pump(peer);
        self.release_held();
    }

    pub(super) fn peer_lost(&mut self, peer: NodeId) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let lost_our_primary = is_replicating(p.conn) && p.state.as_ref().is_some_and(|s| s.role == Role::Primary);
        let was_replicating = is_replicating(p.conn);
        if p.conn != ConnState::StandAlone {
            p.conn = ConnState::Connecting;
        }
        p.handshake = None;
        p.state = None;
        p.scans = super::scan_recorders(&self.cfg.geometry);
        if let Some(resync) = p.resync.take() {
            // Tracks not yet confirmed in sync stay recorded for the next attempt.
            for t in resync.unconfirmed() {
                p.record.mark(t);
            }
        }
        for w in self.local.writes.values_mut() {
            if matches!(w.origin, WriteFor::Replica { peer: q, .. } | WriteFor::Resync { peer: q, .. } if q == peer) {
                w.origin = WriteFor::Orphan;
            }
        }
        self.local.forget_peer(peer);
        self.local.orphan_flushes(peer);
        self.verify_peer_lost(peer);
        self.scan_peer_lost(peer);
        self.host_peer_lost(peer);
        if self.meta.role == Role::Primary && was_replicating {
            // The other secondaries must learn that this one misses writes before any
            // DestageDone lets them forget tracks it may not have received.
            self.broadcast_state();
        }
        if lost_our_primary && self.meta.role == Role::Secondary {
            self.lost_primary();
        }
        self.release_held();
    }
}

fn p_is_primary(node: &Node, peer: NodeId) -> bool {
    node.peers[&peer].state.as_ref().is_some_and(|s| s.role == Role::Primary)
}

/// One bit per track, LSB first: the `RecordPage` layout.
fn bits_to_bytes(bits: &Bits) -> Bytes {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for i in bits.iter_ones() {
        out[i / 8] |= 1 << (i % 8);
    }
    Bytes::from(out)
}

impl super::local::LocalIos {
    /// Flush answers for a connection that is gone must not reach a later one.
    pub(super) fn orphan_flushes(&mut self, peer: NodeId) {
        self.retarget(|o| match o {
            OtherFor::Harden(HardenFor::ReplicaFlush { peer: q, .. } | HardenFor::ResyncEnd(q)) if *q == peer => {
                Some(OtherFor::Harden(HardenFor::Degraded))
            }
            _ => None,
        });
    }
}
