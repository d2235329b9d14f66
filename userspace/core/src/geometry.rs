//! Volume geometry: block, track and range sizes, and conversions between byte extents and
//! track spans.

use std::ops::Range;
use thiserror::Error;

/// Index of a track in the volume.
pub type TrackId = u64;
/// Index of a range (a run of tracks whose bitmaps toggle together).
pub type RangeId = u32;

/// A byte extent on the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn new(offset: u64, len: u64) -> Self {
        Extent { offset, len }
    }

    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A run of consecutive tracks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TrackSpan {
    pub first: TrackId,
    pub count: u64,
}

impl TrackSpan {
    pub fn new(first: TrackId, count: u64) -> Self {
        TrackSpan { first, count }
    }

    pub fn tracks(&self) -> Range<TrackId> {
        self.first..self.first + self.count
    }

    pub fn end(&self) -> TrackId {
        self.first + self.count
    }

    pub fn contains(&self, track: TrackId) -> bool {
        self.tracks().contains(&track)
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GeometryError {
    #[error("logical block size {0} is not supported (512 or 4096)")]
    BlockSize(u32),
    #[error("track size {0} must be a power of two from 4 KiB to 4 MiB, and at least the block size")]
    TrackSize(u32),
    #[error("tracks per range {0} must be at least 1")]
    TracksPerRange(u32),
    #[error("volume size {size} must be a non-zero multiple of the block size {block_size}")]
    VolumeSize { size: u64, block_size: u32 },
    #[error("volume of {size} bytes needs more than 2^32 ranges; raise the track size or tracks per range")]
    TooManyRanges { size: u64 },
    #[error("extent at {offset} of {len} bytes is not aligned to the block size {block_size}")]
    Misaligned { offset: u64, len: u64, block_size: u32 },
    #[error("extent at {offset} of {len} bytes ends beyond the volume size {volume_size}")]
    OutOfRange { offset: u64, len: u64, volume_size: u64 },
    #[error("extent at {offset} is empty")]
    Empty { offset: u64 },
    #[error("track {track} is beyond the volume's {tracks} tracks")]
    NoSuchTrack { track: TrackId, tracks: u64 },
    #[error("range {range} is beyond the volume's {ranges} ranges")]
    NoSuchRange { range: RangeId, ranges: u32 },
}

/// Sizes that fix how a volume is divided into blocks, tracks and ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    volume_size: u64,
    block_size: u32,
    track_size: u32,
    tracks_per_range: u32,
}

impl Geometry {
    pub const DEFAULT_TRACK_SIZE: u32 = 64 * 1024;
    pub const DEFAULT_TRACKS_PER_RANGE: u32 = 16384;
    pub const MIN_TRACK_SIZE: u32 = 4 * 1024;
    pub const MAX_TRACK_SIZE: u32 = 4 * 1024 * 1024;

    pub fn new(
        volume_size: u64,
        block_size: u32,
        track_size: u32,
        tracks_per_range: u32,
    ) -> Result<Self, GeometryError> {
        if block_size != 512 && block_size != 4096 {
            return Err(GeometryError::BlockSize(block_size));
        }
        if !track_size.is_power_of_two()
            || !(Self::MIN_TRACK_SIZE..=Self::MAX_TRACK_SIZE).contains(&track_size)
            || track_size < block_size
        {
            return Err(GeometryError::TrackSize(track_size));
        }
        if tracks_per_range == 0 {
            return Err(GeometryError::TracksPerRange(tracks_per_range));
        }
        if volume_size == 0 || !volume_size.is_multiple_of(u64::from(block_size)) {
            return Err(GeometryError::VolumeSize { size: volume_size, block_size });
        }
        let g = Geometry { volume_size, block_size, track_size, tracks_per_range };
        if g.track_count().div_ceil(u64::from(tracks_per_range)) > u64::from(u32::MAX) {
            return Err(GeometryError::TooManyRanges { size: volume_size });
        }
        Ok(g)
    }

    /// The default track size (64 KiB) and range length (16384 tracks, 1 GiB).
    pub fn with_defaults(volume_size: u64, block_size: u32) -> Result<Self, GeometryError> {
        Self::new(volume_size, block_size, Self::DEFAULT_TRACK_SIZE, Self::DEFAULT_TRACKS_PER_RANGE)
    }

    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    pub fn track_size(&self) -> u32 {
        self.track_size
    }
    pub fn tracks_per_range(&self) -> u32 {
        self.tracks_per_range
    }

    /// Tracks in the volume; the last one may be shorter than the track size.
    pub fn track_count(&self) -> u64 {
        self.volume_size.div_ceil(u64::from(self.track_size))
    }

    pub fn range_count(&self) -> u32 {
        // Cannot truncate: checked in `new`.
        self.track_count().div_ceil(u64::from(self.tracks_per_range)) as u32
    }

    /// The track holding a byte offset (the caller has validated the offset).
    pub fn track_of(&self, offset: u64) -> TrackId {
        offset / u64::from(self.track_size)
    }

    pub fn range_of(&self, track: TrackId) -> RangeId {
        (track / u64::from(self.tracks_per_range)) as RangeId
    }

    /// The tracks of a range (the last range may be shorter).
    pub fn tracks_in_range(&self, range: RangeId) -> Range<TrackId> {
        let start = u64::from(range) * u64::from(self.tracks_per_range);
        let end = (start + u64::from(self.tracks_per_range)).min(self.track_count());
        start.min(end)..end
    }

    /// The byte extent of one track (the last track may be short).
    pub fn track_extent(&self, track: TrackId) -> Result<Extent, GeometryError> {
        if track >= self.track_count() {
            return Err(GeometryError::NoSuchTrack { track, tracks: self.track_count() });
        }
        let offset = track * u64::from(self.track_size);
        let len = u64::from(self.track_size).min(self.volume_size - offset);
        Ok(Extent { offset, len })
    }

    /// Checks an I/O extent (block-aligned, non-empty, inside the volume).
    pub fn check(&self, extent: Extent) -> Result<(), GeometryError> {
        let bs = u64::from(self.block_size);
        if extent.len == 0 {
            return Err(GeometryError::Empty { offset: extent.offset });
        }
        if !extent.offset.is_multiple_of(bs) || !extent.len.is_multiple_of(bs) {
            return Err(GeometryError::Misaligned {
                offset: extent.offset,
                len: extent.len,
                block_size: self.block_size,
            });
        }
        match extent.offset.checked_add(extent.len) {
            Some(end) if end <= self.volume_size => Ok(()),
            _ => {
                Err(GeometryError::OutOfRange { offset: extent.offset, len: extent.len, volume_size: self.volume_size })
            }
        }
    }

    /// The tracks an I/O extent touches.
    pub fn span(&self, extent: Extent) -> Result<TrackSpan, GeometryError> {
        self.check(extent)?;
        let first = self.track_of(extent.offset);
        let last = self.track_of(extent.end() - 1);
        Ok(TrackSpan { first, count: last - first + 1 })
    }

    /// The ranges a span of tracks touches.
    pub fn ranges_of(&self, span: TrackSpan) -> Range<RangeId> {
        if span.count == 0 {
            return 0..0;
        }
        self.range_of(span.first)..self.range_of(span.end() - 1) + 1
    }

    pub fn check_range(&self, range: RangeId) -> Result<(), GeometryError> {
        if range >= self.range_count() {
            return Err(GeometryError::NoSuchRange { range, ranges: self.range_count() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn defaults_make_one_gib_ranges() {
        let g = Geometry::with_defaults(10 << 30, 512).unwrap();
        assert_eq!(g.track_count(), 10 * 16384);
        assert_eq!(g.range_count(), 10);
        assert_eq!(g.tracks_in_range(9), 9 * 16384..10 * 16384);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(Geometry::new(1 << 20, 1024, 65536, 16), Err(GeometryError::BlockSize(1024)));
        assert_eq!(Geometry::new(1 << 20, 512, 3 << 12, 16), Err(GeometryError::TrackSize(3 << 12)));
        assert_eq!(Geometry::new(1 << 20, 512, 2048, 16), Err(GeometryError::TrackSize(2048)));
        assert_eq!(Geometry::new(1 << 20, 512, 8 << 20, 16), Err(GeometryError::TrackSize(8 << 20)));
        assert_eq!(Geometry::new(1 << 20, 512, 4096, 0), Err(GeometryError::TracksPerRange(0)));
        assert!(matches!(Geometry::new(1000, 512, 4096, 1), Err(GeometryError::VolumeSize { .. })));
        assert!(matches!(Geometry::new(0, 512, 4096, 1), Err(GeometryError::VolumeSize { .. })));
    }

    #[test]
    fn short_last_track_and_range() {
        let g = Geometry::new(4096 * 10 + 512, 512, 4096, 4).unwrap();
        assert_eq!(g.track_count(), 11);
        assert_eq!(g.range_count(), 3);
        assert_eq!(g.tracks_in_range(2), 8..11);
        assert_eq!(g.track_extent(10).unwrap(), Extent::new(40960, 512));
        assert!(g.track_extent(11).is_err());
    }

    #[test]
    fn extents_are_checked() {
        let g = Geometry::new(1 << 20, 4096, 65536, 4).unwrap();
        assert!(matches!(g.span(Extent::new(512, 4096)), Err(GeometryError::Misaligned { .. })));
        assert!(matches!(g.span(Extent::new(0, 0)), Err(GeometryError::Empty { .. })));
        assert!(matches!(g.span(Extent::new(1 << 20, 4096)), Err(GeometryError::OutOfRange { .. })));
        assert!(matches!(g.span(Extent::new(u64::MAX - 4095, 4096)), Err(GeometryError::OutOfRange { .. })));
        assert_eq!(g.span(Extent::new(65536 - 4096, 8192)).unwrap(), TrackSpan::new(0, 2));
    }

    proptest! {
        #[test]
        fn span_covers_exactly_the_touched_tracks(
            blocks in 1u64..4096, off in 0u64..4096, len in 1u64..4096, shift in 12u32..17
        ) {
            let g = Geometry::new(blocks * 512, 512, 1 << shift, 3).unwrap();
            let e = Extent::new(off * 512, len * 512);
            match g.span(e) {
                Ok(span) => {
                    prop_assert!(e.end() <= g.volume_size());
                    for t in span.tracks() {
                        let te = g.track_extent(t).unwrap();
                        prop_assert!(te.offset < e.end() && e.offset < te.end());
                    }
                    if span.first > 0 {
                        prop_assert!(g.track_extent(span.first - 1).unwrap().end() <= e.offset);
                    }
                    let ranges = g.ranges_of(span);
                    prop_assert_eq!(ranges.start, g.range_of(span.first));
                    prop_assert!(ranges.end <= g.range_count());
                }
                Err(_) => prop_assert!(e.end() > g.volume_size()),
            }
        }
    }
}
