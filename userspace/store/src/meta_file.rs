//! The external metadata file (DRBD's "external meta-data"): a regular file or a block device
//! of its own, holding the header and two slots (layout in `codec`).
//!
//! Crash atomicity comes from the slots, not from renames: a write always goes to the slot
//! that does *not* hold the newest durable record, with the next sequence number, and is
//! hardened before it counts. A crash in the middle tears at most that slot, whose checksum
//! then fails, and the reader takes the other one: the state before the interrupted write,
//! which was never reported durable. A failed write leaves the durable slot where it was, so
//! the retry goes to the same (possibly torn) slot and never over the only good copy.
//!
//! What the slots cannot tell apart: a newest slot that was torn while being written, and a
//! newest slot that was complete and later damaged on the media. Both read as "fall back to
//! the older record". [`inspect_md`] reports the other slot's state so tools can show it.

use crate::codec::{self, DecodeError, MetaHeader, HEADER_BLOCK, SLOT_HEADER_LEN};
use crate::error::StoreError;
use crate::sys::{self, Kind};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tandem_core::node::Meta;
use tandem_core::types::NodeId;
use tandem_core::Geometry;

/// An open metadata file, locked for one store. `write` is the blocking form of the
/// store's `PersistMeta`; both share the slot choice below.
#[derive(Debug)]
pub struct MetaFile {
    path: PathBuf,
    file: File,
    header: MetaHeader,
    slot_size: u64,
    /// The slot holding the newest record known durable; the next write goes to the other.
    durable_slot: usize,
    durable_seq: u64,
}

/// Everything `inspect_md` read: the metadata in use and the state of the other slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedMeta {
    pub header: MetaHeader,
    pub meta: Meta,
    /// Sequence number and slot of `meta`.
    pub seq: u64,
    pub slot: usize,
    /// The other slot: its (older) sequence number, or why it does not count.
    pub other: Result<u64, DecodeError>,
    pub slot_size: u64,
}

/// A slot write about to be issued.
pub(crate) struct SlotWrite {
    pub slot: usize,
    pub seq: u64,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

impl MetaFile {
    /// Opens metadata for use by a store: takes an exclusive lock (or, for a block device,
    /// an exclusive claim), so a second daemon on the same file fails here.
    pub fn open(path: &Path) -> Result<(MetaFile, Meta), StoreError> {
        let kind = kind_of(path)?;
        let file = sys::open_rw(path, kind).map_err(|e| open_error(path, kind, e))?;
        if kind == Kind::File && !sys::try_lock(&file).map_err(|e| StoreError::io("lock", path, e))? {
            return Err(StoreError::InUse { path: path.into(), why: LOCKED });
        }
        let loaded = read(&file, kind, path)?;
        let mf = MetaFile {
            path: path.into(),
            file,
            header: loaded.header,
            slot_size: loaded.slot_size,
            durable_slot: loaded.slot,
            durable_seq: loaded.seq,
        };
        Ok((mf, loaded.meta))
    }

    pub fn header(&self) -> &MetaHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sequence number of the newest durable record.
    pub fn seq(&self) -> u64 {
        self.durable_seq
    }

    /// Checks that this metadata belongs to the configured volume and node.
    pub fn expect(&self, volume_uuid: u128, node: NodeId, geometry: &Geometry) -> Result<(), StoreError> {
        let h = &self.header;
        let mismatch = |what, stored: String, expected: String| {
            Err(StoreError::Mismatch { path: self.path.clone(), what, stored, expected })
        };
        let (a, b) = (&h.geometry, geometry);
        if h.volume_uuid != volume_uuid {
            return mismatch("volume", format!("{:032x}", h.volume_uuid), format!("{volume_uuid:032x}"));
        }
        if h.node != node {
            return mismatch("node", h.node.to_string(), node.to_string());
        }
        let fields = [
            ("volume size", a.volume_size(), b.volume_size()),
            ("block size", a.block_size().into(), b.block_size().into()),
            ("track size", a.track_size().into(), b.track_size().into()),
            ("tracks per range", a.tracks_per_range().into(), b.tracks_per_range().into()),
        ];
        for (what, stored, expected) in fields {
            if stored != expected {
                return mismatch(what, stored.to_string(), expected.to_string());
            }
        }
        Ok(())
    }

    /// Writes `meta` durably and crash-atomically, blocking.
    pub fn write(&mut self, meta: &Meta) -> Result<(), StoreError> {
        self.check(meta).map_err(|(need, _)| StoreError::MetaTooLarge {
            path: self.path.clone(),
            need,
            slot_size: self.slot_size,
        })?;
        let w = self.prepare(meta);
        let r = self.file.write_all_at(&w.bytes, w.offset).and_then(|()| self.file.sync_data());
        r.map_err(|e| StoreError::io("write metadata to", &self.path, e))?;
        self.committed(w.slot, w.seq);
        Ok(())
    }

    /// `Err((need, tracks))` if `meta` does not fit a slot or has the wrong track count.
    pub(crate) fn check(&self, meta: &Meta) -> Result<(), (u64, u64)> {
        let need = codec::slot_len(meta);
        let tracks = meta.out_of_sync.len() as u64;
        if !codec::encodable(meta) || need > self.slot_size || tracks != self.header.geometry.track_count() {
            return Err((need, tracks));
        }
        Ok(())
    }

    pub(crate) fn slot_size(&self) -> u64 {
        self.slot_size
    }

    /// The next write: to the slot not holding the newest durable record.
    pub(crate) fn prepare(&self, meta: &Meta) -> SlotWrite {
        let slot = 1 - self.durable_slot;
        let seq = self.durable_seq + 1;
        SlotWrite {
            slot,
            seq,
            offset: MetaHeader::slot_offset(self.slot_size, slot),
            bytes: codec::encode_slot(self.header.volume_uuid, seq, meta),
        }
    }

    /// A prepared write is hardened: its slot now holds the newest durable record.
    pub(crate) fn committed(&mut self, slot: usize, seq: u64) {
        self.durable_slot = slot;
        self.durable_seq = seq;
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }
}

const LOCKED: &str = "another process holds its lock (is a tandem daemon already using it?)";
const CLAIMED: &str = "the block device is claimed by someone else (mounted, held by device-mapper, or open \
                       exclusively by another program)";

fn kind_of(path: &Path) -> Result<Kind, StoreError> {
    let m = fs::metadata(path).map_err(|e| StoreError::io("stat", path, e))?;
    match Kind::of(&m) {
        Kind::Other(kind) => Err(StoreError::NotFileOrBlockDevice { path: path.into(), kind }),
        k => Ok(k),
    }
}

pub(crate) fn open_error(path: &Path, kind: Kind, e: io::Error) -> StoreError {
    if kind == Kind::BlockDevice && e.raw_os_error() == Some(libc::EBUSY) {
        StoreError::InUse { path: path.into(), why: CLAIMED }
    } else {
        StoreError::io("open", path, e)
    }
}

/// Creates metadata for a new replica, with `Meta::fresh` in the header's initial
/// generation (see [`MetaHeader::initial_generation`]).
pub fn create_md(path: &Path, header: &MetaHeader, force: bool) -> Result<(), StoreError> {
    create_md_with(path, header, &Meta::fresh(&header.geometry, header.initial_generation()), force)
}

/// Creates metadata holding `meta`. Without `force` it refuses a path that already holds
/// anything but zeroes: valid metadata (naming the volume it belongs to), damaged metadata, or
/// foreign data. With `force` it still refuses metadata a running daemon holds.
///
/// A regular file is written whole under a temporary name, hardened and renamed over `path`,
/// then the directory is hardened: a crash leaves either the old file or the new one. A block
/// device is written in place (its old contents are invalid until the new header is down).
pub fn create_md_with(path: &Path, header: &MetaHeader, meta: &Meta, force: bool) -> Result<(), StoreError> {
    let slot_size = header.min_slot_size();
    let tracks = header.geometry.track_count();
    if meta.out_of_sync.len() as u64 != tracks {
        return Err(StoreError::Mismatch {
            path: path.into(),
            what: "a track count of",
            stored: meta.out_of_sync.len().to_string(),
            expected: tracks.to_string(),
        });
    }
    if !codec::encodable(meta) || codec::slot_len(meta) > slot_size {
        return Err(StoreError::MetaTooLarge { path: path.into(), need: codec::slot_len(meta), slot_size });
    }
    let head = codec::encode_header(header, slot_size);
    let record = codec::encode_slot(header.volume_uuid, 1, meta);

    let existing = match fs::metadata(path) {
        Ok(_) => Some(kind_of(path)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(StoreError::io("stat", path, e)),
    };
    match existing {
        Some(Kind::BlockDevice) => {
            let file = sys::open_rw(path, Kind::BlockDevice).map_err(|e| open_error(path, Kind::BlockDevice, e))?;
            refuse_existing(&file, Kind::BlockDevice, path, force)?;
            let size = sys::size_of(&file, Kind::BlockDevice).map_err(|e| StoreError::io("size", path, e))?;
            let need = MetaHeader::file_len(slot_size);
            if size < need {
                return Err(StoreError::MetaDeviceTooSmall { path: path.into(), size, need });
            }
            // Only the first block of slot 1 needs zeroing: a reader stops at its header.
            let w = || -> io::Result<()> {
                write_block(&file, 0, &head, HEADER_BLOCK)?;
                write_block(&file, MetaHeader::slot_offset(slot_size, 0), &record, slot_size)?;
                write_block(&file, MetaHeader::slot_offset(slot_size, 1), &[], codec::SLOT_ALIGN)?;
                file.sync_data()
            };
            w().map_err(|e| StoreError::io("write metadata to", path, e))
        }
        _ => {
            // A symlink is followed: the file it names is replaced, the link stays.
            let path = match existing {
                Some(_) => fs::canonicalize(path).map_err(|e| StoreError::io("resolve", path, e))?,
                None => path.to_path_buf(),
            };
            if existing.is_some() {
                let file = File::open(&path).map_err(|e| StoreError::io("open", &path, e))?;
                if !sys::try_lock(&file).map_err(|e| StoreError::io("lock", &path, e))? {
                    return Err(StoreError::InUse { path, why: LOCKED });
                }
                refuse_existing(&file, Kind::File, &path, force)?;
            }
            replace_file(&path, &head, &record, slot_size)
        }
    }
}

/// Errors unless `force` or the file holds nothing but zeroes.
fn refuse_existing(file: &File, kind: Kind, path: &Path, force: bool) -> Result<(), StoreError> {
    if force {
        return Ok(());
    }
    match read(file, kind, path) {
        Ok(l) => Err(StoreError::MetaExists {
            path: path.into(),
            volume_uuid: l.header.volume_uuid,
            node: l.header.node,
            volume_size: l.header.geometry.volume_size(),
        }),
        Err(e) => {
            let mut first = vec![0u8; HEADER_BLOCK as usize];
            let n = read_up_to(file, 0, &mut first).map_err(|e| StoreError::io("read", path, e))?;
            if first[..n].iter().all(|&b| b == 0) {
                return Ok(());
            }
            let what = if first.starts_with(&codec::MAGIC) {
                format!("damaged Tandem metadata ({e})")
            } else {
                format!("data that is not Tandem metadata (first bytes {:02x?})", &first[..n.min(8)])
            };
            Err(StoreError::ExistingContent { path: path.into(), what })
        }
    }
}

fn replace_file(path: &Path, head: &[u8], record: &[u8], slot_size: u64) -> Result<(), StoreError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(".{name}.tandem-tmp"));
    // A leftover from a create that crashed is ours to replace.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(StoreError::io("remove", &tmp, e)),
        _ => {}
    }
    let file =
        OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| StoreError::io("create", &tmp, e))?;
    // Every block is written (not left as a hole), so later slot writes never need to
    // allocate, and cannot fail for lack of space.
    let w = || -> io::Result<()> {
        write_block(&file, 0, head, HEADER_BLOCK)?;
        write_block(&file, MetaHeader::slot_offset(slot_size, 0), record, slot_size)?;
        write_block(&file, MetaHeader::slot_offset(slot_size, 1), &[], slot_size)?;
        file.sync_all()
    };
    if let Err(e) = w() {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::io("write", &tmp, e));
    }
    fs::rename(&tmp, path).map_err(|e| StoreError::io("rename into place", path, e))?;
    File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| StoreError::io("harden directory", &dir, e))
}

/// Writes `bytes` at `offset`, then zeroes up to `len` bytes in all.
fn write_block(file: &File, offset: u64, bytes: &[u8], len: u64) -> io::Result<()> {
    file.write_all_at(bytes, offset)?;
    let zeroes = vec![0u8; (1 << 20).min(len as usize)];
    let mut at = bytes.len() as u64;
    while at < len {
        let n = (len - at).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + at)?;
        at += n as u64;
    }
    Ok(())
}

/// Reads the header and metadata, taking no lock: for status and dump tools.
pub fn load_md(path: &Path) -> Result<(MetaHeader, Meta), StoreError> {
    let l = inspect_md(path)?;
    Ok((l.header, l.meta))
}

/// Like [`load_md`], with which slot was used and the state of the other one.
pub fn inspect_md(path: &Path) -> Result<LoadedMeta, StoreError> {
    let kind = kind_of(path)?;
    let file = File::open(path).map_err(|e| StoreError::io("open", path, e))?;
    read(&file, kind, path)
}

fn read(file: &File, kind: Kind, path: &Path) -> Result<LoadedMeta, StoreError> {
    let bad = |source| StoreError::Meta { path: path.into(), source };
    let size = sys::size_of(file, kind).map_err(|e| StoreError::io("size", path, e))?;
    let mut head = [0u8; codec::HEADER_LEN];
    let n = read_up_to(file, 0, &mut head).map_err(|e| StoreError::io("read", path, e))?;
    let (header, slot_size) = codec::decode_header(&head[..n]).map_err(bad)?;
    let need = MetaHeader::file_len(slot_size);
    if size < need {
        return Err(bad(DecodeError::Truncated { need, have: size }));
    }
    let slot = |i| read_slot(file, &header, slot_size, i).map_err(|e| StoreError::io("read", path, e));
    let (s0, s1) = (slot(0)?, slot(1)?);
    let (slot, (seq, meta), other) = match (s0, s1) {
        (Ok(a), Ok(b)) if b.0 > a.0 => (1, b, Ok(a.0)),
        (Ok(a), Ok(b)) => (0, a, Ok(b.0)),
        (Ok(a), Err(e)) => (0, a, Err(e)),
        (Err(e), Ok(b)) => (1, b, Err(e)),
        (Err(slot0), Err(slot1)) => return Err(StoreError::NoValidSlot { path: path.into(), slot0, slot1 }),
    };
    Ok(LoadedMeta { header, meta, seq, slot, other, slot_size })
}

/// Reads slot `i`: its header, then as much as its record length says (when plausible).
fn read_slot(
    file: &File,
    header: &MetaHeader,
    slot_size: u64,
    i: usize,
) -> io::Result<Result<(u64, Meta), DecodeError>> {
    let offset = MetaHeader::slot_offset(slot_size, i);
    let mut head = [0u8; SLOT_HEADER_LEN];
    file.read_exact_at(&mut head, offset)?;
    let len = u64::from(u32::from_le_bytes(head[32..36].try_into().expect("4 bytes")));
    let total = SLOT_HEADER_LEN as u64 + len + 4;
    if head[0..8] != codec::SLOT_MAGIC || total > slot_size {
        return Ok(codec::decode_slot(&head, header, slot_size));
    }
    let mut bytes = vec![0u8; total as usize];
    file.read_exact_at(&mut bytes, offset)?;
    Ok(codec::decode_slot(&bytes, header, slot_size))
}

/// Reads until `buf` is full or the end of the file; returns the bytes read.
fn read_up_to(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slot choice alone: a failed write leaves the next write on the same slot, so the
    /// only good copy is never the one overwritten.
    #[test]
    fn failed_write_retries_the_same_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("md");
        let h = MetaHeader::new(7, 0, Geometry::new(1 << 20, 512, 4096, 16).unwrap());
        create_md(&path, &h, false).unwrap();
        let (mut mf, meta) = MetaFile::open(&path).unwrap();
        assert_eq!((mf.durable_slot, mf.seq()), (0, 1));
        let w = mf.prepare(&meta);
        assert_eq!((w.slot, w.seq), (1, 2));
        // Not committed (the write failed): the retry targets the same slot.
        let again = mf.prepare(&meta);
        assert_eq!((again.slot, again.seq), (1, 2));
        mf.committed(again.slot, again.seq);
        let next = mf.prepare(&meta);
        assert_eq!((next.slot, next.seq), (0, 3));
    }
}
