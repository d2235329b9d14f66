//! One volume's programs and maps: load + attach + pin, re-open, read, toggle, drain, clear.

use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, OpenObject, PrintCallback, PrintLevel};

use crate::device::{DeviceInfo, DeviceRef};
use crate::error::BpfError;
use crate::layout::{
    self, pins, BioEntry, Consts, Params, RangeEntry, RangeState, TpLayout, COMPLETED, KEY_FILLING, QUEUED, SIDE_BOTH,
};
use crate::sys::{self, Mmap, RcuSync};
use crate::{skel_btf, skel_classic, Flavor, FlavorChoice};

/// Where the BPF filesystem is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where the volumes' directories are: `/sys/fs/bpf/tandem/<volume>/`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/tandem";
/// The kernel's BTF, needed by the tp_btf programs.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Age after which the classic flavour's drains consider an in-flight entry complete: the block
/// layer's default I/O timeout.
pub const CLASSIC_REAP_AGE: Duration = Duration::from_secs(30);

/// Smallest and largest track sizes (DESIGN.md: a power of two, 4 KiB .. 4 MiB).
pub const MIN_TRACK_SIZE: u32 = 4 * 1024;
pub const MAX_TRACK_SIZE: u32 = 4 * 1024 * 1024;

/// What to load for a volume.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    /// The volume's name: the pin directory's name.
    pub name: String,
    /// The block device whose writes are recorded.
    pub device: DeviceRef,
    /// Track size in bytes: a power of two from 4 KiB to 4 MiB.
    pub track_size: u32,
    /// Tracks per range (any number from 1; 64 or a multiple of it wastes no bitmap bits).
    pub tracks_per_range: u32,
    /// Tracks in the volume; writes beyond the last track are ignored.
    pub track_count: u64,
    /// The volume's generation, stored in the `params` map for operators.
    pub generation: u64,
    /// Which programs to load.
    pub flavor: FlavorChoice,
}

impl VolumeConfig {
    pub fn new(
        name: impl Into<String>,
        device: impl Into<DeviceRef>,
        track_size: u32,
        tracks_per_range: u32,
        track_count: u64,
    ) -> VolumeConfig {
        VolumeConfig {
            name: name.into(),
            device: device.into(),
            track_size,
            tracks_per_range,
            track_count,
            generation: 0,
            flavor: FlavorChoice::Auto,
        }
    }
}

/// Snapshot of one range's two bitmaps, as track numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeTracks {
    /// Which side is current (0 or 1).
    pub current_side: u32,
    /// Tracks marked on the current side.
    pub current: Vec<u64>,
    /// Tracks marked on the old side.
    pub old: Vec<u64>,
}

/// A write bio the programs saw queued and not yet completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InflightBio {
    /// Its slot in the `inflight` table.
    pub slot: u32,
    pub entry: BioEntry,
    /// Time since it was queued.
    pub age: Duration,
}

/// `tandem_range` as seen through mmap: the same layout with atomics.
#[repr(C)]
struct RangeCell {
    current: AtomicU32,
    toggles: AtomicU32,
    marked: [AtomicU64; 2],
    untracked: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<RangeCell>() == RangeEntry::SIZE);

/// `tandem_bio` as seen through mmap.
#[repr(C)]
struct SlotCell {
    key: AtomicU64,
    first_range: AtomicU32,
    last_range: AtomicU32,
    side: AtomicU32,
    dev: AtomicU32,
    queued_ns: AtomicU64,
    sector: AtomicU64,
    bytes: AtomicU32,
    pad: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<SlotCell>() == BioEntry::SIZE);

impl SlotCell {
    /// The slot's content, if it holds a bio (fields read after the key, then the key checked
    /// again: a slot reused meanwhile is skipped).
    fn snapshot(&self) -> Option<BioEntry> {
        let key = self.key.load(Ordering::SeqCst);
        if key == 0 || key == KEY_FILLING {
            return None;
        }
        let entry = BioEntry {
            key,
            first_range: self.first_range.load(Ordering::SeqCst),
            last_range: self.last_range.load(Ordering::SeqCst),
            side: self.side.load(Ordering::SeqCst),
            dev: self.dev.load(Ordering::SeqCst),
            queued_ns: self.queued_ns.load(Ordering::SeqCst),
            sector: self.sector.load(Ordering::SeqCst),
            bytes: self.bytes.load(Ordering::SeqCst),
            pad: self.pad.load(Ordering::Relaxed),
        };
        (self.key.load(Ordering::SeqCst) == key).then_some(entry)
    }
}

/// A volume's pinned maps, read and written through mmap.
///
/// Dropping it leaves everything pinned and the programs attached: a restarted daemon calls
/// [`Volume::open`] and finds every bit. [`Volume::unpin`] detaches and removes everything.
pub struct Volume {
    name: String,
    dir: PathBuf,
    params: Params,
    params_map: MapHandle,
    _inflight_map: MapHandle,
    _bitmap_map: MapHandle,
    _ranges_map: MapHandle,
    _counters_map: MapHandle,
    bitmap: Mmap,
    ranges: Mmap,
    counters: Mmap,
    inflight: Mmap,
    sync: RcuSync,
    reaper: Option<OwnedFd>,
    lock: Mutex<()>,
    fallback: Option<String>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("params", &self.params)
            .finish()
    }
}

/// Serializes loads: libbpf's log callback is process-wide.
static LOAD_LOCK: Mutex<()> = Mutex::new(());
static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Held while loading: no two loads (or probes) share libbpf's log callback.
pub(crate) fn load_lock() -> MutexGuard<'static, ()> {
    lock(&LOAD_LOCK)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn capture_log(level: PrintLevel, message: String) {
    if matches!(level, PrintLevel::Debug) {
        return;
    }
    let mut log = lock(&LOG);
    log.extend(message.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned));
    let excess = log.len().saturating_sub(400);
    log.drain(..excess);
}

/// While alive, libbpf's messages go to [`LOG`] instead of stderr.
pub(crate) struct LogCapture {
    previous: Option<(PrintLevel, PrintCallback)>,
}

impl LogCapture {
    pub(crate) fn start() -> LogCapture {
        lock(&LOG).clear();
        let previous = libbpf_rs::set_print(Some((PrintLevel::Info, capture_log as PrintCallback)));
        LogCapture { previous }
    }

    pub(crate) fn take(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&LOG))
    }
}

impl Drop for LogCapture {
    fn drop(&mut self) {
        libbpf_rs::set_print(self.previous.take());
    }
}

pub(crate) fn validate_name(name: &str) -> Result<&str, BpfError> {
    let bad = |why| Err(BpfError::InvalidName { name: name.to_owned(), why });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 64 {
        return bad("it is longer than 64 bytes");
    }
    if name == "." || name == ".." {
        return bad("it is . or ..");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return bad("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(name)
}

/// The pin directory of a volume.
pub fn pin_dir(name: &str) -> Result<PathBuf, BpfError> {
    Ok(Path::new(PIN_ROOT).join(validate_name(name)?))
}

/// Computes the `params` entry of a volume on a device.
pub(crate) fn geometry(config: &VolumeConfig, device: &DeviceInfo, flavor: Flavor) -> Result<Params, BpfError> {
    let ts = config.track_size;
    if !ts.is_power_of_two() || !(MIN_TRACK_SIZE..=MAX_TRACK_SIZE).contains(&ts) {
        return Err(BpfError::Geometry(format!("track size {ts} must be a power of two from 4 KiB to 4 MiB")));
    }
    let tpr = config.tracks_per_range;
    if tpr == 0 {
        return Err(BpfError::Geometry("tracks per range must be at least 1".into()));
    }
    let tracks = config.track_count;
    if tracks == 0 {
        return Err(BpfError::Geometry("track count must be at least 1".into()));
    }
    let device_bytes = device.nr_sectors * 512;
    if (tracks - 1).saturating_mul(u64::from(ts)) >= device_bytes {
        return Err(BpfError::Geometry(format!(
            "{tracks} tracks of {ts} bytes do not fit the device's {device_bytes} bytes ({} is {} sectors)",
            device.device, device.nr_sectors
        )));
    }
    let ranges = tracks.div_ceil(u64::from(tpr));
    let wpr = tpr.div_ceil(layout::WORD_BITS);
    let words = ranges * 2 * u64::from(wpr);
    if ranges > u64::from(u32::MAX) || words > u64::from(u32::MAX) {
        return Err(BpfError::Geometry(format!(
            "{tracks} tracks in ranges of {tpr} need {words} bitmap words, more than a BPF array holds (2^32)"
        )));
    }
    let volume_sectors = tracks.saturating_mul(u64::from(ts)).div_ceil(512).min(device.nr_sectors);
    let cpus = libbpf_rs::num_possible_cpus().map_err(|e| BpfError::libbpf("counting the possible CPUs", e))? as u64;
    let counters_per_cpu = (ranges * 4).div_ceil(8) * 8;
    if cpus * counters_per_cpu > u64::from(u32::MAX) {
        return Err(BpfError::Geometry(format!("{ranges} ranges on {cpus} CPUs need too many counters")));
    }
    Ok(Params {
        magic: layout::MAGIC,
        version: layout::LAYOUT_VERSION,
        dev: device.kernel_dev,
        track_shift: ts.trailing_zeros(),
        start_sector: device.start_sector,
        nr_sectors: volume_sectors,
        tracks,
        tracks_per_range: tpr,
        words_per_range: wpr,
        ranges: ranges as u32,
        flavor: flavor.code(),
        generation: config.generation,
        cpus: cpus as u32,
        counters_per_cpu: counters_per_cpu as u32,
        diskseq: device.diskseq.unwrap_or(0),
    })
}

/// Programs of each flavour, in the order of [`pins::LINKS`] (completions attach first, so no
/// write counted at queue can miss its completion).
const PROGS_BTF: [&str; 4] =
    ["tandem_rq_complete_btf", "tandem_bio_complete_btf", "tandem_split_btf", "tandem_queue_btf"];
const PROGS_CLASSIC: [&str; 4] =
    ["tandem_rq_complete_tp", "tandem_bio_complete_tp", "tandem_split_tp", "tandem_queue_tp"];
const EVENTS: [&str; 4] = ["block_bio_queue", "block_split", "block_rq_complete", "block_bio_complete"];

/// Reads the classic events' formats: where `rwbs` is, and that dev/sector/nr_sector are where
/// the classic programs read them.
fn classic_layout(tracefs: &Path) -> Result<TpLayout, BpfError> {
    let mut offsets = [0u32; 4];
    for (i, event) in EVENTS.iter().enumerate() {
        let path = tracefs.join("events/block").join(event).join("format");
        let missing = |detail: String| BpfError::TracepointMissing { name: format!("block/{event}"), detail };
        let text = fs::read_to_string(&path).map_err(|e| missing(format!("reading {}: {e}", path.display())))?;
        let field = |name: &str| -> Option<u32> {
            text.lines().find_map(|line| {
                let decl = line.trim().strip_prefix("field:")?;
                let (decl, rest) = decl.split_once(';')?;
                let ident = decl.rsplit([' ', '*']).next()?.split('[').next()?;
                if ident != name {
                    return None;
                }
                rest.trim().strip_prefix("offset:")?.split(';').next()?.trim().parse().ok()
            })
        };
        let third = if *event == "block_split" { "new_sector" } else { "nr_sector" };
        for (name, want) in [("dev", 8), ("sector", 16), (third, 24)] {
            if field(name) != Some(want) {
                return Err(missing(format!(
                    "{}: field {name} is at offset {:?}, the classic programs read it at {want}",
                    path.display(),
                    field(name)
                )));
            }
        }
        offsets[i] = field("rwbs").ok_or_else(|| missing(format!("{} has no rwbs field", path.display())))?;
    }
    Ok(TpLayout {
        bio_queue_rwbs: offsets[0],
        split_rwbs: offsets[1],
        rq_complete_rwbs: offsets[2],
        bio_complete_rwbs: offsets[3],
    })
}

/// Loads one flavour of the programs for a volume, attaches them and pins maps and links
/// into `dir`. On failure, removes what it pinned.
fn load_flavor(flavor: Flavor, params: &Params, devs: &[u32], dir: &Path) -> Result<(), BpfError> {
    match flavor {
        Flavor::TpBtf => {
            if !Path::new(KERNEL_BTF).exists() {
                return Err(BpfError::BtfMissing { path: KERNEL_BTF.into() });
            }
        }
        Flavor::Classic => {}
    }
    let tp_layout = match flavor {
        Flavor::TpBtf => None,
        Flavor::Classic => Some(classic_layout(sys::ensure_tracefs()?)?),
    };
    let capture = LogCapture::start();
    let mut storage = MaybeUninit::uninit();
    let mut pinned = Vec::new();
    let result = match flavor {
        Flavor::TpBtf => load_skel(
            skel_btf::TandemSkelBuilder::default(),
            &mut storage,
            flavor,
            PROGS_BTF,
            None,
            params,
            devs,
            dir,
            &mut pinned,
            &capture,
        ),
        Flavor::Classic => load_skel(
            skel_classic::TandemClassicSkelBuilder::default(),
            &mut storage,
            flavor,
            PROGS_CLASSIC,
            tp_layout,
            params,
            devs,
            dir,
            &mut pinned,
            &capture,
        ),
    };
    if result.is_err() {
        for path in pinned.iter().rev() {
            let _ = fs::remove_file(path);
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn load_skel<'obj, B>(
    builder: B,
    storage: &'obj mut MaybeUninit<OpenObject>,
    flavor: Flavor,
    progs: [&'static str; 4],
    tp_layout: Option<TpLayout>,
    params: &Params,
    devs: &[u32],
    dir: &Path,
    pinned: &mut Vec<PathBuf>,
    capture: &LogCapture,
) -> Result<(), BpfError>
where
    B: SkelBuilder<'obj>,
{
    let load_err = |source: libbpf_rs::Error| {
        if source.kind() == libbpf_rs::ErrorKind::PermissionDenied {
            return BpfError::NoPermission {
                op: format!("loading the {flavor} programs (bpf(BPF_PROG_LOAD))"),
                source: io::Error::from_raw_os_error(libc::EPERM),
            };
        }
        let log = capture.take();
        if log.iter().any(|l| l.contains("btf_trace_block_bio")) {
            return BpfError::TracepointMissing {
                name: format!(
                    "tp_btf/{}",
                    if log.iter().any(|l| l.contains("complete")) { "block_bio_complete" } else { "block_bio_queue" }
                ),
                detail: format!("the kernel's BTF has no such raw tracepoint: {source}"),
            };
        }
        BpfError::Load { flavor, source, log }
    };
    let mut open = builder.open(storage).map_err(load_err)?;
    // The programs read the geometry and the watched devices as constants (see struct
    // tandem_consts): they must be in .rodata before the load freezes it.
    let consts = Consts::new(params, devs, tp_layout.unwrap_or_default());
    let mut consts_set = false;
    for mut map in open.open_object_mut().maps_mut() {
        if map.name().to_string_lossy().ends_with(".rodata") {
            let value =
                map.initial_value_mut().filter(|v| v.len() == Consts::SIZE).ok_or_else(|| BpfError::Layout {
                    path: dir.to_owned(),
                    detail: format!("the {flavor} object's .rodata is not one struct tandem_consts"),
                })?;
            value.copy_from_slice(&consts.to_bytes());
            consts_set = true;
            continue;
        }
        let entries = match map.name().to_str() {
            Some(pins::BITMAP) => params.bitmap_words() as u32,
            Some(pins::RANGES) => params.ranges,
            Some(pins::COUNTERS) => params.counter_count() as u32,
            _ => continue,
        };
        map.set_max_entries(entries).map_err(load_err)?;
    }
    if !consts_set || devs.is_empty() || devs.len() > 2 {
        return Err(BpfError::Layout {
            path: dir.to_owned(),
            detail: format!("the {flavor} object has no .rodata, or {} devices to watch (1 or 2)", devs.len()),
        });
    }
    let mut skel = open.load().map_err(load_err)?;

    let object = skel.object();
    let map = |name: &str| {
        object.maps().find(|m| m.name() == name).ok_or_else(|| BpfError::Layout {
            path: dir.join(name),
            detail: format!("the {flavor} object has no map {name}"),
        })
    };
    map(pins::PARAMS)?
        .update(&0u32.to_ne_bytes(), &params.to_bytes(), MapFlags::ANY)
        .map_err(|e| BpfError::libbpf("writing the params map", e))?;
    let devices = map(pins::DEVICES)?;
    for dev in devs {
        devices
            .update(&dev.to_ne_bytes(), &0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(|e| BpfError::libbpf("writing the devices map", e))?;
    }

    // Completion first: no bio counted at queue may miss its completion.
    let mut links: Vec<(&str, Link)> = Vec::new();
    for (prog_name, pin) in progs.into_iter().zip(pins::LINKS) {
        let prog = object.progs_mut().find(|p| p.name() == prog_name).ok_or_else(|| BpfError::Layout {
            path: dir.join(pin),
            detail: format!("the {flavor} object has no program {prog_name}"),
        })?;
        let link = prog.attach().map_err(|source| {
            let log = capture.take();
            if source.kind() == libbpf_rs::ErrorKind::PermissionDenied {
                BpfError::NoPermission {
                    op: format!("attaching {prog_name}"),
                    source: io::Error::from_raw_os_error(libc::EPERM),
                }
            } else if source.kind() == libbpf_rs::ErrorKind::NotFound {
                BpfError::TracepointMissing { name: prog_name.into(), detail: format!("attach failed: {source}") }
            } else {
                BpfError::Attach { flavor, program: prog_name, source, log }
            }
        })?;
        links.push((pin, link));
    }

    for mut map in skel.object_mut().maps_mut() {
        let Some(name) = map.name().to_str().map(str::to_owned) else { continue };
        if !pins::MAPS.contains(&name.as_str()) {
            continue;
        }
        let path = dir.join(&name);
        map.pin(&path).map_err(|e| BpfError::libbpf(format!("pinning map {}", path.display()), e))?;
        pinned.push(path);
    }
    for (pin, link) in &mut links {
        let path = dir.join(pin);
        link.pin(&path).map_err(|e| BpfError::libbpf(format!("pinning link {}", path.display()), e))?;
        pinned.push(path);
    }
    if let Some(mut reaper) = skel.object().progs_mut().find(|p| p.name() == "tandem_reap") {
        let path = dir.join(pins::REAP);
        reaper.pin(&path).map_err(|e| BpfError::libbpf(format!("pinning program {}", path.display()), e))?;
        pinned.push(path);
    }
    Ok(())
}

/// Removes a volume's pins: the links first (which detaches the programs), then the maps and
/// the directory. Returns false when nothing was pinned.
pub fn unpin(name: &str) -> Result<bool, BpfError> {
    let dir = pin_dir(name)?;
    if !dir.exists() {
        return Ok(false);
    }
    for pin in pins::LINKS.iter().chain(pins::MAPS.iter()).chain([pins::REAP].iter()) {
        let path = dir.join(pin);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(BpfError::io(format!("removing {}", path.display()), e)),
        }
    }
    fs::remove_dir(&dir).map_err(|e| BpfError::io(format!("removing {}", dir.display()), e))?;
    Ok(true)
}

impl Volume {
    /// Loads the programs for a volume, attaches them to the block tracepoints and pins maps
    /// and links under `/sys/fs/bpf/tandem/<name>/`. With [`FlavorChoice::Auto`], tp_btf first,
    /// the classic tracepoints when tp_btf fails ([`Volume::fallback_reason`] says why).
    pub fn load(config: &VolumeConfig) -> Result<Volume, BpfError> {
        let name = validate_name(&config.name)?.to_owned();
        let device = DeviceInfo::resolve(&config.device)?;
        let _guard = load_lock();
        sys::ensure_bpffs(Path::new(BPFFS))?;
        let dir = pin_dir(&name)?;
        if pins::LINKS.iter().any(|p| dir.join(p).exists()) {
            return Err(BpfError::AlreadyLoaded { volume: name, dir });
        }
        if pins::MAPS.iter().any(|p| dir.join(p).exists()) {
            return Err(BpfError::Layout {
                path: dir,
                detail: "its maps are pinned but its programs are not attached (writes since then are not \
                         recorded); read them with Volume::open, then unpin"
                    .into(),
            });
        }
        fs::create_dir_all(&dir).map_err(|e| BpfError::io(format!("creating {}", dir.display()), e))?;
        let attempt = |flavor: Flavor| -> Result<(), BpfError> {
            let params = geometry(config, &device, flavor)?;
            let devs: Vec<u32> = std::iter::once(device.kernel_dev).chain(device.disk_dev).collect();
            load_flavor(flavor, &params, &devs, &dir)
        };
        let result = match config.flavor {
            FlavorChoice::TpBtf => attempt(Flavor::TpBtf).map(|()| None),
            FlavorChoice::Classic => attempt(Flavor::Classic).map(|()| None),
            FlavorChoice::Auto => match attempt(Flavor::TpBtf) {
                Ok(()) => Ok(None),
                Err(e @ (BpfError::NoPermission { .. } | BpfError::Geometry(_) | BpfError::BpfFs { .. })) => Err(e),
                Err(tp_btf) => match attempt(Flavor::Classic) {
                    Ok(()) => Ok(Some(tp_btf.to_string())),
                    Err(classic) => Err(BpfError::NoFlavor { tp_btf: Box::new(tp_btf), classic: Box::new(classic) }),
                },
            },
        };
        let fallback = match result {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                return Err(e);
            }
        };
        let mut volume = Volume::open_dir(name, dir)?;
        volume.fallback = fallback;
        Ok(volume)
    }

    /// Opens the pinned maps of a loaded volume (after a daemon restart: the programs kept
    /// recording meanwhile, if their links are pinned).
    pub fn open(name: &str) -> Result<Volume, BpfError> {
        let dir = pin_dir(name)?;
        Volume::open_dir(name.to_owned(), dir)
    }

    fn open_dir(name: String, dir: PathBuf) -> Result<Volume, BpfError> {
        let params_path = dir.join(pins::PARAMS);
        if !params_path.exists() {
            return Err(BpfError::NotLoaded { volume: name, path: params_path });
        }
        let open = |pin: &str| {
            let path = dir.join(pin);
            MapHandle::from_pinned_path(&path).map_err(|e| BpfError::libbpf(format!("opening {}", path.display()), e))
        };
        let layout_err = |pin: &str, detail: String| BpfError::Layout { path: dir.join(pin), detail };
        let expect_sizes = |map: &MapHandle, pin: &str, key: usize, value: usize| {
            if map.key_size() as usize != key || map.value_size() as usize != value {
                return Err(layout_err(
                    pin,
                    format!("key/value sizes {}/{} instead of {key}/{value}", map.key_size(), map.value_size()),
                ));
            }
            Ok(())
        };

        let params_map = open(pins::PARAMS)?;
        expect_sizes(&params_map, pins::PARAMS, 4, Params::SIZE)?;
        let bytes = params_map
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(|e| BpfError::libbpf(format!("reading {}", params_path.display()), e))?
            .unwrap_or_default();
        let params = Params::from_bytes(&bytes).ok_or_else(|| layout_err(pins::PARAMS, "no entry 0".into()))?;
        if params.magic != layout::MAGIC || params.version != layout::LAYOUT_VERSION {
            return Err(layout_err(
                pins::PARAMS,
                format!(
                    "magic {:#x} version {}, this build reads magic {:#x} version {}",
                    params.magic,
                    params.version,
                    layout::MAGIC,
                    layout::LAYOUT_VERSION
                ),
            ));
        }

        let bitmap_map = open(pins::BITMAP)?;
        expect_sizes(&bitmap_map, pins::BITMAP, 4, 8)?;
        if bitmap_map.max_entries() as usize != params.bitmap_words() {
            return Err(layout_err(
                pins::BITMAP,
                format!("{} entries, params say {}", bitmap_map.max_entries(), params.bitmap_words()),
            ));
        }
        let ranges_map = open(pins::RANGES)?;
        expect_sizes(&ranges_map, pins::RANGES, 4, RangeEntry::SIZE)?;
        if ranges_map.max_entries() != params.ranges {
            return Err(layout_err(
                pins::RANGES,
                format!("{} entries, params say {}", ranges_map.max_entries(), params.ranges),
            ));
        }
        let inflight_map = open(pins::INFLIGHT)?;
        expect_sizes(&inflight_map, pins::INFLIGHT, 4, BioEntry::SIZE)?;
        if inflight_map.max_entries() != layout::INFLIGHT_SLOTS {
            return Err(layout_err(
                pins::INFLIGHT,
                format!("{} slots, this build uses {}", inflight_map.max_entries(), layout::INFLIGHT_SLOTS),
            ));
        }

        let bitmap = Mmap::map(bitmap_map.as_fd(), params.bitmap_words() * 8)
            .map_err(|e| BpfError::io(format!("mmap of {}", dir.join(pins::BITMAP).display()), e))?;
        let ranges = Mmap::map(ranges_map.as_fd(), params.ranges as usize * RangeEntry::SIZE)
            .map_err(|e| BpfError::io(format!("mmap of {}", dir.join(pins::RANGES).display()), e))?;
        let counters_map = open(pins::COUNTERS)?;
        expect_sizes(&counters_map, pins::COUNTERS, 4, 8)?;
        if counters_map.max_entries() as usize != params.counter_count() || params.cpus == 0 {
            return Err(layout_err(
                pins::COUNTERS,
                format!("{} entries, params say {}", counters_map.max_entries(), params.counter_count()),
            ));
        }
        let counters = Mmap::map(counters_map.as_fd(), params.counter_count() * 8)
            .map_err(|e| BpfError::io(format!("mmap of {}", dir.join(pins::COUNTERS).display()), e))?;
        let inflight = Mmap::map(inflight_map.as_fd(), layout::INFLIGHT_SLOTS as usize * BioEntry::SIZE)
            .map_err(|e| BpfError::io(format!("mmap of {}", dir.join(pins::INFLIGHT).display()), e))?;
        debug_assert!(bitmap.len() >= params.bitmap_words() * 8);
        let reaper = libbpf_rs::Program::fd_from_pinned_path(dir.join(pins::REAP)).ok();
        Ok(Volume {
            name,
            dir,
            params,
            params_map,
            _inflight_map: inflight_map,
            _bitmap_map: bitmap_map,
            _ranges_map: ranges_map,
            _counters_map: counters_map,
            bitmap,
            ranges,
            counters,
            inflight,
            sync: RcuSync::new(),
            reaper,
            lock: Mutex::new(()),
            fallback: None,
        })
    }

    /// Detaches the programs and removes every pin of this volume.
    pub fn unpin(self) -> Result<(), BpfError> {
        let name = self.name.clone();
        drop(self);
        unpin(&name).map(|_| ())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/sys/fs/bpf/tandem/<volume>`.
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    /// The `params` entry as it was when the volume was opened.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The programs recording this volume.
    pub fn flavor(&self) -> Option<Flavor> {
        Flavor::from_code(self.params.flavor)
    }

    /// When [`Volume::load`] fell back from tp_btf to the classic tracepoints: why.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Why the pinned programs do not record `device` itself, if they do not: another device
    /// number, or the same number on another disk (its diskseq differs: the number was freed
    /// and given to a new device, e.g. the next loop device). Where either side has no diskseq
    /// (a kernel before 5.15) the device number alone decides.
    pub fn device_mismatch(&self, device: &DeviceInfo) -> Option<String> {
        let p = &self.params;
        let name = |dev: u32| format!("{}:{}", dev >> 20, dev & 0xf_ffff);
        if p.dev != device.kernel_dev {
            return Some(format!(
                "they record device {}, not {} ({})",
                name(p.dev),
                name(device.kernel_dev),
                device.device
            ));
        }
        match device.diskseq {
            Some(seq) if p.diskseq != 0 && seq != p.diskseq => Some(format!(
                "they record device {} of diskseq {}, and {} is now another disk (diskseq {seq})",
                name(p.dev),
                p.diskseq,
                device.device
            )),
            _ => None,
        }
    }

    /// True while both links are pinned (the programs are recording).
    pub fn is_attached(&self) -> bool {
        pins::LINKS.iter().all(|p| self.dir.join(p).exists())
    }

    pub fn track_count(&self) -> u64 {
        self.params.tracks
    }

    pub fn range_count(&self) -> u32 {
        self.params.ranges
    }

    /// Records a new generation in the `params` map.
    pub fn set_generation(&mut self, generation: u64) -> Result<(), BpfError> {
        let mut params = self.params;
        params.generation = generation;
        self.params_map
            .update(&0u32.to_ne_bytes(), &params.to_bytes(), MapFlags::ANY)
            .map_err(|e| BpfError::libbpf("writing the params map", e))?;
        self.params = params;
        Ok(())
    }

    fn word(&self, index: usize) -> &AtomicU64 {
        assert!(index < self.params.bitmap_words(), "bitmap word {index} out of range");
        // SAFETY: in bounds of the mapping (checked above and at open), 8-byte aligned.
        unsafe { &*self.bitmap.as_ptr().cast::<AtomicU64>().add(index) }
    }

    fn cell(&self, range: u32) -> Result<&RangeCell, BpfError> {
        if range >= self.params.ranges {
            return Err(BpfError::NoSuchRange { range, ranges: self.params.ranges });
        }
        // SAFETY: in bounds of the mapping, 8-byte aligned, same layout as tandem_range.
        Ok(unsafe { &*self.ranges.as_ptr().cast::<RangeCell>().add(range as usize) })
    }

    fn locate(&self, track: u64) -> Result<(u32, u32, u64), BpfError> {
        if track >= self.params.tracks {
            return Err(BpfError::NoSuchTrack { track, tracks: self.params.tracks });
        }
        let tpr = u64::from(self.params.tracks_per_range);
        let range = (track / tpr) as u32;
        let i = track % tpr;
        Ok((range, (i / 64) as u32, 1u64 << (i % 64)))
    }

    fn counter(&self, cpu: u32, range: u32, k: u32) -> &AtomicU64 {
        let index = self.params.counter_index(cpu, range, k);
        assert!(index < self.params.counter_count());
        // SAFETY: in bounds of the mapping (checked at open), 8-byte aligned.
        unsafe { &*self.counters.as_ptr().cast::<AtomicU64>().add(index) }
    }

    /// Write bios counted on `side` of `range` whose completion has not been seen: the
    /// completed counters are summed first, then the queued ones, so that a zero is never
    /// reported while a write queued before the first read is in flight (the per-CPU counters
    /// only grow, as in SRCU).
    pub fn inflight(&self, range: u32, side: u32) -> Result<u64, BpfError> {
        self.cell(range)?;
        let sum =
            |k: u32| (0..self.params.cpus).map(move |c| self.counter(c, range, k + (side & 1)).load(Ordering::SeqCst));
        let completed: u64 = sum(COMPLETED).fold(0, u64::wrapping_add);
        let queued: u64 = sum(QUEUED).fold(0, u64::wrapping_add);
        Ok(queued.saturating_sub(completed))
    }

    /// One range's state (which side is current, counters).
    pub fn range_state(&self, range: u32) -> Result<RangeState, BpfError> {
        let cell = self.cell(range)?;
        Ok(RangeState {
            current: cell.current.load(Ordering::SeqCst),
            toggles: cell.toggles.load(Ordering::SeqCst),
            marked: [cell.marked[0].load(Ordering::SeqCst), cell.marked[1].load(Ordering::SeqCst)],
            inflight: [self.inflight(range, 0)?, self.inflight(range, 1)?],
            untracked: cell.untracked.load(Ordering::SeqCst),
        })
    }

    /// Every range's state.
    pub fn range_states(&self) -> Vec<RangeState> {
        (0..self.params.ranges).map(|r| self.range_state(r).expect("range in bounds")).collect()
    }

    /// True when `track` is marked on either side of its range.
    pub fn is_marked(&self, track: u64) -> Result<bool, BpfError> {
        let (range, word, bit) = self.locate(track)?;
        let old = (self.cell(range)?.current.load(Ordering::SeqCst) & 1) ^ 1;
        let o = self.word(self.params.word_index(range, old, word)).load(Ordering::SeqCst);
        let c = self.word(self.params.word_index(range, old ^ 1, word)).load(Ordering::SeqCst);
        Ok((o | c) & bit != 0)
    }

    /// Calls `f(track)` for each track whose bit is set in `word` of range `range`.
    fn each_bit(&self, range: u32, word: u32, bits: u64, mut f: impl FnMut(u64)) {
        let base = u64::from(range) * u64::from(self.params.tracks_per_range) + u64::from(word) * 64;
        let limit = self.params.tracks_in_range(range);
        let mut bits = bits;
        while bits != 0 {
            let b = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            if u64::from(word) * 64 + b < limit {
                f(base + b);
            }
        }
    }

    /// Union of both sides of one range, word by word. The old side is read before the
    /// current one, so a concurrent toggle (which moves leftover old bits into current before
    /// clearing them) cannot hide a bit.
    fn range_union(&self, range: u32, mut f: impl FnMut(u32, u64)) {
        let old = (self.cell(range).expect("range in bounds").current.load(Ordering::SeqCst) & 1) ^ 1;
        for w in 0..self.params.words_per_range {
            let o = self.word(self.params.word_index(range, old, w)).load(Ordering::SeqCst);
            let c = self.word(self.params.word_index(range, old ^ 1, w)).load(Ordering::SeqCst);
            f(w, o | c);
        }
    }

    /// Every marked track (current ∪ old of every range): the record, read through mmap.
    pub fn dirty_tracks(&self) -> Vec<u64> {
        let mut tracks = Vec::new();
        for r in 0..self.params.ranges {
            self.range_union(r, |w, bits| self.each_bit(r, w, bits, |t| tracks.push(t)));
        }
        tracks
    }

    /// Number of marked tracks.
    pub fn dirty_count(&self) -> u64 {
        let mut n = 0;
        for r in 0..self.params.ranges {
            self.range_union(r, |w, bits| self.each_bit(r, w, bits, |_| n += 1));
        }
        n
    }

    /// The marked tracks as runs of consecutive tracks.
    pub fn dirty_runs(&self) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for t in self.dirty_tracks() {
            match runs.last_mut() {
                Some(run) if run.end == t => run.end = t + 1,
                _ => runs.push(t..t + 1),
            }
        }
        runs
    }

    /// Both bitmaps of one range, as track numbers.
    pub fn range_tracks(&self, range: u32) -> Result<RangeTracks, BpfError> {
        let current = self.cell(range)?.current.load(Ordering::SeqCst) & 1;
        let side = |s: u32| {
            let mut tracks = Vec::new();
            for w in 0..self.params.words_per_range {
                let bits = self.word(self.params.word_index(range, s, w)).load(Ordering::SeqCst);
                self.each_bit(range, w, bits, |t| tracks.push(t));
            }
            tracks
        };
        let old = side(current ^ 1);
        Ok(RangeTracks { current_side: current, current: side(current), old })
    }

    /// Marks a track on its range's current side from userspace (e.g. a write the daemon
    /// learnt of another way, or a full resync).
    pub fn mark(&self, track: u64) -> Result<(), BpfError> {
        let (range, word, bit) = self.locate(track)?;
        let current = self.cell(range)?.current.load(Ordering::SeqCst) & 1;
        self.word(self.params.word_index(range, current, word)).fetch_or(bit, Ordering::SeqCst);
        Ok(())
    }

    /// Marks every track of the volume on its range's current side.
    pub fn mark_all(&self) {
        for r in 0..self.params.ranges {
            let current = self.cell(r).expect("range in bounds").current.load(Ordering::SeqCst) & 1;
            let limit = self.params.tracks_in_range(r);
            for w in 0..self.params.words_per_range {
                let first = u64::from(w) * 64;
                if first >= limit {
                    break;
                }
                let n = (limit - first).min(64);
                let mask = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                self.word(self.params.word_index(r, current, w)).fetch_or(mask, Ordering::SeqCst);
            }
        }
    }

    /// Toggles a range: its current side becomes old and new marks go to the other side.
    ///
    /// Returns once every program invocation that could still mark the old side has returned
    /// (an RCU grace period, a few milliseconds). The writes queued before the toggle may still
    /// be in flight: [`Volume::wait_old_drained`] waits for them.
    ///
    /// Like the core's `RangePair::toggle`, bits still on the old side (a clear that never
    /// came) move into the new old side rather than being dropped. That requires the writes
    /// counted on the old side to have completed; else [`BpfError::OldSideBusy`].
    pub fn toggle(&self, range: u32) -> Result<(), BpfError> {
        let _guard = lock(&self.lock);
        let cell = self.cell(range)?;
        let cur = cell.current.load(Ordering::SeqCst) & 1;
        let old = cur ^ 1;
        let p = &self.params;
        let leftover =
            (0..p.words_per_range).any(|w| self.word(p.word_index(range, old, w)).load(Ordering::SeqCst) != 0);
        if leftover {
            let inflight = self.inflight(range, old)?;
            if inflight != 0 {
                return Err(BpfError::OldSideBusy { range, side: old, inflight });
            }
            // OR first, then clear: a crash in between leaves a superset, never less.
            for w in 0..p.words_per_range {
                let from = self.word(p.word_index(range, old, w));
                let bits = from.load(Ordering::SeqCst);
                if bits != 0 {
                    self.word(p.word_index(range, cur, w)).fetch_or(bits, Ordering::SeqCst);
                    from.fetch_and(!bits, Ordering::SeqCst);
                }
            }
            let moved = cell.marked[old as usize].swap(0, Ordering::SeqCst);
            cell.marked[cur as usize].fetch_add(moved, Ordering::SeqCst);
        }
        cell.current.store(old, Ordering::SeqCst);
        cell.toggles.fetch_add(1, Ordering::SeqCst);
        self.sync.synchronize()
    }

    /// Waits until no write counted on the old side of `range` is in flight: every write
    /// queued before the last toggle has completed, and its bits are on the old side.
    pub fn wait_old_drained(&self, range: u32, timeout: Duration) -> Result<(), BpfError> {
        let cell = self.cell(range)?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        let mut last = (u64::MAX, Instant::now());
        loop {
            let old = (cell.current.load(Ordering::SeqCst) & 1) ^ 1;
            let inflight = self.inflight(range, old)?;
            if inflight == 0 {
                return Ok(());
            }
            // No progress for a while: completions the programs missed? Release the slots of
            // bios that are provably done (tp_btf only; see ebpf/tandem.bpf.c, tandem_reap).
            // The classic flavour cannot check a bio: it releases what is older than the block
            // layer's I/O timeout (its completion program is skipped whenever it fires while
            // another BPF tracing program runs on the same CPU, e.g. our queue program).
            if inflight != last.0 {
                last = (inflight, Instant::now());
            } else if last.1.elapsed() >= Duration::from_millis(5) {
                if self.reaper.is_some() {
                    self.reap_completed()?;
                } else {
                    self.reap_stale(CLASSIC_REAP_AGE)?;
                }
                last.1 = Instant::now();
                continue;
            }
            let waited = start.elapsed();
            if waited >= timeout {
                let oldest = self
                    .inflight_bios()
                    .into_iter()
                    .filter(|b| {
                        (b.entry.first_range..=b.entry.last_range).contains(&range)
                            && (b.entry.side == old || b.entry.side == SIDE_BOTH)
                    })
                    .map(|b| b.age)
                    .max();
                return Err(BpfError::DrainTimeout { range, side: old, inflight, waited, oldest });
            }
            std::thread::sleep(pause.min(timeout - waited));
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// Runs the tp_btf flavour's reaper program once (BPF_PROG_TEST_RUN, ≈ 0.1 ms): it releases
    /// the in-flight slots of bios that are provably no longer in flight — completed (size 0) or
    /// freed and reused for other sectors — whose completion the programs did not see. Returns
    /// how many it released (0 without a reaper: the classic flavour has no bio addresses to
    /// check). [`Volume::wait_old_drained`] calls it when a drain stops making progress.
    pub fn reap_completed(&self) -> Result<u32, BpfError> {
        let Some(fd) = &self.reaper else { return Ok(0) };
        let mut opts = libbpf_rs::libbpf_sys::bpf_test_run_opts {
            sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_test_run_opts>() as _,
            ..Default::default()
        };
        // SAFETY: a valid program fd and a properly sized opts struct.
        let rc = unsafe { libbpf_rs::libbpf_sys::bpf_prog_test_run_opts(fd.as_raw_fd(), &mut opts) };
        if rc != 0 {
            return Err(BpfError::io(
                format!("running the reaper program {}", self.dir.join(pins::REAP).display()),
                io::Error::from_raw_os_error(-rc),
            ));
        }
        Ok(opts.retval)
    }

    /// Clears the old side of a range. Only after [`Volume::toggle`], [`Volume::wait_old_drained`]
    /// and the copy (or hardening) of the old side's tracks: what it clears is forgotten.
    pub fn clear_old(&self, range: u32) -> Result<(), BpfError> {
        let _guard = lock(&self.lock);
        let cell = self.cell(range)?;
        let old = (cell.current.load(Ordering::SeqCst) & 1) ^ 1;
        for w in 0..self.params.words_per_range {
            self.word(self.params.word_index(range, old, w)).store(0, Ordering::SeqCst);
        }
        cell.marked[old as usize].store(0, Ordering::SeqCst);
        Ok(())
    }

    /// One destage of a range, in the only safe order: toggle, wait for the writes queued
    /// before the toggle, hand the old side's tracks to `copy`, clear the old side.
    pub fn destage_range(
        &self,
        range: u32,
        timeout: Duration,
        copy: impl FnOnce(&[u64]) -> io::Result<()>,
    ) -> Result<(), BpfError> {
        self.toggle(range)?;
        self.wait_old_drained(range, timeout)?;
        let old = self.range_tracks(range)?.old;
        copy(&old).map_err(|e| BpfError::io(format!("copying the old tracks of range {range}"), e))?;
        self.clear_old(range)
    }

    fn slot(&self, index: u32) -> &SlotCell {
        assert!(index < layout::INFLIGHT_SLOTS);
        // SAFETY: in bounds of the mapping, 8-byte aligned, same layout as tandem_bio.
        unsafe { &*self.inflight.as_ptr().cast::<SlotCell>().add(index as usize) }
    }

    /// The write bios in flight, from the `inflight` table (read through mmap).
    pub fn inflight_bios(&self) -> Vec<InflightBio> {
        let now = sys::monotonic_ns();
        (0..layout::INFLIGHT_SLOTS)
            .filter_map(|i| {
                let entry = self.slot(i).snapshot()?;
                Some(InflightBio { slot: i, entry, age: Duration::from_nanos(now.saturating_sub(entry.queued_ns)) })
            })
            .collect()
    }

    /// Forgets in-flight entries queued more than `age` ago and releases their counts, for
    /// completions the programs missed (BPF skips a tracing program that is already running on
    /// the same CPU): such an entry would hold every drain of its side forever. Choose `age`
    /// well above the block layer's I/O timeout (30 s): a write really still in flight must not
    /// be reaped. Returns how many were reaped.
    pub fn reap_stale(&self, age: Duration) -> Result<usize, BpfError> {
        let mut reaped = 0;
        for bio in self.inflight_bios() {
            if bio.age < age {
                continue;
            }
            let cell = self.slot(bio.slot);
            // Same protocol as the programs: whoever swaps the key out releases the counts.
            if cell.key.compare_exchange(bio.entry.key, 0, Ordering::SeqCst, Ordering::SeqCst).is_err() {
                continue;
            }
            // Count it completed, on CPU 0's counters (only the sums matter).
            let e = bio.entry;
            for r in e.first_range..=e.last_range.min(self.params.ranges.saturating_sub(1)) {
                if e.side == SIDE_BOTH {
                    self.counter(0, r, COMPLETED).fetch_add(1, Ordering::SeqCst);
                    self.counter(0, r, COMPLETED + 1).fetch_add(1, Ordering::SeqCst);
                } else {
                    self.counter(0, r, COMPLETED + (e.side & 1)).fetch_add(1, Ordering::SeqCst);
                    break;
                }
            }
            reaped += 1;
        }
        Ok(reaped)
    }
}
