//! Local I/O bookkeeping: admission, ordering gates, and routing completions.
//!
//! Two gates hold a write back: overlapping writes go to the device one at a time in the
//! order they were admitted (the device may complete concurrent writes in any order, and a
//! resync copy must never land under a newer replicated write), and a write that depends on
//! metadata (a new generation, the `out_of_sync` set) waits until that metadata is durable.

use super::{Action, HardenScope, HostIoId, IoError, IoId, Node, Payload};
use crate::geometry::{Extent, RangeId, TrackId};
use crate::types::NodeId;
use crate::wire::WriteId;
use bytes::Bytes;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub(super) enum WriteFor {
    Host(HostIoId),
    /// Data replicated from `peer`.
    Replica {
        peer: NodeId,
        id: WriteId,
        fua: bool,
    },
    /// A resync copy of `track` from `peer`.
    Resync {
        peer: NodeId,
        track: TrackId,
    },
    /// Its connection is gone: the write still lands, but answers nobody.
    Orphan,
}

#[derive(Clone, Debug)]
pub(super) enum OtherFor {
    ResyncRead {
        peer: NodeId,
        track: TrackId,
    },
    /// This node's copy of a track it verifies against a peer.
    VerifyRead {
        track: TrackId,
    },
    /// A peer's verify request; `None` once that connection is gone.
    VerifyServe {
        peer: Option<NodeId>,
        track: TrackId,
        digest: [u8; 32],
    },
    Harden(HardenFor),
}

#[derive(Clone, Debug)]
pub(super) enum HardenFor {
    Scan(RangeId),
    HostFlush(HostIoId),
    ReplicaFlush {
        peer: NodeId,
        id: u64,
    },
    HostWrite(HostIoId),
    /// Hardening everything after losing a peer in `memory` mode.
    Degraded,
    /// The last resync copies from `peer` before this replica calls itself UpToDate.
    ResyncEnd(NodeId),
    /// Everything, before an orderly shutdown marks the metadata clean.
    Shutdown,
}

#[derive(Clone, Debug)]
pub(super) struct LocalWrite {
    pub extent: Extent,
    payload: Payload,
    fua: bool,
    after_meta: u64,
    issued: bool,
    pub origin: WriteFor,
}

#[derive(Default)]
pub(super) struct LocalIos {
    /// Admitted writes, issued or held by a gate, in admission order.
    pub writes: BTreeMap<IoId, LocalWrite>,
    others: BTreeMap<IoId, OtherFor>,
}

impl LocalIos {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.others.is_empty()
    }

    /// Admitted writes (issued or not) touching `extent`.
    pub fn writes_touching(&self, extent: Extent) -> Vec<IoId> {
        self.writes.iter().filter(|(_, w)| overlaps(w.extent, extent)).map(|(&io, _)| io).collect()
    }

    /// Resync reads in flight for a peer.
    pub fn forget_peer(&mut self, peer: NodeId) {
        self.others.retain(|_, o| !matches!(o, OtherFor::ResyncRead { peer: p, .. } if *p == peer));
    }

    pub(super) fn retarget(&mut self, f: impl Fn(&OtherFor) -> Option<OtherFor>) {
        for o in self.others.values_mut() {
            if let Some(new) = f(o) {
                *o = new;
            }
        }
    }
}

fn overlaps(a: Extent, b: Extent) -> bool {
    a.offset < b.end() && b.offset < a.end()
}

impl Node {
    pub(super) fn admit_write(
        &mut self,
        extent: Extent,
        payload: Payload,
        fua: bool,
        after_meta: u64,
        origin: WriteFor,
    ) -> IoId {
        let io = self.alloc_io();
        self.local.writes.insert(io, LocalWrite { extent, payload, fua, after_meta, issued: false, origin });
        self.pump_writes();
        io
    }

    /// Issues every held write whose gates have opened.
    pub(super) fn pump_writes(&mut self) {
        let mut issue = Vec::new();
        let ios: Vec<IoId> = self.local.writes.keys().copied().collect();
        for (i, io) in ios.iter().enumerate() {
            let w = &self.local.writes[io];
            if w.issued || w.after_meta > self.meta_durable {
                continue;
            }
            let blocked = ios[..i].iter().any(|earlier| overlaps(self.local.writes[earlier].extent, w.extent));
            if !blocked {
                issue.push(*io);
            }
        }
        for io in issue {
            let w = self.local.writes.get_mut(&io).expect("admitted write");
            w.issued = true;
            let action = Action::WriteLocal { io, offset: w.extent.offset, payload: w.payload.clone(), fua: w.fua };
            self.emit(action);
        }
    }

    pub(super) fn read_local(&mut self, extent: Extent, why: OtherFor) -> IoId {
        let io = self.alloc_io();
        self.local.others.insert(io, why);
        self.emit(Action::ReadLocal { io, offset: extent.offset, len: extent.len });
        io
    }

    pub(super) fn harden(&mut self, scope: HardenScope, why: HardenFor) -> IoId {
        let io = self.alloc_io();
        if let HardenFor::Scan(r) = why {
            self.destage.scan_due[r as usize] = false;
        }
        self.local.others.insert(io, OtherFor::Harden(why));
        self.emit(Action::Harden { io, scope });
        io
    }

    pub(super) fn io_done(&mut self, io: IoId, result: Result<Option<Bytes>, IoError>) {
        if let Some((meta_io, version)) = self.meta_inflight {
            if meta_io == io {
                self.meta_inflight = None;
                match result {
                    Ok(_) => {
                        self.meta_durable = version;
                        self.meta_persisted();
                    }
                    Err(e) => self.disk_failed(format!("metadata write: {e}")),
                }
                self.flush_meta();
                return;
            }
        }
        if let Some(w) = self.local.writes.remove(&io) {
            match result {
                Ok(_) => {
                    // Even a FUA write needs a scan: only its DestageDone lets the peers
                    // forget the tracks, whatever hardened them.
                    let g = self.cfg.geometry;
                    if let Ok(span) = g.span(w.extent) {
                        for r in g.ranges_of(span) {
                            self.destage.scan_due[r as usize] = true;
                        }
                    }
                    self.write_done(io, w);
                }
                Err(e) => self.disk_failed(format!("write at {}: {e}", w.extent.offset)),
            }
            self.pump_writes();
            return;
        }
        let Some(other) = self.local.others.remove(&io) else {
            return;
        };
        let data = match result {
            Ok(data) => data,
            Err(e) => return self.disk_failed(format!("{other:?}: {e}")),
        };
        match other {
            OtherFor::ResyncRead { peer, track } => self.resync_read_done(peer, track, io, data.unwrap_or_default()),
            OtherFor::VerifyRead { track } => self.verify_read_done(track, io, data.unwrap_or_default()),
            OtherFor::VerifyServe { peer, track, digest } => {
                self.verify_serve_done(peer, track, digest, data.unwrap_or_default())
            }
            OtherFor::Harden(why) => self.harden_done(why),
        }
    }

    fn write_done(&mut self, io: IoId, w: LocalWrite) {
        self.scan_write_done(io);
        match w.origin {
            WriteFor::Host(id) => self.host_local_done(id, w.fua),
            WriteFor::Replica { peer, id, fua } => self.replica_write_done(peer, id, fua),
            WriteFor::Resync { peer, track } => self.resync_write_done(peer, track),
            WriteFor::Orphan => {}
        }
    }

    fn harden_done(&mut self, why: HardenFor) {
        match why {
            HardenFor::Scan(range) => self.scan_hardened(range),
            HardenFor::HostFlush(id) => self.host_flush_local_done(id),
            HardenFor::ReplicaFlush { peer, id } => {
                if self.peers.get(&peer).is_some_and(|p| super::is_replicating(p.conn)) {
                    self.send(peer, crate::wire::Message::FlushAck { id });
                }
            }
            HardenFor::HostWrite(id) => self.host_local_hardened(id),
            HardenFor::ResyncEnd(peer) => self.resync_hardened(peer),
            HardenFor::Shutdown => self.shutdown_hardened(),
            HardenFor::Degraded => {}
        }
    }

    /// Metadata reached stable storage: writes waiting for it may go.
    fn meta_persisted(&mut self) {
        self.pump_writes();
        self.host_meta_durable();
    }
}
