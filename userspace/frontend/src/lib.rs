//! Block-device frontends: ublk on kernels that have it ([`UblkFrontend`]), a FUSE file + loop
//! device elsewhere.
//!
//! The daemon implements [`BlockBackend`] for a volume. The file frontend serves it as one
//! regular file in a FUSE mount ([`mount`] → [`Mounted::file`]), and [`attach_loop`] puts a
//! real block device on top of that file:
//!
//! ```no_run
//! # fn demo(backend: std::sync::Arc<dyn tandem_frontend::BlockBackend>) -> tandem_frontend::Result<()> {
//! use tandem_frontend::{attach_loop_with, FileFrontend, LoopOptions};
//! let block_size = backend.block_size();
//! let mut mounted = FileFrontend::new(backend)?.mount(std::path::Path::new("/run/tandem/r0"))?;
//! let opts = LoopOptions { direct_io: true, block_size: Some(block_size), read_only: false };
//! let mut dev = attach_loop_with(mounted.file(), &opts)?;
//! println!("volume at {}", dev.path().display());
//! // ... later, in this order: the loop device holds the file open.
//! dev.detach()?;
//! mounted.unmount()?;
//! # Ok(()) }
//! ```
//!
//! Everything here needs root (mount(2), /dev/fuse, /dev/loop-control). Killing the daemon
//! makes the device return EIO; there is no re-attach under a mounted filesystem with this
//! frontend (that is a ublk feature).

mod align;
mod backend;
mod error;
mod fuse;
mod loopdev;
mod mount;
mod ublk;

pub use backend::BlockBackend;
pub use error::{BackendError, FrontendError, Result};
pub use fuse::set_io_flusher;
pub use loopdev::{attach_loop, attach_loop_with, LoopDevice, LoopOptions};
pub use mount::{mount, FileFrontend, FileFrontendOptions, Mounted};
pub use ublk::{
    device_state, private_mount_namespace, stop_device, unavailable as ublk_unavailable, Change, Done, UblkBackend,
    UblkDevice, UblkFrontend, UblkOptions, UblkStart, UblkState, UBLK_CONTROL,
};

#[cfg(test)]
mod tests {
    /// The daemon moves these between threads.
    #[test]
    fn handles_are_send() {
        fn send<T: Send>() {}
        send::<super::Mounted>();
        send::<super::LoopDevice>();
        send::<super::FileFrontend>();
    }
}
