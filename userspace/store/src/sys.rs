//! The few system calls std does not wrap: an eventfd to wake the ring thread, advisory
//! locks, and the size of a block device.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// A non-blocking eventfd: `notify` from any thread, `drain` on the ring thread.
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. It cannot fail in a way that matters: the
        // counter would have to reach 2^64 - 1 (EAGAIN), and then a wakeup is pending anyway.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter; called after the ring reported the descriptor readable.
    pub(crate) fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64; EAGAIN (already drained) is fine.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// What a path names, for the checks and messages of `open`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    BlockDevice,
    Other(&'static str),
}

impl Kind {
    pub(crate) fn of(m: &Metadata) -> Kind {
        let t = m.file_type();
        if t.is_file() {
            Kind::File
        } else if t.is_block_device() {
            Kind::BlockDevice
        } else if t.is_dir() {
            Kind::Other("directory")
        } else if t.is_char_device() {
            Kind::Other("character device")
        } else if t.is_fifo() {
            Kind::Other("fifo")
        } else if t.is_socket() {
            Kind::Other("socket")
        } else {
            Kind::Other("special file")
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::BlockDevice => "block device",
            Kind::Other(s) => s,
        }
    }
}

/// Opens read-write. A block device is opened with `O_EXCL`, which Linux turns into an
/// exclusive claim: it fails with EBUSY while the device is mounted, held by device-mapper or
/// claimed by another program, exactly the cases where writing under it would corrupt it.
pub(crate) fn open_rw(path: &Path, kind: Kind) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if kind == Kind::BlockDevice {
        o.custom_flags(libc::O_EXCL);
    }
    o.open(path)
}

/// Takes an exclusive advisory lock without waiting; `Ok(false)` if another open file
/// description holds one (another daemon, or a `create_md` in progress).
pub(crate) fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock takes no pointers.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

/// Size of an open block device in bytes (BLKGETSIZE64).
pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is live.
    unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

/// Size of what `file` opens: a file's length or a block device's capacity.
pub(crate) fn size_of(file: &File, kind: Kind) -> io::Result<u64> {
    match kind {
        Kind::BlockDevice => block_device_size(file),
        _ => Ok(file.metadata()?.len()),
    }
}
