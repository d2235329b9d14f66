//! The pinned map layout: a mirror of `ebpf/tandem.h`.
//!
//! Every struct here has the size and field offsets of its C twin; the tests check them against
//! the BTF clang emitted for both program objects, and the constants against the header's
//! `#define`s. Change both sides together and bump [`LAYOUT_VERSION`].

/// `tandem_params.magic`: "TNDM" read as a little-endian u32.
pub const MAGIC: u32 = 0x4d44_4e54;
/// `tandem_params.version`.
pub const LAYOUT_VERSION: u32 = 2;
/// Capacity of the `devices` map.
pub const MAX_DEVICES: u32 = 16;
/// log2 of the slots of the `inflight` table.
pub const INFLIGHT_BITS: u32 = 14;
/// Slots of the `inflight` table.
pub const INFLIGHT_SLOTS: u32 = 1 << INFLIGHT_BITS;
/// Slots a bio may take, from its id's home slot on.
pub const INFLIGHT_PROBES: u32 = 8;
/// Bits per bitmap word.
pub const WORD_BITS: u32 = 64;
/// `tandem_params.flavor` of the tp_btf programs.
pub const FLAVOR_TP_BTF: u32 = 1;
/// `tandem_params.flavor` of the classic tracepoint programs.
pub const FLAVOR_CLASSIC: u32 = 2;
/// `tandem_bio.side` of a bio spanning several ranges: counted on both sides of each.
pub const SIDE_BOTH: u32 = 2;
/// `tandem_bio.key` of a slot a queue program is filling: its other fields are not its bio's yet.
pub const KEY_FILLING: u64 = u64::MAX;
/// `tandem_consts.range_shift` when the tracks per range are not a power of two.
pub const NO_SHIFT: u32 = 0xff;

/// Names of the pinned objects under `/sys/fs/bpf/tandem/<volume>/`.
pub mod pins {
    pub const PARAMS: &str = "params";
    pub const DEVICES: &str = "devices";
    pub const BITMAP: &str = "bitmap";
    pub const RANGES: &str = "ranges";
    pub const COUNTERS: &str = "counters";
    pub const INFLIGHT: &str = "inflight";
    pub const LINK_QUEUE: &str = "link_queue";
    pub const LINK_SPLIT: &str = "link_split";
    pub const LINK_RQ_COMPLETE: &str = "link_rq_complete";
    pub const LINK_BIO_COMPLETE: &str = "link_bio_complete";
    /// The tp_btf flavour's reaper program (run by userspace, never attached).
    pub const REAP: &str = "reap";
    /// Every map, in the order they are pinned.
    pub const MAPS: [&str; 6] = [PARAMS, DEVICES, BITMAP, RANGES, COUNTERS, INFLIGHT];
    /// Every link, in the order they are attached (completions before the queue).
    pub const LINKS: [&str; 4] = [LINK_RQ_COMPLETE, LINK_BIO_COMPLETE, LINK_SPLIT, LINK_QUEUE];
}

/// `struct tandem_params`: the one entry of the `params` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Params {
    pub magic: u32,
    pub version: u32,
    /// The volume's device, kernel encoding `major << 20 | minor` (for a partition, the
    /// `devices` map also holds the whole disk's).
    pub dev: u32,
    /// log2 of the track size in bytes.
    pub track_shift: u32,
    /// First 512-byte sector of the volume on its disk (a partition's start: bios carry
    /// absolute sectors), else 0.
    pub start_sector: u64,
    /// Size of the volume in 512-byte sectors.
    pub nr_sectors: u64,
    /// Tracks in the volume.
    pub tracks: u64,
    /// Tracks per range (the last range may be shorter).
    pub tracks_per_range: u32,
    /// Words per side of a range in the `bitmap` map: `ceil(tracks_per_range / 64)`.
    pub words_per_range: u32,
    /// Ranges in the volume.
    pub ranges: u32,
    /// [`FLAVOR_TP_BTF`] or [`FLAVOR_CLASSIC`].
    pub flavor: u32,
    /// The volume's generation, set by userspace; the programs do not read it.
    pub generation: u64,
    /// Possible CPUs: the `counters` map holds `cpus * counters_per_cpu` entries.
    pub cpus: u32,
    /// `ranges * 4` rounded up to 8 (whole cache lines per CPU).
    pub counters_per_cpu: u32,
    /// The disk's sequence number (`struct gendisk.diskseq`, Linux ≥ 5.15; for a partition,
    /// the whole disk's) when the programs were loaded: with [`Params::dev`], the device's
    /// identity (a dev_t is reused by the next device that gets the number, a diskseq never
    /// is until reboot). The tp_btf queue programs record only bios of this disk; 0: the kernel
    /// has none, and the device number alone decides (as it always does for the classic
    /// flavour, whose events carry no disk).
    pub diskseq: u64,
}

impl Params {
    pub const SIZE: usize = std::mem::size_of::<Params>();

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        // SAFETY: Params is repr(C), Copy, and has no padding (checked by the layout test).
        unsafe { std::mem::transmute::<Params, [u8; Self::SIZE]>(*self) }
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Params> {
        if bytes.len() != Self::SIZE {
            return None;
        }
        // SAFETY: exactly SIZE bytes; every bit pattern is a valid Params.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Params>()) })
    }

    /// Track size in bytes.
    pub fn track_size(&self) -> u64 {
        1u64 << self.track_shift
    }

    /// Tracks in range `range` (the last one may be shorter).
    pub fn tracks_in_range(&self, range: u32) -> u64 {
        let first = u64::from(range) * u64::from(self.tracks_per_range);
        self.tracks.saturating_sub(first).min(u64::from(self.tracks_per_range))
    }

    /// Index in the `bitmap` map of word `word` of `side` of `range`.
    pub fn word_index(&self, range: u32, side: u32, word: u32) -> usize {
        (u64::from(range) * 2 + u64::from(side)) as usize * self.words_per_range as usize + word as usize
    }

    /// Entries of the `bitmap` map.
    pub fn bitmap_words(&self) -> usize {
        self.ranges as usize * 2 * self.words_per_range as usize
    }

    /// Entries of the `counters` map.
    pub fn counter_count(&self) -> usize {
        self.cpus as usize * self.counters_per_cpu as usize
    }

    /// Index in the `counters` map of counter `k` (QUEUED/COMPLETED + side) of `range` on `cpu`.
    pub fn counter_index(&self, cpu: u32, range: u32, k: u32) -> usize {
        cpu as usize * self.counters_per_cpu as usize + range as usize * 4 + k as usize
    }
}

/// `struct tandem_range`: one entry of the `ranges` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeEntry {
    /// Side (0 or 1) new marks go to. Written by userspace only.
    pub current: u32,
    /// Toggles of this range since its maps were created.
    pub toggles: u32,
    /// Write bios that set new bits on each side since that side was last cleared.
    pub marked: [u64; 2],
    /// Write bios whose completion could not be tracked: marked on both sides, never counted.
    pub untracked: u64,
}

impl RangeEntry {
    pub const SIZE: usize = std::mem::size_of::<RangeEntry>();
}

/// One range's state: its `ranges` entry plus its writes in flight, summed from `counters`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeState {
    /// Side (0 or 1) new marks go to.
    pub current: u32,
    /// Toggles of this range since its maps were created.
    pub toggles: u32,
    /// Write bios that set new bits on each side since that side was last cleared.
    pub marked: [u64; 2],
    /// Write bios counted on each side whose completion has not been seen yet.
    pub inflight: [u64; 2],
    /// Write bios whose completion could not be tracked: marked on both sides, never counted.
    pub untracked: u64,
}

impl RangeState {
    /// The side that is not current.
    pub fn old(&self) -> u32 {
        1 - (self.current & 1)
    }
}

/// `counters`: offset of a range's queued counters (plus the side).
pub const QUEUED: u32 = 0;
/// `counters`: offset of a range's completed counters (plus the side).
pub const COMPLETED: u32 = 2;

/// `struct tandem_bio`: one slot of the `inflight` table (a write bio queued and not yet
/// completed, when `key != 0`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BioEntry {
    /// 0: free; [`KEY_FILLING`]: being claimed. tp_btf: the bio's address. classic:
    /// `end sector + 1 + (dev << 44)`.
    pub key: u64,
    pub first_range: u32,
    pub last_range: u32,
    /// 0 or 1, or [`SIDE_BOTH`].
    pub side: u32,
    /// Device it was queued on (kernel encoding).
    pub dev: u32,
    /// CLOCK_MONOTONIC when the bio was queued, to a scheduler tick (never ahead).
    pub queued_ns: u64,
    /// First sector of the bio.
    pub sector: u64,
    /// Its size in bytes.
    pub bytes: u32,
    pub pad: u32,
}

impl BioEntry {
    pub const SIZE: usize = std::mem::size_of::<BioEntry>();
}

/// Home slot of an id in the `inflight` table.
pub fn home_slot(id: u64) -> u32 {
    (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - INFLIGHT_BITS)) as u32
}

/// The `k`-th slot (0..[`INFLIGHT_PROBES`]) an id with home slot `home` may take: only slots
/// 4n and 4n + 3, which lie within one cache line each.
pub fn probe_slot(home: u32, k: u32) -> u32 {
    ((home & !3) + (k >> 1) * 4 + (k & 1) * 3) & (INFLIGHT_SLOTS - 1)
}

/// `struct tandem_tp_layout`: the classic object's `.rodata`, offsets of `rwbs` in the classic
/// tracepoints' records.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TpLayout {
    pub bio_queue_rwbs: u32,
    pub split_rwbs: u32,
    pub rq_complete_rwbs: u32,
    pub bio_complete_rwbs: u32,
}

impl TpLayout {
    pub const SIZE: usize = std::mem::size_of::<TpLayout>();

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        // SAFETY: repr(C), Copy, no padding.
        unsafe { std::mem::transmute::<TpLayout, [u8; Self::SIZE]>(*self) }
    }
}

/// `struct tandem_consts`: each program object's `.rodata`, which the loader fills from the
/// geometry before loading (not pinned; the verifier reads it as constants).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Consts {
    pub start_sector: u64,
    pub nr_sectors: u64,
    pub tracks: u64,
    /// `params.diskseq` (0: the device number alone). Only the tp_btf programs read it.
    pub diskseq: u64,
    /// The watched devices (kernel encoding), 0: none.
    pub devs: [u32; 2],
    pub track_shift: u32,
    pub tracks_per_range: u32,
    /// log2 of `tracks_per_range` when it is a power of two, else [`NO_SHIFT`].
    pub range_shift: u32,
    pub words_per_range: u32,
    pub cpus: u32,
    pub counters_per_cpu: u32,
    /// Classic flavour only.
    pub tp: TpLayout,
}

impl Consts {
    pub const SIZE: usize = std::mem::size_of::<Consts>();

    /// The constants of a volume with geometry `params` watching `devs` (at most two).
    pub fn new(params: &Params, devs: &[u32], tp: TpLayout) -> Consts {
        let tpr = params.tracks_per_range;
        Consts {
            start_sector: params.start_sector,
            nr_sectors: params.nr_sectors,
            tracks: params.tracks,
            diskseq: params.diskseq,
            devs: [devs.first().copied().unwrap_or(0), devs.get(1).copied().unwrap_or(0)],
            track_shift: params.track_shift,
            tracks_per_range: tpr,
            range_shift: if tpr.is_power_of_two() { tpr.trailing_zeros() } else { NO_SHIFT },
            words_per_range: params.words_per_range,
            cpus: params.cpus,
            counters_per_cpu: params.counters_per_cpu,
            tp,
        }
    }

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        // SAFETY: repr(C), Copy, no padding (8-byte fields first, an even number of u32s).
        unsafe { std::mem::transmute::<Consts, [u8; Self::SIZE]>(*self) }
    }
}
