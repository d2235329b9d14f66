//! The interface between a frontend and the volume behind it.
//!
//! The daemon implements [`BlockBackend`] for each volume; the frontends (the FUSE file here,
//! ublk later) call it. Calls are *blocking* and come from the frontend's own serving threads,
//! several at once: the daemon implements each one by sending a request into its event loop and
//! waiting for the completion. Nothing here knows about replication modes; "acknowledged" means
//! whatever the volume's mode says (see the FLUSH/FUA table in the docs).

use bytes::Bytes;

use crate::error::BackendError;

/// One volume as seen by a frontend: a fixed-size array of blocks.
///
/// Alignment: the frontends only ever pass offsets and lengths that are multiples of
/// [`block_size`](Self::block_size) and lie inside [`size`](Self::size); unaligned requests from
/// tools are converted before they get here (see `FileFrontend`).
///
/// Deadlock rule: the threads that call this may be the ones the kernel needs to make progress
/// on writeback (they carry `PR_SET_IO_FLUSHER`). An implementation must not wait on the page
/// cache of the device it serves; the threads of the daemon that complete these calls should
/// call [`crate::set_io_flusher`] too.
pub trait BlockBackend: Send + Sync + 'static {
    /// Size of the volume in bytes; a multiple of `block_size()`. Must not change while served.
    fn size(&self) -> u64;

    /// Logical block size in bytes: a power of two, 512..=65536 (4096 for most volumes).
    fn block_size(&self) -> u32;

    /// Read `len` bytes at `offset`. Returns exactly `len` bytes.
    fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError>;

    /// Write `data` at `offset`; returns when the write is acknowledged per the volume's mode.
    /// `fua`: the write must be hardened (per the mode) before returning, as after a flush.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError>;

    /// Every write acknowledged before this call must be hardened (per the mode) when it returns.
    fn flush(&self) -> Result<(), BackendError>;

    /// Deallocate a range. Afterwards the range **must read back as zeros**: the loop driver
    /// implements `REQ_OP_WRITE_ZEROES` (without `REQ_NOUNMAP`) as a punch hole, so filesystems
    /// rely on it.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError>;

    /// Write zeros over a range, keeping it allocated (`REQ_OP_WRITE_ZEROES` with `REQ_NOUNMAP`).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError>;
}

/// Check that a backend's geometry is one the frontends can serve.
pub(crate) fn check_geometry(backend: &dyn BlockBackend) -> Result<(), String> {
    let bs = backend.block_size();
    if !(512..=65536).contains(&bs) || !bs.is_power_of_two() {
        return Err(format!("block size {bs} is not a power of two in 512..=65536"));
    }
    let size = backend.size();
    if size == 0 || !size.is_multiple_of(u64::from(bs)) {
        return Err(format!("size {size} is not a positive multiple of the block size {bs}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Geo(u64, u32);
    impl BlockBackend for Geo {
        fn size(&self) -> u64 {
            self.0
        }
        fn block_size(&self) -> u32 {
            self.1
        }
        fn read(&self, _: u64, len: u32) -> Result<Bytes, BackendError> {
            Ok(Bytes::from(vec![0; len as usize]))
        }
        fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), BackendError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), BackendError> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), BackendError> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64) -> Result<(), BackendError> {
            Ok(())
        }
    }

    #[test]
    fn geometry() {
        assert!(check_geometry(&Geo(1 << 20, 4096)).is_ok());
        assert!(check_geometry(&Geo(1 << 20, 512)).is_ok());
        assert!(check_geometry(&Geo(1 << 20, 3000)).is_err());
        assert!(check_geometry(&Geo(1 << 20, 256)).is_err());
        assert!(check_geometry(&Geo(0, 4096)).is_err());
        assert!(check_geometry(&Geo(4096 + 512, 4096)).is_err());
    }
}
