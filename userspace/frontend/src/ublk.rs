//! The ublk frontend: the volume as `/dev/ublkbN`, served through the kernel's `ublk_drv`
//! (Linux >= 6.0; user recovery since 6.1) with the `libublk` crate.
//!
//! Shape: one libublk queue thread per hardware queue, each running one async task per tag on
//! the queue's own io_uring (libublk's per-tag model). [`BlockBackend`] calls are blocking, so
//! a task hands its request to a shared pool of worker threads and waits for the answer with an
//! eventfd read submitted on the queue's ring: the queue thread never blocks on the volume and
//! keeps every tag in flight, and a completion wakes the ring at once.
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

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::thread;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use io_uring::{opcode, types};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkError, UblkFlags};

use crate::backend::{check_geometry, BlockBackend};
use crate::error::{BackendError, FrontendError, Result};

/// The ublk control device; present once `ublk_drv` is loaded.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";

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
    /// Threads that make the blocking [`BlockBackend`] calls, shared by all queues: how many
    /// requests the volume sees at once. Default 32.
    pub workers: usize,
}

impl Default for UblkOptions {
    fn default() -> Self {
        let cpus = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Self { queues: cpus.clamp(1, 4) as u16, depth: 64, max_io_bytes: 512 << 10, workers: 32 }
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
        if self.workers == 0 {
            return Err("workers must be at least 1".into());
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
    backend: Arc<dyn BlockBackend>,
    options: UblkOptions,
}

impl UblkFrontend {
    /// Checks the volume's geometry and the options; touches no device yet.
    pub fn new(backend: Arc<dyn BlockBackend>, options: UblkOptions) -> Result<Self> {
        check_geometry(backend.as_ref()).map_err(FrontendError::Geometry)?;
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

        let (jobs, pool) = WorkerPool::start(self.backend.clone(), self.options.workers)?;
        let size = self.backend.size();
        let block_size = self.backend.block_size();
        let target = move |dev: &mut UblkDev| {
            set_params(dev, size, block_size);
            Ok(())
        };
        let queue = move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, &jobs);
        let on_live = move |ctrl: &UblkCtrl| {
            let id = ctrl.dev_info().dev_id;
            ready(&UblkDevice { id, block_device: PathBuf::from(format!("/dev/ublkb{id}")) });
        };
        let served = ctrl.run_target(target, queue, on_live).map_err(|e| ublk_error("serve", e));
        // The queues are down: no request is waiting on the pool any more.
        pool.stop();
        // A device we recovered is not ours to delete on drop (libublk deletes only devices it
        // added), but an orderly end of serving removes it either way.
        if let Err(e) = ctrl.del_dev() {
            tracing::debug!("deleting ublk device after serving: {e:?}");
        }
        served.map(|_| ())
    }
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
fn serve_queue(qid: u16, dev: &UblkDev, jobs: &Sender<Job>) {
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
        let tag_state = match TagState::new() {
            Ok(state) => state,
            Err(e) => {
                tracing::error!("ublk queue {qid} tag {tag}: eventfd: {e}");
                return;
            }
        };
        let queue = queue.clone();
        let jobs = jobs.clone();
        tasks.push(executor.spawn(async move {
            match serve_tag(&queue, tag, max_io_bytes, &tag_state, &jobs).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!("ublk queue {qid} tag {tag}: {e:?}"),
            }
            // An eventfd read may still be in flight on the ring, which outlives this task:
            // its 8-byte target must stay valid until the ring is torn down with the thread.
            std::mem::forget(tag_state);
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

/// What one tag needs to wait for the worker pool on the queue's ring.
struct TagState {
    /// Written by the worker that completes this tag's request.
    eventfd: Arc<OwnedFd>,
    /// Where the ring puts the eventfd's counter (boxed: the kernel writes here).
    counter: Box<[u8; 8]>,
    /// The worker's answer.
    slot: Arc<Mutex<Option<Outcome>>>,
}

impl TagState {
    fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd(2) with constant flags; the new descriptor is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd(2) and is owned by nobody else.
        let eventfd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Self { eventfd, counter: Box::new([0; 8]), slot: Arc::new(Mutex::new(None)) })
    }
}

/// The loop of one tag: fetch a request, have it served, commit the result and fetch the next.
async fn serve_tag(
    queue: &UblkQueue<'_>,
    tag: u16,
    max_io_bytes: usize,
    state: &TagState,
    jobs: &Sender<Job>,
) -> std::result::Result<(), UblkError> {
    let mut buffer = IoBuf::<u8>::new(max_io_bytes);
    queue.submit_io_prep_cmd(tag, BufDesc::Slice(buffer.as_slice()), 0, Some(&buffer)).await?;
    loop {
        let iod = *queue.get_iod(tag);
        let result = handle(queue, &iod, buffer.as_mut_slice(), state, jobs).await;
        queue.submit_io_commit_cmd(tag, BufDesc::Slice(buffer.as_slice()), result).await?;
    }
}

/// Serves one request; its result for the kernel: bytes transferred, 0, or -errno.
async fn handle(
    queue: &UblkQueue<'_>,
    iod: &libublk::sys::ublksrv_io_desc,
    buffer: &mut [u8],
    state: &TagState,
    jobs: &Sender<Job>,
) -> i32 {
    use libublk::sys;
    let op = iod.op_flags & 0xff;
    let flags = iod.op_flags & !0xff;
    let offset = iod.start_sector << 9;
    let len = iod.nr_sectors << 9;
    if len as usize > buffer.len() && matches!(op, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE) {
        return -libc::EINVAL;
    }
    let request = match op {
        sys::UBLK_IO_OP_READ => Request::Read { offset, len },
        sys::UBLK_IO_OP_WRITE => {
            Request::Write { offset, data: buffer[..len as usize].to_vec(), fua: flags & sys::UBLK_IO_F_FUA != 0 }
        }
        sys::UBLK_IO_OP_FLUSH => Request::Flush,
        sys::UBLK_IO_OP_DISCARD => Request::Discard { offset, len: u64::from(len) },
        // Without NOUNMAP the range may be deallocated, which the backend's discard does
        // (and it reads back as zeros, which is all write-zeroes promises).
        sys::UBLK_IO_OP_WRITE_ZEROES if flags & sys::UBLK_IO_F_NOUNMAP == 0 => {
            Request::Discard { offset, len: u64::from(len) }
        }
        sys::UBLK_IO_OP_WRITE_ZEROES => Request::WriteZeroes { offset, len: u64::from(len) },
        _ => return -libc::EOPNOTSUPP,
    };
    let job = Job { request, slot: state.slot.clone(), eventfd: state.eventfd.clone() };
    if jobs.send(job).is_err() {
        return -libc::EIO;
    }
    // Wait for the worker's eventfd write on this queue's ring: the executor sleeps in the
    // ring, so a completion from another thread must arrive there to wake it.
    let read = opcode::Read::new(types::Fd(state.eventfd.as_raw_fd()), state.counter.as_ptr() as *mut u8, 8).build();
    let woken = queue.ublk_submit_sqe(read).await;
    if woken < 0 {
        tracing::error!("ublk: waiting for the volume's answer failed: errno {}", -woken);
        return -libc::EIO;
    }
    let outcome = state.slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
    match outcome {
        Some(Ok(Answer::Data(data))) => {
            if data.len() != len as usize {
                tracing::error!("ublk: the volume returned {} bytes for a {len}-byte read", data.len());
                return -libc::EIO;
            }
            buffer[..data.len()].copy_from_slice(&data);
            len as i32
        }
        Some(Ok(Answer::Done)) if matches!(op, sys::UBLK_IO_OP_WRITE) => len as i32,
        Some(Ok(Answer::Done)) => 0,
        Some(Err(e)) => -e.errno(),
        None => -libc::EIO,
    }
}

enum Request {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: Vec<u8>, fua: bool },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
}

enum Answer {
    Data(Bytes),
    Done,
}

type Outcome = std::result::Result<Answer, BackendError>;

struct Job {
    request: Request,
    slot: Arc<Mutex<Option<Outcome>>>,
    eventfd: Arc<OwnedFd>,
}

/// The threads that make the blocking backend calls.
struct WorkerPool {
    jobs: Option<Sender<Job>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl WorkerPool {
    /// Starts `count` workers; returns the queue they serve (cloned into every queue thread).
    fn start(backend: Arc<dyn BlockBackend>, count: usize) -> Result<(Sender<Job>, WorkerPool)> {
        let (jobs, receiver) = crossbeam_channel::unbounded::<Job>();
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let backend = backend.clone();
            let receiver: Receiver<Job> = receiver.clone();
            let thread = thread::Builder::new()
                .name(format!("ublk-worker-{index}"))
                .spawn(move || {
                    crate::fuse::ensure_io_flusher();
                    for job in receiver {
                        // A panicking backend must still answer, or the tag would wait forever.
                        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            run(backend.as_ref(), job.request)
                        }))
                        .unwrap_or_else(|_| Err(BackendError::io("the volume panicked serving a ublk request")));
                        *job.slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(outcome);
                        wake(job.eventfd.as_raw_fd());
                    }
                })
                .map_err(|source| FrontendError::Options(format!("cannot start ublk worker threads: {source}")))?;
            threads.push(thread);
        }
        Ok((jobs.clone(), WorkerPool { jobs: Some(jobs), threads }))
    }

    /// Ends the workers once every queue thread has dropped its sender.
    fn stop(mut self) {
        self.jobs.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn run(backend: &dyn BlockBackend, request: Request) -> Outcome {
    match request {
        Request::Read { offset, len } => backend.read(offset, len).map(Answer::Data),
        Request::Write { offset, data, fua } => backend.write(offset, &data, fua).map(|()| Answer::Done),
        Request::Flush => backend.flush().map(|()| Answer::Done),
        Request::Discard { offset, len } => backend.discard(offset, len).map(|()| Answer::Done),
        Request::WriteZeroes { offset, len } => backend.write_zeroes(offset, len).map(|()| Answer::Done),
    }
}

fn wake(eventfd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer to a descriptor the job keeps open.
    let written = unsafe { libc::write(eventfd, one.as_ptr().cast(), one.len()) };
    if written != 8 {
        tracing::error!("ublk: waking a queue failed: {}", std::io::Error::last_os_error());
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
        let good = UblkOptions { queues: 2, depth: 64, max_io_bytes: 512 << 10, workers: 4 };
        assert!(good.check(4096).is_ok());
        assert!(UblkOptions { queues: 0, ..good.clone() }.check(4096).is_err());
        assert!(UblkOptions { depth: 0, ..good.clone() }.check(4096).is_err());
        assert!(UblkOptions { max_io_bytes: 6000, ..good.clone() }.check(4096).is_err());
        assert!(UblkOptions { max_io_bytes: 2 << 20, ..good.clone() }.check(4096).is_err());
        assert!(UblkOptions { workers: 0, ..good }.check(4096).is_err());
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
