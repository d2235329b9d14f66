//! Kernel plumbing: bpffs and tracefs mounts, mmap of BPF arrays, RCU grace periods, clocks.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::ptr::NonNull;

use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};

use crate::error::BpfError;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const TRACEFS_MAGIC: i64 = 0x7472_6163;
const DEBUGFS_MAGIC: i64 = 0x6462_6720;

/// Where libbpf looks for tracefs (it prefers the debugfs path when that exists).
pub(crate) const TRACEFS: &str = "/sys/kernel/tracing";
pub(crate) const DEBUG_TRACEFS: &str = "/sys/kernel/debug/tracing";

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

fn mount(source: &str, target: &Path, fstype: &str, data: &str) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let target = CString::new(target.as_os_str().as_encoded_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let (source, fstype, data) = (c(source)?, c(fstype)?, c(data)?);
    // SAFETY: valid C strings.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, data.as_ptr().cast()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes sure `root`'s parent is a BPF filesystem, mounting one at /sys/fs/bpf if nothing is
/// mounted there (as bpftool and systemd do).
pub(crate) fn ensure_bpffs(bpffs: &Path) -> Result<(), BpfError> {
    match fs_magic(bpffs) {
        Ok(BPF_FS_MAGIC) => return Ok(()),
        Ok(_) => {}
        Err(e) => {
            return Err(BpfError::BpfFs { path: bpffs.to_owned(), detail: format!("cannot stat it: {e}") });
        }
    }
    match mount("bpf", bpffs, "bpf", "mode=0700") {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(BpfError::NoPermission {
            op: format!("mounting the BPF filesystem at {} (mount -t bpf bpf {})", bpffs.display(), bpffs.display()),
            source: e,
        }),
        Err(e) => Err(BpfError::BpfFs {
            path: bpffs.to_owned(),
            detail: format!(
                "not a BPF filesystem, and mounting one failed: {e} (mount -t bpf bpf {})",
                bpffs.display()
            ),
        }),
    }
}

/// The events directory libbpf will read classic tracepoint ids from, mounting tracefs at
/// /sys/kernel/tracing if neither place has it.
pub(crate) fn ensure_tracefs() -> Result<&'static Path, BpfError> {
    let debug = Path::new(DEBUG_TRACEFS);
    if debug.exists() {
        return Ok(debug);
    }
    let tracefs = Path::new(TRACEFS);
    match fs_magic(tracefs) {
        Ok(TRACEFS_MAGIC) | Ok(DEBUGFS_MAGIC) => return Ok(tracefs),
        Ok(_) => {}
        Err(e) => {
            return Err(BpfError::TracepointMissing {
                name: "tracefs".into(),
                detail: format!("{TRACEFS}: {e} (kernel without CONFIG_TRACING?)"),
            });
        }
    }
    match mount("nodev", tracefs, "tracefs", "") {
        Ok(()) => Ok(tracefs),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(BpfError::NoPermission {
            op: format!("mounting tracefs at {TRACEFS} (mount -t tracefs nodev {TRACEFS})"),
            source: e,
        }),
        Err(e) => Err(BpfError::TracepointMissing {
            name: "tracefs".into(),
            detail: format!("tracefs is not mounted at {TRACEFS} and mounting it failed: {e}"),
        }),
    }
}

/// A shared, writable mapping of a `BPF_F_MMAPABLE` array's values.
pub(crate) struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through atomics.
unsafe impl Send for Mmap {}
unsafe impl Sync for Mmap {}

impl Mmap {
    pub(crate) fn map(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<Mmap> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = bytes.max(1).div_ceil(page) * page;
        // SAFETY: a fresh mapping of a BPF map fd; the kernel checks the length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap { ptr: NonNull::new(ptr.cast()).expect("mmap returned NULL"), len })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Waits for an RCU grace period, which outlasts every BPF tracing program running when it
/// starts (they run under rcu_read_lock, or with preemption disabled on a tracepoint).
///
/// How: updating an entry of a map-in-map makes the kernel call `synchronize_rcu()` before
/// returning (`maybe_wait_bpf_programs()` in kernel/bpf/syscall.c, there precisely so that
/// userspace knows no program still uses the previous value; the kernel's own selftests use it
/// to trigger a grace period). Fallback: `membarrier(MEMBARRIER_CMD_GLOBAL)`, which is also
/// `synchronize_rcu()`, but refused on nohz_full kernels.
pub(crate) struct RcuSync {
    outer: Option<MapHandle>,
    inner: Option<MapHandle>,
}

impl RcuSync {
    pub(crate) fn new() -> RcuSync {
        let inner = MapHandle::create(MapType::Array, Some("tandem_rcu_in"), 4, 4, 1, &map_create_opts(None)).ok();
        let outer = inner.as_ref().and_then(|inner| {
            MapHandle::create(
                MapType::ArrayOfMaps,
                Some("tandem_rcu"),
                4,
                4,
                1,
                &map_create_opts(Some(inner.as_fd().as_raw_fd() as u32)),
            )
            .ok()
        });
        RcuSync { outer, inner }
    }

    pub(crate) fn synchronize(&self) -> Result<(), BpfError> {
        if let (Some(outer), Some(inner)) = (&self.outer, &self.inner) {
            let fd = inner.as_fd().as_raw_fd() as u32;
            if outer.update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY).is_ok() {
                return Ok(());
            }
        }
        const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
        // SAFETY: membarrier takes no pointers.
        let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
        if rc != 0 {
            return Err(BpfError::io(
                "waiting for an RCU grace period (map-in-map update and membarrier both failed)",
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

fn map_create_opts(inner_map_fd: Option<u32>) -> libbpf_rs::libbpf_sys::bpf_map_create_opts {
    libbpf_rs::libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_map_create_opts>() as _,
        inner_map_fd: inner_map_fd.unwrap_or(0),
        ..Default::default()
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Checks that bpf(2) is allowed at all by creating (and dropping) a one-entry array.
pub(crate) fn check_bpf_permission() -> Result<(), BpfError> {
    match MapHandle::create(MapType::Array, Some("tandem_probe"), 4, 4, 1, &map_create_opts(None)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == libbpf_rs::ErrorKind::PermissionDenied => Err(BpfError::NoPermission {
            op: "bpf(BPF_MAP_CREATE)".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        }),
        Err(e) => Err(BpfError::libbpf("bpf(BPF_MAP_CREATE) of a probe map", e)),
    }
}
