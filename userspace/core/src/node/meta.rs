//! What a node keeps on stable storage besides the data: generations, role, disk state, the
//! clean-shutdown flag and the tracks written while a peer was absent.

use crate::bitmap::Bits;
use crate::geometry::{Geometry, TrackSpan};
use crate::types::{DiskState, GenId, Generations, Role};
use bitvec::prelude::*;

/// The persisted metadata of one replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub generations: Generations,
    pub role: Role,
    pub disk: DiskState,
    /// Cleared while the node runs, set on an orderly shutdown: finding it unset at start
    /// means the node crashed and lost its in-memory records and volatile cache.
    pub clean: bool,
    /// Crashed since the last completed resync (reported to peers as `crashed`).
    pub crashed: bool,
    /// Tracks written locally while some peer could not record them. In memory these are in
    /// the per-peer records; on disk they survive this node's own crash, which the peers'
    /// records cannot cover because the peers never saw the writes.
    pub out_of_sync: Bits,
    /// A resync target takes its source's generations when the resync starts; until it
    /// completes, these are the generations of the data it really holds. A forced
    /// promotion of a half-synced replica continues from them, so it never claims the
    /// source's lineage without the source's data.
    pub before_resync: Option<Generations>,
}

impl Meta {
    /// Metadata of a replica created from scratch. Nodes created together with the same
    /// `initial` generation and identical (e.g. zeroed) devices start in sync.
    pub fn fresh(geometry: &Geometry, initial: GenId) -> Self {
        Meta {
            generations: Generations::new(initial),
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            clean: true,
            crashed: false,
            out_of_sync: bitvec![u64, Lsb0; 0; geometry.track_count() as usize],
            before_resync: None,
        }
    }

    /// Adds a span to `out_of_sync`; true if it grew (and so must be persisted).
    pub(crate) fn mark_out_of_sync(&mut self, span: TrackSpan) -> bool {
        let mut grew = false;
        for t in span.tracks() {
            let t = t as usize;
            if !self.out_of_sync[t] {
                self.out_of_sync.set(t, true);
                grew = true;
            }
        }
        grew
    }
}
