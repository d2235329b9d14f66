//! Seed 003 Fig. 5: the destage scan.
//!
//! The hardener announces a scan of the range (`DestageStart`); the recorder saves its
//! current bitmap as old and marks later writes in a fresh current (`DestageAck`). The
//! hardener then destages every track of the range its cache holds and reports
//! `DestageDone`, and the recorder clears old. The hardener keeps no bitmap at all.

use super::{check_range, Flaw, Flaws, RecordToggle, ToggleError, ToggleMsg};
use crate::bitmap::DirtyMap;
use crate::geometry::{RangeId, TrackId};

/// The recorder of one range, for the destage scan and for its selective variant (the
/// recorder cannot tell them apart).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorder {
    toggle: RecordToggle,
    flaws: Flaws,
}

impl Recorder {
    pub fn new(range: RangeId) -> Self {
        Recorder { toggle: RecordToggle::new(range), flaws: Flaws::default() }
    }

    #[cfg(test)]
    fn with_flaw(range: RangeId, flaw: Flaw) -> Self {
        Recorder { toggle: RecordToggle::new(range), flaws: Flaws(Some(flaw)) }
    }

    pub fn range(&self) -> RangeId {
        self.toggle.range
    }

    /// A write to `track` (in this range): a primary recorder calls this before the data
    /// leaves for the hardener, a secondary recorder when the data arrives.
    pub fn on_write(&self, record: &mut DirtyMap, track: TrackId) {
        self.toggle.mark(record, track);
    }

    /// Handles `DestageStart` (answered with `DestageAck`) and `DestageDone`.
    pub fn on_message(&mut self, record: &mut DirtyMap, msg: ToggleMsg) -> Result<Option<ToggleMsg>, ToggleError> {
        check_range(self.range(), msg)?;
        match msg {
            ToggleMsg::DestageStart { range } => {
                self.toggle.toggle(record);
                if self.flaws.has(Flaw::RecorderClearsOnStart) {
                    record.clear_old(range);
                }
                Ok(Some(ToggleMsg::DestageAck { range }))
            }
            ToggleMsg::DestageDone { .. } => {
                self.toggle.clear_old(record, msg)?;
                Ok(None)
            }
            _ => Err(ToggleError::unexpected(msg, "running the destage scan method")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    /// `DestageStart` sent; destaging before the ack could miss data the recorder has
    /// already moved to old but that is still in flight to us.
    AwaitingAck,
    Scanning,
}

/// The hardener of one range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hardener {
    range: RangeId,
    phase: Phase,
}

impl Hardener {
    pub fn new(range: RangeId) -> Self {
        Hardener { range, phase: Phase::Idle }
    }

    pub fn range(&self) -> RangeId {
        self.range
    }

    /// Begins a destage scan (on a timer, or when the range holds too much unhardened
    /// data); `None` while a scan is already under way.
    pub fn start(&mut self) -> Option<ToggleMsg> {
        if self.phase != Phase::Idle {
            return None;
        }
        self.phase = Phase::AwaitingAck;
        Some(ToggleMsg::DestageStart { range: self.range })
    }

    /// Handles `DestageAck`: from now on [`is_scanning`](Self::is_scanning) tells the cache
    /// to destage the range.
    pub fn on_message(&mut self, msg: ToggleMsg) -> Result<Option<ToggleMsg>, ToggleError> {
        check_range(self.range, msg)?;
        match (msg, self.phase) {
            (ToggleMsg::DestageAck { .. }, Phase::AwaitingAck) => {
                self.phase = Phase::Scanning;
                Ok(None)
            }
            (ToggleMsg::DestageAck { .. }, _) => Err(ToggleError::unexpected(msg, "no destage start is waiting")),
            _ => Err(ToggleError::unexpected(msg, "running the destage scan method")),
        }
    }

    /// The cache must now destage every track of the range it held when the ack arrived
    /// (later writes are in the recorder's new current bitmap and may wait).
    pub fn is_scanning(&self) -> bool {
        self.phase == Phase::Scanning
    }

    /// Reports that the scan destaged the whole range; returns `DestageDone`. `None` when
    /// no acknowledged scan was running: hardening done before the ack proves nothing about
    /// data still in flight, so it must not clear the record.
    pub fn harden_range(&mut self) -> Option<ToggleMsg> {
        if self.phase != Phase::Scanning {
            return None;
        }
        self.phase = Phase::Idle;
        Some(ToggleMsg::DestageDone { range: self.range })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Geometry;
    use crate::toggle::model::{self, Pair, Setup};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    struct Destage {
        record: DirtyMap,
        recorder: Recorder,
        hardener: Hardener,
        /// What the running scan must still destage: the cache's unhardened tracks when the
        /// ack arrived, less those hardened since.
        scan: Option<BTreeSet<TrackId>>,
    }

    impl Destage {
        fn new(setup: &Setup, flawed: bool) -> Self {
            let recorder = match flawed {
                false => Recorder::new(setup.range),
                true => Recorder::with_flaw(setup.range, Flaw::RecorderClearsOnStart),
            };
            Destage {
                record: DirtyMap::new(setup.geometry),
                recorder,
                hardener: Hardener::new(setup.range),
                scan: None,
            }
        }
    }

    impl Pair for Destage {
        fn record(&self) -> &DirtyMap {
            &self.record
        }

        fn record_write(&mut self, track: TrackId) {
            self.recorder.on_write(&mut self.record, track);
        }

        fn cache_write(&mut self, _: TrackId) -> Option<ToggleMsg> {
            None
        }

        fn to_recorder(&mut self, msg: ToggleMsg) -> Result<Option<ToggleMsg>, ToggleError> {
            self.recorder.on_message(&mut self.record, msg)
        }

        fn to_hardener(
            &mut self,
            msg: ToggleMsg,
            unhardened: &BTreeSet<TrackId>,
        ) -> Result<Option<ToggleMsg>, ToggleError> {
            let out = self.hardener.on_message(msg)?;
            if self.hardener.is_scanning() && self.scan.is_none() {
                self.scan = Some(unhardened.clone());
            }
            Ok(out)
        }

        fn start(&mut self) -> Option<ToggleMsg> {
            self.hardener.start()
        }

        fn hardened(&mut self, track: TrackId) -> Option<ToggleMsg> {
            if let Some(scan) = &mut self.scan {
                scan.remove(&track);
            }
            None
        }

        fn scan(&self) -> Option<Vec<TrackId>> {
            self.scan.as_ref().map(|s| s.iter().copied().collect())
        }

        fn finish_scan(&mut self) -> Option<ToggleMsg> {
            self.scan = None;
            self.hardener.harden_range()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn record_covers_the_unhardened_tracks_and_clears((setup, ops) in model::scenario()) {
            model::check(Destage::new(&setup, false), &setup, &ops)?;
        }
    }

    #[test]
    fn the_checks_catch_a_recorder_that_clears_on_start() {
        let failure = model::find_failure(|setup| Destage::new(setup, true));
        assert!(failure.is_some(), "the model did not catch a recorder clearing old on DestageStart");
    }

    #[test]
    fn one_scan_at_a_time_and_done_only_after_ack() {
        let mut h = Hardener::new(2);
        assert_eq!(h.harden_range(), None);
        assert_eq!(h.start(), Some(ToggleMsg::DestageStart { range: 2 }));
        assert_eq!(h.start(), None);
        assert_eq!(h.harden_range(), None, "hardening before the ack proves nothing");
        assert_eq!(h.on_message(ToggleMsg::DestageAck { range: 2 }), Ok(None));
        assert!(h.is_scanning());
        assert!(matches!(h.on_message(ToggleMsg::DestageAck { range: 2 }), Err(ToggleError::Unexpected { .. })));
        assert_eq!(h.harden_range(), Some(ToggleMsg::DestageDone { range: 2 }));
        assert!(!h.is_scanning());
        assert!(matches!(h.on_message(ToggleMsg::DestageAck { range: 3 }), Err(ToggleError::WrongRange { .. })));
    }

    #[test]
    fn recorder_ignores_a_done_without_a_start() {
        let mut record = DirtyMap::new(Geometry::new(8 * 4096, 512, 4096, 4).unwrap());
        let mut r = Recorder::new(1);
        r.on_write(&mut record, 5);
        record.toggle(1);
        let done = ToggleMsg::DestageDone { range: 1 };
        assert!(matches!(r.on_message(&mut record, done), Err(ToggleError::Unexpected { .. })));
        assert!(record.is_marked_old(5), "a stray done must not clear the record");
        assert!(matches!(
            r.on_message(&mut record, ToggleMsg::ClearOld { range: 1 }),
            Err(ToggleError::Unexpected { .. })
        ));
        assert_eq!(
            r.on_message(&mut record, ToggleMsg::DestageStart { range: 1 }),
            Ok(Some(ToggleMsg::DestageAck { range: 1 }))
        );
        r.on_write(&mut record, 6);
        assert!(record.is_marked_old(5) && record.is_marked_current(6));
        assert_eq!(r.on_message(&mut record, done), Ok(None));
        assert_eq!(record.union_tracks().collect::<Vec<_>>(), vec![6]);
    }
}
