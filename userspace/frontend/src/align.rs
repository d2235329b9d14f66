//! Byte-granular access to a block-granular backend.
//!
//! The FUSE file is an ordinary file to tools (`dd bs=1`, `cmp`, `hexdump`), so requests can have
//! any offset and length. The loop device in direct-I/O mode with its logical block size set to
//! the volume's sends only aligned requests; everything else is converted here:
//! - unaligned reads read the covering blocks and return the slice asked for;
//! - unaligned writes are a read-modify-write of the edge blocks, sent as ONE aligned write;
//! - unaligned discard / zero ranges zero their partial edge blocks with such a write and pass the
//!   aligned middle to the backend.
//!
//! A read-modify-write must not interleave with another write to the same block, or that write
//! is lost (the RMW writes back the block as it read it). Rather than tracking blocks, every
//! RMW takes an exclusive lock and every other modifying request a shared one: aligned I/O runs
//! in parallel, and the rare unaligned request briefly runs alone.
//!
//! Requests past the end are clipped like on a block device: a read returns fewer bytes, a write
//! is short, and one starting at or past the end fails with `ENOSPC`.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use crate::backend::BlockBackend;
use crate::error::BackendError;

/// A backend plus the alignment conversions and the RMW lock.
pub(crate) struct AlignedVolume {
    backend: Arc<dyn BlockBackend>,
    /// Block size, cached: the backend promises it does not change.
    bs: u64,
    /// Size, cached for the same reason.
    size: u64,
    /// Shared for aligned modifications, exclusive for a read-modify-write. Guards no data.
    rmw: RwLock<()>,
}

impl AlignedVolume {
    /// Wrap a backend whose geometry passed `check_geometry`.
    pub(crate) fn new(backend: Arc<dyn BlockBackend>) -> Self {
        let bs = u64::from(backend.block_size());
        let size = backend.size();
        Self { backend, bs, size, rmw: RwLock::new(()) }
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn block_size(&self) -> u32 {
        self.bs as u32
    }

    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        // The lock protects no data, so a poisoned lock (a panicking backend) is harmless.
        self.rmw.read().unwrap_or_else(|e| e.into_inner())
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.rmw.write().unwrap_or_else(|e| e.into_inner())
    }

    fn down(&self, x: u64) -> u64 {
        x & !(self.bs - 1)
    }

    fn up(&self, x: u64) -> u64 {
        self.down(x + self.bs - 1)
    }

    fn aligned(&self, x: u64) -> bool {
        x & (self.bs - 1) == 0
    }

    /// Read up to `len` bytes at `offset`; fewer at the end of the volume, none past it.
    pub(crate) fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        if offset >= self.size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + u64::from(len)).min(self.size);
        let (start, stop) = (self.down(offset), self.up(end));
        let span = u32::try_from(stop - start).map_err(|_| BackendError::invalid("read too large"))?;
        let data = self.backend.read(start, span)?;
        if data.len() != span as usize {
            return Err(BackendError::io(format!("backend returned {} bytes for a {span}-byte read", data.len())));
        }
        Ok(data.slice((offset - start) as usize..(end - start) as usize))
    }

    /// Write `data` at `offset`; returns the bytes written (short at the end of the volume).
    pub(crate) fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<usize, BackendError> {
        if data.is_empty() {
            return Ok(0);
        }
        if offset >= self.size {
            return Err(BackendError::no_space(format!("write at {offset} past the end ({})", self.size)));
        }
        let n = (self.size - offset).min(data.len() as u64) as usize;
        let data = &data[..n];
        if self.aligned(offset) && self.aligned(n as u64) {
            let _guard = self.shared();
            self.backend.write(offset, data, fua)?;
        } else {
            let _guard = self.exclusive();
            self.read_modify_write(offset, data, fua)?;
        }
        Ok(n)
    }

    /// The caller holds the exclusive lock.
    fn read_modify_write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        let end = offset + data.len() as u64;
        let (start, stop) = (self.down(offset), self.up(end));
        let mut buf = vec![0u8; (stop - start) as usize];
        let bs = self.bs as usize;
        let head_partial = offset != start;
        let tail_partial = end != stop;
        if head_partial {
            buf[..bs].copy_from_slice(&self.read_block(start)?);
        }
        // One block that is partial at both ends was read just above.
        if tail_partial && !(head_partial && stop - start == self.bs) {
            let at = buf.len() - bs;
            buf[at..].copy_from_slice(&self.read_block(stop - self.bs)?);
        }
        buf[(offset - start) as usize..(end - start) as usize].copy_from_slice(data);
        self.backend.write(start, &buf, fua)
    }

    fn read_block(&self, at: u64) -> Result<Bytes, BackendError> {
        let block = self.backend.read(at, self.bs as u32)?;
        if block.len() != self.bs as usize {
            return Err(BackendError::io(format!("backend returned {} bytes for one block", block.len())));
        }
        Ok(block)
    }

    /// Every acknowledged write hardened.
    pub(crate) fn flush(&self) -> Result<(), BackendError> {
        self.backend.flush()
    }

    /// Deallocate `[offset, offset+len)` (clipped to the volume); it reads back as zeros.
    pub(crate) fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.zero_range(offset, len, |b, at, n| b.discard(at, n))
    }

    /// Zero `[offset, offset+len)` (clipped to the volume), keeping it allocated.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.zero_range(offset, len, |b, at, n| b.write_zeroes(at, n))
    }

    /// Partial edge blocks are zeroed by a read-modify-write, the aligned middle goes to `op`.
    fn zero_range(
        &self,
        offset: u64,
        len: u64,
        op: impl Fn(&dyn BlockBackend, u64, u64) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        if offset >= self.size || len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len).min(self.size);
        let (mid_start, mid_end) = (self.up(offset), self.down(end));
        if mid_start >= mid_end {
            // No whole block inside: the range lies within one block or straddles two.
            let _guard = self.exclusive();
            return self.read_modify_write(offset, &vec![0; (end - offset) as usize], false);
        }
        if offset < mid_start {
            let _guard = self.exclusive();
            self.read_modify_write(offset, &vec![0; (mid_start - offset) as usize], false)?;
        }
        {
            let _guard = self.shared();
            op(self.backend.as_ref(), mid_start, mid_end - mid_start)?;
        }
        if mid_end < end {
            let _guard = self.exclusive();
            self.read_modify_write(mid_end, &vec![0; (end - mid_end) as usize], false)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A backend that refuses anything misaligned, so the tests prove the conversions.
    struct Strict {
        bs: u64,
        data: Mutex<Vec<u8>>,
    }

    impl Strict {
        fn check(&self, offset: u64, len: u64) -> Result<(), BackendError> {
            let size = self.data.lock().unwrap().len() as u64;
            if !offset.is_multiple_of(self.bs) || !len.is_multiple_of(self.bs) || offset + len > size {
                panic!("misaligned or out of range: {offset}+{len}");
            }
            Ok(())
        }
        fn fill(&self, offset: u64, len: u64, byte: u8) {
            self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(byte);
        }
    }

    impl BlockBackend for Strict {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn block_size(&self) -> u32 {
            self.bs as u32
        }
        fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
            self.check(offset, len.into())?;
            let d = self.data.lock().unwrap();
            Ok(Bytes::copy_from_slice(&d[offset as usize..offset as usize + len as usize]))
        }
        fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), BackendError> {
            self.check(offset, data.len() as u64)?;
            self.data.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> Result<(), BackendError> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
            self.check(offset, len)?;
            self.fill(offset, len, 0);
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
            self.discard(offset, len)
        }
    }

    fn volume(bs: u64, blocks: u64) -> (Arc<Strict>, AlignedVolume) {
        let backend = Arc::new(Strict { bs, data: Mutex::new(vec![0xAA; (bs * blocks) as usize]) });
        let vol = AlignedVolume::new(backend.clone());
        (backend, vol)
    }

    /// xorshift: deterministic, no dependency.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn random_unaligned_ops_match_a_byte_model() {
        for bs in [512u64, 4096] {
            let (_backend, vol) = volume(bs, 16);
            let size = vol.size();
            let mut model = vec![0xAAu8; size as usize];
            let mut rng = 0x9E37_79B9_7F4A_7C15u64;
            for round in 0..2000u64 {
                let offset = next(&mut rng) % size;
                let len = 1 + next(&mut rng) % (3 * bs);
                match next(&mut rng) % 4 {
                    0 => {
                        let data: Vec<u8> = (0..len).map(|i| (round + i) as u8).collect();
                        let n = vol.write(offset, &data, false).unwrap();
                        assert_eq!(n as u64, len.min(size - offset));
                        model[offset as usize..offset as usize + n].copy_from_slice(&data[..n]);
                    }
                    1 => {
                        vol.discard(offset, len).unwrap();
                        let end = (offset + len).min(size) as usize;
                        model[offset as usize..end].fill(0);
                    }
                    2 => {
                        vol.write_zeroes(offset, len).unwrap();
                        let end = (offset + len).min(size) as usize;
                        model[offset as usize..end].fill(0);
                    }
                    _ => {
                        let got = vol.read(offset, len as u32).unwrap();
                        let end = (offset + len).min(size) as usize;
                        assert_eq!(&got[..], &model[offset as usize..end], "round {round}");
                    }
                }
            }
            assert_eq!(&vol.read(0, size as u32).unwrap()[..], &model[..]);
        }
    }

    #[test]
    fn past_the_end() {
        let (_b, vol) = volume(4096, 4);
        assert!(vol.read(4 * 4096, 10).unwrap().is_empty());
        assert_eq!(vol.read(4 * 4096 - 3, 10).unwrap().len(), 3);
        assert_eq!(vol.write(4 * 4096 - 3, &[1; 10], false).unwrap(), 3);
        assert_eq!(vol.write(4 * 4096, &[1; 10], false).unwrap_err().errno(), libc::ENOSPC);
        assert_eq!(vol.write(0, &[], false).unwrap(), 0);
        vol.discard(4 * 4096 - 100, u64::MAX).unwrap();
        assert_eq!(&vol.read(4 * 4096 - 100, 100).unwrap()[..], &[0; 100][..]);
    }
}
