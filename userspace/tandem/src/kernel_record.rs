//! The volume's record of written tracks in the kernel: the pinned BPF maps of `tandem-bpf`,
//! kept by the daemon next to the core's in-process records.
//!
//! # Soundness rule
//!
//! The sans-IO core keeps its per-peer records: the protocol and the simulator drive them,
//! and they decide what a resync ships while the daemon lives. The kernel map is a mirror
//! that survives the daemon (`kill -9`, a crash) and that operators read with `bpftool`. It
//! must at every instant be a **superset** of
//!
//! * the tracks written to this device that any peer's core record still holds (current ∪
//!   old), that a resync has not confirmed yet, or that are in `meta.out_of_sync`, and
//! * the tracks of every write queued to the device since (the programs mark a write when
//!   it is queued, before the daemon sees it).
//!
//! The tracks of `out_of_sync` that no write to this device marked (restored at start, or
//! marked by a verify) are marked into the map by the daemon's tick ([`Clearing::tick`]), at
//! most one tick after the core took them. Other tracks the core holds without a write to this
//! device (a secondary's record of the primary's writes, a peer's record merged at a
//! handshake) are not mirrored: the kernel map is this device's record of *its* writes, and
//! mirroring them would only make the resync after a crash ship more.
//!
//! It stays bounded through a **clearing cycle** per range, run on a timer from the node's
//! thread and never blocking it (a write to the file frontend's loop device completes only
//! when the node acknowledges it: a blocking drain there would deadlock):
//!
//! 1. [`KernelRecord::begin`]: toggle the range (new marks go to the other side). The toggle
//!    waits for an RCU grace period, so it runs on a helper thread of its own.
//! 2. [`KernelRecord::poll_drained`], on later ticks: once the writes counted on the old side
//!    (those queued before the toggle) have all completed, their bits are final: it returns
//!    the old side's tracks. Never waits: it reads the per-CPU counters through mmap.
//! 3. [`KernelRecord::finish`]: every old track that is still recorded (the closure says so)
//!    is marked again on the current side, then
//! 4. the old side is cleared.
//!
//! A track leaves the map only in step 4, and only when the core no longer holds it and the
//! write that marked it has completed (so the core has seen that write and recorded it
//! wherever it had to).
//!
//! # Restart
//!
//! After a `kill -9` the pinned maps still hold every track written (the programs kept
//! recording). [`recover_pinned`] reads them; the daemon adds them to the persisted
//! `out_of_sync` and writes the metadata durably. Then it depends on the device:
//!
//! * the file frontend's loop device died with the daemon: the daemon unpins and loads the
//!   programs afresh for its new loop device. The kernel may give that one the same minor
//!   (the same dev_t): a device is its dev_t *and* its disk's diskseq, which the kernel never
//!   reuses, and the tp_btf programs record only bios of the diskseq they were loaded for, so
//!   the old programs never mark a device that reused the number (the classic flavour cannot
//!   tell: its events carry no disk);
//! * the ublk device survives the daemon (user recovery), and with it its dev_t and diskseq:
//!   the daemon keeps the pinned programs and maps ([`Recovered::keep_for`]) instead of
//!   replacing them, so the bios the kernel reissues on recovery, and every write from then
//!   on, stay in the same record with no gap.
//!
//! Maps whose geometry differs from the configuration count as "every track written", and are
//! replaced.
//!
//! # Fallback
//!
//! Without BPF (not root, no BTF and no tracepoint, seccomp, ...) the core's in-process
//! bitmaps are the only record: [`Record::Memory`] says why, in `tandem status` and once in
//! the log. `record = "bpf"` in `[node]` makes that an error instead.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tandem_bpf::{BpfError, Flavor, Volume, VolumeConfig};
use tandem_core::node::Node;
use tandem_core::Geometry;
use thiserror::Error;

use crate::control::{MapDirtyView, MapRangeView, RecordView, TrackRun};

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
/// `statfs` magic of the BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// `[node] record`: where the volume's record of written tracks lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecordChoice {
    /// The kernel map when the BPF programs load here, else the in-process bitmaps.
    #[default]
    Auto,
    /// The kernel map; the daemon refuses to start without it.
    Bpf,
    /// The in-process bitmaps only (no programs are loaded).
    Memory,
}

impl FromStr for RecordChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(RecordChoice::Auto),
            "bpf" => Ok(RecordChoice::Bpf),
            "memory" => Ok(RecordChoice::Memory),
            other => Err(format!("unknown record '{other}' (auto, bpf, memory)")),
        }
    }
}

impl fmt::Display for RecordChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordChoice::Auto => "auto",
            RecordChoice::Bpf => "bpf",
            RecordChoice::Memory => "memory",
        })
    }
}

/// Everything that can go wrong with the kernel record.
#[derive(Debug, Error)]
pub enum KernelRecordError {
    #[error(
        "{}: another live process holds this record (a second daemon with the same pin name? \
         nodes of one volume on one host need distinct `record_pin`s in [node])",
        pin_dir.display()
    )]
    InUse { pin_dir: PathBuf },
    #[error("{what}: {source}")]
    Bpf {
        what: String,
        #[source]
        source: BpfError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("range {range}: {why}")]
    Phase { range: u32, why: &'static str },
    #[error("the toggle thread of {volume} stopped")]
    TogglerGone { volume: String },
}

impl KernelRecordError {
    fn bpf(what: impl Into<String>) -> impl FnOnce(BpfError) -> KernelRecordError {
        let what = what.into();
        move |source| KernelRecordError::Bpf { what, source }
    }

    /// True when the failure means BPF cannot be used here at all (the fallback applies).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, KernelRecordError::Bpf { source, .. } if source.is_unavailable())
    }
}

/// What [`KernelRecord::load`] needs.
#[derive(Clone, Debug)]
pub struct RecordSpec {
    /// The pin directory's name: `/sys/fs/bpf/tandem/<pin>/`.
    pub pin: String,
    /// The block device whose writes are recorded.
    pub device: PathBuf,
    pub geometry: Geometry,
    /// Stored in the `params` map for operators.
    pub generation: u64,
}

/// An exclusive `flock` on a pin directory: held while a daemon owns the record, so that a
/// second daemon configured with the same pin name never takes a live record for a dead one.
#[derive(Debug)]
struct PinLock(#[allow(dead_code)] File);

fn lock_pin_dir(dir: &Path) -> Result<PinLock, KernelRecordError> {
    let file = File::open(dir)
        .map_err(|source| KernelRecordError::Io { what: format!("opening {}", dir.display()), source })?;
    // SAFETY: a valid fd; flock takes no pointers.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(KernelRecordError::InUse { pin_dir: dir.to_owned() });
        }
        return Err(KernelRecordError::Io { what: format!("locking {}", dir.display()), source: e });
    }
    Ok(PinLock(file))
}

fn bpffs_mounted() -> bool {
    let path = std::ffi::CString::new(tandem_bpf::BPFFS).expect("no NUL");
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    unsafe { libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

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

    fn with_volume(volume: Volume, lock: PinLock) -> KernelRecord {
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
    fn collect_toggles(&mut self) -> Result<(), KernelRecordError> {
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

/// A bitset over the volume's tracks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackSet(Vec<u64>);

impl TrackSet {
    pub fn new(tracks: u64) -> TrackSet {
        TrackSet(vec![0; tracks.div_ceil(64) as usize])
    }
    pub fn insert(&mut self, t: u64) {
        if let Some(w) = self.0.get_mut((t / 64) as usize) {
            *w |= 1 << (t % 64);
        }
    }
    pub fn contains(&self, t: u64) -> bool {
        self.0.get((t / 64) as usize).is_some_and(|w| w >> (t % 64) & 1 == 1)
    }
    pub fn clear(&mut self) {
        self.0.fill(0);
    }
    #[allow(dead_code)] // for attach mode and tests
    pub fn len(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    #[allow(dead_code)] // for attach mode and tests
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
    /// Tracks in `self` and not in `other`.
    #[allow(dead_code)] // for attach mode and tests
    pub fn minus<'a>(&'a self, other: &'a TrackSet) -> impl Iterator<Item = u64> + 'a {
        self.0.iter().enumerate().flat_map(move |(i, &w)| {
            let mut bits = w & !other.0.get(i).copied().unwrap_or(0);
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = bits.trailing_zeros();
                    bits &= bits - 1;
                    i as u64 * 64 + u64::from(b)
                })
            })
        })
    }
}

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

/// The daemon's record of written tracks.
pub enum Record {
    /// The pinned BPF maps, kept by the clearing cycles.
    Kernel(Box<Clearing>),
    /// The core's in-process bitmaps only, and why.
    Memory { reason: String },
}

impl Record {
    /// What `tandem status` shows.
    pub fn view(&self) -> RecordView {
        match self {
            Record::Kernel(c) => c.view(),
            Record::Memory { reason } => RecordView {
                source: "memory".into(),
                flavor: None,
                pin_dir: None,
                marked_tracks: None,
                cycles: 0,
                cleared_tracks: 0,
                reason: Some(reason.clone()),
            },
        }
    }
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
            let state = self
                .record
                .volume()
                .range_state(range)
                .map_err(KernelRecordError::bpf(format!("reading range {range}")))?;
            let counters = (state.marked[0], state.marked[1], state.toggles);
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
                let state = self
                    .record
                    .volume()
                    .range_state(range)
                    .map_err(KernelRecordError::bpf(format!("reading range {range}")))?;
                checks.push((range, (state.marked[0], state.marked[1], state.toggles)));
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

/// The daemon's choice at start: the kernel record for `device`, or why not.
pub fn start(choice: RecordChoice, spec: &RecordSpec) -> Result<Record, KernelRecordError> {
    if choice == RecordChoice::Memory {
        return Ok(Record::Memory { reason: "record = \"memory\" in the configuration".into() });
    }
    match KernelRecord::load(spec) {
        Ok(record) => Ok(Record::Kernel(Box::new(Clearing::new(record, &spec.geometry)))),
        Err(e) if choice == RecordChoice::Auto && e.is_unavailable() => {
            let probe = tandem_bpf::probe();
            let reason = if probe.is_available() { e.to_string() } else { probe.summary() };
            Ok(Record::Memory { reason })
        }
        Err(e) => Err(e),
    }
}

/// `record = "bpf"`: fails with the reason when the programs cannot load here.
pub fn require_bpf() -> Result<(), String> {
    let probe = tandem_bpf::probe();
    if probe.is_available() {
        return Ok(());
    }
    let problems: Vec<String> = probe
        .problems
        .iter()
        .map(|(flavor, e)| match flavor {
            Some(f) => format!("{f}: {e}"),
            None => e.to_string(),
        })
        .collect();
    Err(format!("the BPF write recording cannot load here: {}", problems.join("; ")))
}

/// What the pinned maps of a dead (or restarted) daemon held.
#[derive(Debug)]
pub struct Recovered {
    pub pin_dir: PathBuf,
    /// Every track marked (current ∪ old of every range).
    pub tracks: Vec<u64>,
    /// The maps could not be trusted (geometry or layout differ): every track counts as
    /// written, and this says why.
    pub untrusted: Option<String>,
    pub flavor: Option<Flavor>,
    _lock: PinLock,
}

impl Recovered {
    /// Removes the pins (which detaches the programs): only once `tracks` are durable.
    pub fn unpin(self) -> Result<(), KernelRecordError> {
        let name = self.pin_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        tandem_bpf::unpin(&name).map(|_| ()).map_err(KernelRecordError::bpf(format!("unpinning {name}")))
    }

    /// Keeps the pinned programs and maps as this daemon's record, when they still record
    /// `device` itself: the maps are trusted, the programs attached, and `device` has the
    /// dev_t and the diskseq they were loaded for (a device that survived the daemon, as a
    /// ublk device under user recovery does). Otherwise gives `self` back with why not, to be
    /// unpinned. Call it only once `tracks` are durable: the record's clearing cycles may then
    /// clear them from the map.
    pub fn keep_for(self, device: &Path) -> Result<KernelRecord, (Recovered, String)> {
        if let Some(why) = &self.untrusted {
            let why = why.clone();
            return Err((self, why));
        }
        let name = self.pin_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let volume = match Volume::open(&name) {
            Ok(v) => v,
            Err(e) => return Err((self, format!("the pinned maps cannot be opened: {e}"))),
        };
        if !volume.is_attached() {
            return Err((self, "its programs are detached: writes since then were not recorded".into()));
        }
        let info = match tandem_bpf::DeviceInfo::resolve(&tandem_bpf::DeviceRef::Path(device.to_owned())) {
            Ok(info) => info,
            Err(e) => return Err((self, format!("cannot identify {}: {e}", device.display()))),
        };
        if let Some(why) = volume.device_mismatch(&info) {
            return Err((self, why));
        }
        Ok(KernelRecord::with_volume(volume, self._lock))
    }
}

/// At daemon start: if maps are pinned for `pin` (a daemon died without `down`), what they
/// hold. `None` when nothing is pinned. Fails when a live process holds the record.
pub fn recover_pinned(pin: &str, geometry: &Geometry) -> Result<Option<Recovered>, KernelRecordError> {
    let dir = tandem_bpf::pin_dir(pin).map_err(KernelRecordError::bpf("the record's pin name"))?;
    if !dir.is_dir() {
        return Ok(None);
    }
    let lock = lock_pin_dir(&dir)?;
    let empty = std::fs::read_dir(&dir).map(|mut d| d.next().is_none()).unwrap_or(false);
    if empty {
        let _ = std::fs::remove_dir(&dir);
        return Ok(None);
    }
    let all = || (0..geometry.track_count()).collect::<Vec<u64>>();
    let (tracks, untrusted, flavor) = match Volume::open(pin) {
        Ok(v) => {
            let p = v.params();
            let mismatch = [
                ("tracks", p.tracks, geometry.track_count()),
                ("track size", 1u64 << p.track_shift, u64::from(geometry.track_size())),
                ("tracks per range", u64::from(p.tracks_per_range), u64::from(geometry.tracks_per_range())),
            ]
            .into_iter()
            .find(|(_, pinned, configured)| pinned != configured);
            match mismatch {
                None => (v.dirty_tracks(), None, v.flavor()),
                Some((what, pinned, configured)) => (
                    all(),
                    Some(format!("the pinned maps have {what} {pinned}, the configuration {configured}")),
                    v.flavor(),
                ),
            }
        }
        Err(e) => (all(), Some(format!("the pinned maps cannot be read: {e}")), None),
    };
    Ok(Some(Recovered { pin_dir: dir, tracks, untrusted, flavor, _lock: lock }))
}

fn runs(tracks: impl IntoIterator<Item = u64>) -> Vec<TrackRun> {
    let mut out: Vec<TrackRun> = Vec::new();
    for t in tracks {
        match out.last_mut() {
            Some(r) if r.first_track + r.tracks == t => r.tracks += 1,
            _ => out.push(TrackRun { first_track: t, tracks: 1 }),
        }
    }
    out
}

fn dev_name(dev: u32) -> String {
    format!("{}:{}", dev >> 20, dev & 0xf_ffff)
}

/// `tandem dirty`: the pinned maps of `pin`, read directly (no daemon needed). `Ok(None)`
/// when nothing is pinned.
pub fn inspect(pin: &str) -> Result<Option<MapDirtyView>, KernelRecordError> {
    let dir = tandem_bpf::pin_dir(pin).map_err(KernelRecordError::bpf("the record's pin name"))?;
    if !dir.join(tandem_bpf::layout::pins::PARAMS).exists() {
        return Ok(None);
    }
    let v = Volume::open(pin).map_err(KernelRecordError::bpf(format!("opening {}", dir.display())))?;
    let p = *v.params();
    let mut ranges = Vec::new();
    let mut all = BTreeMap::new();
    for r in 0..v.range_count() {
        let tracks = v.range_tracks(r).map_err(KernelRecordError::bpf(format!("reading range {r}")))?;
        let state = v.range_state(r).map_err(KernelRecordError::bpf(format!("reading range {r}")))?;
        for &t in tracks.current.iter().chain(&tracks.old) {
            all.insert(t, ());
        }
        ranges.push(MapRangeView {
            range: r,
            current_side: tracks.current_side,
            current: runs(tracks.current.iter().copied()),
            old: runs(tracks.old.iter().copied()),
            inflight: state.inflight,
            toggles: state.toggles,
            untracked: state.untracked,
        });
    }
    Ok(Some(MapDirtyView {
        pin_dir: dir.display().to_string(),
        flavor: v.flavor().map(|f| f.to_string()),
        attached: v.is_attached(),
        device: dev_name(p.dev),
        track_size: p.track_size() as u32,
        tracks: p.tracks,
        tracks_per_range: p.tracks_per_range,
        generation: format!("{:#018x}", p.generation),
        marked_tracks: all.len() as u64,
        runs: runs(all.into_keys()),
        ranges,
    }))
}

/// Runs of consecutive tracks (for logs).
pub fn track_runs(tracks: &[u64]) -> Vec<Range<u64>> {
    runs(tracks.iter().copied()).into_iter().map(|r| r.first_track..r.first_track + r.tracks).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_choice_parses_and_names_the_choices() {
        assert_eq!("auto".parse(), Ok(RecordChoice::Auto));
        assert_eq!("bpf".parse(), Ok(RecordChoice::Bpf));
        assert_eq!("memory".parse(), Ok(RecordChoice::Memory));
        let e = "kernel".parse::<RecordChoice>().unwrap_err();
        assert!(e.contains("'kernel'") && e.contains("auto, bpf, memory"), "{e}");
    }

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

    #[test]
    fn track_sets_diff_word_by_word() {
        let mut a = TrackSet::new(200);
        let mut b = TrackSet::new(200);
        for t in [0, 1, 63, 64, 130, 199] {
            a.insert(t);
        }
        for t in [1, 64, 150] {
            b.insert(t);
        }
        assert_eq!(a.minus(&b).collect::<Vec<_>>(), vec![0, 63, 130, 199]);
        assert_eq!(b.minus(&a).collect::<Vec<_>>(), vec![150]);
        assert_eq!(a.len(), 6);
        assert!(a.contains(199) && !a.contains(198));
        a.insert(500); // beyond the volume: ignored
        assert_eq!(a.len(), 6);
        a.clear();
        assert!(a.is_empty());
        assert_eq!(track_runs(&[1, 2, 3, 7, 9, 10]), vec![1..4, 7..8, 9..11]);
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
