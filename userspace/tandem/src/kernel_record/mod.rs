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

mod clearing;
mod cycle;
mod inspect;
mod pin;
mod recovery;
mod tracks;

use std::path::PathBuf;

use tandem_bpf::BpfError;
use tandem_core::Geometry;
use thiserror::Error;

use crate::control::RecordView;

pub use clearing::Clearing;
pub use cycle::KernelRecord;
pub use inspect::inspect;
pub use recovery::recover_pinned;
#[cfg(doc)]
use recovery::Recovered;
pub use tracks::{track_runs, TrackSet};

crate::choice::choice! {
    /// `[node] record`: where the volume's record of written tracks lives.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub enum RecordChoice: "record" {
        /// The kernel map when the BPF programs load here, else the in-process bitmaps.
        #[default]
        Auto = "auto",
        /// The kernel map; the daemon refuses to start without it.
        Bpf = "bpf",
        /// The in-process bitmaps only (no programs are loaded).
        Memory = "memory",
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
}
