//! Seed 003, selective hardening: Fig. 5's messages, but instead of destaging the whole
//! range the hardener hardens only the tracks marked both in its old mirror bitmap and in
//! its own set of unhardened cached tracks, then reports `DestageDone`.
//!
//! The mirror follows the recorder's bitmaps: marked on every write, toggled when
//! `DestageAck` arrives (for the same reason as in [`counter`](super::counter): data the
//! recorder marked before its toggle is ahead of the ack), old cleared with `DestageDone`.
//! Unlike Fig. 6 the mirror is not cleared by hardening; the cache set is what narrows the
//! work to tracks still unhardened.

use super::{check_range, Flaw, Flaws, Mirror, ToggleError, ToggleMsg};
use crate::bitmap::Bits;
use crate::geometry::{Geometry, RangeId, TrackId};

/// The recorder is Fig. 5's: it sees the same messages and cannot tell the difference.
pub use super::destage::Recorder;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    AwaitingAck,
    /// Hardening the tracks in `pending`.
    Hardening,
}

/// The hardener of one range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hardener {
    range: RangeId,
    mirror: Mirror,
    /// Tracks the cache holds and has not hardened, by index in the range.
    cached: Bits,
    /// During a scan: old mirror ∩ cached, less what was hardened since the ack.
    pending: Bits,
    phase: Phase,
    flaws: Flaws,
}

impl Hardener {
    pub fn new(geometry: &Geometry, range: RangeId) -> Self {
        let mirror = Mirror::new(geometry, range);
        let empty = Bits::repeat(false, mirror.current().len());
        Hardener { range, mirror, cached: empty.clone(), pending: empty, phase: Phase::Idle, flaws: Flaws::default() }
    }

    #[cfg(test)]
    fn with_flaw(geometry: &Geometry, range: RangeId, flaw: Flaw) -> Self {
        Hardener { flaws: Flaws(Some(flaw)), ..Hardener::new(geometry, range) }
    }

    pub fn range(&self) -> RangeId {
        self.range
    }

    /// A write's data entered the cache.
    pub fn on_write(&mut self, track: TrackId) {
        self.mirror.set_current(track, true);
        let i = self.mirror.index(track);
        self.cached.set(i, true);
    }

    /// The cache hardened `track`, as part of the scan or on its own initiative. Returns
    /// `DestageDone` when that was the scan's last track.
    pub fn harden_track(&mut self, track: TrackId) -> Option<ToggleMsg> {
        let i = self.mirror.index(track);
        self.cached.set(i, false);
        if self.phase != Phase::Hardening {
            return None;
        }
        self.pending.set(i, false);
        self.done_if_hardened()
    }

    /// Begins a scan; `None` while one is under way.
    pub fn start(&mut self) -> Option<ToggleMsg> {
        if self.phase != Phase::Idle {
            return None;
        }
        self.phase = Phase::AwaitingAck;
        if self.flaws.has(Flaw::MirrorTogglesOnStart) {
            self.mirror.toggle();
        }
        Some(ToggleMsg::DestageStart { range: self.range })
    }

    /// Handles `DestageAck`: selects the tracks to harden, and answers `DestageDone` at once
    /// if there are none.
    pub fn on_message(&mut self, msg: ToggleMsg) -> Result<Option<ToggleMsg>, ToggleError> {
        check_range(self.range, msg)?;
        match (msg, self.phase) {
            (ToggleMsg::DestageAck { .. }, Phase::AwaitingAck) => {
                if !self.flaws.has(Flaw::MirrorTogglesOnStart) {
                    self.mirror.toggle();
                }
                self.pending.copy_from_bitslice(self.mirror.old());
                self.pending &= &self.cached;
                self.phase = Phase::Hardening;
                Ok(self.done_if_hardened())
            }
            (ToggleMsg::DestageAck { .. }, _) => Err(ToggleError::unexpected(msg, "no destage start is waiting")),
            _ => Err(ToggleError::unexpected(msg, "running the selective hardening method")),
        }
    }

    /// The tracks the running scan must still harden (none when no scan runs).
    pub fn pending(&self) -> impl Iterator<Item = TrackId> + '_ {
        let tracks = match self.phase {
            Phase::Hardening => Some(self.mirror.tracks(&self.pending)),
            _ => None,
        };
        tracks.into_iter().flatten()
    }

    pub fn is_hardening(&self) -> bool {
        self.phase == Phase::Hardening
    }

    fn done_if_hardened(&mut self) -> Option<ToggleMsg> {
        if self.pending.any() {
            return None;
        }
        self.mirror.clear_old();
        self.phase = Phase::Idle;
        Some(ToggleMsg::DestageDone { range: self.range })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::DirtyMap;
    use crate::toggle::model::{self, Pair, Setup};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    struct Selective {
        record: DirtyMap,
        recorder: Recorder,
        hardener: Hardener,
    }

    impl Selective {
        fn new(setup: &Setup, flawed: bool) -> Self {
            let hardener = match flawed {
                false => Hardener::new(&setup.geometry, setup.range),
                true => Hardener::with_flaw(&setup.geometry, setup.range, Flaw::MirrorTogglesOnStart),
            };
            Selective { record: DirtyMap::new(setup.geometry), recorder: Recorder::new(setup.range), hardener }
        }
    }

    impl Pair for Selective {
        fn record(&self) -> &DirtyMap {
            &self.record
        }

        fn record_write(&mut self, track: TrackId) {
            self.recorder.on_write(&mut self.record, track);
        }

        fn cache_write(&mut self, track: TrackId) -> Option<ToggleMsg> {
            self.hardener.on_write(track);
            None
        }

        fn to_recorder(&mut self, msg: ToggleMsg) -> Result<Option<ToggleMsg>, ToggleError> {
            self.recorder.on_message(&mut self.record, msg)
        }

        fn to_hardener(&mut self, msg: ToggleMsg, _: &BTreeSet<TrackId>) -> Result<Option<ToggleMsg>, ToggleError> {
            self.hardener.on_message(msg)
        }

        fn start(&mut self) -> Option<ToggleMsg> {
            self.hardener.start()
        }

        fn hardened(&mut self, track: TrackId) -> Option<ToggleMsg> {
            self.hardener.harden_track(track)
        }

        fn scan(&self) -> Option<Vec<TrackId>> {
            self.hardener.is_hardening().then(|| self.hardener.pending().collect())
        }

        fn finish_scan(&mut self) -> Option<ToggleMsg> {
            // The hardener reports `DestageDone` by itself with the last pending track.
            None
        }

        fn check(&self, unhardened: &BTreeSet<TrackId>) -> Result<(), String> {
            let h = &self.hardener;
            let cached: BTreeSet<TrackId> = h.mirror.tracks(&h.cached).collect();
            if &cached != unhardened {
                return Err(format!("cache set {cached:?} is not the cache's unhardened {unhardened:?}"));
            }
            let mirrored: BTreeSet<TrackId> =
                h.mirror.tracks(h.mirror.old()).chain(h.mirror.tracks(h.mirror.current())).collect();
            if !cached.is_subset(&mirrored) {
                return Err(format!("cache set {cached:?} is not within the mirror {mirrored:?}"));
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn record_covers_the_unhardened_tracks_and_clears((setup, ops) in model::scenario()) {
            model::check(Selective::new(&setup, false), &setup, &ops)?;
        }
    }

    #[test]
    fn the_checks_catch_a_mirror_toggled_on_start() {
        let failure = model::find_failure(|setup| Selective::new(setup, true));
        let failure = failure.expect("the model did not catch a mirror toggled before the ack");
        assert!(failure.contains("record misses"), "{failure}");
    }

    #[test]
    fn hardens_only_old_tracks_still_cached() {
        let g = Geometry::new(8 * 4096, 4096, 4096, 4).unwrap();
        let mut h = Hardener::new(&g, 1);
        for t in [4, 5, 6] {
            h.on_write(t);
        }
        assert_eq!(h.harden_track(5), None, "hardening outside a scan is silent");
        assert_eq!(h.start(), Some(ToggleMsg::DestageStart { range: 1 }));
        h.on_write(7); // ahead of the ack: the recorder marked it before toggling
        assert_eq!(h.on_message(ToggleMsg::DestageAck { range: 1 }), Ok(None));
        h.on_write(4); // after the ack: in the new bitmap, but 4 is still pending from old
        assert_eq!(h.pending().collect::<Vec<_>>(), vec![4, 6, 7]);
        assert_eq!(h.harden_track(6), None);
        assert_eq!(h.harden_track(4), None);
        assert_eq!(h.harden_track(7), Some(ToggleMsg::DestageDone { range: 1 }));
        assert_eq!(h.pending().count(), 0);
        assert_eq!(h.start(), Some(ToggleMsg::DestageStart { range: 1 }));
        assert_eq!(h.on_message(ToggleMsg::DestageAck { range: 1 }), Ok(Some(ToggleMsg::DestageDone { range: 1 })));
    }
}
