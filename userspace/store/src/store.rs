//! The store: one volume's backing file or block device, driven through io_uring.
//!
//! # The cache is the page cache
//!
//! I/O is buffered: a write completes once its data is in the kernel's page cache. That is
//! the volatile cache of `memory` mode, and it is the right one because it lives in the
//! kernel, not in the daemon: when the daemon crashes or is killed, the kernel keeps the
//! dirty pages and writes them back, so a killed daemon loses its memory but not its cache
//! (protocol.md §7.2, "killed daemon"). Only the loss of the machine loses the cache, which is
//! exactly the failure the protocol covers with the peer's copy and its records.
//!
//! # What completes when
//!
//! | operation | its completion means |
//! |---|---|
//! | write, discard, write-zeroes | the data is in the page cache (a discard or write-zeroes via `fallocate` is applied to the file or device); reads return it |
//! | FUA write / discard / write-zeroes | as above, then hardened: a datasync of exactly the written range (`vfs_fsync_range`, the same call `O_DSYNC` makes after each write) |
//! | `Harden(All)` | `fdatasync(2)` of the whole file or device |
//! | `Harden(Range)`, `Harden(Extent)` | a datasync of that byte range (IORING_OP_FSYNC with an offset and length) |
//! | read | the data read |
//! | `PersistMeta` | the record is in its slot and hardened (see `meta_file`) |
//!
//! "Hardened" means: every write to the range that *completed before the harden was
//! submitted* is on stable media. The datasync writes back the range's dirty pages and waits
//! for them (including pages background writeback had already started), has the file system
//! commit the metadata needed to read them back (allocations of holes, `fallocate` results:
//! `fdatasync` semantics, not `fsync`'s timestamps), and issues a cache flush to the device,
//! so the disk's own volatile write cache is included. A ranged datasync differs from a full
//! one only in which dirty pages it writes back; the metadata commit and the device flush are
//! the same. On a block device it is `blkdev_fsync`: write back the range, then flush.
//!
//! Why FUA is "write, then datasync the range" rather than `RWF_DSYNC`: the guarantee is the
//! same (`RWF_DSYNC` makes the very same `vfs_fsync_range` call after the write), but io_uring
//! hands synchronous buffered writes to its workers, which run writes to one file one after
//! another; separate datasync steps run side by side and share journal commits and device
//! flushes. Its completion is reported only after both steps succeeded.
//!
//! Why not `sync_file_range(2)`: it neither commits file-system metadata nor flushes the
//! device's write cache, and its manual page says it is unfit for data integrity. A harden
//! that completed on it would not mean stable.
//!
//! # Small writes skip the ring
//!
//! io_uring cannot issue a buffered write to most file systems (ext4 among them) without
//! blocking, so it hands every one to a kernel worker thread: submitting a 4 KiB write then
//! costs two thread wake-ups (ring thread to worker and back) on top of the copy. A data write
//! of at most [`Store::inline_write_max`] bytes (default [`INLINE_WRITE_MAX`]) is therefore
//! written by [`Store::submit`] itself, on the caller's thread, with `pwrite(2)`: a copy into
//! the page cache, the same thing the worker would do. Its completion is delivered before
//! `submit` returns; a FUA write then queues the datasync of its range to the ring. The
//! guarantees in the table above are the same either way, and the node never has two
//! overlapping writes in flight, so the order in which they reach the page cache cannot matter.
//!
//! Write-back errors: when the kernel fails to write back a dirty page in the background, the
//! error is recorded on the file and the next datasync on it (any range) reports it once. The
//! store keeps one descriptor per file, so that report reaches a harden, whose `Err` fails the
//! disk (protocol.md §3.4): the page may be gone from the cache, and the node stops trusting
//! the device.
//!
//! The guarantees are the file system's: on tmpfs nothing is ever stable (harden succeeds and
//! means nothing), and a file system that ignores flushes weakens them all. Put backing files
//! on a local journaling file system (ext4, xfs) or use a block device.

use crate::error::StoreError;
use crate::meta_file::{self, MetaFile};
use crate::ring::{self, Engine, Job};
use crate::sys::{self, EventFd, Kind};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use io_uring::{opcode, IoUring, Probe};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use tandem_core::node::{Action, Event, HardenScope, IoError, IoId, Meta, Payload};
use tandem_core::{Extent, Geometry};

/// Largest read the store buffers at once (the protocol reads one track, at most 4 MiB).
pub const MAX_READ: u64 = 64 << 20;

/// Data writes up to this size are written on the submitting thread (see the module docs).
pub const INLINE_WRITE_MAX: u64 = 128 << 10;

/// Where completions go: called once per accepted operation, from the ring thread, or from the
/// submitting thread for a write written inline.
pub(crate) type Sink = Arc<dyn Fn(Completion) + Send + Sync>;

/// The store operations: the four node actions that touch local storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    Write { io: IoId, offset: u64, payload: Payload, fua: bool },
    Read { io: IoId, offset: u64, len: u64 },
    Harden { io: IoId, scope: HardenScope },
    PersistMeta { io: IoId, meta: Meta },
}

impl StoreOp {
    pub fn io(&self) -> IoId {
        match self {
            StoreOp::Write { io, .. }
            | StoreOp::Read { io, .. }
            | StoreOp::Harden { io, .. }
            | StoreOp::PersistMeta { io, .. } => *io,
        }
    }
}

impl TryFrom<Action> for StoreOp {
    /// Any other action, handed back.
    type Error = Action;

    fn try_from(a: Action) -> Result<StoreOp, Action> {
        Ok(match a {
            Action::WriteLocal { io, offset, payload, fua } => StoreOp::Write { io, offset, payload, fua },
            Action::ReadLocal { io, offset, len } => StoreOp::Read { io, offset, len },
            Action::Harden { io, scope } => StoreOp::Harden { io, scope },
            Action::PersistMeta { io, meta } => StoreOp::PersistMeta { io, meta },
            other => return Err(other),
        })
    }
}

/// A finished operation; reads carry their data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub io: IoId,
    pub result: Result<Option<Bytes>, IoError>,
}

impl From<Completion> for Event {
    fn from(c: Completion) -> Event {
        Event::IoDone { io: c.io, result: c.result }
    }
}

/// One volume's local storage. Dropping it finishes every accepted operation (their
/// completions are still sent) and stops the ring thread.
pub struct Store {
    path: PathBuf,
    kind: Kind,
    size: u64,
    geometry: Geometry,
    data: Arc<File>,
    /// Path and slot size of the metadata file, if there is one.
    meta: Option<(PathBuf, u64)>,
    jobs: Option<Sender<Job>>,
    wake: Arc<EventFd>,
    sink: Sink,
    /// Empty (and disconnected) when the store was opened with a sink.
    completions: Receiver<Completion>,
    inline_write_max: u64,
    thread: Option<JoinHandle<()>>,
}

impl Store {
    /// Opens a backing regular file or block device for a volume of `geometry`, without
    /// metadata (`PersistMeta` is then refused). The backing store must hold at least the
    /// volume; it is never grown, shrunk or created here.
    pub fn open(path: &Path, geometry: &Geometry) -> Result<Store, StoreError> {
        Store::start(path, *geometry, None, None)
    }

    /// Opens the backing store of the volume `meta` describes; `PersistMeta` writes to `meta`.
    pub fn open_with_meta(path: &Path, meta: MetaFile) -> Result<Store, StoreError> {
        let geometry = meta.header().geometry;
        Store::start(path, geometry, Some(meta), None)
    }

    /// [`Store::open`], delivering each completion by calling `sink` instead of through
    /// [`Store::completions`]: from the ring thread, or from the thread calling `submit` for a
    /// write done inline. `sink` must not block for long and must not call back into the store.
    pub fn open_with_sink(
        path: &Path,
        geometry: &Geometry,
        sink: impl Fn(Completion) + Send + Sync + 'static,
    ) -> Result<Store, StoreError> {
        Store::start(path, *geometry, None, Some(Arc::new(sink)))
    }

    /// [`Store::open_with_meta`] with a completion sink, as in [`Store::open_with_sink`].
    pub fn open_with_meta_and_sink(
        path: &Path,
        meta: MetaFile,
        sink: impl Fn(Completion) + Send + Sync + 'static,
    ) -> Result<Store, StoreError> {
        let geometry = meta.header().geometry;
        Store::start(path, geometry, Some(meta), Some(Arc::new(sink)))
    }

    fn start(path: &Path, geometry: Geometry, meta: Option<MetaFile>, sink: Option<Sink>) -> Result<Store, StoreError> {
        let m = fs::metadata(path).map_err(|e| StoreError::io("stat", path, e))?;
        let kind = Kind::of(&m);
        if let Kind::Other(k) = kind {
            return Err(StoreError::NotFileOrBlockDevice { path: path.into(), kind: k });
        }
        let file = sys::open_rw(path, kind).map_err(|e| meta_file::open_error(path, kind, e))?;
        if kind == Kind::File && !sys::try_lock(&file).map_err(|e| StoreError::io("lock", path, e))? {
            return Err(StoreError::InUse {
                path: path.into(),
                why: "another process holds its lock (is a tandem daemon already serving it?)",
            });
        }
        let size = sys::size_of(&file, kind).map_err(|e| StoreError::io("size", path, e))?;
        let volume_size = geometry.volume_size();
        if size < volume_size {
            return Err(StoreError::BackingTooSmall {
                path: path.into(),
                kind: kind.name(),
                size,
                volume_size,
                missing: volume_size - size,
            });
        }
        let ring = new_ring()?;
        let wake = Arc::new(EventFd::new().map_err(|e| StoreError::io("create eventfd for", path, e))?);
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let sink = sink.unwrap_or_else(|| {
            Arc::new(move |c| {
                // A dropped receiver means nobody waits for completions any more.
                let _ = done_tx.send(c);
            })
        });
        let data = Arc::new(file);
        let meta_info = meta.as_ref().map(|m| (m.path().to_path_buf(), m.slot_size()));
        let engine = Engine {
            ring,
            jobs: jobs_rx,
            wake: wake.clone(),
            done: sink.clone(),
            data: data.clone(),
            data_name: path.display().to_string(),
            meta,
        };
        let thread = std::thread::Builder::new()
            .name("tandem-store".into())
            .spawn(move || engine.run())
            .map_err(|e| StoreError::io("start the ring thread for", path, e))?;
        Ok(Store {
            path: path.into(),
            kind,
            size,
            geometry,
            data,
            meta: meta_info,
            jobs: Some(jobs_tx),
            wake,
            sink,
            completions: done_rx,
            inline_write_max: INLINE_WRITE_MAX,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Size of the backing file or device (at least the volume size).
    pub fn backing_size(&self) -> u64 {
        self.size
    }

    pub fn is_block_device(&self) -> bool {
        self.kind == Kind::BlockDevice
    }

    /// Starts an operation; its completion arrives on [`Store::completions`] (or the sink).
    /// An `Err` means the operation was refused as invalid (or the store is closed) and no
    /// completion will come for it. It does not wait for I/O, except that a data write of at
    /// most [`Store::inline_write_max`] bytes is copied into the page cache here (and, unless
    /// FUA, has completed when this returns): see the module docs.
    pub fn submit(&self, op: StoreOp) -> Result<(), StoreError> {
        let job = self.validate(op)?;
        let jobs = self.jobs.as_ref().ok_or(StoreError::Closed)?;
        let job = match job {
            Job::Write { io, offset, payload: Payload::Data(data), fua }
                if data.len() as u64 <= self.inline_write_max =>
            {
                match self.write_inline(offset, &data, fua) {
                    Ok(()) if fua => Job::Harden { io, offset, len: data.len() as u64, fua_write: true },
                    result => {
                        (self.sink)(Completion { io, result: result.map(|()| None) });
                        return Ok(());
                    }
                }
            }
            job => job,
        };
        jobs.send(job).map_err(|_| StoreError::Closed)?;
        self.wake.notify();
        Ok(())
    }

    /// The largest data write [`Store::submit`] writes on the calling thread.
    pub fn inline_write_max(&self) -> u64 {
        self.inline_write_max
    }

    /// Changes [`Store::inline_write_max`]; 0 sends every write through the ring.
    pub fn set_inline_write_max(&mut self, bytes: u64) {
        self.inline_write_max = bytes;
    }

    fn write_inline(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
        // write_all_at retries short writes and EINTR, and fails on a write of 0 bytes.
        self.data.write_all_at(data, offset).map_err(|e| {
            let what = if fua { "FUA write" } else { "write" };
            let len = data.len();
            IoError(format!("{what} of {len} bytes at offset {offset} on {}: write failed: {e}", self.path.display()))
        })
    }

    /// [`Store::submit`] for a node action; refuses actions that are not store operations.
    pub fn submit_action(&self, action: Action) -> Result<(), StoreError> {
        let op = StoreOp::try_from(action).map_err(|a| StoreError::NotAStoreAction(action_name(&a)))?;
        self.submit(op)
    }

    /// Completions, in the order the operations finish (not the order they were submitted).
    /// Disconnected and empty when the store was opened with a sink.
    pub fn completions(&self) -> &Receiver<Completion> {
        &self.completions
    }

    /// The backing file's descriptor, for a frontend that reads the volume on a ring of its
    /// own (ublk): the same page cache as the store's writes, so reads see every completed
    /// write. Open as long as the store is.
    pub fn data_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.data.as_fd()
    }

    /// Reads synchronously on the caller's thread, for host reads the frontend serves. It goes
    /// through the same page cache as the ring's writes, so it sees every completed write.
    pub fn read_sync(&self, offset: u64, len: u64) -> io::Result<Bytes> {
        self.geometry
            .check(Extent::new(offset, len))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        if len > MAX_READ {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("read of {len} bytes exceeds {MAX_READ}")));
        }
        let mut buf = vec![0u8; len as usize];
        self.data.read_exact_at(&mut buf, offset).map_err(|e| {
            io::Error::new(e.kind(), format!("read of {len} bytes at offset {offset} of {}: {e}", self.path.display()))
        })?;
        Ok(Bytes::from(buf))
    }

    fn validate(&self, op: StoreOp) -> Result<Job, StoreError> {
        let g = &self.geometry;
        let check = |io, op, offset, len| {
            g.check(Extent::new(offset, len)).map_err(|source| StoreError::InvalidExtent { io, op, source })
        };
        Ok(match op {
            StoreOp::Write { io, offset, payload, fua } => {
                check(io, "write", offset, payload.len())?;
                Job::Write { io, offset, payload, fua }
            }
            StoreOp::Read { io, offset, len } => {
                check(io, "read", offset, len)?;
                if len > MAX_READ {
                    return Err(StoreError::ReadTooLarge { io, len, max: MAX_READ });
                }
                Job::Read { io, offset, len }
            }
            StoreOp::Harden { io, scope: HardenScope::All } => Job::Harden { io, offset: 0, len: 0, fua_write: false },
            StoreOp::Harden { io, scope: HardenScope::Range(range) } => {
                g.check_range(range).map_err(|source| StoreError::InvalidExtent { io, op: "harden", source })?;
                let tracks = g.tracks_in_range(range);
                let track = u64::from(g.track_size());
                let offset = tracks.start * track;
                let end = (tracks.end * track).min(g.volume_size());
                Job::Harden { io, offset, len: end - offset, fua_write: false }
            }
            StoreOp::Harden { io, scope: HardenScope::Extent(e) } => {
                check(io, "harden", e.offset, e.len)?;
                Job::Harden { io, offset: e.offset, len: e.len, fua_write: false }
            }
            StoreOp::PersistMeta { io, meta } => {
                let (meta_path, slot_size) = self.meta.as_ref().ok_or(StoreError::NoMetadata { io })?;
                let (stored, expected) = (meta.out_of_sync.len() as u64, g.track_count());
                if stored != expected {
                    return Err(StoreError::MetaTracks { io, stored, expected });
                }
                let need = crate::codec::slot_len(&meta);
                if !crate::codec::encodable(&meta) || need > *slot_size {
                    return Err(StoreError::MetaTooLarge { path: meta_path.clone(), need, slot_size: *slot_size });
                }
                Job::Persist { io, meta: Box::new(meta) }
            }
        })
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Disconnect the channel, then wake the thread so it notices: it finishes what was
        // accepted and exits.
        self.jobs = None;
        self.wake.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn action_name(a: &Action) -> &'static str {
    match a {
        Action::WriteLocal { .. } => "WriteLocal",
        Action::ReadLocal { .. } => "ReadLocal",
        Action::Harden { .. } => "Harden",
        Action::PersistMeta { .. } => "PersistMeta",
        Action::Send { .. } => "Send",
        Action::CompleteHost { .. } => "CompleteHost",
        Action::SetTimer { .. } => "SetTimer",
        Action::Disconnect { .. } => "Disconnect",
    }
}

/// Sets up a ring and checks that the kernel offers every operation the store issues.
fn new_ring() -> Result<IoUring, StoreError> {
    let ring = IoUring::builder().build(ring::RING_ENTRIES).map_err(|source| {
        let reason = match source.raw_os_error() {
            Some(libc::ENOSYS) => {
                "the kernel has no io_uring (too old, built without it, or a seccomp filter hides it)"
            }
            Some(libc::EPERM) => {
                "io_uring is not permitted (the kernel.io_uring_disabled sysctl, a seccomp filter or the container \
                 runtime forbids it)"
            }
            Some(libc::ENOMEM) => "no memory for the ring (raise the locked-memory limit, ulimit -l)",
            _ => "io_uring_setup failed",
        };
        StoreError::IoUringUnavailable { reason, source }
    })?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|source| StoreError::IoUringUnavailable { reason: "probing its operations failed", source })?;
    let needed = [
        (opcode::Read::CODE, "read"),
        (opcode::Write::CODE, "write"),
        (opcode::Fsync::CODE, "fsync"),
        (opcode::Fallocate::CODE, "fallocate"),
        (opcode::PollAdd::CODE, "poll"),
    ];
    if let Some((_, op)) = needed.iter().find(|(code, _)| !probe.is_supported(*code)) {
        return Err(StoreError::IoUringOpcode { op });
    }
    Ok(ring)
}
