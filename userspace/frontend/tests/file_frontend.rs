//! The file frontend end to end: FUSE file, loop device, ext4 on top.
//!
//! Needs root and /dev/fuse (mount(2), loop devices); elsewhere each test prints
//! "skipped: needs root and /dev/fuse" and passes. CI runs them as root.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use std::time::Duration;

use tandem_frontend::{
    attach_loop, attach_loop_with, BackendError, BlockBackend, FileFrontend, FileFrontendOptions, FrontendError,
    LoopOptions,
};

const SIZE: u64 = 64 << 20;
const BS: u32 = 4096;

/// A volume in memory that counts what reaches it and checks the frontend's promises.
struct MemBackend {
    data: Mutex<Vec<u8>>,
    flushes: AtomicU64,
    discards: AtomicU64,
    zeroes: AtomicU64,
    fua_writes: AtomicU64,
    /// Requests that were not block-aligned (the frontend promises there are none).
    misaligned: AtomicU64,
    /// Requests served on a thread without PR_SET_IO_FLUSHER.
    not_io_flusher: AtomicU64,
}

impl MemBackend {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0; SIZE as usize]),
            flushes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            misaligned: AtomicU64::new(0),
            not_io_flusher: AtomicU64::new(0),
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        const PR_GET_IO_FLUSHER: libc::c_int = 58;
        // SAFETY: integer-only prctl.
        if unsafe { libc::prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0) } != 1 {
            self.not_io_flusher.fetch_add(1, Relaxed);
        }
        if !offset.is_multiple_of(BS.into()) || !len.is_multiple_of(BS.into()) || offset + len > SIZE {
            self.misaligned.fetch_add(1, Relaxed);
            return Err(BackendError::invalid(format!("misaligned {offset}+{len}")));
        }
        Ok(())
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[offset as usize..offset as usize + len].to_vec()
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        SIZE
    }
    fn block_size(&self) -> u32 {
        BS
    }
    fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        self.check(offset, len.into())?;
        Ok(Bytes::from(self.bytes(offset, len as usize)))
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.check(offset, data.len() as u64)?;
        if fua {
            self.fua_writes.fetch_add(1, Relaxed);
        }
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.flushes.fetch_add(1, Relaxed);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.check(offset, len)?;
        self.discards.fetch_add(1, Relaxed);
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.check(offset, len)?;
        self.zeroes.fetch_add(1, Relaxed);
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

fn privileged() -> bool {
    // SAFETY: geteuid cannot fail.
    let ok = unsafe { libc::geteuid() } == 0 && Path::new("/dev/fuse").exists();
    if !ok {
        eprintln!("skipped: needs root and /dev/fuse");
    }
    ok
}

/// PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE, which some sandboxes withhold even from root.
fn io_flusher_permitted() -> bool {
    let ok = std::thread::spawn(|| tandem_frontend::set_io_flusher().is_ok()).join().unwrap();
    if !ok {
        eprintln!("note: PR_SET_IO_FLUSHER not permitted here (no CAP_SYS_RESOURCE); not checked");
    }
    ok
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an open fd.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(p))
}

#[test]
fn fuse_file_io_reaches_the_backend() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backend = MemBackend::new();
    let mut mounted = FileFrontend::new(backend.clone()).unwrap().mount(dir.path()).unwrap();
    let path = mounted.file().to_path_buf();

    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.len(), SIZE);
    let names: Vec<_> = std::fs::read_dir(mounted.mountpoint()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["volume"]);

    let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    // Aligned round trip, and the bytes really are in the backend.
    let big = pattern(1 << 20, 1);
    file.write_all_at(&big, 4 << 20).unwrap();
    let mut back = vec![0; big.len()];
    file.read_exact_at(&mut back, 4 << 20).unwrap();
    assert_eq!(back, big);
    assert_eq!(backend.bytes(4 << 20, big.len()), big);

    // Unaligned (read-modify-write inside the frontend; the backend still sees whole blocks).
    let odd = pattern(10_000, 2);
    file.write_all_at(&odd, 4097).unwrap();
    let mut back = vec![0; odd.len()];
    file.read_exact_at(&mut back, 4097).unwrap();
    assert_eq!(back, odd);
    assert_eq!(backend.bytes(4097, odd.len()), odd);
    assert_eq!(backend.bytes(4096, 1), [0], "the byte before the unaligned write is kept");

    // fsync reaches backend.flush.
    let before = backend.flushes.load(Relaxed);
    file.sync_all().unwrap();
    assert!(backend.flushes.load(Relaxed) > before, "fsync must reach the backend");
    let before = backend.flushes.load(Relaxed);
    file.sync_data().unwrap();
    assert!(backend.flushes.load(Relaxed) > before, "fdatasync must reach the backend");

    // Punch hole → discard, zero range → write_zeroes; both read back as zeros.
    file.write_all_at(&pattern(256 << 10, 3), 8 << 20).unwrap();
    fallocate(&file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 8 << 20, 64 << 10).unwrap();
    assert_eq!(backend.discards.load(Relaxed), 1);
    assert!(backend.bytes(8 << 20, 64 << 10).iter().all(|&b| b == 0));
    fallocate(&file, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, (8 << 20) + (64 << 10), 64 << 10).unwrap();
    assert_eq!(backend.zeroes.load(Relaxed), 1);
    assert!(backend.bytes(8 << 20, 128 << 10).iter().all(|&b| b == 0));
    assert!(backend.bytes((8 << 20) + (128 << 10), 4096).iter().any(|&b| b != 0), "beyond the range is kept");
    // Unaligned punch: edges zeroed by the frontend, the middle discarded.
    fallocate(&file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, (8 << 20) + (128 << 10) + 100, 10_000)
        .unwrap();
    let after = backend.bytes((8 << 20) + (128 << 10), 20_000);
    assert!(after[100..10_100].iter().all(|&b| b == 0));
    assert!(after[..100].iter().any(|&b| b != 0) && after[10_100..].iter().any(|&b| b != 0));
    // Anything else is refused, not ignored.
    let err = fallocate(&file, 0, 0, 4096).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP));

    // The size is fixed; past the end is ENOSPC; reads stop at the end.
    assert_eq!(file.set_len(SIZE / 2).unwrap_err().raw_os_error(), Some(libc::EPERM));
    assert_eq!(file.write_at(b"x", SIZE).unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(file.read_at(&mut [0; 16], SIZE).unwrap(), 0);
    assert_eq!(file.read_at(&mut [0; 16], SIZE - 4).unwrap(), 4);

    // O_DSYNC writes arrive as FUA.
    let dsync = OpenOptions::new().write(true).custom_flags(libc::O_DSYNC).open(&path).unwrap();
    dsync.write_all_at(&[7; 4096], 0).unwrap();
    assert_eq!(backend.fua_writes.load(Relaxed), 1);

    // close() is a FLUSH, which hardens too.
    let before = backend.flushes.load(Relaxed);
    drop(dsync);
    drop(file);
    assert!(backend.flushes.load(Relaxed) > before, "close must reach the backend flush");

    assert_eq!(backend.misaligned.load(Relaxed), 0);
    if io_flusher_permitted() {
        assert_eq!(backend.not_io_flusher.load(Relaxed), 0, "serving threads must carry PR_SET_IO_FLUSHER");
    }

    mounted.unmount().unwrap();
    assert!(!is_mounted(dir.path()));
    mounted.unmount().unwrap(); // idempotent
}

#[test]
fn options_and_geometry_are_checked() {
    let bad = |o: FileFrontendOptions| FileFrontend::with_options(MemBackend::new(), o).unwrap_err();
    assert!(matches!(bad(FileFrontendOptions { threads: 1, ..Default::default() }), FrontendError::Options(_)));
    assert!(matches!(
        bad(FileFrontendOptions { file_name: "a/b".into(), ..Default::default() }),
        FrontendError::Options(_)
    ));
    assert!(FileFrontend::new(MemBackend::new()).is_ok());
}

#[test]
fn unmount_waits_for_the_file_to_be_closed() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backend = MemBackend::new();
    let opts = FileFrontendOptions { threads: 2, unmount_patience: Duration::from_millis(100), ..Default::default() };
    let mut mounted = FileFrontend::with_options(backend.clone(), opts.clone()).unwrap().mount(dir.path()).unwrap();
    let held = File::open(mounted.file()).unwrap();
    assert!(matches!(mounted.unmount(), Err(FrontendError::Busy { .. })));
    assert!(is_mounted(dir.path()), "a busy unmount leaves the mount usable");
    held.read_exact_at(&mut [0; 4096], 0).unwrap();
    drop(held);
    mounted.unmount().unwrap();
    assert!(!is_mounted(dir.path()));

    // Dropped while busy: detached from the tree at once, served until the holder closes.
    let mounted = FileFrontend::with_options(backend, opts).unwrap().mount(dir.path()).unwrap();
    let held = OpenOptions::new().read(true).write(true).open(mounted.file()).unwrap();
    drop(mounted);
    assert!(!is_mounted(dir.path()));
    held.write_all_at(&[1; 4096], 0).unwrap();
    held.sync_all().unwrap();
    drop(held);
}

#[test]
fn loop_with_512_byte_sectors_over_4k_volume_blocks() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backend = MemBackend::new();
    let mut mounted = FileFrontend::new(backend.clone()).unwrap().mount(dir.path()).unwrap();
    // Kernel-default block size: the device takes 512-byte direct I/O, which the frontend turns
    // into read-modify-writes of 4 KiB volume blocks.
    let mut dev = attach_loop(mounted.file(), true).unwrap();
    assert!(dev.direct_io().unwrap());
    assert_eq!(dev.file(), mounted.file());
    let blockdev = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(dev.path()).unwrap();
    // O_DIRECT wants an aligned buffer: take a 512-byte window of a page-aligned allocation.
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: non-zero size; freed below with the same layout.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    // SAFETY: ptr is valid for 4096 bytes and not aliased.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, 4096) };
    buf[..512].copy_from_slice(&pattern(512, 7));
    blockdev.write_all_at(&buf[..512], 512).unwrap();
    blockdev.sync_all().unwrap();
    assert_eq!(backend.bytes(512, 512), pattern(512, 7));
    assert!(backend.bytes(0, 512).iter().all(|&b| b == 0), "the rest of the block is kept");
    buf.fill(0);
    blockdev.read_exact_at(&mut buf[..512], 512).unwrap();
    assert_eq!(&buf[..512], &pattern(512, 7)[..]);
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    drop(blockdev);
    assert_eq!(backend.misaligned.load(Relaxed), 0);
    dev.detach().unwrap();
    mounted.unmount().unwrap();
}

/// Unmounts (lazily) on drop, so a failing test does not leave ext4 mounted.
struct Ext4Mount(PathBuf, bool);

impl Ext4Mount {
    fn mount(dev: &Path, at: &Path, flags: nix::mount::MsFlags) -> Self {
        nix::mount::mount(Some(dev), at, Some("ext4"), flags, None::<&str>).unwrap();
        Self(at.to_path_buf(), true)
    }
    fn unmount(mut self) {
        self.1 = false;
        nix::mount::umount(&self.0).unwrap();
    }
}

impl Drop for Ext4Mount {
    fn drop(&mut self) {
        if self.1 {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ext4_on_a_loop_device_over_the_fuse_file() {
    if !privileged() {
        return;
    }
    let fuse_dir = tempfile::tempdir().unwrap();
    let ext4_dir = tempfile::tempdir().unwrap();
    let backend = MemBackend::new();
    // Guards are declared so they drop in teardown order: ext4, loop device, FUSE.
    let mut mounted = FileFrontend::new(backend.clone()).unwrap().mount(fuse_dir.path()).unwrap();
    let opts = LoopOptions { direct_io: true, block_size: Some(BS), read_only: false };
    let mut dev = attach_loop_with(mounted.file(), &opts).unwrap();
    let dev_path = dev.path().to_path_buf();
    let dev_str = dev_path.to_str().unwrap().to_owned();
    assert!(dev.direct_io().unwrap());
    let sys = format!("/sys/block/loop{}", dev.number());
    assert_eq!(std::fs::read_to_string(format!("{sys}/loop/dio")).unwrap().trim(), "1");
    assert_eq!(std::fs::read_to_string(format!("{sys}/queue/logical_block_size")).unwrap().trim(), "4096");

    let flushes_before = backend.flushes.load(Relaxed);
    run("mkfs.ext4", &["-q", "-F", "-b", "4096", &dev_str]);
    let files: Vec<(String, Vec<u8>)> =
        (0..8).map(|i| (format!("f{i}"), pattern(((i + 1) * 300_000) as usize, 10 + i))).collect();
    {
        let fs = Ext4Mount::mount(&dev_path, ext4_dir.path(), nix::mount::MsFlags::empty());
        for (name, data) in &files {
            let f = File::create(ext4_dir.path().join(name)).unwrap();
            f.write_all_at(data, 0).unwrap();
            f.sync_all().unwrap();
        }
        // SAFETY: sync(2) has no arguments.
        unsafe { libc::sync() };
        fs.unmount();
    }
    run("e2fsck", &["-fn", &dev_str]);
    {
        let fs = Ext4Mount::mount(&dev_path, ext4_dir.path(), nix::mount::MsFlags::MS_RDONLY);
        for (name, data) in &files {
            assert_eq!(&std::fs::read(ext4_dir.path().join(name)).unwrap(), data, "{name}");
        }
        fs.unmount();
    }

    dev.detach().unwrap();
    assert!(!Path::new(&format!("{sys}/loop")).exists(), "loop device still bound");
    mounted.unmount().unwrap();
    assert!(!is_mounted(fuse_dir.path()));

    assert!(backend.flushes.load(Relaxed) > flushes_before, "ext4's flushes must reach the backend");
    assert!(backend.discards.load(Relaxed) + backend.zeroes.load(Relaxed) > 0, "mkfs discards");
    assert_eq!(backend.misaligned.load(Relaxed), 0, "a 4096-byte loop device sends whole blocks only");
    if io_flusher_permitted() {
        assert_eq!(backend.not_io_flusher.load(Relaxed), 0);
    }
}
