//! Loader for the eBPF write-recording programs in `ebpf/` and the pinned map layout.
//!
//! Per volume, one instance of the programs records every write, discard and write-zeroes bio
//! queued to the volume's block device into a per-range current/old bitmap pair, in maps pinned
//! under `/sys/fs/bpf/tandem/<volume>/` (see `ebpf/tandem.h` and docs/observability.md). The
//! daemon reads and toggles them through mmap ([`Volume`]); they outlive the daemon.
//!
//! ```no_run
//! use std::time::Duration;
//! use tandem_bpf::{Volume, VolumeConfig};
//!
//! let config = VolumeConfig::new("vol0", std::path::Path::new("/dev/loop0"), 64 * 1024, 16384, 4096);
//! let volume = Volume::load(&config)?;          // attach + pin
//! let dirty = volume.dirty_tracks();            // mmap, no syscall
//! volume.destage_range(0, Duration::from_secs(30), |old_tracks| {
//!     // copy (or harden) `old_tracks`; they are cleared when this returns Ok
//!     Ok(())
//! })?;
//! drop(volume);                                 // still pinned, still recording
//! let volume = Volume::open("vol0")?;           // e.g. after a daemon restart
//! volume.unpin()?;                              // detach + remove the pins
//! # Ok::<(), tandem_bpf::BpfError>(())
//! ```

use std::fmt;
use std::mem::MaybeUninit;
use std::path::Path;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};

mod device;
mod error;
pub mod layout;
mod sys;
mod volume;

pub use device::{kernel_dev, DeviceInfo, DeviceRef};
pub use error::BpfError;
pub use volume::{
    pin_dir, unpin, InflightBio, RangeTracks, Volume, VolumeConfig, BPFFS, CLASSIC_REAP_AGE, KERNEL_BTF,
    MAX_TRACK_SIZE, MIN_TRACK_SIZE, PIN_ROOT,
};

#[allow(
    clippy::all,
    clippy::pedantic,
    dead_code,
    missing_docs,
    unused_imports,
    unsafe_op_in_unsafe_fn,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals
)]
mod skel_btf {
    include!(concat!(env!("OUT_DIR"), "/tandem.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    dead_code,
    missing_docs,
    unused_imports,
    unsafe_op_in_unsafe_fn,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals
)]
mod skel_classic {
    include!(concat!(env!("OUT_DIR"), "/tandem_classic.skel.rs"));
}

/// The compiled program objects, for tools and tests (e.g. to read their BTF).
pub mod objects {
    /// `ebpf/tandem.bpf.c`: tp_btf programs, CO-RE.
    pub const TP_BTF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tandem.bpf.o"));
    /// `ebpf/tandem_classic.bpf.c`: classic tracepoint programs, no CO-RE.
    pub const CLASSIC: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tandem_classic.bpf.o"));
}

/// Which programs record a volume's writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// `tp_btf/block_bio_queue` + `tp_btf/block_rq_complete` (and `block_split`,
    /// `block_bio_complete`; needs kernel BTF). `cargo xtask bench ebpf`: ≈ 4 % of the 4 KiB
    /// random-write IOPS of a memory-backed loop device at QD32 (docs/observability.md, "Cost").
    TpBtf,
    /// `tracepoint/block/block_bio_queue` and the same three others: loads without BTF, costs
    /// more per bio (≈ 9 % of those IOPS).
    Classic,
}

impl Flavor {
    /// `tandem_params.flavor`.
    pub fn code(self) -> u32 {
        match self {
            Flavor::TpBtf => layout::FLAVOR_TP_BTF,
            Flavor::Classic => layout::FLAVOR_CLASSIC,
        }
    }

    pub fn from_code(code: u32) -> Option<Flavor> {
        match code {
            layout::FLAVOR_TP_BTF => Some(Flavor::TpBtf),
            layout::FLAVOR_CLASSIC => Some(Flavor::Classic),
            _ => None,
        }
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::TpBtf => "tp_btf",
            Flavor::Classic => "classic tracepoint",
        })
    }
}

/// Which programs [`Volume::load`] tries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlavorChoice {
    /// tp_btf, and the classic tracepoints if tp_btf fails to load or attach.
    #[default]
    Auto,
    TpBtf,
    Classic,
}

/// Whether this process can record writes with BPF, and with what.
#[derive(Debug)]
pub struct Availability {
    /// The best flavour that loads here, if any.
    pub flavor: Option<Flavor>,
    /// Why the flavours that do not load here do not (`None`: a problem for both).
    pub problems: Vec<(Option<Flavor>, BpfError)>,
}

impl Availability {
    pub fn is_available(&self) -> bool {
        self.flavor.is_some()
    }

    /// One line for `tandem status` and the daemon's log.
    pub fn summary(&self) -> String {
        let problems = self
            .problems
            .iter()
            .map(|(f, e)| match f {
                Some(f) => format!("{f}: {e}"),
                None => e.to_string(),
            })
            .collect::<Vec<_>>()
            .join("; ");
        match self.flavor {
            Some(f) if self.problems.is_empty() => format!("BPF write recording available ({f})"),
            Some(f) => format!("BPF write recording available ({f}; {problems})"),
            None => format!("BPF write recording unavailable, falling back to in-process bitmaps: {problems}"),
        }
    }
}

/// Checks, without attaching or pinning anything, whether the programs load here: bpf(2)
/// permission first, then each flavour, best first, loaded and dropped.
pub fn probe() -> Availability {
    let _guard = volume::load_lock();
    if let Err(e) = sys::check_bpf_permission() {
        return Availability { flavor: None, problems: vec![(None, e)] };
    }
    let mut problems = Vec::new();
    for candidate in [Flavor::TpBtf, Flavor::Classic] {
        match probe_load(candidate) {
            Ok(()) => return Availability { flavor: Some(candidate), problems },
            Err(e) => problems.push((Some(candidate), e)),
        }
    }
    Availability { flavor: None, problems }
}

fn probe_load(flavor: Flavor) -> Result<(), BpfError> {
    fn load<'obj, B: SkelBuilder<'obj>>(
        builder: B,
        storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
        flavor: Flavor,
        capture: &volume::LogCapture,
    ) -> Result<(), BpfError> {
        let err = |source: libbpf_rs::Error| {
            if source.kind() == libbpf_rs::ErrorKind::PermissionDenied {
                BpfError::NoPermission {
                    op: format!("loading the {flavor} programs"),
                    source: std::io::Error::from_raw_os_error(libc::EPERM),
                }
            } else {
                BpfError::Load { flavor, source, log: capture.take() }
            }
        };
        let open = builder.open(storage).map_err(err)?;
        open.load().map_err(err)?;
        Ok(())
    }
    let capture = volume::LogCapture::start();
    let mut storage = MaybeUninit::uninit();
    match flavor {
        Flavor::TpBtf => {
            if !Path::new(KERNEL_BTF).exists() {
                return Err(BpfError::BtfMissing { path: KERNEL_BTF.into() });
            }
            load(skel_btf::TandemSkelBuilder::default(), &mut storage, flavor, &capture)
        }
        Flavor::Classic => {
            load(skel_classic::TandemClassicSkelBuilder::default(), &mut storage, flavor, &capture)?;
            let events = [sys::DEBUG_TRACEFS, sys::TRACEFS]
                .iter()
                .map(|t| Path::new(t).join("events/block"))
                .find(|p| p.exists());
            match events {
                Some(dir) if !dir.join("block_bio_queue").exists() => Err(BpfError::TracepointMissing {
                    name: "block/block_bio_queue".into(),
                    detail: format!("{} has no block_bio_queue", dir.display()),
                }),
                // tracefs not mounted yet: Volume::load mounts it.
                _ => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests;
