//! Root-only: the in-flight race. Bits are set when a write bio is queued, not when it
//! completes, so a destage that copies and clears a range's old side could forget a write that
//! was queued before the toggle and is still in flight. The protocol — toggle, wait for the
//! writes counted on the old side to complete, copy, clear — must never lose one.
//!
//! # What the test does
//!
//! Writer threads issue O_DIRECT writes of 1 to 8 whole tracks at random places; the first 8
//! bytes of every track written carry the write's unique sequence number. Every 8-track zone
//! belongs to one writer, so writes to a track never overlap in time and each track has a
//! well-defined last write once the writers pause. Concurrently a destager plays the peer, range
//! after range: `toggle` → `wait_old_drained` → copy (read every old-side track from the device
//! into `replica`) → `clear_old`. Every round ends with a quiescent point (writers and destager
//! stopped, every write completed) where the invariant is checked.
//!
//! # The invariant (DESIGN.md invariant 2, "the record covers divergence", with `replica` as the peer)
//!
//! At every quiescent point, for every track t:
//!
//! > `replica[t] == device[t]`, or t is marked in its range's current ∪ old bitmap.
//!
//! A track where the replica differs and nothing is marked is a missed track: a write the record
//! lost. Per write, this is the brief's "every write that completed after a clear of its range's
//! old side is in the current side or a later old side" — until a copy made after it completed.
//!
//! Why the protocol guarantees it. Take a write W to track t of range r, queued at q(W),
//! completed at c(W). At q(W) the queue program reads side s = current(r), counts W in
//! inflight[s] and sets t's bit on side s; W's completion releases the count, and W's data is
//! readable from then on. Bits of side s disappear only through `clear_old(r)` while s is old.
//! Let X be the first such clear after q(W), T the toggle that made s old before it (T is after
//! q(W), since s was current at q(W)), D the drain after T and C the copy between D and X.
//! T returns after an RCU grace period, so every program that read s as current — W's included
//! — has finished counting; D returns only when inflight[s] is zero, so c(W) precedes the end
//! of D, and C read t after c(W): it copied W's data or a later write's. Every later write W' is
//! itself marked until a copy made after c(W'). So for the last write to t: either t is still
//! marked, or some copy after its completion put `device[t]` into `replica[t]`.
//!
//! The same harness without the drain (`copy_without_drain_is_caught`) must find missed tracks:
//! the checker catches the race when writes outlive the toggle.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use tandem_bpf::{Flavor, Volume};

const TRACK: u64 = 64 * 1024;
const TRACKS: u64 = 1024;
const TRACKS_PER_RANGE: u32 = 64;
const ZONE: u64 = 8;
const WRITERS: u64 = 48;

#[derive(Default)]
struct Stats {
    writes: AtomicU64,
    cycles: AtomicU64,
    copied: AtomicU64,
    /// Destages whose drain found writes still in flight on the old side after the toggle.
    drains_that_waited: AtomicU64,
    max_inflight_at_drain: AtomicU64,
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn writer(f: &File, id: u64, throttle: Option<&Throttle>, stop: &AtomicBool, stats: &Stats) {
    if let Some(t) = throttle {
        t.enter();
    }
    let zones: Vec<u64> = (0..TRACKS / ZONE).filter(|z| z % WRITERS == id).collect();
    let mut rng = 0x9e37_79b9_7f4a_7c15 ^ (id + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut buf = AlignedBuf::new((ZONE * TRACK) as usize);
    let mut counter = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let zone = zones[(xorshift(&mut rng) % zones.len() as u64) as usize];
        let first = xorshift(&mut rng) % ZONE;
        let count = 1 + xorshift(&mut rng) % (ZONE - first);
        counter += 1;
        let seq = (id + 1) << 48 | counter;
        for i in 0..count as usize {
            let at = i * TRACK as usize;
            buf.as_mut_slice()[at..at + 8].copy_from_slice(&seq.to_le_bytes());
        }
        let offset = (zone * ZONE + first) * TRACK;
        f.write_all_at(&buf.as_slice()[..(count * TRACK) as usize], offset).unwrap();
        stats.writes.fetch_add(1, Ordering::Relaxed);
    }
}

/// A cgroup-v1 blkio group that throttles writes to the disk under the loop device's backing
/// file. The loop driver issues a bio's backing I/O on behalf of the bio's cgroup, so writers
/// in this group see their loop writes stay in flight for tens of milliseconds — longer than a
/// toggle's grace period, which is what makes the drain matter. Without it, every write queued
/// before a toggle has long completed when the toggle returns and the race is never run.
struct Throttle {
    dir: std::path::PathBuf,
}

impl Throttle {
    fn new(backing: &std::path::Path, iops: u32) -> Option<Throttle> {
        let root = std::path::Path::new("/sys/fs/cgroup/blkio");
        if !root.join("blkio.throttle.write_iops_device").exists() {
            eprintln!("no cgroup-v1 blkio throttling at {}: writes will not outlive toggles", root.display());
            return None;
        }
        let st_dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(backing).ok()?);
        let dir = root.join(format!("tandem-race-{}-{}", std::process::id(), volume_name("cg")));
        std::fs::create_dir(&dir).ok()?;
        let throttle = Throttle { dir };
        let rule = format!("{}:{} {iops}", libc::major(st_dev), libc::minor(st_dev));
        if let Err(e) = std::fs::write(throttle.dir.join("blkio.throttle.write_iops_device"), &rule) {
            eprintln!("cannot throttle writes ({rule}): {e}");
            return None;
        }
        Some(throttle)
    }

    /// Moves the calling thread into the group.
    fn enter(&self) {
        let tid = unsafe { libc::gettid() };
        std::fs::write(self.dir.join("tasks"), tid.to_string()).unwrap();
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        // Empty once the writer threads have exited.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The sequence number in the first bytes of a track on the device.
fn read_seq(f: &File, track: u64, buf: &mut AlignedBuf) -> u64 {
    f.read_exact_at(buf.as_mut_slice(), track * TRACK).unwrap();
    u64::from_le_bytes(buf.as_slice()[..8].try_into().unwrap())
}

fn destager(v: &Volume, f: &File, replica: &Mutex<HashMap<u64, u64>>, drain: bool, stop: &AtomicBool, stats: &Stats) {
    let mut buf = AlignedBuf::new(4096);
    let mut range = 0;
    while !stop.load(Ordering::Relaxed) {
        v.toggle(range).unwrap();
        let state = v.range_state(range).unwrap();
        let inflight = state.inflight[state.old() as usize];
        if inflight > 0 {
            stats.drains_that_waited.fetch_add(1, Ordering::Relaxed);
            stats.max_inflight_at_drain.fetch_max(inflight, Ordering::Relaxed);
        }
        if drain {
            v.wait_old_drained(range, Duration::from_secs(90)).unwrap();
        }
        let old = v.range_tracks(range).unwrap().old;
        for &t in &old {
            let seq = read_seq(f, t, &mut buf);
            replica.lock().unwrap().insert(t, seq);
        }
        v.clear_old(range).unwrap();
        stats.copied.fetch_add(old.len() as u64, Ordering::Relaxed);
        stats.cycles.fetch_add(1, Ordering::Relaxed);
        range = (range + 1) % v.range_count();
    }
}

struct Outcome {
    /// (round, track, sequence number on the device, sequence number in the replica)
    missed: Vec<(u32, u64, u64, u64)>,
    /// Whether writes were throttled so that they outlive toggles.
    throttled: bool,
}

/// Runs `rounds` rounds of racing writes and destages and checks the invariant at the end of
/// each.
fn race(flavor: Flavor, drain: bool, rounds: u32, round_time: Duration) -> Outcome {
    let dev = LoopDevice::new(TRACKS * TRACK, true);
    let throttle = Throttle::new(&dev.backing, 400);
    let name = volume_name("race");
    let _pinned = Pinned(name.clone());
    let v = Volume::load(&config(&name, &dev.path, TRACK as u32, TRACKS_PER_RANGE, TRACKS, flavor)).unwrap();
    let f = dev.open_direct();
    let replica = Mutex::new(HashMap::new());
    let stats = Stats::default();
    let mut missed = Vec::new();
    let start = Instant::now();
    for round in 0..rounds {
        let stop_writers = AtomicBool::new(false);
        let stop_destager = AtomicBool::new(false);
        std::thread::scope(|s| {
            let destage = s.spawn(|| destager(&v, &f, &replica, drain, &stop_destager, &stats));
            let writers: Vec<_> = (0..WRITERS)
                .map(|id| {
                    s.spawn({
                        let (f, throttle, stop, stats) = (&f, throttle.as_ref(), &stop_writers, &stats);
                        move || writer(f, id, throttle, stop, stats)
                    })
                })
                .collect();
            std::thread::sleep(round_time);
            stop_writers.store(true, Ordering::SeqCst);
            for w in writers {
                w.join().unwrap();
            }
            stop_destager.store(true, Ordering::SeqCst);
            destage.join().unwrap();
        });
        // Quiescent point: check the invariant on every track.
        let replica = replica.lock().unwrap();
        let mut buf = AlignedBuf::new(4096);
        for t in 0..TRACKS {
            let on_device = read_seq(&f, t, &mut buf);
            let copied = replica.get(&t).copied().unwrap_or(0);
            if on_device != copied && !v.is_marked(t).unwrap() {
                missed.push((round, t, on_device, copied));
            }
        }
        if flavor == Flavor::TpBtf {
            for (r, state) in v.range_states().iter().enumerate() {
                assert_eq!(state.untracked, 0, "range {r}: {state:?}");
            }
        }
    }
    let untracked: u64 = v.range_states().iter().map(|s| s.untracked).sum();
    let s = |a: &AtomicU64| a.load(Ordering::Relaxed);
    eprintln!(
        "{flavor} drain={drain}: {} rounds in {:?}: {} writes, {} destage cycles, {} tracks copied, \
         {} drains found writes still in flight after the toggle (max {}), {} untracked writes, {} missed tracks",
        rounds,
        start.elapsed(),
        s(&stats.writes),
        s(&stats.cycles),
        s(&stats.copied),
        s(&stats.drains_that_waited),
        s(&stats.max_inflight_at_drain),
        untracked,
        missed.len()
    );
    assert!(s(&stats.writes) > 100 && s(&stats.cycles) > 10 && s(&stats.copied) > 0, "the race did not run");
    if throttle.is_some() {
        assert!(s(&stats.drains_that_waited) > 0, "no write outlived a toggle: the race was not exercised");
    }
    v.unpin().unwrap();
    Outcome { missed, throttled: throttle.is_some() }
}

#[test]
fn toggle_drain_clear_never_misses_a_write_tp_btf() {
    if skip("toggle_drain_clear_never_misses_a_write_tp_btf") {
        return;
    }
    let missed = race(Flavor::TpBtf, true, 6, Duration::from_millis(700)).missed;
    assert!(missed.is_empty(), "missed tracks (round, track, device seq, replica seq): {missed:?}");
}

#[test]
fn toggle_drain_clear_never_misses_a_write_classic() {
    if skip("toggle_drain_clear_never_misses_a_write_classic") {
        return;
    }
    let missed = race(Flavor::Classic, true, 6, Duration::from_millis(700)).missed;
    assert!(missed.is_empty(), "missed tracks (round, track, device seq, replica seq): {missed:?}");
}

/// The negative control: the same race without the drain loses writes, and the checker sees it.
#[test]
fn copy_without_drain_is_caught() {
    if skip("copy_without_drain_is_caught") {
        return;
    }
    let outcome = race(Flavor::TpBtf, false, 3, Duration::from_millis(700));
    if outcome.throttled {
        assert!(!outcome.missed.is_empty(), "without the drain, the race must lose writes and the checker must see it");
    }
}
