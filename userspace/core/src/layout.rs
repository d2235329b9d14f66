//! The persisted byte layout of a [`DirtyMap`]: stable, versioned and checksummed.
//!
//! The daemon keeps the record in its metadata with this layout, and the eBPF maps follow
//! it closely, so it must never change silently: the golden test below fixes its bytes.
//! Everything is little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"TNDMBMAP"` |
//! | 8 | 2 | layout version, `1` |
//! | 10 | 2 | flags, `0` (a reader rejects any flag it does not know) |
//! | 12 | 8 | volume size in bytes |
//! | 20 | 4 | block size in bytes |
//! | 24 | 4 | track size in bytes |
//! | 28 | 4 | tracks per range |
//! | 32 | 4 | range count (must equal what the geometry implies) |
//! | 36 | … | one entry per range, in range order (below) |
//! | len − 4 | 4 | CRC32C (Castagnoli) of every byte before it |
//!
//! A range entry, for a range of `t` tracks and `w = ⌈t / 64⌉` words:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | which bitmap is current, `0` or `1` |
//! | 1 | 7 | zero padding |
//! | 8 | 8·w | bitmap 0 as u64 words; track `i` of the range is bit `i % 64` of word `i / 64` |
//! | 8 + 8·w | 8·w | bitmap 1, the same way |
//!
//! Bits past the range's last track are zero. Decoding accepts exactly the bytes
//! [`encode`] produces: anything else is an error, never a guess.

use crate::bitmap::{Bits, DirtyMap, RangePair};
use crate::geometry::{Geometry, GeometryError, RangeId};
use bitvec::field::BitField;
use thiserror::Error;

pub const MAGIC: [u8; 8] = *b"TNDMBMAP";
pub const VERSION: u16 = 1;
const HEADER_LEN: usize = 36;
const ENTRY_HEADER_LEN: usize = 8;
const CRC_LEN: usize = 4;
/// The shortest well-formed input: a header and a checksum (a geometry has at least one
/// range, so real inputs are longer).
const MIN_LEN: usize = HEADER_LEN + CRC_LEN;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LayoutError {
    #[error("not a Tandem bitmap: magic is {found:02x?}, expected \"TNDMBMAP\"")]
    BadMagic { found: [u8; 8] },
    #[error("unsupported bitmap layout version {0} (this build reads version {VERSION})")]
    UnsupportedVersion(u16),
    #[error("unsupported bitmap layout flags {0:#06x}")]
    UnsupportedFlags(u16),
    #[error("truncated bitmap: need {need} bytes, have {have}")]
    Truncated { need: u64, have: u64 },
    #[error("bitmap is {have} bytes, its geometry makes it {need}: trailing bytes")]
    TrailingBytes { need: u64, have: u64 },
    #[error("bitmap checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("invalid geometry in bitmap: {0}")]
    Geometry(#[from] GeometryError),
    #[error("bitmap holds {stored} ranges, its geometry has {expected}")]
    RangeCount { stored: u32, expected: u32 },
    #[error("bad current index {index} in range {range} (must be 0 or 1)")]
    BadCurrentIndex { range: RangeId, index: u8 },
    #[error("nonzero padding bits in range {range}")]
    NonzeroPadding { range: RangeId },
}

/// The persisted bytes of a record.
pub fn encode(map: &DirtyMap) -> Vec<u8> {
    let g = map.geometry();
    let mut out = Vec::with_capacity(encoded_len(g).unwrap_or(0) as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&g.volume_size().to_le_bytes());
    out.extend_from_slice(&g.block_size().to_le_bytes());
    out.extend_from_slice(&g.track_size().to_le_bytes());
    out.extend_from_slice(&g.tracks_per_range().to_le_bytes());
    out.extend_from_slice(&g.range_count().to_le_bytes());
    for pair in map.ranges() {
        let mut entry = [0u8; ENTRY_HEADER_LEN];
        entry[0] = pair.current_index() as u8;
        out.extend_from_slice(&entry);
        for bits in pair.parts() {
            // Loading chunk by chunk (not the raw storage) keeps bits past the range's end
            // zero whatever the bit vector's spare capacity holds.
            for chunk in bits.chunks(64) {
                out.extend_from_slice(&chunk.load_le::<u64>().to_le_bytes());
            }
        }
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Reads bytes written by [`encode`]. Sizes are checked against `bytes.len()` before
/// anything is allocated, so a hostile header cannot make this allocate more than a small
/// multiple of the input.
pub fn decode(bytes: &[u8]) -> Result<DirtyMap, LayoutError> {
    let have = bytes.len() as u64;
    if bytes.len() < MAGIC.len() {
        return Err(LayoutError::Truncated { need: MIN_LEN as u64, have });
    }
    let mut r = Reader { bytes, pos: 0 };
    let found: [u8; 8] = r.array();
    if found != MAGIC {
        return Err(LayoutError::BadMagic { found });
    }
    if bytes.len() < MIN_LEN {
        return Err(LayoutError::Truncated { need: MIN_LEN as u64, have });
    }
    let version = r.u16();
    if version != VERSION {
        return Err(LayoutError::UnsupportedVersion(version));
    }
    let flags = r.u16();
    if flags != 0 {
        return Err(LayoutError::UnsupportedFlags(flags));
    }
    let (volume_size, block_size, track_size, tracks_per_range) = (r.u64(), r.u32(), r.u32(), r.u32());
    let stored_ranges = r.u32();
    // A header that fails to describe a volume is more likely damage than a writer's bug:
    // say so when the checksum agrees.
    let geometry = match Geometry::new(volume_size, block_size, track_size, tracks_per_range) {
        Ok(g) => g,
        Err(e) => return Err(tail_checksum(bytes).err().unwrap_or(LayoutError::Geometry(e))),
    };
    if stored_ranges != geometry.range_count() {
        let e = LayoutError::RangeCount { stored: stored_ranges, expected: geometry.range_count() };
        return Err(tail_checksum(bytes).err().unwrap_or(e));
    }
    let need = encoded_len(&geometry).unwrap_or(u64::MAX);
    if have < need {
        return Err(LayoutError::Truncated { need, have });
    }
    if have > need {
        return Err(LayoutError::TrailingBytes { need, have });
    }
    tail_checksum(bytes)?;

    // From here every size is bounded by the input length checked above.
    let mut ranges = Vec::with_capacity(geometry.range_count() as usize);
    for range in 0..geometry.range_count() {
        let tracks = geometry.tracks_in_range(range);
        let tracks = (tracks.end - tracks.start) as usize;
        let entry: [u8; ENTRY_HEADER_LEN] = r.array();
        let current = entry[0];
        if current > 1 {
            return Err(LayoutError::BadCurrentIndex { range, index: current });
        }
        if entry[1..].iter().any(|b| *b != 0) {
            return Err(LayoutError::NonzeroPadding { range });
        }
        let bits = [r.bits(tracks, range)?, r.bits(tracks, range)?];
        ranges.push(RangePair::from_parts(bits, usize::from(current)));
    }
    Ok(DirtyMap::from_ranges(geometry, ranges))
}

/// Bytes [`encode`] produces for a geometry; `None` if that does not fit in a `u64`.
pub fn encoded_len(g: &Geometry) -> Option<u64> {
    let ranges = u64::from(g.range_count());
    let words = |tracks: u64| tracks.div_ceil(64);
    let last = g.tracks_in_range(g.range_count() - 1);
    let last = last.end - last.start;
    let full_words = (ranges - 1).checked_mul(words(u64::from(g.tracks_per_range())))?;
    let bitmap_bytes = full_words.checked_add(words(last))?.checked_mul(2 * 8)?;
    let entry_bytes = ranges.checked_mul(ENTRY_HEADER_LEN as u64)?;
    bitmap_bytes.checked_add(entry_bytes)?.checked_add((HEADER_LEN + CRC_LEN) as u64)
}

fn tail_checksum(bytes: &[u8]) -> Result<(), LayoutError> {
    let (body, tail) = bytes.split_at(bytes.len() - CRC_LEN);
    let stored = u32::from_le_bytes(tail.try_into().expect("CRC_LEN bytes"));
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(LayoutError::ChecksumMismatch { stored, computed });
    }
    Ok(())
}

/// Sequential little-endian reads; callers have checked the length beforehand, so running
/// past the end is a bug in this module, not bad input.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let a = self.bytes[self.pos..self.pos + N].try_into().expect("slice of N bytes");
        self.pos += N;
        a
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    fn bits(&mut self, tracks: usize, range: RangeId) -> Result<Bits, LayoutError> {
        let words: Vec<u64> = (0..tracks.div_ceil(64)).map(|_| self.u64()).collect();
        let mut bits = Bits::from_vec(words);
        if bits[tracks..].any() {
            return Err(LayoutError::NonzeroPadding { range });
        }
        bits.truncate(tracks);
        Ok(bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::TrackId;
    use proptest::prelude::*;

    fn tiny() -> DirtyMap {
        // Two ranges: four tracks, then one.
        let mut m = DirtyMap::new(Geometry::new(5 * 4096, 512, 4096, 4).unwrap());
        m.mark(1);
        m.mark(2);
        m.toggle(0);
        m.mark(2);
        m.mark(3);
        m.mark(4);
        m
    }

    /// Re-seals bytes after a deliberate edit, to reach the checks behind the checksum.
    fn reseal(bytes: &mut [u8]) {
        let n = bytes.len() - CRC_LEN;
        let crc = crc32c::crc32c(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn golden_bytes() {
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &b"TNDMBMAP"[..],
            &[1, 0, 0, 0],                          // version 1, flags 0
            &[0x00, 0x50, 0, 0, 0, 0, 0, 0],        // volume size 20480
            &[0x00, 0x02, 0, 0],                    // block size 512
            &[0x00, 0x10, 0, 0],                    // track size 4096
            &[4, 0, 0, 0],                          // tracks per range
            &[2, 0, 0, 0],                          // range count
            &[1, 0, 0, 0, 0, 0, 0, 0],              // range 0: bitmap 1 is current
            &[0b0110, 0, 0, 0, 0, 0, 0, 0],         //   bitmap 0 (old): tracks 1, 2
            &[0b1100, 0, 0, 0, 0, 0, 0, 0],         //   bitmap 1 (current): tracks 2, 3
            &[0, 0, 0, 0, 0, 0, 0, 0],              // range 1: bitmap 0 is current
            &[1, 0, 0, 0, 0, 0, 0, 0],              //   bitmap 0: track 4
            &[0, 0, 0, 0, 0, 0, 0, 0],              //   bitmap 1: empty
            &[0xc0, 0xf9, 0xf3, 0x33],              // CRC32C 0x33f3f9c0
        ]
        .concat();
        let bytes = encode(&tiny());
        assert_eq!(bytes, expected);
        assert_eq!(decode(&expected).unwrap(), tiny());
    }

    #[test]
    fn crc_is_castagnoli() {
        // The standard check value, so other languages' CRC32C read our files.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn errors_are_precise() {
        let good = encode(&tiny());
        assert_eq!(decode(&good[..3]), Err(LayoutError::Truncated { need: 40, have: 3 }));
        assert_eq!(decode(&good[..20]), Err(LayoutError::Truncated { need: 40, have: 20 }));
        assert_eq!(decode(&good[..good.len() - 1]), Err(LayoutError::Truncated { need: 88, have: 87 }));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(LayoutError::TrailingBytes { need: 88, have: 89 }));

        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(decode(&b), Err(LayoutError::BadMagic { found }) if &found == b"XNDMBMAP"));

        let mut b = good.clone();
        b[8] = 2;
        assert_eq!(decode(&b), Err(LayoutError::UnsupportedVersion(2)));

        let mut b = good.clone();
        b[10] = 1;
        assert_eq!(decode(&b), Err(LayoutError::UnsupportedFlags(1)));

        let mut b = good.clone();
        b[45] ^= 0x80;
        let stored = u32::from_le_bytes(good[84..].try_into().unwrap());
        let computed = crc32c::crc32c(&b[..84]);
        assert_eq!(decode(&b), Err(LayoutError::ChecksumMismatch { stored, computed }));

        // Behind a valid checksum: what a buggy writer could produce.
        let mut b = good.clone();
        b[21] = 0; // block size 512 -> 0
        reseal(&mut b);
        assert_eq!(decode(&b), Err(LayoutError::Geometry(GeometryError::BlockSize(0))));
        // The same damage without a valid checksum is reported as damage.
        let mut b = good.clone();
        b[21] = 0;
        assert!(matches!(decode(&b), Err(LayoutError::ChecksumMismatch { .. })));

        let mut b = good.clone();
        b[32] = 3;
        reseal(&mut b);
        assert_eq!(decode(&b), Err(LayoutError::RangeCount { stored: 3, expected: 2 }));

        let mut b = good.clone();
        b[60] = 2; // range 1's current index
        reseal(&mut b);
        assert_eq!(decode(&b), Err(LayoutError::BadCurrentIndex { range: 1, index: 2 }));

        let mut b = good.clone();
        b[37] = 1; // range 0's entry padding
        reseal(&mut b);
        assert_eq!(decode(&b), Err(LayoutError::NonzeroPadding { range: 0 }));

        let mut b = good.clone();
        b[68] = 0b10; // range 1 has one track: bit 1 is past its end
        reseal(&mut b);
        assert_eq!(decode(&b), Err(LayoutError::NonzeroPadding { range: 1 }));

        let mut b = good;
        b[44] = 0b1_0000; // range 0 has four tracks
        reseal(&mut b);
        assert_eq!(decode(&b), Err(LayoutError::NonzeroPadding { range: 0 }));
    }

    #[test]
    fn huge_geometry_is_refused_before_allocating() {
        // A header claiming 4 EiB in 4 MiB tracks, 512 per range, would need 256 GiB of
        // bitmap: it must come back as truncated, not as an allocation failure.
        let mut b = encode(&tiny());
        b[12..20].copy_from_slice(&(1u64 << 62).to_le_bytes());
        b[24..28].copy_from_slice(&(1u32 << 22).to_le_bytes());
        b[28..32].copy_from_slice(&(1u32 << 9).to_le_bytes());
        b[32..36].copy_from_slice(&(1u32 << 31).to_le_bytes());
        reseal(&mut b);
        assert!(matches!(decode(&b), Err(LayoutError::Truncated { need, .. }) if need > 1 << 38));
    }

    #[derive(Clone, Debug)]
    enum Edit {
        Mark(TrackId),
        Toggle(RangeId),
        ClearOld(RangeId),
        ClearTrack(TrackId),
        MarkAll,
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            6 => any::<TrackId>().prop_map(Edit::Mark),
            2 => any::<RangeId>().prop_map(Edit::Toggle),
            1 => any::<RangeId>().prop_map(Edit::ClearOld),
            1 => any::<TrackId>().prop_map(Edit::ClearTrack),
            1 => Just(Edit::MarkAll),
        ]
    }

    fn geometry() -> impl Strategy<Value = Geometry> {
        (prop_oneof![Just(512u32), Just(4096u32)], 12u32..=22, 1u32..=200, 1u64..=600, 0u64..8).prop_map(
            |(block, shift, tpr, tracks, tail_blocks)| {
                // A short last track sometimes, to cover ranges that are not multiples of 64.
                let size = (tracks * (1u64 << shift)).saturating_sub(tail_blocks * u64::from(block));
                Geometry::new(size.max(u64::from(block)), block, 1 << shift, tpr).unwrap()
            },
        )
    }

    fn map() -> impl Strategy<Value = DirtyMap> {
        (geometry(), proptest::collection::vec(edit(), 0..80)).prop_map(|(g, edits)| {
            let mut m = DirtyMap::new(g);
            for e in edits {
                match e {
                    Edit::Mark(t) => m.mark(t % g.track_count()),
                    Edit::Toggle(r) => m.toggle(r % g.range_count()),
                    Edit::ClearOld(r) => m.clear_old(r % g.range_count()),
                    Edit::ClearTrack(t) => m.clear_track(t % g.track_count()),
                    Edit::MarkAll => m.mark_all(),
                }
            }
            m
        })
    }

    proptest! {
        #[test]
        fn round_trips(m in map()) {
            let bytes = encode(&m);
            prop_assert_eq!(bytes.len() as u64, encoded_len(m.geometry()).unwrap());
            prop_assert_eq!(decode(&bytes).unwrap(), m);
        }

        #[test]
        fn every_single_byte_corruption_is_rejected(m in map(), at in any::<prop::sample::Index>(), x in 1u8..) {
            let mut bytes = encode(&m);
            let i = at.index(bytes.len());
            bytes[i] ^= x;
            prop_assert!(decode(&bytes).is_err(), "byte {} ^ {:#x} accepted", i, x);
        }

        #[test]
        fn every_truncation_is_rejected(m in map(), at in any::<prop::sample::Index>()) {
            let bytes = encode(&m);
            let cut = at.index(bytes.len());
            let is_truncated = matches!(decode(&bytes[..cut]), Err(LayoutError::Truncated { .. }));
            prop_assert!(is_truncated);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        /// Random edits behind a valid checksum reach the checks on geometry, indexes and
        /// padding: decoding must not panic, and whatever it accepts must be canonical.
        #[test]
        fn resealed_edits_never_panic_and_accepted_bytes_are_canonical(
            m in map(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = encode(&m);
            let body = bytes.len() - CRC_LEN;
            for (at, value) in edits {
                bytes[at.index(body)] = value;
            }
            reseal(&mut bytes);
            if let Ok(decoded) = decode(&bytes) {
                prop_assert_eq!(encode(&decoded), bytes);
            }
        }
    }
}
