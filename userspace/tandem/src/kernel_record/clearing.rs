//! [`Clearing`]: the node's driver of the clearing cycles, one bounded tick at a time, and
//! what it asks the core ([`core_holds`]).

use std::time::{Duration, Instant};

use tandem_bpf::{Flavor, Volume};
use tandem_core::node::Node;
use tandem_core::Geometry;

use super::{KernelRecord, KernelRecordError, TrackSet};
use crate::control::RecordView;

/// How often the daemon looks at its clearing cycles.
pub const TICK: Duration = Duration::from_millis(200);
/// While a cycle is under way: its toggle takes a grace period (10-40 ms) and its drain the
/// completion of a few writes, and the map should follow the core closely (what it still
/// holds after a crash is resynced).
pub const FAST_TICK: Duration = Duration::from_millis(20);
/// A range is cycled at most this often.
pub const CYCLE_INTERVAL: Duration = Duration::from_millis(200);
/// Ranges toggled per tick at most (each toggle waits for an RCU grace period on the helper
/// thread; a long queue would only delay the clears of the ranges already drained).
const TOGGLES_PER_TICK: usize = 16;

/// Whether the core still holds `track`: in some peer's record (current ∪ old), among a
/// resync's unconfirmed tracks, or in the persisted `out_of_sync`. A drained old track of the
/// map that it holds is marked again before the old side is cleared. Per track and cheap (no
/// listing of a full resync's million tracks while driving the node).
pub fn core_holds(node: &Node, track: u64) -> bool {
    node.meta().out_of_sync.get(track as usize).is_some_and(|b| *b)
        || node
            .config()
            .peers
            .iter()
            .any(|&peer| node.record(peer).is_some_and(|r| r.is_marked(track)) || node.resync_holds(peer, track))
}

/// The node's driver of the clearing cycles of a [`KernelRecord`].
///
/// Its work per tick is bounded, whatever the volume's size: `out_of_sync` is compared word by
/// word, and only ranges whose counters moved (new marks, a toggle) plus a few others in turn
/// ([`CHECKS_PER_TICK`]; a track the core stopped holding is noticed when its range's turn
/// comes) are read and judged track by track.
pub struct Clearing {
    record: KernelRecord,
    /// `out_of_sync` as marked into the map at the last tick.
    synced: TrackSet,
    next: Instant,
    last_cycle: Vec<Option<Instant>>,
    /// Per range: its counters (marks per side, toggles) when it was last judged to hold
    /// nothing clearable.
    seen: Vec<Option<(u64, u64, u32)>>,
    /// The next range whose turn it is to be judged even if its counters did not move.
    sweep: u32,
    cycles: u64,
    cleared: u64,
    /// The last error, logged once until it changes.
    last_error: Option<String>,
}

/// Ranges judged per tick at most (reading a range's maps and asking the core about each
/// marked track costs up to a millisecond for a range of 16384 tracks).
pub const CHECKS_PER_TICK: usize = 4;

impl Clearing {
    pub fn new(record: KernelRecord, geometry: &Geometry) -> Clearing {
        let ranges = record.range_count() as usize;
        Clearing {
            record,
            synced: TrackSet::new(geometry.track_count()),
            next: Instant::now(),
            last_cycle: vec![None; ranges],
            seen: vec![None; ranges],
            sweep: 0,
            cycles: 0,
            cleared: 0,
            last_error: None,
        }
    }

    /// When the next tick is due.
    pub fn due(&self) -> Instant {
        self.next
    }

    /// One tick, while driving the node; never blocks. Marks what is new in `out_of_sync`,
    /// advances every range's cycle, starts cycles of ranges whose map holds tracks the core no
    /// longer does.
    pub fn tick(&mut self, node: &Node) {
        let now = Instant::now();
        let result = self.step(node, now);
        let busy = (0..self.record.range_count()).any(|r| self.record.in_cycle(r));
        self.next = now + if busy { FAST_TICK } else { TICK };
        if let Err(e) = result {
            let text = e.to_string();
            if self.last_error.as_deref() != Some(text.as_str()) {
                tracing::warn!(error = %text, "kernel record");
                self.last_error = Some(text);
            }
        }
    }

    /// Marks the tracks that entered `out_of_sync` since the last tick. One that was there at
    /// the last tick is still in the map: only `finish` clears, and it keeps what the core
    /// holds.
    fn sync_out_of_sync(&mut self, node: &Node) -> Result<(), KernelRecordError> {
        let words = node.meta().out_of_sync.as_raw_slice();
        let tracks = node.meta().out_of_sync.len() as u64;
        for (i, synced) in self.synced.0.iter_mut().enumerate() {
            let mut word = words.get(i).copied().unwrap_or(0);
            let first = i as u64 * 64;
            if first + 64 > tracks {
                // Bits past the volume's end are not tracks.
                word &= (1u64 << (tracks.saturating_sub(first)).min(63)) - 1;
            }
            let mut new = word & !*synced;
            while new != 0 {
                let b = u64::from(new.trailing_zeros());
                new &= new - 1;
                self.record.mark(first + b)?;
            }
            *synced = word;
        }
        Ok(())
    }

    fn step(&mut self, node: &Node, now: Instant) -> Result<(), KernelRecordError> {
        self.sync_out_of_sync(node)?;
        self.record.collect_toggles()?;
        let ranges = self.record.range_count();
        for range in 0..ranges {
            // Clearing takes the maps' lock, which a toggle holds for its grace period: wait
            // for a tick without toggles instead of blocking.
            if !self.record.in_cycle(range) || self.record.toggling() {
                continue;
            }
            if self.record.poll_drained(range)?.is_some() {
                let done = self.record.finish(range, |t| core_holds(node, t))?;
                self.cycles += 1;
                self.cleared += done.cleared;
                self.seen[range as usize] = None;
                if done.cleared > 0 {
                    tracing::debug!(range, cleared = done.cleared, kept = done.kept, "cleared the kernel record");
                }
            }
        }
        // Which idle ranges to judge: those whose counters moved, then the next in turn.
        let mut checks = Vec::new();
        for range in 0..ranges {
            if checks.len() >= CHECKS_PER_TICK {
                break;
            }
            if self.record.in_cycle(range) {
                continue;
            }
            let counters = self.counters(range)?;
            if self.seen[range as usize] != Some(counters) {
                checks.push((range, counters));
            }
        }
        for _ in 0..ranges {
            if checks.len() >= CHECKS_PER_TICK {
                break;
            }
            let range = self.sweep;
            self.sweep = (self.sweep + 1) % ranges;
            if !self.record.in_cycle(range) && !checks.iter().any(|(r, _)| *r == range) {
                checks.push((range, self.counters(range)?));
                break;
            }
        }
        let mut toggles = 0;
        for (range, counters) in checks {
            let due = self.last_cycle[range as usize].is_none_or(|at| now.duration_since(at) >= CYCLE_INTERVAL);
            if !due || toggles >= TOGGLES_PER_TICK {
                continue;
            }
            let marked = self
                .record
                .volume()
                .range_tracks(range)
                .map_err(KernelRecordError::bpf(format!("reading range {range}")))?;
            let clearable = marked.current.iter().chain(&marked.old).any(|&t| !core_holds(node, t));
            if !clearable {
                self.seen[range as usize] = Some(counters);
            } else if self.record.begin(range)? {
                self.last_cycle[range as usize] = Some(now);
                self.seen[range as usize] = None;
                toggles += 1;
            }
        }
        self.last_error = None;
        Ok(())
    }

    /// A range's counters (marks per side, toggles): unchanged counters, an unchanged range.
    fn counters(&self, range: u32) -> Result<(u64, u64, u32), KernelRecordError> {
        let state = self
            .record
            .volume()
            .range_state(range)
            .map_err(KernelRecordError::bpf(format!("reading range {range}")))?;
        Ok((state.marked[0], state.marked[1], state.toggles))
    }

    pub fn view(&self) -> RecordView {
        let v = self.record.volume();
        RecordView {
            source: "bpf".into(),
            flavor: v.flavor().map(|f| f.to_string()),
            pin_dir: Some(v.pin_dir().display().to_string()),
            marked_tracks: Some(v.dirty_count()),
            cycles: self.cycles,
            cleared_tracks: self.cleared,
            reason: degraded(v),
        }
    }

    pub fn unpin(self) -> Result<(), KernelRecordError> {
        self.record.unpin()
    }
}

/// What `tandem status` says of a kernel record that is less than the best: the classic
/// flavour (and why tp_btf did not load), a device known by its number only.
fn degraded(v: &Volume) -> Option<String> {
    let mut notes = Vec::new();
    if let Some(r) = v.fallback_reason() {
        notes.push(format!("tp_btf did not load: {r}"));
    }
    let by_number = match v.flavor() {
        Some(Flavor::Classic) => Some("the classic tracepoints carry no disk"),
        _ if v.params().diskseq == 0 => Some("this kernel has no diskseq"),
        _ => None,
    };
    if let Some(why) = by_number {
        notes.push(format!(
            "the device is known by its number only ({why}): while no daemon runs, a new device that gets \
             the number is recorded too"
        ));
    }
    (!notes.is_empty()).then(|| notes.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The re-mark decision must ask the core's records *and* the resync and out_of_sync
    /// sets: build a real node and ask it.
    #[test]
    fn core_holds_covers_out_of_sync_and_the_records() {
        use tandem_core::node::{Meta, NodeConfig};
        use tandem_core::Mode;
        let g = Geometry::new(64 << 20, 4096, 64 << 10, 256).unwrap();
        let mut meta = Meta::fresh(&g, 1);
        meta.out_of_sync.set(7, true);
        meta.out_of_sync.set(300, true);
        let node = Node::new(NodeConfig::new(0, vec![1], g, Mode::Memory), meta, 1).unwrap();
        let held: Vec<u64> = (0..g.track_count()).filter(|&t| core_holds(&node, t)).collect();
        // `out_of_sync` is restored into every peer's record at start, and read directly.
        assert_eq!(held, vec![7, 300]);
        assert!(node.record(1).unwrap().is_marked(300));
        assert!(!core_holds(&node, 8));
    }
}
