//! [`KernelRecord`]: the loaded (or taken over) maps of one volume and the phased clearing
//! cycle of each of its ranges (steps 1 to 4 of the module's doc), never blocking the node.

use std::fmt;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tandem_bpf::{BpfError, Flavor, Volume, VolumeConfig};

use super::pin::{bpffs_mounted, lock_pin_dir, PinLock};
#[cfg(doc)]
use super::recovery::Recovered;
use super::{KernelRecordError, RecordSpec};

/// Where one range is in its clearing cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    /// The toggle was handed to the helper thread.
    Toggling,
    /// Toggled; waiting for the writes counted on the old side. `(last count seen, polls
    /// without progress)`.
    Draining {
        last: u64,
        stalled: u32,
    },
    /// Drained; [`KernelRecord::finish`] may clear.
    Drained,
}

/// What the clearing cycle concluded about a range's drain from one look at its counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DrainVerdict {
    Drained,
    Wait {
        last: u64,
        stalled: u32,
    },
    /// No progress for a while: completions the programs missed? Release the slots of bios
    /// that are provably done (see `Volume::reap_completed`), then wait again.
    Reap,
}

/// Pure: the next step of a drain given the old side's writes in flight now.
fn drain_verdict(inflight: u64, last: u64, stalled: u32) -> DrainVerdict {
    const REAP_AFTER: u32 = 2;
    if inflight == 0 {
        DrainVerdict::Drained
    } else if inflight != last {
        DrainVerdict::Wait { last: inflight, stalled: 0 }
    } else if stalled + 1 >= REAP_AFTER {
        DrainVerdict::Reap
    } else {
        DrainVerdict::Wait { last: inflight, stalled: stalled + 1 }
    }
}

/// Pure: the tracks of a drained old side that must be marked again on the current side
/// before the old side is cleared (step 3 of the cycle).
pub fn tracks_to_keep(old: &[u64], still_recorded: impl Fn(u64) -> bool) -> Vec<u64> {
    old.iter().copied().filter(|&t| still_recorded(t)).collect()
}

/// What [`KernelRecord::finish`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Finished {
    /// Old tracks still recorded, marked again on the current side.
    pub kept: u64,
    /// Old tracks forgotten.
    pub cleared: u64,
}

/// A loaded (or taken over) kernel record: the pinned maps of one volume, and its clearing
/// cycles. Dropping it leaves everything pinned and recording; [`KernelRecord::unpin`] ends it.
pub struct KernelRecord {
    volume: Arc<Volume>,
    phases: Vec<Phase>,
    /// Toggles for the helper thread, and its answers.
    toggle_tx: Option<Sender<u32>>,
    toggled_rx: Receiver<(u32, Result<(), BpfError>)>,
    toggler: Option<JoinHandle<()>>,
    toggles_pending: usize,
    _lock: PinLock,
}

impl fmt::Debug for KernelRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelRecord").field("volume", &self.volume).field("phases", &self.phases).finish()
    }
}

impl KernelRecord {
    /// Loads the programs for `spec.device`, attaches them and pins the maps under
    /// `/sys/fs/bpf/tandem/<pin>/` (tp_btf, else the classic tracepoints). Fails with
    /// [`KernelRecordError::is_unavailable`] when BPF cannot be used here.
    pub fn load(spec: &RecordSpec) -> Result<KernelRecord, KernelRecordError> {
        let dir = tandem_bpf::pin_dir(&spec.pin).map_err(KernelRecordError::bpf("the record's pin name"))?;
        // Lock the directory before the maps appear in it when bpffs is already there (the
        // loader mounts it otherwise, and then the lock follows the load).
        let early = if bpffs_mounted() {
            std::fs::create_dir_all(&dir)
                .map_err(|source| KernelRecordError::Io { what: format!("creating {}", dir.display()), source })?;
            Some(lock_pin_dir(&dir)?)
        } else {
            None
        };
        let g = &spec.geometry;
        let mut config = VolumeConfig::new(
            spec.pin.clone(),
            spec.device.as_path(),
            g.track_size(),
            g.tracks_per_range(),
            g.track_count(),
        );
        config.generation = spec.generation;
        let volume = Volume::load(&config).map_err(|e| {
            if early.is_some() {
                // Ours, and empty: the loader removes what it pinned when it fails.
                let _ = std::fs::remove_dir(&dir);
            }
            KernelRecordError::Bpf {
                what: format!("loading the BPF write recording for {}", spec.device.display()),
                source: e,
            }
        })?;
        let lock = match early {
            Some(lock) => lock,
            None => lock_pin_dir(&dir)?,
        };
        Ok(Self::with_volume(volume, lock))
    }

    /// Takes over the maps a previous daemon left pinned for `pin`, programs still attached to
    /// the same device (attach mode: the attached device keeps its dev_t across a restart, so
    /// nothing the programs recorded meanwhile is lost; the ublk frontend goes through
    /// [`Recovered::keep_for`]). The file frontend does not use it: its restart makes a new
    /// loop device, which the pinned programs do not watch.
    #[allow(dead_code)] // for attach mode
    pub fn take_over(pin: &str) -> Result<KernelRecord, KernelRecordError> {
        let dir = tandem_bpf::pin_dir(pin).map_err(KernelRecordError::bpf("the record's pin name"))?;
        let lock = lock_pin_dir(&dir)?;
        let volume = Volume::open(pin).map_err(KernelRecordError::bpf(format!("opening {}", dir.display())))?;
        Ok(Self::with_volume(volume, lock))
    }

    pub(super) fn with_volume(volume: Volume, lock: PinLock) -> KernelRecord {
        let volume = Arc::new(volume);
        let phases = vec![Phase::Idle; volume.range_count() as usize];
        let (toggle_tx, toggle_rx) = channel::<u32>();
        let (toggled_tx, toggled_rx) = channel();
        let worker = volume.clone();
        let toggler = std::thread::Builder::new()
            .name("record-toggle".into())
            .spawn(move || {
                for range in toggle_rx {
                    if toggled_tx.send((range, worker.toggle(range))).is_err() {
                        break;
                    }
                }
            })
            .ok();
        KernelRecord {
            volume,
            phases,
            toggle_tx: toggler.is_some().then_some(toggle_tx),
            toggled_rx,
            toggler,
            toggles_pending: 0,
            _lock: lock,
        }
    }

    /// The maps, for reading (dirty tracks, range states, params).
    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    #[allow(dead_code)] // for attach mode and tests
    pub fn flavor(&self) -> Option<Flavor> {
        self.volume.flavor()
    }

    #[allow(dead_code)] // for attach mode and tests
    pub fn pin_dir(&self) -> &Path {
        self.volume.pin_dir()
    }

    pub fn range_count(&self) -> u32 {
        self.volume.range_count()
    }

    /// Marks a track on its range's current side (a track the record must hold that no write
    /// to the device marked).
    pub fn mark(&self, track: u64) -> Result<(), KernelRecordError> {
        self.volume.mark(track).map_err(KernelRecordError::bpf(format!("marking track {track}")))
    }

    /// True while a cycle of `range` is under way (begun and not finished).
    pub fn in_cycle(&self, range: u32) -> bool {
        self.phases.get(range as usize).is_some_and(|p| *p != Phase::Idle)
    }

    /// True while a toggle waits for its grace period on the helper thread.
    pub fn toggling(&self) -> bool {
        self.toggles_pending > 0
    }

    /// Step 1: starts a cycle of `range` (its toggle runs on the helper thread). Returns false
    /// when a cycle of that range is already under way.
    pub fn begin(&mut self, range: u32) -> Result<bool, KernelRecordError> {
        let phase = self.phase_mut(range)?;
        if *phase != Phase::Idle {
            return Ok(false);
        }
        *phase = Phase::Toggling;
        let sent = self.toggle_tx.as_ref().is_some_and(|tx| tx.send(range).is_ok());
        if !sent {
            self.phases[range as usize] = Phase::Idle;
            return Err(KernelRecordError::TogglerGone { volume: self.volume.name().to_owned() });
        }
        self.toggles_pending += 1;
        Ok(true)
    }

    fn phase_mut(&mut self, range: u32) -> Result<&mut Phase, KernelRecordError> {
        let ranges = self.volume.range_count();
        self.phases.get_mut(range as usize).ok_or(KernelRecordError::Bpf {
            what: "the clearing cycle".into(),
            source: BpfError::NoSuchRange { range, ranges },
        })
    }

    /// Takes the helper thread's finished toggles. A failed toggle (e.g. the old side still
    /// held writes in flight) ends that cycle; the error is returned for the first one.
    pub(super) fn collect_toggles(&mut self) -> Result<(), KernelRecordError> {
        let mut first = None;
        loop {
            match self.toggled_rx.try_recv() {
                Ok((range, result)) => {
                    self.toggles_pending -= 1;
                    let phase = &mut self.phases[range as usize];
                    match result {
                        Ok(()) => *phase = Phase::Draining { last: u64::MAX, stalled: 0 },
                        Err(e) => {
                            *phase = Phase::Idle;
                            first.get_or_insert(KernelRecordError::Bpf {
                                what: format!("toggling range {range}"),
                                source: e,
                            });
                        }
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if self.toggles_pending > 0 {
                        return Err(KernelRecordError::TogglerGone { volume: self.volume.name().to_owned() });
                    }
                    break;
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Step 2: never blocks. `Some(old tracks)` once every write counted on the old side of
    /// `range` has completed (then [`KernelRecord::finish`] may clear it); `None` while the
    /// toggle or the drain is still under way.
    pub fn poll_drained(&mut self, range: u32) -> Result<Option<Vec<u64>>, KernelRecordError> {
        self.collect_toggles()?;
        let phase = *self.phase_mut(range)?;
        let (last, stalled) = match phase {
            Phase::Idle => return Err(KernelRecordError::Phase { range, why: "no cycle was begun" }),
            Phase::Toggling => return Ok(None),
            Phase::Draining { last, stalled } => (last, stalled),
            Phase::Drained => return self.old_tracks(range).map(Some),
        };
        let what = || format!("reading the writes in flight on range {range}");
        let state = self.volume.range_state(range).map_err(KernelRecordError::bpf(what()))?;
        let inflight = self.volume.inflight(range, state.old()).map_err(KernelRecordError::bpf(what()))?;
        match drain_verdict(inflight, last, stalled) {
            DrainVerdict::Drained => {
                self.phases[range as usize] = Phase::Drained;
                self.old_tracks(range).map(Some)
            }
            DrainVerdict::Wait { last, stalled } => {
                self.phases[range as usize] = Phase::Draining { last, stalled };
                Ok(None)
            }
            DrainVerdict::Reap => {
                let reaped = match self.volume.flavor() {
                    Some(Flavor::TpBtf) => self.volume.reap_completed().map(|n| n as usize),
                    _ => self.volume.reap_stale(tandem_bpf::CLASSIC_REAP_AGE),
                }
                .map_err(KernelRecordError::bpf(format!("releasing missed completions on range {range}")))?;
                if reaped > 0 {
                    tracing::info!(range, reaped, "released in-flight entries whose completion the programs missed");
                }
                self.phases[range as usize] = Phase::Draining { last: inflight, stalled: 0 };
                Ok(None)
            }
        }
    }

    fn old_tracks(&self, range: u32) -> Result<Vec<u64>, KernelRecordError> {
        Ok(self.volume.range_tracks(range).map_err(KernelRecordError::bpf(format!("reading range {range}")))?.old)
    }

    /// Steps 3 and 4: marks again on the current side every old track `still_recorded` says
    /// is still held, then clears the old side. Only after [`KernelRecord::poll_drained`]
    /// returned `Some` for this cycle. The old side is read afresh here, so a mark that
    /// landed on it after the drain is judged too.
    pub fn finish(&mut self, range: u32, still_recorded: impl Fn(u64) -> bool) -> Result<Finished, KernelRecordError> {
        if *self.phase_mut(range)? != Phase::Drained {
            return Err(KernelRecordError::Phase { range, why: "finish before the old side drained" });
        }
        let old = self.old_tracks(range)?;
        let keep = tracks_to_keep(&old, still_recorded);
        for &t in &keep {
            self.mark(t)?;
        }
        self.volume.clear_old(range).map_err(KernelRecordError::bpf(format!("clearing range {range}")))?;
        self.phases[range as usize] = Phase::Idle;
        Ok(Finished { kept: keep.len() as u64, cleared: (old.len() - keep.len()) as u64 })
    }

    /// One whole cycle of `range`, waiting (sleeping) between its steps: for threads that may
    /// block (attach mode's shipping loop), never for the node.
    #[allow(dead_code)] // for attach mode and tests
    pub fn cycle_blocking(
        &mut self,
        range: u32,
        timeout: Duration,
        still_recorded: impl Fn(u64) -> bool,
    ) -> Result<Finished, KernelRecordError> {
        let start = Instant::now();
        self.begin(range)?;
        loop {
            if self.poll_drained(range)?.is_some() {
                return self.finish(range, still_recorded);
            }
            if start.elapsed() > timeout {
                return Err(KernelRecordError::Phase { range, why: "the old side did not drain in time" });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Detaches the programs and removes the pins (`tandem down`, once the records are
    /// persisted).
    pub fn unpin(mut self) -> Result<(), KernelRecordError> {
        self.toggle_tx = None;
        if let Some(t) = self.toggler.take() {
            let _ = t.join();
        }
        let name = self.volume.name().to_owned();
        drop(self);
        tandem_bpf::unpin(&name).map(|_| ()).map_err(KernelRecordError::bpf(format!("unpinning {name}")))
    }
}

impl Drop for KernelRecord {
    fn drop(&mut self) {
        self.toggle_tx = None;
        if let Some(t) = self.toggler.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_record::{recover_pinned, TrackSet};
    use std::fs::File;
    use tandem_core::Geometry;

    #[test]
    fn only_still_recorded_old_tracks_are_kept() {
        let old = [1, 2, 5, 9, 64, 65];
        let recorded = [2u64, 9, 65, 100];
        assert_eq!(tracks_to_keep(&old, |t| recorded.contains(&t)), vec![2, 9, 65]);
        assert_eq!(tracks_to_keep(&old, |_| false), Vec::<u64>::new());
        assert_eq!(tracks_to_keep(&old, |_| true), old.to_vec());
        assert_eq!(tracks_to_keep(&[], |_| true), Vec::<u64>::new());
    }

    #[test]
    fn a_drain_ends_only_at_zero_and_reaps_when_stuck() {
        // First look: no history.
        assert_eq!(drain_verdict(3, u64::MAX, 0), DrainVerdict::Wait { last: 3, stalled: 0 });
        // Progress resets the stall count.
        assert_eq!(drain_verdict(2, 3, 1), DrainVerdict::Wait { last: 2, stalled: 0 });
        // No progress: wait once more, then reap.
        assert_eq!(drain_verdict(2, 2, 0), DrainVerdict::Wait { last: 2, stalled: 1 });
        assert_eq!(drain_verdict(2, 2, 1), DrainVerdict::Reap);
        assert_eq!(drain_verdict(0, 2, 5), DrainVerdict::Drained);
        assert_eq!(drain_verdict(0, u64::MAX, 0), DrainVerdict::Drained);
    }

    /// A model of the kernel map and of the core, driven through random schedules of the
    /// cycle's steps, writes (marked when queued, completed later) and core records coming
    /// and going: the map must always hold every track the core holds and every write
    /// queued and not yet seen by the core. The decisions under test are the daemon's:
    /// sync what is newly held, begin, drain on the counter, keep what is still held, clear.
    #[test]
    fn the_cycle_never_drops_a_held_track_or_an_unfinished_write() {
        const TRACKS: u64 = 16;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..300 {
            // Kernel model: two sides, which is current, per-side writes in flight.
            let mut sides = [TrackSet::new(TRACKS), TrackSet::new(TRACKS)];
            let mut current = 0usize;
            let mut inflight: Vec<(u64, usize)> = Vec::new(); // (track, side counted on)
                                                              // Core model: held tracks; among them those a completed write put there (the map
                                                              // holds those from the write's queueing on, with no tick needed) and those of
                                                              // `out_of_sync` (marked into the map by a tick).
            let mut core = TrackSet::new(TRACKS);
            let mut written = TrackSet::new(TRACKS);
            let mut out_of_sync = TrackSet::new(TRACKS);
            let mut synced = TrackSet::new(TRACKS);
            let mut phase = Phase::Idle;
            for _ in 0..200 {
                match rnd(7) {
                    0 | 1 => {
                        // A write queued: marked on current, counted in flight.
                        let t = rnd(TRACKS);
                        sides[current].insert(t);
                        inflight.push((t, current));
                    }
                    2 if !inflight.is_empty() => {
                        // A write completes: the core saw it and records it (peer absent or
                        // not yet hardened), or it was already hardened by the peer.
                        let (t, _) = inflight.remove(rnd(inflight.len() as u64) as usize);
                        if rnd(2) == 0 {
                            core.insert(t);
                            written.insert(t);
                        }
                    }
                    3 => {
                        // The core forgets a track (peer hardened it, a resync shipped it), or
                        // takes one without a write: into `out_of_sync` (restored, a verify's
                        // difference) or into a record only (a handshake merged the peer's).
                        let t = rnd(TRACKS);
                        let choice = rnd(3);
                        if choice == 0 {
                            let without = |set: &TrackSet| {
                                let mut c = TrackSet::new(TRACKS);
                                for x in set.minus(&TrackSet::new(TRACKS)).filter(|&x| x != t) {
                                    c.insert(x);
                                }
                                c
                            };
                            core = without(&core);
                            written = without(&written);
                            out_of_sync = without(&out_of_sync);
                        } else {
                            core.insert(t);
                            if choice == 1 {
                                out_of_sync.insert(t);
                            }
                        }
                    }
                    _ => {
                        // A tick: mark what is new in `out_of_sync`, then advance the cycle.
                        for t in out_of_sync.minus(&synced).collect::<Vec<_>>() {
                            sides[current].insert(t);
                        }
                        synced = out_of_sync.clone();
                        phase = match phase {
                            Phase::Idle => {
                                current ^= 1;
                                Phase::Draining { last: u64::MAX, stalled: 0 }
                            }
                            Phase::Draining { last, stalled } => {
                                let n = inflight.iter().filter(|(_, s)| *s != current).count() as u64;
                                match drain_verdict(n, last, stalled) {
                                    DrainVerdict::Drained => Phase::Drained,
                                    DrainVerdict::Wait { last, stalled } => Phase::Draining { last, stalled },
                                    DrainVerdict::Reap => Phase::Draining { last: n, stalled: 0 },
                                }
                            }
                            Phase::Toggling => unreachable!("the model toggles at once"),
                            Phase::Drained => {
                                let old = 1 - current;
                                let olds: Vec<u64> = sides[old].minus(&TrackSet::new(TRACKS)).collect();
                                for t in tracks_to_keep(&olds, |t| core.contains(t)) {
                                    sides[current].insert(t);
                                }
                                sides[old].clear();
                                Phase::Idle
                            }
                        };
                    }
                }
                // The invariant, checked after every step, against what the map must hold:
                // the tracks written and still held, `out_of_sync` as of the last tick (a newer
                // one is marked at the next) and every write not yet complete.
                let map = |t: u64| sides[0].contains(t) || sides[1].contains(t);
                for t in synced.minus(&TrackSet::new(TRACKS)) {
                    assert!(map(t), "out-of-sync track {t} missing from the map");
                }
                for t in written.minus(&TrackSet::new(TRACKS)) {
                    assert!(map(t), "written and held track {t} missing from the map");
                }
                for &(t, _) in &inflight {
                    assert!(map(t), "write in flight on track {t} missing from the map");
                }
            }
        }
    }

    /// The phased API against real maps (root only: elsewhere it says why it skips; as root
    /// BPF must load): writes to a loop device are marked; a cycle keeps exactly the tracks
    /// still recorded; a write after the toggle stays; `cycle_blocking` (attach mode) does the
    /// same in one call; `unpin` removes the pin directory.
    #[test]
    fn the_phased_cycle_on_real_maps_keeps_only_what_is_still_recorded() {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading BPF programs and making loop devices needs root");
            return;
        }
        let probe = tandem_bpf::probe();
        assert!(probe.is_available(), "as root, BPF write recording must load here: {}", probe.summary());
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vol.img");
        File::create(&image).unwrap().set_len(4 << 20).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--show", "-f", "--direct-io=on", image.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        let device = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        struct Detach(String);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = std::process::Command::new("losetup").args(["-d", &self.0]).status();
            }
        }
        let _detach = Detach(device.clone());
        let geometry = Geometry::new(4 << 20, 4096, 64 << 10, 32).unwrap(); // 64 tracks, 2 ranges
        let pin = format!("unit-kernel-record-{}", std::process::id());
        // A failed assertion must not leave the programs attached on this host.
        struct Unpin(String);
        impl Drop for Unpin {
            fn drop(&mut self) {
                let _ = tandem_bpf::unpin(&self.0);
            }
        }
        let _unpin = Unpin(pin.clone());
        let spec = RecordSpec { pin: pin.clone(), device: device.clone().into(), geometry, generation: 7 };
        let mut record = KernelRecord::load(&spec).unwrap();
        let file = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&device).unwrap();
        let mut buf = vec![0u8; 8192];
        let offset = buf.as_ptr().align_offset(4096);
        let block = &mut buf[offset..offset + 4096];
        let write = |track: u64, block: &mut [u8]| {
            block.fill(track as u8);
            file.write_all_at(block, track * (64 << 10)).unwrap();
        };
        for t in [1, 2, 3, 40] {
            write(t, block);
        }
        assert_eq!(record.volume().dirty_tracks(), vec![1, 2, 3, 40]);
        // A second daemon with the same pin name is refused while this one holds it.
        assert!(matches!(recover_pinned(&pin, &geometry), Err(KernelRecordError::InUse { .. })));

        // Range 0: the core still records track 2 only.
        assert!(record.begin(0).unwrap());
        assert!(!record.begin(0).unwrap(), "one cycle per range at a time");
        assert!(matches!(record.finish(0, |_| true), Err(KernelRecordError::Phase { .. })));
        let start = Instant::now();
        let old = loop {
            if let Some(old) = record.poll_drained(0).unwrap() {
                break old;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "range 0 did not drain");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(old, vec![1, 2, 3]);
        write(5, block); // after the toggle: on the current side, untouched by the clear
        let done = record.finish(0, |t| t == 2).unwrap();
        assert_eq!(done, Finished { kept: 1, cleared: 2 });
        assert_eq!(record.volume().dirty_tracks(), vec![2, 5, 40]);
        assert!(!record.in_cycle(0));

        // Range 1 in one call: nothing recorded any more.
        let done = record.cycle_blocking(1, Duration::from_secs(10), |_| false).unwrap();
        assert_eq!(done, Finished { kept: 0, cleared: 1 });
        assert_eq!(record.volume().dirty_tracks(), vec![2, 5]);
        let dir = record.pin_dir().to_owned();

        // A restart on the same device (ublk under user recovery): the pinned programs are
        // kept, and go on recording into the same maps.
        drop(record);
        write(9, block); // no daemon
        let recovered = recover_pinned(&pin, &geometry).unwrap().expect("still pinned");
        assert_eq!(recovered.tracks, vec![2, 5, 9]);
        let record = recovered.keep_for(Path::new(&device)).map_err(|(_, why)| why).unwrap();
        write(12, block);
        assert_eq!(record.volume().dirty_tracks(), vec![2, 5, 9, 12]);
        assert!(matches!(recover_pinned(&pin, &geometry), Err(KernelRecordError::InUse { .. })));
        drop(record);

        // A restart on a new device that got the same number (the file frontend's next loop
        // device): not kept.
        drop(file);
        let out = std::process::Command::new("losetup").args(["-d", &device]).output().unwrap();
        assert!(out.status.success(), "losetup -d: {}", String::from_utf8_lossy(&out.stderr));
        let other = dir_for_other_image(&device);
        let recovered = recover_pinned(&pin, &geometry).unwrap().expect("still pinned");
        let (recovered, why) = match recovered.keep_for(Path::new(&device)) {
            Ok(_) => panic!("kept the record of a dead device for the device that reused its number"),
            Err(back) => back,
        };
        assert!(why.contains("diskseq"), "{why}");
        assert_eq!(recovered.tracks, vec![2, 5, 9, 12]);
        recovered.unpin().unwrap();
        assert!(!dir.exists(), "{} is still there", dir.display());
        drop(other);
    }

    /// Attaches a new image to the loop device `device` (just detached), retrying while the
    /// detach completes; the image's directory lives as long as the returned value.
    fn dir_for_other_image(device: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("other.img");
        File::create(&image).unwrap().set_len(4 << 20).unwrap();
        let mut last = String::new();
        for _ in 0..100 {
            let out = std::process::Command::new("losetup").args([device, image.to_str().unwrap()]).output().unwrap();
            if out.status.success() {
                return dir;
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("cannot attach a new image to {device} (taken by someone else?): {last}");
    }
}
