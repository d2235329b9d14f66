//! Toggling the record (seed 003): how a node learns that its peer hardened what it cached,
//! so that it may forget those tracks.
//!
//! Each method is a pair of state machines for one range:
//! - the **hardener** is the node whose volatile cache holds data it has not hardened yet
//!   (typically the secondary, hardening what the primary shipped to it);
//! - the **recorder** keeps the record ([`DirtyMap`](crate::bitmap::DirtyMap)) of the tracks
//!   the hardener may not have hardened: the union of the range's current and old bitmap.
//!
//! The recorder's safety rule is the same in every method: the record is a superset of the
//! hardener's unhardened tracks, at every instant. Writes mark the current bitmap; a toggle
//! turns current into old; only a message proving that everything the old bitmap covers is
//! hardened (or marked again in current) clears old.
//!
//! Methods:
//! - [`destage`]: seed Fig. 5, the destage scan hardens the whole range between
//!   `DestageStart`/`DestageAck` and `DestageDone`.
//! - [`counter`]: seed Fig. 6, the hardener keeps a mirror of the record and counters, hardens
//!   tracks in any order and asks for `ClearOld` once every old track is accounted for.
//! - [`selective`]: Fig. 5 with the mirror, hardening only old tracks still unhardened.
//!
//! All of them assume one FIFO link per direction that carries the write data and these
//! messages in the order they were sent: a toggle takes effect at the same point of the data
//! stream on both sides only because the acknowledgment (or notice) follows the data sent
//! before it. The daemon must therefore send a range's toggle messages on the connection
//! that carries that range's data, after the data frames sent before them. After a
//! reconnect, machines are built afresh (the records are exchanged then).
//!
//! A machine is told only about tracks of its own range: the caller routes each track with
//! [`Geometry::range_of`]; a track from elsewhere is a bug in the caller and panics.

pub mod counter;
pub mod destage;
pub mod selective;

#[cfg(test)]
mod model;

use crate::bitmap::{DirtyMap, RangePair};
use crate::geometry::{Geometry, RangeId, TrackId};
use crate::wire::Message;
use bitvec::prelude::{BitSlice, Lsb0};
use thiserror::Error;

/// The messages of the toggling methods; the same names as in [`Message`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ToggleMsg {
    /// Fig. 5: the hardener is about to destage the range; toggle its record.
    DestageStart { range: RangeId },
    /// Fig. 5: the record of the range was toggled.
    DestageAck { range: RangeId },
    /// Fig. 5: the range is hardened; clear its old bitmap.
    DestageDone { range: RangeId },
    /// Fig. 6: the hardener switches to a new bitmap for the range.
    ToggleNotice { range: RangeId },
    /// Fig. 6: the record of the range was toggled.
    ToggleAck { range: RangeId },
    /// Fig. 6: counter M reached zero; clear the old bitmap of the range.
    ClearOld { range: RangeId },
}

impl ToggleMsg {
    pub fn range(&self) -> RangeId {
        match *self {
            ToggleMsg::DestageStart { range }
            | ToggleMsg::DestageAck { range }
            | ToggleMsg::DestageDone { range }
            | ToggleMsg::ToggleNotice { range }
            | ToggleMsg::ToggleAck { range }
            | ToggleMsg::ClearOld { range } => range,
        }
    }

    pub fn name(&self) -> &'static str {
        Message::from(*self).name()
    }

    /// The toggle message a wire message carries, if it is one.
    pub fn from_wire(msg: &Message) -> Option<ToggleMsg> {
        Some(match *msg {
            Message::DestageStart { range } => ToggleMsg::DestageStart { range },
            Message::DestageAck { range } => ToggleMsg::DestageAck { range },
            Message::DestageDone { range } => ToggleMsg::DestageDone { range },
            Message::ToggleNotice { range } => ToggleMsg::ToggleNotice { range },
            Message::ToggleAck { range } => ToggleMsg::ToggleAck { range },
            Message::ClearOld { range } => ToggleMsg::ClearOld { range },
            _ => return None,
        })
    }
}

impl From<ToggleMsg> for Message {
    fn from(msg: ToggleMsg) -> Message {
        match msg {
            ToggleMsg::DestageStart { range } => Message::DestageStart { range },
            ToggleMsg::DestageAck { range } => Message::DestageAck { range },
            ToggleMsg::DestageDone { range } => Message::DestageDone { range },
            ToggleMsg::ToggleNotice { range } => Message::ToggleNotice { range },
            ToggleMsg::ToggleAck { range } => Message::ToggleAck { range },
            ToggleMsg::ClearOld { range } => Message::ClearOld { range },
        }
    }
}

/// A message a machine cannot act on. The machine's state is unchanged, which is always
/// safe: the record stays a superset, at worst a larger one.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ToggleError {
    #[error("{msg} for range {got} reached the toggle machine of range {expected}")]
    WrongRange { msg: &'static str, expected: RangeId, got: RangeId },
    #[error("{msg} for range {range} is not expected while {state}")]
    Unexpected { msg: &'static str, range: RangeId, state: &'static str },
}

impl ToggleError {
    fn unexpected(msg: ToggleMsg, state: &'static str) -> Self {
        ToggleError::Unexpected { msg: msg.name(), range: msg.range(), state }
    }
}

fn check_range(expected: RangeId, msg: ToggleMsg) -> Result<(), ToggleError> {
    if msg.range() != expected {
        return Err(ToggleError::WrongRange { msg: msg.name(), expected, got: msg.range() });
    }
    Ok(())
}

/// Deliberate protocol mistakes a test can switch on, to prove that the model's checks do
/// fail when a method is wrong. Outside tests no machine can carry one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum Flaw {
    /// Fig. 5: the recorder clears old on `DestageStart` instead of `DestageDone`.
    RecorderClearsOnStart,
    /// Fig. 6 read literally: a write to an old track decrements M but leaves the old mirror
    /// bit set, so a second write after hardening decrements M again.
    DecrementKeepsOldBit,
    /// Fig. 6: the hardener toggles its mirror when sending the notice, not on the ack.
    MirrorTogglesOnNotice,
    /// Selective: the hardener toggles its mirror when sending the start, not on the ack.
    MirrorTogglesOnStart,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Flaws(#[cfg(test)] Option<Flaw>);

impl Flaws {
    #[cfg(test)]
    fn has(self, flaw: Flaw) -> bool {
        self.0 == Some(flaw)
    }

    #[cfg(not(test))]
    fn has(self, _: Flaw) -> bool {
        false
    }
}

/// The recorder's half, common to every method: toggle on the hardener's first message,
/// clear old on its last. Only the message names differ between methods.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RecordToggle {
    range: RangeId,
    /// Toggled, and the clear has not come yet.
    old_pending: bool,
}

impl RecordToggle {
    fn new(range: RangeId) -> Self {
        RecordToggle { range, old_pending: false }
    }

    fn mark(&self, record: &mut DirtyMap, track: TrackId) {
        debug_assert_eq!(record.geometry().range_of(track), self.range, "track {track} is not in this range");
        record.mark(track);
    }

    /// A second toggle before the clear (the hardener started over, e.g. after losing its
    /// state) is safe: [`DirtyMap::toggle`] keeps the uncleared old bits.
    fn toggle(&mut self, record: &mut DirtyMap) {
        record.toggle(self.range);
        self.old_pending = true;
    }

    fn clear_old(&mut self, record: &mut DirtyMap, msg: ToggleMsg) -> Result<(), ToggleError> {
        if !self.old_pending {
            return Err(ToggleError::unexpected(msg, "no toggle is waiting for a clear"));
        }
        record.clear_old(self.range);
        self.old_pending = false;
        Ok(())
    }
}

/// A bitmap pair private to a hardener: its mirror of the recorder's current and old bitmap
/// of one range, indexed by track within the range.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mirror {
    first: TrackId,
    pair: RangePair,
}

impl Mirror {
    fn new(geometry: &Geometry, range: RangeId) -> Self {
        let tracks = geometry.tracks_in_range(range);
        Mirror { first: tracks.start, pair: RangePair::new((tracks.end - tracks.start) as usize) }
    }

    fn index(&self, track: TrackId) -> usize {
        let i = track.checked_sub(self.first).map(|i| i as usize);
        match i {
            Some(i) if i < self.pair.len() => i,
            _ => panic!(
                "track {track} is outside this range's tracks {}..{}",
                self.first,
                self.first + self.pair.len() as u64
            ),
        }
    }

    fn in_current(&self, track: TrackId) -> bool {
        self.pair.current()[self.index(track)]
    }

    fn in_old(&self, track: TrackId) -> bool {
        self.pair.old()[self.index(track)]
    }

    fn set_current(&mut self, track: TrackId, value: bool) {
        let i = self.index(track);
        self.pair.set_current(i, value);
    }

    fn set_old(&mut self, track: TrackId, value: bool) {
        let i = self.index(track);
        self.pair.set_old(i, value);
    }

    /// Like the record's toggle, it keeps uncleared old bits rather than drop them.
    fn toggle(&mut self) {
        self.pair.toggle();
    }

    fn clear_old(&mut self) {
        self.pair.clear_old();
    }

    fn current(&self) -> &BitSlice<u64, Lsb0> {
        self.pair.current()
    }

    fn old(&self) -> &BitSlice<u64, Lsb0> {
        self.pair.old()
    }

    fn tracks<'a>(&self, bits: &'a BitSlice<u64, Lsb0>) -> impl Iterator<Item = TrackId> + 'a {
        let first = self.first;
        bits.iter_ones().map(move |i| first + i as u64)
    }
}
