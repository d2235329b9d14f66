//! Seed 003 Fig. 6: the counter method.
//!
//! The hardener keeps a mirror of the recorder's two bitmaps of the range and hardens
//! tracks one by one, in any order (least recently used, say), clearing their mirror bits
//! without telling the recorder. Counter N is the number of tracks marked in the new
//! (current) mirror, M the number still marked in the old one. From time to time the
//! hardener toggles (`ToggleNotice` / `ToggleAck`): old is locked with M := N, and N starts
//! over at zero. Each old track leaves M once, either hardened or written again (then the
//! recorder holds it in its current bitmap). When M reaches zero the old bitmap proves
//! nothing the record needs, and the hardener sends `ClearOld`.
//!
//! Where the seed is ambiguous this module takes the safe reading:
//! - A write to a track marked in old decrements M *and clears the old mirror bit*. The seed
//!   only says "decrements M"; leaving the bit set lets the same track decrement M again
//!   after it is hardened and written once more, so M reaches zero while other old tracks
//!   are still unhardened, and `ClearOld` drops them from the record. (A test shows it.)
//! - The hardener toggles its mirror when the ack arrives, not when it sends the notice:
//!   data the recorder marked before its toggle travels ahead of the ack, so it must land in
//!   the bitmap that becomes old. Toggling early would count it in N instead, and M could
//!   reach zero while it is unhardened. When the hardener is the node that receives host
//!   writes, toggling at the ack only makes old cover a few more tracks.
//! - A new toggle starts only after `ClearOld` went out, so the old bitmap on each side
//!   always corresponds to exactly one M.

use super::{check_range, Flaw, Flaws, Mirror, RecordToggle, ToggleError, ToggleMsg};
use crate::bitmap::DirtyMap;
use crate::geometry::{Geometry, RangeId, TrackId};

/// The recorder of one range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorder {
    toggle: RecordToggle,
}

impl Recorder {
    pub fn new(range: RangeId) -> Self {
        Recorder { toggle: RecordToggle::new(range) }
    }

    pub fn range(&self) -> RangeId {
        self.toggle.range
    }

    /// A write to `track` (in this range): a primary recorder calls this before the data
    /// leaves for the hardener, a secondary recorder when the data arrives.
    pub fn on_write(&self, record: &mut DirtyMap, track: TrackId) {
        self.toggle.mark(record, track);
    }

    /// Handles `ToggleNotice` (answered with `ToggleAck`) and `ClearOld`.
    pub fn on_message(&mut self, record: &mut DirtyMap, msg: ToggleMsg) -> Result<Option<ToggleMsg>, ToggleError> {
        check_range(self.range(), msg)?;
        match msg {
            ToggleMsg::ToggleNotice { range } => {
                self.toggle.toggle(record);
                Ok(Some(ToggleMsg::ToggleAck { range }))
            }
            ToggleMsg::ClearOld { .. } => {
                self.toggle.clear_old(record, msg)?;
                Ok(None)
            }
            _ => Err(ToggleError::unexpected(msg, "running the counter method")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The old mirror is clear (its `ClearOld` went out).
    Idle,
    AwaitingAck,
    /// Old is locked; M counts its tracks not yet hardened or written again.
    Draining,
}

/// The hardener of one range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hardener {
    range: RangeId,
    mirror: Mirror,
    /// N: tracks marked in the new (current) mirror.
    n: u64,
    /// M: tracks still marked in the old mirror.
    m: u64,
    phase: Phase,
    flaws: Flaws,
}

impl Hardener {
    pub fn new(geometry: &Geometry, range: RangeId) -> Self {
        Hardener {
            range,
            mirror: Mirror::new(geometry, range),
            n: 0,
            m: 0,
            phase: Phase::Idle,
            flaws: Flaws::default(),
        }
    }

    #[cfg(test)]
    fn with_flaw(geometry: &Geometry, range: RangeId, flaw: Flaw) -> Self {
        Hardener { flaws: Flaws(Some(flaw)), ..Hardener::new(geometry, range) }
    }

    pub fn range(&self) -> RangeId {
        self.range
    }

    /// Counter N: tracks marked in the new mirror bitmap.
    pub fn new_count(&self) -> u64 {
        self.n
    }

    /// Counter M: tracks of the locked old bitmap neither hardened nor written again.
    pub fn old_count(&self) -> u64 {
        self.m
    }

    /// The tracks this range's cache holds unhardened: the ones to harden.
    pub fn unhardened(&self) -> impl Iterator<Item = TrackId> + '_ {
        self.mirror.tracks(self.mirror.old()).chain(self.mirror.tracks(self.mirror.current()))
    }

    /// A write's data entered the cache. The message it may return (`ClearOld`) must go out
    /// after this write's data when this node is the one sending the data.
    pub fn on_write(&mut self, track: TrackId) -> Option<ToggleMsg> {
        if self.mirror.in_current(track) {
            return None;
        }
        self.mirror.set_current(track, true);
        self.n += 1;
        if !self.mirror.in_old(track) {
            return None;
        }
        // The recorder now holds the track in its current bitmap too, so old no longer has
        // to answer for it.
        if !self.flaws.has(Flaw::DecrementKeepsOldBit) {
            self.mirror.set_old(track, false);
        }
        self.decrement_m()
    }

    /// The cache hardened `track`. Nothing is sent unless that was the last old track.
    pub fn harden_track(&mut self, track: TrackId) -> Option<ToggleMsg> {
        if self.mirror.in_current(track) {
            // A track in the new bitmap left old (and M) when it was written.
            self.mirror.set_current(track, false);
            self.n -= 1;
            return None;
        }
        if self.mirror.in_old(track) {
            self.mirror.set_old(track, false);
            return self.decrement_m();
        }
        None
    }

    /// Announces a switch to a new bitmap; `None` until the previous old bitmap is cleared.
    pub fn start(&mut self) -> Option<ToggleMsg> {
        if self.phase != Phase::Idle {
            return None;
        }
        self.phase = Phase::AwaitingAck;
        if self.flaws.has(Flaw::MirrorTogglesOnNotice) {
            self.switch_mirror();
        }
        Some(ToggleMsg::ToggleNotice { range: self.range })
    }

    /// Handles `ToggleAck`: locks old, and answers `ClearOld` at once if nothing in it is
    /// left to harden.
    pub fn on_message(&mut self, msg: ToggleMsg) -> Result<Option<ToggleMsg>, ToggleError> {
        check_range(self.range, msg)?;
        match (msg, self.phase) {
            (ToggleMsg::ToggleAck { .. }, Phase::AwaitingAck) => {
                if !self.flaws.has(Flaw::MirrorTogglesOnNotice) {
                    self.switch_mirror();
                }
                self.phase = Phase::Draining;
                Ok(self.clear_old_if_drained())
            }
            (ToggleMsg::ToggleAck { .. }, _) => Err(ToggleError::unexpected(msg, "no toggle notice is waiting")),
            _ => Err(ToggleError::unexpected(msg, "running the counter method")),
        }
    }

    fn switch_mirror(&mut self) {
        self.mirror.toggle();
        self.m = self.n;
        self.n = 0;
    }

    fn decrement_m(&mut self) -> Option<ToggleMsg> {
        // Only the flawed variants can decrement past zero; saturating keeps them running
        // until the model's checks see the damage.
        self.m = self.m.saturating_sub(1);
        self.clear_old_if_drained()
    }

    fn clear_old_if_drained(&mut self) -> Option<ToggleMsg> {
        if self.phase != Phase::Draining || self.m != 0 {
            return None;
        }
        self.mirror.clear_old();
        self.phase = Phase::Idle;
        Some(ToggleMsg::ClearOld { range: self.range })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toggle::model::{self, Pair, Setup};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    struct Counter {
        record: DirtyMap,
        recorder: Recorder,
        hardener: Hardener,
        flawed: bool,
    }

    impl Counter {
        fn new(setup: &Setup, flaw: Option<Flaw>) -> Self {
            let hardener = match flaw {
                None => Hardener::new(&setup.geometry, setup.range),
                Some(f) => Hardener::with_flaw(&setup.geometry, setup.range, f),
            };
            let recorder = Recorder::new(setup.range);
            Counter { record: DirtyMap::new(setup.geometry), recorder, hardener, flawed: flaw.is_some() }
        }
    }

    impl Pair for Counter {
        fn record(&self) -> &DirtyMap {
            &self.record
        }

        fn record_write(&mut self, track: TrackId) {
            self.recorder.on_write(&mut self.record, track);
        }

        fn cache_write(&mut self, track: TrackId) -> Option<ToggleMsg> {
            self.hardener.on_write(track)
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
            None
        }

        fn finish_scan(&mut self) -> Option<ToggleMsg> {
            None
        }

        fn check(&self, unhardened: &BTreeSet<TrackId>) -> Result<(), String> {
            // A flawed hardener's counters drift by design: leave catching it to the
            // record check, which is what the flaw tests are about.
            if self.flawed {
                return Ok(());
            }
            let h = &self.hardener;
            let mirrored: BTreeSet<TrackId> = h.unhardened().collect();
            if &mirrored != unhardened {
                return Err(format!("mirror {mirrored:?} is not the cache's unhardened {unhardened:?}"));
            }
            let (n, m) = (h.mirror.current().count_ones() as u64, h.mirror.old().count_ones() as u64);
            if (h.n, h.m) != (n, m) {
                return Err(format!("counters N={} M={} but the mirror holds {n} new and {m} old", h.n, h.m));
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn record_covers_the_unhardened_tracks_and_clears((setup, ops) in model::scenario()) {
            model::check(Counter::new(&setup, None), &setup, &ops)?;
        }
    }

    #[test]
    fn the_checks_catch_the_literal_reading_of_the_seed() {
        let failure = model::find_failure(|setup| Counter::new(setup, Some(Flaw::DecrementKeepsOldBit)));
        let failure = failure.expect("the model did not catch M decremented twice for one old track");
        assert!(failure.contains("record misses"), "{failure}");
    }

    #[test]
    fn the_checks_catch_a_mirror_toggled_on_notice() {
        let failure = model::find_failure(|setup| Counter::new(setup, Some(Flaw::MirrorTogglesOnNotice)));
        let failure = failure.expect("the model did not catch a mirror toggled before the ack");
        assert!(failure.contains("record misses"), "{failure}");
    }

    /// The seed's steps 96-110 on a concrete history.
    #[test]
    fn counters_follow_the_flow_chart() {
        let g = Geometry::new(8 * 4096, 4096, 4096, 8).unwrap();
        let mut h = Hardener::new(&g, 0);
        for t in [1, 2, 3] {
            assert_eq!(h.on_write(t), None);
        }
        assert_eq!(h.on_write(2), None);
        assert_eq!(h.harden_track(3), None, "hardening is silent");
        assert_eq!((h.new_count(), h.old_count()), (2, 0));
        assert_eq!(h.start(), Some(ToggleMsg::ToggleNotice { range: 0 }));
        assert_eq!(h.start(), None);
        assert_eq!(h.on_write(4), None, "before the ack, writes still go to the bitmap becoming old");
        assert_eq!(h.on_message(ToggleMsg::ToggleAck { range: 0 }), Ok(None));
        assert_eq!((h.new_count(), h.old_count()), (0, 3));
        assert_eq!(h.on_write(1), None, "an old track written again leaves M");
        assert_eq!((h.new_count(), h.old_count()), (1, 2));
        assert_eq!(h.harden_track(1), None);
        assert_eq!(h.on_write(1), None, "and only once");
        assert_eq!((h.new_count(), h.old_count()), (1, 2));
        assert_eq!(h.harden_track(2), None);
        assert_eq!(h.start(), None, "old is still locked");
        assert_eq!(h.harden_track(4), Some(ToggleMsg::ClearOld { range: 0 }));
        assert_eq!((h.new_count(), h.old_count()), (1, 0));
        assert_eq!(h.unhardened().collect::<Vec<_>>(), vec![1]);
        assert_eq!(h.start(), Some(ToggleMsg::ToggleNotice { range: 0 }));
        assert_eq!(h.harden_track(1), None);
        assert_eq!(h.on_message(ToggleMsg::ToggleAck { range: 0 }), Ok(Some(ToggleMsg::ClearOld { range: 0 })));
    }

    #[test]
    fn recorder_toggles_on_notice_and_clears_on_clear_old() {
        let g = Geometry::new(8 * 4096, 4096, 4096, 4).unwrap();
        let mut record = DirtyMap::new(g);
        let mut r = Recorder::new(1);
        r.on_write(&mut record, 5);
        let notice = ToggleMsg::ToggleNotice { range: 1 };
        assert_eq!(r.on_message(&mut record, notice), Ok(Some(ToggleMsg::ToggleAck { range: 1 })));
        r.on_write(&mut record, 6);
        assert!(matches!(
            r.on_message(&mut record, ToggleMsg::DestageDone { range: 1 }),
            Err(ToggleError::Unexpected { .. })
        ));
        assert!(matches!(
            r.on_message(&mut record, ToggleMsg::ClearOld { range: 0 }),
            Err(ToggleError::WrongRange { .. })
        ));
        assert_eq!(record.union_tracks().collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(r.on_message(&mut record, ToggleMsg::ClearOld { range: 1 }), Ok(None));
        assert_eq!(record.union_tracks().collect::<Vec<_>>(), vec![6]);
    }
}
