//! Dirty-track bitmaps: per range a pair of bitmaps whose roles (current / old) toggle.
//!
//! New marks go to the current bitmap. A toggle turns current into old and starts an empty
//! current; clearing old forgets what the peer has since hardened. The union (current ∪ old)
//! is the record: every track the peer may hold differently.

use crate::geometry::{Geometry, GeometryError, RangeId, TrackId, TrackSpan};
use bitvec::prelude::*;

pub type Bits = BitVec<u64, Lsb0>;

/// The two bitmaps of one range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangePair {
    bits: [Bits; 2],
    current: usize,
}

impl RangePair {
    pub(crate) fn new(tracks: usize) -> Self {
        RangePair { bits: [bitvec![u64, Lsb0; 0; tracks], bitvec![u64, Lsb0; 0; tracks]], current: 0 }
    }

    pub fn current(&self) -> &BitSlice<u64, Lsb0> {
        &self.bits[self.current]
    }

    pub fn old(&self) -> &BitSlice<u64, Lsb0> {
        &self.bits[1 - self.current]
    }

    /// Which of the two bitmaps is current (0 or 1): part of the persisted layout.
    pub fn current_index(&self) -> usize {
        self.current
    }

    pub(crate) fn from_parts(bits: [Bits; 2], current: usize) -> Self {
        RangePair { bits, current }
    }

    pub(crate) fn parts(&self) -> &[Bits; 2] {
        &self.bits
    }

    /// Tracks in the range.
    pub fn len(&self) -> usize {
        self.bits[0].len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Current becomes old; an empty bitmap becomes current. Bits still in the previous old
    /// bitmap (its clear never came) move into the new old one instead of being dropped: a
    /// record may only ever over-approximate.
    pub(crate) fn toggle(&mut self) {
        let (cur, old) = (self.current, 1 - self.current);
        let leftover = std::mem::take(&mut self.bits[old]);
        self.bits[cur] |= &leftover;
        self.bits[old] = leftover;
        self.bits[old].fill(false);
        self.current = old;
    }

    pub(crate) fn clear_old(&mut self) {
        self.bits[1 - self.current].fill(false);
    }

    /// Sets bit `i` (a track's index within the range) of the current bitmap.
    pub(crate) fn set_current(&mut self, i: usize, value: bool) {
        self.bits[self.current].set(i, value);
    }

    pub(crate) fn set_old(&mut self, i: usize, value: bool) {
        self.bits[1 - self.current].set(i, value);
    }
}

/// A record: per-range current/old bitmap pairs over a whole volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyMap {
    geometry: Geometry,
    ranges: Vec<RangePair>,
}

impl DirtyMap {
    pub fn new(geometry: Geometry) -> Self {
        let ranges = (0..geometry.range_count()).map(|r| RangePair::new(geometry.tracks_in_range(r).count())).collect();
        DirtyMap { geometry, ranges }
    }

    pub(crate) fn from_ranges(geometry: Geometry, ranges: Vec<RangePair>) -> Self {
        DirtyMap { geometry, ranges }
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn ranges(&self) -> &[RangePair] {
        &self.ranges
    }

    fn locate(&self, track: TrackId) -> (usize, usize) {
        let tpr = u64::from(self.geometry.tracks_per_range());
        ((track / tpr) as usize, (track % tpr) as usize)
    }

    /// Marks a track in its range's current bitmap. Panics if the track is outside the
    /// volume: callers hold spans checked by [`Geometry::span`].
    pub fn mark(&mut self, track: TrackId) {
        let (r, i) = self.locate(track);
        self.ranges[r].set_current(i, true);
    }

    pub fn mark_span(&mut self, span: TrackSpan) {
        for t in span.tracks() {
            self.mark(t);
        }
    }

    /// Marks every track of the volume (a full resync).
    pub fn mark_all(&mut self) {
        for pair in &mut self.ranges {
            pair.bits[pair.current].fill(true);
        }
    }

    /// Current becomes old in one range (see [`RangePair::toggle`]).
    pub fn toggle(&mut self, range: RangeId) {
        self.ranges[range as usize].toggle();
    }

    /// Forgets the old bitmap of a range: the peer has hardened everything it recorded.
    pub fn clear_old(&mut self, range: RangeId) {
        self.ranges[range as usize].clear_old();
    }

    /// Clears a track in both bitmaps (it was copied to the peer and is known identical).
    pub fn clear_track(&mut self, track: TrackId) {
        let (r, i) = self.locate(track);
        for b in &mut self.ranges[r].bits {
            b.set(i, false);
        }
    }

    pub fn clear_all(&mut self) {
        for pair in &mut self.ranges {
            pair.bits[0].fill(false);
            pair.bits[1].fill(false);
        }
    }

    /// Marked in current ∪ old.
    pub fn is_marked(&self, track: TrackId) -> bool {
        let (r, i) = self.locate(track);
        let pair = &self.ranges[r];
        pair.bits[0][i] || pair.bits[1][i]
    }

    pub fn is_marked_current(&self, track: TrackId) -> bool {
        let (r, i) = self.locate(track);
        self.ranges[r].current()[i]
    }

    pub fn is_marked_old(&self, track: TrackId) -> bool {
        let (r, i) = self.locate(track);
        self.ranges[r].old()[i]
    }

    /// The union (current ∪ old) of one range, one bit per track of the range.
    pub fn range_union(&self, range: RangeId) -> Bits {
        let pair = &self.ranges[range as usize];
        let mut u = pair.bits[0].clone();
        u |= &pair.bits[1];
        u
    }

    /// Tracks marked in current ∪ old of one range.
    pub fn range_count(&self, range: RangeId) -> u64 {
        let pair = &self.ranges[range as usize];
        pair.bits[0].iter().zip(pair.bits[1].iter()).filter(|(a, b)| **a || **b).count() as u64
    }

    /// Tracks marked in current ∪ old over the volume.
    pub fn count(&self) -> u64 {
        (0..self.ranges.len() as RangeId).map(|r| self.range_count(r)).sum()
    }

    pub fn is_clean(&self) -> bool {
        self.ranges.iter().all(|p| p.bits[0].not_any() && p.bits[1].not_any())
    }

    /// Tracks marked in current ∪ old, in order.
    pub fn union_tracks(&self) -> impl Iterator<Item = TrackId> + '_ {
        let tpr = u64::from(self.geometry.tracks_per_range());
        self.ranges.iter().enumerate().flat_map(move |(r, pair)| {
            let base = r as u64 * tpr;
            pair.bits[0]
                .iter_ones()
                .chain(pair.bits[1].iter_ones().filter(|i| !pair.bits[0][*i]))
                .map(move |i| base + i as u64)
                .collect::<std::collections::BTreeSet<_>>()
        })
    }

    /// Maximal runs of tracks marked in current ∪ old, in order.
    pub fn union_runs(&self) -> impl Iterator<Item = TrackSpan> + '_ {
        let mut tracks = self.union_tracks().peekable();
        std::iter::from_fn(move || {
            let first = tracks.next()?;
            let mut count = 1;
            while tracks.peek() == Some(&(first + count)) {
                tracks.next();
                count += 1;
            }
            Some(TrackSpan::new(first, count))
        })
    }

    /// Marks into current every track another record holds in current ∪ old.
    pub fn merge(&mut self, other: &DirtyMap) -> Result<(), BitmapError> {
        if other.geometry != self.geometry {
            return Err(BitmapError::GeometryMismatch);
        }
        for (r, pair) in self.ranges.iter_mut().enumerate() {
            let cur = pair.current;
            pair.bits[cur] |= &other.ranges[r].bits[0];
            pair.bits[cur] |= &other.ranges[r].bits[1];
        }
        Ok(())
    }

    /// Marks into current the tracks set in `bits`, one bit per track of `range`
    /// (as produced by [`DirtyMap::range_union`], e.g. received from a peer).
    pub fn mark_range_bits(&mut self, range: RangeId, bits: &BitSlice<u64, Lsb0>) -> Result<(), BitmapError> {
        self.geometry.check_range(range)?;
        let pair = &mut self.ranges[range as usize];
        if bits.len() != pair.bits[0].len() {
            return Err(BitmapError::RangeLength { range, expected: pair.bits[0].len(), got: bits.len() });
        }
        let cur = pair.current;
        pair.bits[cur] |= bits;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BitmapError {
    #[error("records of different geometries cannot be combined")]
    GeometryMismatch,
    #[error("range {range} has {expected} tracks, got a bitmap of {got}")]
    RangeLength { range: RangeId, expected: usize, got: usize },
    #[error(transparent)]
    Geometry(#[from] GeometryError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> DirtyMap {
        DirtyMap::new(Geometry::new(4096 * 12, 512, 4096, 4).unwrap())
    }

    #[test]
    fn toggle_then_clear_old_keeps_new_marks() {
        let mut m = map();
        m.mark(1);
        m.mark(2);
        m.toggle(0);
        m.mark(2);
        m.mark(3);
        assert!(m.is_marked_old(1) && m.is_marked_old(2) && m.is_marked_current(2));
        m.clear_old(0);
        assert_eq!(m.union_tracks().collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn toggle_with_uncleared_old_keeps_it() {
        let mut m = map();
        m.mark(1);
        m.toggle(0);
        m.mark(2);
        m.toggle(0);
        assert!(m.is_marked_old(1) && m.is_marked_old(2));
        assert!(!m.is_marked_current(1));
    }

    #[test]
    fn runs_span_ranges() {
        let mut m = map();
        for t in [0, 3, 4, 5, 9, 10] {
            m.mark(t);
        }
        m.toggle(1);
        m.mark(6);
        let runs: Vec<_> = m.union_runs().collect();
        assert_eq!(runs, vec![TrackSpan::new(0, 1), TrackSpan::new(3, 4), TrackSpan::new(9, 2)]);
        assert_eq!(m.count(), 7);
    }
}
