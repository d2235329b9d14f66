//! Errors of the frontends.
//!
//! Two kinds: [`BackendError`] travels from the daemon's volume back to the kernel as an errno
//! (it is what `read(2)`/`write(2)`/`fsync(2)` on the device return), and [`FrontendError`] is
//! what setting a frontend up or tearing it down can fail with.

use std::io;
use std::path::PathBuf;

/// A failed volume request, carrying the errno the kernel should see.
///
/// The errno matters: `EIO` tells a filesystem on top that the data is gone and makes it
/// remount read-only or shut down, `EROFS` says "this node is not primary", `ENOSPC` is a
/// request past the end of the volume. The message is for logs only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (errno {errno})")]
pub struct BackendError {
    errno: i32,
    message: String,
}

impl BackendError {
    /// An error with an explicit errno (a positive `libc::E*` value; anything else becomes `EIO`).
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        let errno = if errno > 0 { errno } else { libc::EIO };
        Self { errno, message: message.into() }
    }

    /// `EIO`: the data could not be read or hardened.
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(libc::EIO, message)
    }

    /// `EROFS`: the volume does not accept writes here (this node is not primary).
    pub fn read_only(message: impl Into<String>) -> Self {
        Self::new(libc::EROFS, message)
    }

    /// `EINVAL`: a request the volume cannot take (e.g. misaligned).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(libc::EINVAL, message)
    }

    /// `ENOSPC`: a request past the end of the volume.
    pub fn no_space(message: impl Into<String>) -> Self {
        Self::new(libc::ENOSPC, message)
    }

    /// `EOPNOTSUPP`: the volume does not do this operation.
    pub fn not_supported(message: impl Into<String>) -> Self {
        Self::new(libc::EOPNOTSUPP, message)
    }

    /// The errno the kernel is answered with (always positive).
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// The log message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<io::Error> for BackendError {
    fn from(err: io::Error) -> Self {
        Self::new(err.raw_os_error().unwrap_or(libc::EIO), err.to_string())
    }
}

/// Setting up or tearing down a frontend failed.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The backend's geometry cannot be served (zero size, block size not a power of two, ...).
    #[error("volume geometry not servable: {0}")]
    Geometry(String),
    /// Invalid frontend options.
    #[error("invalid frontend options: {0}")]
    Options(String),
    /// Mounting the FUSE filesystem failed (not root, no /dev/fuse, bad mountpoint).
    #[error("mounting FUSE on {mountpoint}: {source}")]
    Mount {
        /// Where it was to be mounted.
        mountpoint: PathBuf,
        /// What the kernel or fuser said.
        source: io::Error,
    },
    /// Unmounting failed with something other than "busy".
    #[error("unmounting {mountpoint}: {source}")]
    Unmount {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// What umount(2) said.
        source: io::Error,
    },
    /// The mount stayed busy: something (usually a loop device) still holds the volume file open.
    #[error("{mountpoint} is busy (detach the loop device on top of it first)")]
    Busy {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
    /// The FUSE session thread ended with an error or panicked.
    #[error("FUSE session for {mountpoint} ended badly: {source}")]
    Session {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// fuser's error.
        source: io::Error,
    },
    /// A loop device operation failed.
    #[error("loop device: {op} {path}: {source}")]
    Loop {
        /// What was being done (`open`, `LOOP_CONFIGURE`, ...).
        op: &'static str,
        /// The file or device involved.
        path: PathBuf,
        /// The kernel's answer.
        source: io::Error,
    },
    /// Direct I/O was requested but the kernel attached the loop device without it.
    #[error("{device}: the kernel refused direct I/O on {file}")]
    DirectIoUnavailable {
        /// The loop device (already detached again).
        device: PathBuf,
        /// Its backing file.
        file: PathBuf,
    },
    /// The loop device is still bound after detach: another opener (a mounted filesystem, a
    /// tool) holds it. The kernel finishes the detach when it closes (autoclear).
    #[error("{device} still open elsewhere; it detaches when the last opener closes it")]
    LoopStillOpen {
        /// The loop device.
        device: PathBuf,
    },
    /// A ublk control or queue operation failed (no ublk_drv, device busy, not root, ...).
    #[error("ublk: {op}: {detail}")]
    Ublk {
        /// What was being done (`ADD_DEV`, `START_USER_RECOVERY`, `serve`, ...).
        op: &'static str,
        /// What libublk or the kernel said.
        detail: String,
    },
}

/// Result alias for setup and teardown.
pub type Result<T, E = FrontendError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_always_positive() {
        assert_eq!(BackendError::new(0, "x").errno(), libc::EIO);
        assert_eq!(BackendError::new(-5, "x").errno(), libc::EIO);
        assert_eq!(BackendError::read_only("secondary").errno(), libc::EROFS);
        let from_io: BackendError = io::Error::from_raw_os_error(libc::ENOSPC).into();
        assert_eq!(from_io.errno(), libc::ENOSPC);
        let other: BackendError = io::Error::other("no errno").into();
        assert_eq!(other.errno(), libc::EIO);
    }
}
