//! The ublk frontend: the volume as `/dev/ublkbN`, served through the kernel's `ublk_drv`
//! (Linux >= 6.0; user recovery since 6.1) with the `libublk` crate.
//!
//! Shape: one libublk queue thread per hardware queue, each running one async task per tag on
//! the queue's own io_uring (libublk's per-tag model), and no thread in between: the volume is
//! a non-blocking [`UblkBackend`] driven from the queue threads themselves. A read is served on
//! the queue's ring, from the file the backend names ([`UblkBackend::read_source`]) straight
//! into the tag's buffer, which the kernel then copies to the request: no hand-off, no copy of
//! ours. A request that changes the volume is passed to [`UblkBackend::submit`] with the data
//! borrowed from the tag's buffer and a [`Done`] to complete it with; the tag then waits on an
//! eventfd read submitted on the same ring, which is how a completion from any other thread (the
//! daemon's event loop, say) wakes a queue thread that sleeps in its ring. A request completed
//! before `submit` returns is answered without waiting at all. Compared with a pool of threads
//! making blocking calls, this saves two thread wake-ups and two copies of the data per request,
//! and the queue thread still never blocks on the volume.
//!
//! Devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`: when the
//! serving process dies (kill -9, crash, upgrade), the kernel quiesces the device instead of
//! failing it, queues new I/O, and a new process that calls [`UblkFrontend::serve`] with
//! [`UblkStart::Recover`] re-attaches to the same `/dev/ublkbN`; requests the dead process had
//! taken are issued again to the new one. A filesystem mounted on the device sees a pause, not
//! an error.
//!
//! libublk's control ring is thread-local: a [`UblkCtrl`] must be used on the thread that made
//! it, which is why [`stop_device`] builds its own.

use std::fmt;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::thread;

use io_uring::{opcode, types};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkError, UblkFlags};

use crate::error::{BackendError, FrontendError, Result};

/// The ublk control device; present once `ublk_drv` is loaded.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";

/// A volume served from the ublk queue threads: nothing here may block for long.
///
/// Every call comes from a queue thread, which serves all the requests of its queue: a call that
/// blocks stalls them all. Reads never reach the backend as calls: the frontend reads
/// [`read_source`](Self::read_source) itself, on the queue's io_uring. Everything that changes
/// the volume goes through [`submit`](Self::submit), which starts the change and returns; the
/// request completes when its [`Done`] is completed, from whatever thread finishes it.
///
/// Offsets and lengths are multiples of the logical block size (512 bytes at least) inside
/// [`size`](Self::size).
///
/// Deadlock rule (as for [`crate::BlockBackend`]): the queue threads carry `PR_SET_IO_FLUSHER`
/// and the kernel may need them to make progress on writeback; an implementation must not wait
/// on the page cache of the device it serves, and the threads that complete requests should call
/// [`crate::set_io_flusher`] too.
pub trait UblkBackend: Send + Sync + 'static {
    /// Size of the volume in bytes: a positive multiple of `block_size()`. Must not change
    /// while served.
    fn size(&self) -> u64;

    /// Logical block size in bytes: a power of two in 512..=4096 (the kernel's ublk driver
    /// takes none bigger than a page).
    fn block_size(&self) -> u32;

    /// The open file reads are served from, on the queue's own ring (at the request's byte
    /// offset: the file holds the volume from its offset 0); or why reads fail now (e.g. a
    /// secondary node: a [`BackendError`] whose errno the request fails with). Asked once per
    /// read request. The descriptor must stay open while the device is served.
    ///
    /// Reads see what the file holds: a write must be in the file (its page cache is enough)
    /// before its [`Done`] completes, or a read that follows may miss it.
    fn read_source(&self) -> std::result::Result<RawFd, BackendError>;

    /// Starts a request that changes the volume. Must not block for long; `done` is completed
    /// exactly once, from any thread, possibly before this returns (see [`Done`]). The write
    /// data is borrowed for this call only: a backend that needs it later copies it.
    fn submit(&self, change: Change<'_>, done: Done);
}

/// A request that changes the volume, as [`UblkBackend::submit`] gets it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// Write `data` at `offset`; complete once it is acknowledged per the volume's mode. `fua`:
    /// complete only once the write is hardened (per the mode), as after a flush.
    Write {
        /// Byte offset in the volume.
        offset: u64,
        /// The data, borrowed from the request's buffer for the call to `submit` only.
        data: &'a [u8],
        /// Forced unit access.
        fua: bool,
    },
    /// Every write completed before this was submitted must be hardened (per the mode) when
    /// this completes.
    Flush,
    /// Deallocate a range. Afterwards the range **must read back as zeros**: write-zeroes
    /// without `REQ_NOUNMAP` comes here too.
    Discard {
        /// Byte offset in the volume.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Write zeros over a range, keeping it allocated (`REQ_OP_WRITE_ZEROES` with
    /// `REQ_NOUNMAP`).
    WriteZeroes {
        /// Byte offset in the volume.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl fmt::Debug for Change<'_> {
    /// Without the write's bytes: the length only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Write { offset, data, fua } => {
                f.debug_struct("Write").field("offset", offset).field("len", &data.len()).field("fua", fua).finish()
            }
            Change::Flush => f.write_str("Flush"),
            Change::Discard { offset, len } => {
                f.debug_struct("Discard").field("offset", offset).field("len", len).finish()
            }
            Change::WriteZeroes { offset, len } => {
                f.debug_struct("WriteZeroes").field("offset", offset).field("len", len).finish()
            }
        }
    }
}

/// Completes one request: call [`complete`](Self::complete) exactly once, from any thread.
/// Dropped without `complete`, it completes the request with `EIO` (so a lost request never
/// hangs its tag).
///
/// Completing stores the result where the request's tag looks and writes the tag's eventfd,
/// which ends the eventfd read the tag waits on in its queue's ring. A `Done` completed after
/// its device stopped serving completes nothing, harmlessly.
pub struct Done {
    /// Taken by the completion; `None` afterwards.
    tag: Option<Arc<TagShared>>,
}

impl Done {
    /// Completes the request with `result`: `Ok` is success (a write's full length), an error
    /// fails the request with its errno.
    pub fn complete(mut self, result: std::result::Result<(), BackendError>) {
        if let Some(tag) = self.tag.take() {
            tag.finish(result);
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if let Some(tag) = self.tag.take() {
            tracing::error!("ublk: a request's Done was dropped without completing it: failing it with EIO");
            tag.finish(Err(BackendError::io("the volume dropped a ublk request without completing it")));
        }
    }
}

impl fmt::Debug for Done {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Done").field("completed", &self.tag.is_none()).finish()
    }
}

/// How a ublk device is laid out and served.
#[derive(Clone, Debug)]
pub struct UblkOptions {
    /// Hardware queues (one serving thread each): 1..=64. Default: the CPUs, at most 4.
    pub queues: u16,
    /// Requests in flight per queue: 1..=4096. Default 64.
    pub depth: u16,
    /// The largest request in bytes (the kernel splits bigger ones): a multiple of 4096 up to
    /// 1 MiB. Default 512 KiB.
    pub max_io_bytes: u32,
}

impl Default for UblkOptions {
    fn default() -> Self {
        let cpus = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Self { queues: cpus.clamp(1, 4) as u16, depth: 64, max_io_bytes: 512 << 10 }
    }
}

impl UblkOptions {
    fn check(&self, block_size: u32) -> std::result::Result<(), String> {
        if !(1..=64).contains(&self.queues) {
            return Err(format!("queues {} is not in 1..=64", self.queues));
        }
        if !(1..=4096).contains(&self.depth) {
            return Err(format!("depth {} is not in 1..=4096", self.depth));
        }
        if self.max_io_bytes < 4096
            || self.max_io_bytes > 1 << 20
            || !self.max_io_bytes.is_multiple_of(4096)
            || !self.max_io_bytes.is_multiple_of(block_size)
        {
            return Err(format!(
                "max_io_bytes {} is not a multiple of 4096 and of the block size {block_size} in 4 KiB..=1 MiB",
                self.max_io_bytes
            ));
        }
        Ok(())
    }
}

/// Whether to make a new device or take over one whose server died.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UblkStart {
    /// A new device; the kernel picks its number.
    Add,
    /// Re-attach to device `id` (`/dev/ublkb<id>`), left quiesced by a server that died.
    /// Its queue count, depth and request size are the device's own; the options' are ignored.
    Recover {
        /// The device number.
        id: u32,
    },
}

/// A device being served, as [`UblkFrontend::serve`] reports it once it is live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UblkDevice {
    /// The device number N.
    pub id: u32,
    /// `/dev/ublkbN`.
    pub block_device: PathBuf,
}

/// Why ublk cannot be used here, or `None` when `/dev/ublk-control` exists. It does not load
/// the module: the caller decides whether to try `modprobe ublk_drv` first.
pub fn unavailable() -> Option<String> {
    if Path::new(UBLK_CONTROL).exists() {
        None
    } else {
        Some(format!(
            "{UBLK_CONTROL} does not exist (no ublk_drv: Linux >= 6.0 with CONFIG_BLK_DEV_UBLK, `modprobe ublk_drv`)"
        ))
    }
}

/// Serves one volume as a ublk block device.
pub struct UblkFrontend {
    backend: Arc<dyn UblkBackend>,
    options: UblkOptions,
}

impl UblkFrontend {
    /// Checks the volume's geometry and the options; touches no device yet.
    pub fn new(backend: Arc<dyn UblkBackend>, options: UblkOptions) -> Result<Self> {
        check_geometry(backend.size(), backend.block_size()).map_err(FrontendError::Geometry)?;
        options.check(backend.block_size()).map_err(FrontendError::Options)?;
        Ok(Self { backend, options })
    }

    /// Creates (or recovers) the device and serves it until it is stopped ([`stop_device`], or
    /// `ublk del`), then deletes it. `ready` is called once, on this thread, as soon as the
    /// device is live. If this process dies instead, the device stays, quiesced, for a
    /// [`UblkStart::Recover`].
    pub fn serve(self, start: UblkStart, ready: impl FnOnce(&UblkDevice) + Send + Sync + 'static) -> Result<()> {
        let (id, queues, depth, max_io_bytes, dev_flags) = match start {
            UblkStart::Add => {
                (-1, self.options.queues, self.options.depth, self.options.max_io_bytes, UblkFlags::UBLK_DEV_F_ADD_DEV)
            }
            UblkStart::Recover { id } => {
                let old = UblkCtrl::new_simple(id as i32).map_err(|e| ublk_error("open the device to recover", e))?;
                old.start_user_recover().map_err(|e| ublk_error("START_USER_RECOVERY", e))?;
                let info = old.dev_info();
                (
                    id as i32,
                    info.nr_hw_queues,
                    info.queue_depth,
                    info.max_io_buf_bytes,
                    UblkFlags::UBLK_DEV_F_RECOVER_DEV,
                )
            }
        };
        let ctrl = UblkCtrlBuilder::default()
            .name("tandem")
            .id(id)
            .nr_queues(queues)
            .depth(depth)
            .io_buf_bytes(max_io_bytes)
            .ctrl_flags(u64::from(libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE))
            .dev_flags(dev_flags)
            .build()
            .map_err(|e| ublk_error(if id < 0 { "ADD_DEV" } else { "open the device for recovery" }, e))?;

        let backend = self.backend.clone();
        let size = self.backend.size();
        let block_size = self.backend.block_size();
        let target = move |dev: &mut UblkDev| {
            set_params(dev, size, block_size);
            Ok(())
        };
        let queue = move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, &backend);
        let on_live = move |ctrl: &UblkCtrl| {
            let id = ctrl.dev_info().dev_id;
            ready(&UblkDevice { id, block_device: PathBuf::from(format!("/dev/ublkb{id}")) });
        };
        let served = ctrl.run_target(target, queue, on_live).map_err(|e| ublk_error("serve", e));
        // A device we recovered is not ours to delete on drop (libublk deletes only devices it
        // added), but an orderly end of serving removes it either way.
        if let Err(e) = ctrl.del_dev() {
            tracing::debug!("deleting ublk device after serving: {e:?}");
        }
        served.map(|_| ())
    }
}

/// The geometry ublk can serve: a block size the kernel's driver takes (a power of two from
/// 512 to a page; 4096 is the smallest page) and a size that is a positive multiple of it.
fn check_geometry(size: u64, block_size: u32) -> std::result::Result<(), String> {
    if !(512..=4096).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(format!("block size {block_size} is not a power of two in 512..=4096 (ublk)"));
    }
    if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
        return Err(format!("size {size} is not a positive multiple of the block size {block_size}"));
    }
    Ok(())
}

/// Stops device `id` from any thread: its serving threads see the queues go down and
/// [`UblkFrontend::serve`] returns (and deletes the device).
pub fn stop_device(id: u32) -> Result<()> {
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| ublk_error("open the device to stop it", e))?;
    ctrl.kill_dev().map_err(|e| ublk_error("STOP_DEV", e))?;
    Ok(())
}

/// The kernel's state of a ublk device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UblkState {
    /// Added but not started, or stopped.
    Dead,
    /// Served.
    Live,
    /// Its server died and user recovery holds its I/O: [`UblkStart::Recover`] re-attaches.
    Quiesced,
    /// A state this crate does not know (a newer kernel's).
    Other(u16),
}

/// The state of device `id`, or `None` when there is no such device (no `/dev/ublkc<id>`).
pub fn device_state(id: u32) -> Result<Option<UblkState>> {
    if !Path::new(&format!("/dev/ublkc{id}")).exists() {
        return Ok(None);
    }
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| ublk_error("open the device to read its state", e))?;
    ctrl.read_dev_info().map_err(|e| ublk_error("GET_DEV_INFO", e))?;
    Ok(Some(match u32::from(ctrl.dev_info().state) {
        libublk::sys::UBLK_S_DEV_DEAD => UblkState::Dead,
        libublk::sys::UBLK_S_DEV_LIVE => UblkState::Live,
        libublk::sys::UBLK_S_DEV_QUIESCED => UblkState::Quiesced,
        other => UblkState::Other(other as u16),
    }))
}

/// Moves this process into a mount namespace of its own, with private propagation, and there
/// lazily detaches every mount that sits on `/dev/ublkb<device>` or on a device stacked on it
/// (device-mapper, ...: the `holders` in sysfs, recursively).
///
/// Why: a ublk server whose mount namespace holds a filesystem on its own device deadlocks
/// when it exits as the namespace's last user (tearing the namespace down writes that
/// filesystem back to a device nobody serves any more). A new namespace copies the mounts of
/// the old one, so a server that re-attaches (`device` = the device it recovers) while the
/// filesystem is mounted must drop those copies; the filesystem stays mounted everywhere else.
///
/// Call it before the process starts any thread: unshare(CLONE_NEWNS) refuses a threaded one.
pub fn private_mount_namespace(device: Option<u32>) -> Result<()> {
    let fail = |op: &'static str| FrontendError::Ublk { op, detail: std::io::Error::last_os_error().to_string() };
    // SAFETY: unshare(2) with a constant flag; no memory is passed.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(fail("unshare(CLONE_NEWNS) for the server's own mount namespace"));
    }
    // SAFETY: mount(2) with a static NUL-terminated path and null pointers where the kernel
    // accepts them for a propagation change.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(fail("make / private in the server's mount namespace"));
    }
    let Some(id) = device else { return Ok(()) };
    let mut devices = Vec::new();
    stacked_devices(&format!("ublkb{id}"), &mut devices);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| FrontendError::Ublk { op: "read /proc/self/mountinfo", detail: e.to_string() })?;
    let mut targets: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let (device, target) = (fields.get(2)?, fields.get(4)?);
            devices.iter().any(|d| d == device).then(|| unescape_mountinfo(target))
        })
        .collect();
    // Deepest first, so a mount on top of another goes before it.
    targets.sort_by_key(|target| std::cmp::Reverse(target.len()));
    for target in targets {
        let path = std::ffi::CString::new(target.clone())
            .map_err(|_| FrontendError::Options(format!("mount point {target:?} has a NUL byte")))?;
        // SAFETY: umount2(2) on a NUL-terminated path that lives across the call.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(fail("detach a mount of the served device in the server's namespace"));
        }
        tracing::info!("detached {target} (on the served device) from the server's mount namespace");
    }
    Ok(())
}

/// `major:minor` of block device `name` and of every device stacked on it.
fn stacked_devices(name: &str, out: &mut Vec<String>) {
    let sys = Path::new("/sys/class/block").join(name);
    if let Ok(dev) = std::fs::read_to_string(sys.join("dev")) {
        let dev = dev.trim().to_string();
        if out.contains(&dev) {
            return;
        }
        out.push(dev);
    }
    if let Ok(holders) = std::fs::read_dir(sys.join("holders")) {
        for holder in holders.flatten() {
            stacked_devices(&holder.file_name().to_string_lossy(), out);
        }
    }
}

/// /proc/self/mountinfo escapes space, tab, newline and backslash as `\ooo` (octal).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push((bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Basic limits (block sizes, size, a volatile cache with FUA so that flushes and FUA writes
/// reach the volume as such) and discard / write-zeroes limits.
fn set_params(dev: &mut UblkDev, size: u64, block_size: u32) {
    use libublk::sys;
    dev.set_default_params(size);
    let shift = block_size.trailing_zeros() as u8;
    let params = &mut dev.tgt.params;
    params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
    params.basic.attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    params.basic.logical_bs_shift = shift;
    params.basic.physical_bs_shift = shift.max(12);
    params.basic.io_min_shift = shift.max(12);
    params.basic.io_opt_shift = shift.max(12);
    let max_sectors = params.basic.max_sectors;
    params.discard = sys::ublk_param_discard {
        discard_alignment: 0,
        discard_granularity: block_size,
        max_discard_sectors: max_sectors,
        max_write_zeroes_sectors: max_sectors,
        max_discard_segments: 1,
        reserved0: 0,
    };
}

/// One queue thread: a task per tag on a local executor, driven by the queue's io_uring.
fn serve_queue(qid: u16, dev: &UblkDev, backend: &Arc<dyn UblkBackend>) {
    crate::fuse::ensure_io_flusher();
    let queue = match UblkQueue::new(qid, dev) {
        Ok(queue) => Rc::new(queue),
        Err(e) => {
            tracing::error!("ublk queue {qid}: {e:?}");
            return;
        }
    };
    let executor = Rc::new(smol::LocalExecutor::new());
    let max_io_bytes = dev.dev_info.max_io_buf_bytes as usize;
    let mut tasks = Vec::new();
    for tag in queue.tags() {
        let shared = match TagShared::new() {
            Ok(shared) => Arc::new(shared),
            Err(e) => {
                tracing::error!("ublk queue {qid} tag {tag}: eventfd: {e}");
                return;
            }
        };
        let queue = queue.clone();
        let backend = backend.clone();
        tasks.push(executor.spawn(async move {
            // The ring writes into this memory (request data, the eventfd's counter) and the
            // ring outlives the task. If the task is dropped while one of its operations is
            // still in flight (the executor torn down after an error), the memory must stay
            // valid: `ManuallyDrop` leaks it then. It is freed only when `serve_tag` has
            // returned, with nothing of this tag's left on the ring.
            let mut memory =
                ManuallyDrop::new(TagMemory { buffer: IoBuf::new(max_io_bytes), counter: Box::new([0; 8]) });
            let tag_io = TagIo { queue: &queue, backend: backend.as_ref(), shared: &shared };
            match serve_tag(&tag_io, tag, &mut memory).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!("ublk queue {qid} tag {tag}: {e:?}"),
            }
            // SAFETY: dropped once, here, after `serve_tag` returned: every operation it
            // submitted on the ring had completed (each one is awaited to its end).
            unsafe { ManuallyDrop::drop(&mut memory) };
        }));
    }
    let ticker = executor.clone();
    smol::block_on(executor.run(async move {
        let run = || while ticker.try_tick() {};
        let done = || tasks.iter().all(|task| task.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&queue, Some(20), run, done).await {
            tracing::error!("ublk queue {qid}: {e:?}");
        }
    }));
}

/// What a tag shares with the [`Done`] of its request in flight.
struct TagShared {
    /// Written by whoever completes the tag's request; read on the queue's ring by the tag.
    eventfd: OwnedFd,
    /// The request's result, until the tag takes it.
    slot: Mutex<Option<std::result::Result<(), BackendError>>>,
}

impl TagShared {
    fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd(2) with constant flags; the new descriptor is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd(2) and is owned by nobody else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { eventfd, slot: Mutex::new(None) })
    }

    /// The result first, then the wake-up: a tag woken always finds it.
    fn finish(&self, result: std::result::Result<(), BackendError>) {
        let previous = self.slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).replace(result);
        if previous.is_some() {
            tracing::error!("ublk: a tag's result was overwritten before it was taken");
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to a descriptor `self` owns.
        let written = unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if written != 8 {
            tracing::error!("ublk: waking a queue failed: {}", std::io::Error::last_os_error());
        }
    }

    fn take(&self) -> Option<std::result::Result<(), BackendError>> {
        self.slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }
}

/// The memory of one tag that the queue's ring writes into.
struct TagMemory {
    /// The request's data: the kernel copies a write's here before the request is fetched and
    /// a read's from here when it is committed.
    buffer: IoBuf<u8>,
    /// Where the ring puts the eventfd's counter.
    counter: Box<[u8; 8]>,
}

/// What a tag's requests are served with.
struct TagIo<'a, 'q> {
    queue: &'a UblkQueue<'q>,
    backend: &'a dyn UblkBackend,
    shared: &'a Arc<TagShared>,
}

/// The loop of one tag: fetch a request, serve it, commit the result and fetch the next.
async fn serve_tag(io: &TagIo<'_, '_>, tag: u16, memory: &mut TagMemory) -> std::result::Result<(), UblkError> {
    let queue = io.queue;
    queue.submit_io_prep_cmd(tag, BufDesc::Slice(memory.buffer.as_slice()), 0, Some(&memory.buffer)).await?;
    loop {
        let iod = *queue.get_iod(tag);
        let result = handle(io, &iod, memory).await;
        queue.submit_io_commit_cmd(tag, BufDesc::Slice(memory.buffer.as_slice()), result).await?;
    }
}

/// Serves one request; its result for the kernel: bytes transferred, 0, or -errno.
async fn handle(io: &TagIo<'_, '_>, iod: &libublk::sys::ublksrv_io_desc, memory: &mut TagMemory) -> i32 {
    use libublk::sys;
    let op = iod.op_flags & 0xff;
    let flags = iod.op_flags & !0xff;
    let offset = iod.start_sector << 9;
    let len = u64::from(iod.nr_sectors) << 9;
    if len > memory.buffer.len() as u64 && matches!(op, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE) {
        return -libc::EINVAL;
    }
    let change = match op {
        sys::UBLK_IO_OP_READ => {
            let source = match catch_unwind(AssertUnwindSafe(|| io.backend.read_source())) {
                Ok(Ok(fd)) => fd,
                Ok(Err(e)) => return -e.errno(),
                Err(_) => {
                    tracing::error!("ublk: the volume panicked naming its read source");
                    return -libc::EIO;
                }
            };
            return read_at(io.queue, source, offset, &mut memory.buffer.as_mut_slice()[..len as usize]).await;
        }
        sys::UBLK_IO_OP_WRITE => Change::Write {
            offset,
            data: &memory.buffer.as_slice()[..len as usize],
            fua: flags & sys::UBLK_IO_F_FUA != 0,
        },
        sys::UBLK_IO_OP_FLUSH => Change::Flush,
        sys::UBLK_IO_OP_DISCARD => Change::Discard { offset, len },
        // Without NOUNMAP the range may be deallocated, which the backend's discard does
        // (and it reads back as zeros, which is all write-zeroes promises).
        sys::UBLK_IO_OP_WRITE_ZEROES if flags & sys::UBLK_IO_F_NOUNMAP == 0 => Change::Discard { offset, len },
        sys::UBLK_IO_OP_WRITE_ZEROES => Change::WriteZeroes { offset, len },
        _ => return -libc::EOPNOTSUPP,
    };
    if io.shared.take().is_some() {
        // Cannot happen (each request's Done completes once and is taken once): but a stale
        // result must not answer this request.
        tracing::error!("ublk: a stale result was waiting for a new request");
    }
    let done = Done { tag: Some(io.shared.clone()) };
    // A panicking backend must still answer, or the tag would wait forever: the `Done` it was
    // given is dropped while unwinding (unless it was completed or sent off), failing with EIO.
    if catch_unwind(AssertUnwindSafe(|| io.backend.submit(change, done))).is_err() {
        tracing::error!("ublk: the volume panicked starting {change:?}");
    }
    match wait_for_result(io, &mut memory.counter).await {
        Ok(()) if op == sys::UBLK_IO_OP_WRITE => len as i32,
        Ok(()) => 0,
        Err(e) => -e.errno(),
    }
}

/// Reads `buffer.len()` bytes of `fd` at `offset` into `buffer`, on the queue's ring: the
/// length on success, -errno otherwise (-EIO for an end of file before the end).
async fn read_at(queue: &UblkQueue<'_>, fd: RawFd, offset: u64, buffer: &mut [u8]) -> i32 {
    let mut filled = 0;
    while filled < buffer.len() {
        let rest = &mut buffer[filled..];
        let read = opcode::Read::new(types::Fd(fd), rest.as_mut_ptr(), rest.len() as u32)
            .offset(offset + filled as u64)
            .build();
        match queue.ublk_submit_sqe(read).await {
            n if n < 0 => return n,
            0 => {
                tracing::error!(
                    "ublk: the read source ended at {} reading {} bytes at {offset}",
                    offset + filled as u64,
                    buffer.len()
                );
                return -libc::EIO;
            }
            n => filled += n as usize,
        }
    }
    buffer.len() as i32
}

/// Waits for the result of the request submitted with this tag's `Done`: taken at once if it
/// is there, else after an eventfd read on the queue's ring. A count left in the eventfd by an
/// earlier completion (one that was there before the tag needed to wait) ends a read early:
/// the loop then just looks again.
async fn wait_for_result(io: &TagIo<'_, '_>, counter: &mut [u8; 8]) -> std::result::Result<(), BackendError> {
    let fd = io.shared.eventfd.as_raw_fd();
    loop {
        if let Some(result) = io.shared.take() {
            return result;
        }
        // The executor sleeps in the ring, so a completion from another thread must arrive
        // there to wake it.
        let read = opcode::Read::new(types::Fd(fd), counter.as_mut_ptr(), 8).build();
        let woken = io.queue.ublk_submit_sqe(read).await;
        if woken < 0 {
            // Never seen; the request's Done is still out there, so the tag cannot move on
            // without its result. Wait for it on this thread instead (the eventfd blocks).
            tracing::error!("ublk: waiting for the volume's answer on the ring failed: errno {}", -woken);
            // SAFETY: reads 8 bytes into a live local buffer from a descriptor `shared` owns.
            unsafe { libc::read(fd, counter.as_mut_ptr().cast(), 8) };
        }
    }
}

fn ublk_error(op: &'static str, error: UblkError) -> FrontendError {
    let detail = match &error {
        UblkError::OtherError(errno) | UblkError::UringIOError(errno) => {
            format!("{error} ({})", std::io::Error::from_raw_os_error(errno.abs()))
        }
        other => other.to_string(),
    };
    FrontendError::Ublk { op, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        let good = UblkOptions { queues: 2, depth: 64, max_io_bytes: 512 << 10 };
        assert!(good.check(4096).is_ok());
        assert!(UblkOptions { queues: 0, ..good.clone() }.check(4096).is_err());
        assert!(UblkOptions { depth: 0, ..good.clone() }.check(4096).is_err());
        assert!(UblkOptions { max_io_bytes: 6000, ..good.clone() }.check(4096).is_err());
        assert!(UblkOptions { max_io_bytes: 2 << 20, ..good.clone() }.check(4096).is_err());
        assert!(UblkOptions { max_io_bytes: 4096, ..good.clone() }.check(512).is_ok());
        assert!(UblkOptions { max_io_bytes: 4096, ..good }.check(8192).is_err());
    }

    #[test]
    fn geometry_is_checked() {
        assert!(check_geometry(1 << 20, 4096).is_ok());
        assert!(check_geometry(1 << 20, 512).is_ok());
        assert!(check_geometry(1 << 20, 8192).is_err());
        assert!(check_geometry(1 << 20, 3000).is_err());
        assert!(check_geometry(1 << 20, 256).is_err());
        assert!(check_geometry(0, 4096).is_err());
        assert!(check_geometry(4096 + 512, 4096).is_err());
    }

    fn counter(shared: &TagShared) -> u64 {
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into a local buffer from an eventfd `shared` owns.
        let read = unsafe { libc::read(shared.eventfd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        assert_eq!(read, 8);
        u64::from_ne_bytes(count)
    }

    #[test]
    fn done_stores_the_result_then_wakes() {
        let shared = Arc::new(TagShared::new().unwrap());
        let done = Done { tag: Some(shared.clone()) };
        std::thread::spawn(move || done.complete(Err(BackendError::read_only("secondary")))).join().unwrap();
        assert_eq!(counter(&shared), 1);
        assert_eq!(shared.take().unwrap().unwrap_err().errno(), libc::EROFS);
        assert!(shared.take().is_none());

        Done { tag: Some(shared.clone()) }.complete(Ok(()));
        assert_eq!(shared.take(), Some(Ok(())));
        assert_eq!(counter(&shared), 1);
    }

    #[test]
    fn a_dropped_done_fails_with_eio() {
        let shared = Arc::new(TagShared::new().unwrap());
        drop(Done { tag: Some(shared.clone()) });
        assert_eq!(shared.take().unwrap().unwrap_err().errno(), libc::EIO);
        assert_eq!(counter(&shared), 1);
    }

    #[test]
    fn done_is_send_and_static() {
        fn send<T: Send + 'static>() {}
        send::<Done>();
    }

    #[test]
    fn change_debug_leaves_the_data_out() {
        let data = [7u8; 4096];
        let text = format!("{:?}", Change::Write { offset: 8192, data: &data, fua: true });
        assert_eq!(text, "Write { offset: 8192, len: 4096, fua: true }");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }

    #[test]
    fn unavailable_names_the_control_device() {
        if let Some(why) = unavailable() {
            assert!(why.contains(UBLK_CONTROL));
        }
    }
}
