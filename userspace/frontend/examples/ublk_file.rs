//! Serve a file as a ublk device (`/dev/ublkbN`) until SIGTERM or SIGINT, for the VM tests and
//! manual experiments (needs root and `ublk_drv`):
//!
//! ```text
//! ublk_file BACKING_FILE                 # prints /dev/ublkbN once the device is live
//! ublk_file BACKING_FILE --recover N     # re-attach to /dev/ublkbN after a server died
//! ```
//!
//! Reads are served by the frontend from the file's descriptor, on the queue's io_uring; the
//! changes are done inline by `submit` on the queue thread, which completes each one before it
//! returns: writes with pwrite, flush and FUA writes with fdatasync, discard punches a hole,
//! write-zeroes punches one and allocates the range again. The server runs in a mount namespace
//! of its own, without the mounts of the device it serves (`private_mount_namespace`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tandem_frontend::{
    private_mount_namespace, stop_device, BackendError, Change, Done, UblkBackend, UblkFrontend, UblkOptions, UblkStart,
};

struct FileVolume {
    file: File,
    size: u64,
}

impl FileVolume {
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> Result<(), BackendError> {
        // SAFETY: fallocate(2) on a descriptor this struct owns, with integer arguments only.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().into())
        }
    }

    fn apply(&self, change: Change<'_>) -> Result<(), BackendError> {
        match change {
            Change::Write { offset, data, fua } => {
                self.file.write_all_at(data, offset)?;
                if fua {
                    self.file.sync_data()?;
                }
                Ok(())
            }
            Change::Flush => Ok(self.file.sync_data()?),
            Change::Discard { offset, len } => {
                self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
            }
            Change::WriteZeroes { offset, len } => {
                // Not FALLOC_FL_ZERO_RANGE: tmpfs refuses it. A hole, then the range allocated again.
                self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)?;
                self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len)
            }
        }
    }
}

impl UblkBackend for FileVolume {
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn read_source(&self) -> Result<RawFd, BackendError> {
        Ok(self.file.as_raw_fd())
    }
    /// Inline, on the queue thread: a blocking call here holds up the queue's other requests,
    /// which a test server can afford.
    fn submit(&self, change: Change<'_>, done: Done) {
        done.complete(self.apply(change));
    }
}

/// SIGTERM and SIGINT, blocked in every thread so that one thread can wait for them.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset fill a zeroed local set; pthread_sigmask only changes
    // this thread's mask (inherited by the threads it starts later).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: ublk_file BACKING_FILE [--recover N]";
    let path = args.first().ok_or(usage)?;
    let start = match args.get(1).map(String::as_str) {
        None => UblkStart::Add,
        Some("--recover") => UblkStart::Recover { id: args.get(2).ok_or(usage)?.parse()? },
        Some(other) => return Err(format!("unexpected argument {other:?}; {usage}").into()),
    };
    // Before any thread exists: unshare(CLONE_NEWNS) refuses a threaded process.
    private_mount_namespace(match start {
        UblkStart::Recover { id } => Some(id),
        UblkStart::Add => None,
    })?;
    let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| format!("{path}: {e}"))?;
    let size = file.metadata()?.len() / 4096 * 4096;
    let backend = Arc::new(FileVolume { file, size });
    let signals = stop_signals();
    let frontend = UblkFrontend::new(backend, UblkOptions::default())?;
    frontend.serve(start, move |device| {
        println!("{}", device.block_device.display());
        let _ = std::io::stdout().flush();
        let id = device.id;
        std::thread::spawn(move || {
            let mut signal = 0;
            // SAFETY: sigwait on a set built above, writing into a local.
            unsafe { libc::sigwait(&signals, &mut signal) };
            eprintln!("ublk_file: signal {signal}: stopping /dev/ublkb{id}");
            if let Err(e) = stop_device(id) {
                eprintln!("ublk_file: {e}");
            }
        });
    })?;
    Ok(())
}
