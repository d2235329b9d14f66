//! Errors of the loader and of the map view.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::Flavor;

/// Everything that can go wrong loading, attaching, pinning or using the programs and maps.
#[derive(Debug, Error)]
pub enum BpfError {
    #[error(
        "BPF is not permitted: {op} failed: {source}; the daemon needs root (or CAP_BPF, \
         CAP_PERFMON and CAP_SYS_ADMIN to mount bpffs/tracefs), and a container's seccomp \
         profile or kernel.unprivileged_bpf_disabled / lockdown can forbid bpf(2)"
    )]
    NoPermission { op: String, source: std::io::Error },

    #[error(
        "kernel BTF is missing: {path} does not exist (kernel built without CONFIG_DEBUG_INFO_BTF); \
         the tp_btf programs need it, the classic tracepoint programs do not"
    )]
    BtfMissing { path: PathBuf },

    #[error("tracepoint {name} is not available: {detail}")]
    TracepointMissing { name: String, detail: String },

    #[error("BPF filesystem at {path}: {detail}")]
    BpfFs { path: PathBuf, detail: String },

    #[error("volume name {name:?} is not usable for a pin directory: {why}")]
    InvalidName { name: String, why: &'static str },

    #[error("invalid volume geometry: {0}")]
    Geometry(String),

    #[error("device {device}: {detail}")]
    Device { device: String, detail: String },

    #[error(
        "volume {volume} is already loaded: its programs are attached and pinned under {}; \
         open it with Volume::open, or unpin it first",
        dir.display()
    )]
    AlreadyLoaded { volume: String, dir: PathBuf },

    #[error("volume {volume} is not loaded: nothing is pinned at {}", path.display())]
    NotLoaded { volume: String, path: PathBuf },

    #[error("pinned map {} does not match this build ({detail}); unpin it to start over", path.display())]
    Layout { path: PathBuf, detail: String },

    #[error("loading the {flavor} programs failed: {source}{}", LogTail(log))]
    Load { flavor: Flavor, source: libbpf_rs::Error, log: Vec<String> },

    #[error("attaching {program} ({flavor}) failed: {source}{}", LogTail(log))]
    Attach { flavor: Flavor, program: &'static str, source: libbpf_rs::Error, log: Vec<String> },

    #[error("neither flavour of the programs could be loaded: tp_btf: {tp_btf}; classic: {classic}")]
    NoFlavor { tp_btf: Box<BpfError>, classic: Box<BpfError> },

    #[error("range {range} is beyond the volume's {ranges} ranges")]
    NoSuchRange { range: u32, ranges: u32 },

    #[error("track {track} is beyond the volume's {tracks} tracks")]
    NoSuchTrack { track: u64, tracks: u64 },

    #[error(
        "range {range}: {inflight} write bio(s) counted on side {side} (the old side) were still \
         in flight after {waited:?}{}; the old side must not be cleared yet",
        oldest.map(|d| format!(", the oldest queued {d:?} ago")).unwrap_or_default()
    )]
    DrainTimeout { range: u32, side: u32, inflight: u64, waited: Duration, oldest: Option<Duration> },

    #[error(
        "range {range}: its old side (side {side}) still holds marks and {inflight} write bio(s) \
         counted on it are in flight: wait for them (wait_old_drained) before toggling again"
    )]
    OldSideBusy { range: u32, side: u32, inflight: u64 },

    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },

    #[error("{what}: {source}")]
    Libbpf { what: String, source: libbpf_rs::Error },
}

impl BpfError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> BpfError {
        BpfError::Io { what: what.into(), source }
    }

    /// A libbpf error, classified: a permission error becomes [`BpfError::NoPermission`].
    pub(crate) fn libbpf(what: impl Into<String>, source: libbpf_rs::Error) -> BpfError {
        let what = what.into();
        if source.kind() == libbpf_rs::ErrorKind::PermissionDenied {
            return BpfError::NoPermission { op: what, source: std::io::Error::from_raw_os_error(libc::EPERM) };
        }
        BpfError::Libbpf { what, source }
    }

    /// True when the failure says BPF cannot be used by this process at all (so a fallback to
    /// the in-process bitmaps is the answer, not a retry).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            BpfError::NoPermission { .. }
                | BpfError::BtfMissing { .. }
                | BpfError::TracepointMissing { .. }
                | BpfError::BpfFs { .. }
                | BpfError::Load { .. }
                | BpfError::Attach { .. }
                | BpfError::NoFlavor { .. }
        )
    }
}

/// The last lines of libbpf's log (the verifier's verdict is at the end).
struct LogTail<'a>(&'a [String]);

impl fmt::Display for LogTail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const LINES: usize = 12;
        if self.0.is_empty() {
            return Ok(());
        }
        write!(f, "; libbpf said:")?;
        let skip = self.0.len().saturating_sub(LINES);
        if skip > 0 {
            write!(f, "\n  [{skip} earlier lines]")?;
        }
        for line in &self.0[skip..] {
            write!(f, "\n  {}", line.trim_end())?;
        }
        Ok(())
    }
}
