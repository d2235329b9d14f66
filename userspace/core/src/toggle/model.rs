//! A two-node model for the toggling methods' property tests.
//!
//! One range; a recorder and a hardener joined by one FIFO channel per direction, which
//! carries both the write data and the toggle messages (the ordering the methods rely on).
//! A random schedule interleaves writes, deliveries, hardening, scan steps and starts. The
//! model keeps its own ground truth of the hardener's cache, independent of the machines.
//!
//! Where a write comes from (the [`Origin`]):
//! - At the recorder (it is the primary; the hardener is the secondary hardening what it
//!   received, the seed's main case). The recorder marks the record before the data leaves
//!   (DESIGN invariant 2); the track becomes unhardened at the hardener when the data frame
//!   is delivered. Every unhardened track must be in the record.
//! - At the hardener (it is the primary; the secondary records what the primary may not
//!   have hardened: "the identical method may be used" in the other direction). The data
//!   enters the hardener's cache at once and reaches the recorder later; until then the host
//!   write is not acknowledged, and losing it with the hardener is allowed. So the tracks
//!   that must be in the record are those holding an acknowledged write, i.e. unhardened
//!   tracks whose data has been delivered to the recorder since it was last hardened.
//!
//! Checked after every step: those tracks ⊆ the record (current ∪ old) of the range, and the
//! machines' own consistency ([`Pair::check`]). At the end: deliver everything, harden
//! everything, run one more full cycle, and the range's record must be empty.

use super::{ToggleError, ToggleMsg};
use crate::bitmap::DirtyMap;
use crate::geometry::{Geometry, RangeId, TrackId};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use std::collections::{BTreeSet, VecDeque};

/// Both machines of one method, seen by the model. Messages a machine emits go to the peer.
pub(crate) trait Pair {
    fn record(&self) -> &DirtyMap;
    /// The recorder learns of a write.
    fn record_write(&mut self, track: TrackId);
    /// A write's data enters the hardener's cache.
    fn cache_write(&mut self, track: TrackId) -> Option<ToggleMsg>;
    fn to_recorder(&mut self, msg: ToggleMsg) -> Result<Option<ToggleMsg>, ToggleError>;
    /// `unhardened` is the cache's content, for methods whose scan depends on it.
    fn to_hardener(&mut self, msg: ToggleMsg, unhardened: &BTreeSet<TrackId>)
        -> Result<Option<ToggleMsg>, ToggleError>;
    fn start(&mut self) -> Option<ToggleMsg>;
    /// The hardener's cache hardened a track, by a scan or on its own initiative.
    fn hardened(&mut self, track: TrackId) -> Option<ToggleMsg>;
    /// The tracks a running scan still has to harden; `None` when no scan runs.
    fn scan(&self) -> Option<Vec<TrackId>>;
    /// Called when [`scan`](Self::scan) is empty.
    fn finish_scan(&mut self) -> Option<ToggleMsg>;
    /// The hardener's own view against the ground truth.
    fn check(&self, _unhardened: &BTreeSet<TrackId>) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    Recorder,
    Hardener,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Setup {
    pub geometry: Geometry,
    pub range: RangeId,
    pub origin: Origin,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    /// A host write to the range's track `n % tracks`.
    Write(u8),
    ToHardener,
    ToRecorder,
    /// The cache hardens its `n % len`-th unhardened track.
    Harden(u8),
    /// The running scan hardens its `n % len`-th remaining track, or finishes.
    Scan(u8),
    Start,
}

pub(crate) fn scenario() -> impl Strategy<Value = (Setup, Vec<Op>)> {
    let setup = (1u32..=6, 1u64..=3, any::<prop::sample::Index>(), any::<bool>(), any::<bool>()).prop_map(
        |(tracks_per_range, ranges, pick, short_last, from_recorder)| {
            let tracks = u64::from(tracks_per_range) * ranges - u64::from(short_last && tracks_per_range > 1);
            let geometry = Geometry::new(tracks * 4096, 4096, 4096, tracks_per_range).unwrap();
            let range = pick.index(geometry.range_count() as usize) as RangeId;
            let origin = if from_recorder { Origin::Recorder } else { Origin::Hardener };
            Setup { geometry, range, origin }
        },
    );
    let op = prop_oneof![
        4 => any::<u8>().prop_map(Op::Write),
        4 => Just(Op::ToHardener),
        4 => Just(Op::ToRecorder),
        2 => any::<u8>().prop_map(Op::Harden),
        3 => any::<u8>().prop_map(Op::Scan),
        1 => Just(Op::Start),
    ];
    (setup, proptest::collection::vec(op, 0..160))
}

#[derive(Clone, Copy, Debug)]
enum Frame {
    Data(TrackId),
    Msg(ToggleMsg),
}

struct World<P> {
    pair: P,
    setup: Setup,
    to_hardener: VecDeque<Frame>,
    to_recorder: VecDeque<Frame>,
    /// Tracks the hardener's cache holds and has not hardened.
    unhardened: BTreeSet<TrackId>,
    /// Unhardened tracks holding an acknowledged write: these must be in the record.
    acknowledged: BTreeSet<TrackId>,
}

impl<P: Pair> World<P> {
    fn step(&mut self, op: Op) -> Result<(), String> {
        let tracks = self.setup.geometry.tracks_in_range(self.setup.range);
        match op {
            Op::Write(n) => {
                let track = tracks.start + u64::from(n) % (tracks.end - tracks.start);
                match self.setup.origin {
                    Origin::Recorder => {
                        self.pair.record_write(track);
                        self.to_hardener.push_back(Frame::Data(track));
                    }
                    Origin::Hardener => {
                        self.unhardened.insert(track);
                        // The data leaves before any message the write triggers, so the
                        // recorder marks the track before it may clear its old bitmap.
                        self.to_recorder.push_back(Frame::Data(track));
                        let out = self.pair.cache_write(track);
                        self.send_to_recorder(out);
                    }
                }
            }
            Op::ToHardener => match self.to_hardener.pop_front() {
                Some(Frame::Data(track)) => {
                    // The secondary acknowledges once the data is in its cache.
                    self.unhardened.insert(track);
                    self.acknowledged.insert(track);
                    let out = self.pair.cache_write(track);
                    self.send_to_recorder(out);
                }
                Some(Frame::Msg(msg)) => {
                    let out = self.pair.to_hardener(msg, &self.unhardened).map_err(|e| e.to_string())?;
                    self.send_to_recorder(out);
                }
                None => {}
            },
            Op::ToRecorder => match self.to_recorder.pop_front() {
                Some(Frame::Data(track)) => {
                    self.pair.record_write(track);
                    if self.unhardened.contains(&track) {
                        self.acknowledged.insert(track);
                    }
                }
                Some(Frame::Msg(msg)) => {
                    if let Some(out) = self.pair.to_recorder(msg).map_err(|e| e.to_string())? {
                        self.to_hardener.push_back(Frame::Msg(out));
                    }
                }
                None => {}
            },
            Op::Harden(n) => {
                if !self.unhardened.is_empty() {
                    let track = *self.unhardened.iter().nth(usize::from(n) % self.unhardened.len()).unwrap();
                    self.harden(track);
                }
            }
            Op::Scan(n) => match self.pair.scan() {
                Some(todo) if todo.is_empty() => {
                    let out = self.pair.finish_scan();
                    self.send_to_recorder(out);
                }
                Some(todo) => self.harden(todo[usize::from(n) % todo.len()]),
                None => {}
            },
            Op::Start => {
                let out = self.pair.start();
                self.send_to_recorder(out);
            }
        }
        self.check()
    }

    fn harden(&mut self, track: TrackId) {
        self.unhardened.remove(&track);
        self.acknowledged.remove(&track);
        let out = self.pair.hardened(track);
        self.send_to_recorder(out);
    }

    fn send_to_recorder(&mut self, msg: Option<ToggleMsg>) {
        self.to_recorder.extend(msg.map(Frame::Msg));
    }

    fn check(&self) -> Result<(), String> {
        let record = self.pair.record();
        let missed: Vec<_> = self.acknowledged.iter().filter(|t| !record.is_marked(**t)).collect();
        if !missed.is_empty() {
            return Err(format!("record misses unhardened tracks {missed:?}"));
        }
        self.pair.check(&self.unhardened)
    }

    /// Delivers everything and hardens everything, as the schedule allows no other choice.
    fn quiesce(&mut self) -> Result<(), String> {
        for _ in 0..10_000 {
            let op = if !self.to_hardener.is_empty() {
                Op::ToHardener
            } else if !self.to_recorder.is_empty() {
                Op::ToRecorder
            } else if self.pair.scan().is_some() {
                Op::Scan(0)
            } else if !self.unhardened.is_empty() {
                Op::Harden(0)
            } else {
                return Ok(());
            };
            self.step(op)?;
        }
        Err("the model did not quiesce".into())
    }
}

/// Runs a schedule, then checks that a quiet period and one more cycle empty the record.
pub(crate) fn check<P: Pair>(pair: P, setup: &Setup, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut world = World {
        pair,
        setup: *setup,
        to_hardener: VecDeque::new(),
        to_recorder: VecDeque::new(),
        unhardened: BTreeSet::new(),
        acknowledged: BTreeSet::new(),
    };
    for (i, op) in ops.iter().enumerate() {
        world.step(*op).map_err(|e| TestCaseError::fail(format!("after step {i} ({op:?}): {e}")))?;
    }
    world.quiesce().map_err(|e| TestCaseError::fail(format!("while quiescing: {e}")))?;
    let start = world.pair.start();
    prop_assert!(start.is_some(), "a quiet hardener refuses to start a cycle");
    world.send_to_recorder(start);
    world.quiesce().map_err(|e| TestCaseError::fail(format!("during the last cycle: {e}")))?;
    let left = world.pair.record().range_count(setup.range);
    prop_assert_eq!(left, 0, "the record still holds {} tracks after a full cycle", left);
    Ok(())
}

/// Runs [`check`] on machines from `make` over a fixed-seed sample of schedules; the failure
/// found, if any. Proves that a deliberately broken method fails the property.
pub(crate) fn find_failure<P: Pair>(make: impl Fn(&Setup) -> P) -> Option<String> {
    let config = Config { cases: 2000, failure_persistence: None, max_shrink_iters: 200, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    match runner.run(&scenario(), |(setup, ops)| check(make(&setup), &setup, &ops)) {
        Ok(()) => None,
        Err(TestError::Fail(why, (setup, ops))) => Some(format!("{why}\n{setup:?}\n{ops:?}")),
        Err(TestError::Abort(why)) => panic!("the model aborted: {why}"),
    }
}
