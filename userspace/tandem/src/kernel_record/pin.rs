//! The pin directory's lock (one daemon per record), and whether bpffs is mounted.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::KernelRecordError;

/// `statfs` magic of the BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// An exclusive `flock` on a pin directory: held while a daemon owns the record, so that a
/// second daemon configured with the same pin name never takes a live record for a dead one.
#[derive(Debug)]
pub(super) struct PinLock(#[allow(dead_code)] File);

pub(super) fn lock_pin_dir(dir: &Path) -> Result<PinLock, KernelRecordError> {
    let file = File::open(dir)
        .map_err(|source| KernelRecordError::Io { what: format!("opening {}", dir.display()), source })?;
    // SAFETY: a valid fd; flock takes no pointers.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(KernelRecordError::InUse { pin_dir: dir.to_owned() });
        }
        return Err(KernelRecordError::Io { what: format!("locking {}", dir.display()), source: e });
    }
    Ok(PinLock(file))
}

pub(super) fn bpffs_mounted() -> bool {
    let path = std::ffi::CString::new(tandem_bpf::BPFFS).expect("no NUL");
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    unsafe { libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}
