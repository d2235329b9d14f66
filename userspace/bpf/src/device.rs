//! Which kernel device (and which sectors of it) a volume's writes arrive on.

use std::fmt;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::BpfError;

/// The block device a volume is recorded on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceRef {
    /// A block device node, e.g. `/dev/loop3`, `/dev/ublkb0`, `/dev/vg/lv`, `/dev/sda2`.
    Path(PathBuf),
    /// A device number (`stat`'s major and minor).
    Dev { major: u32, minor: u32 },
}

impl From<&Path> for DeviceRef {
    fn from(path: &Path) -> DeviceRef {
        DeviceRef::Path(path.to_owned())
    }
}

impl From<PathBuf> for DeviceRef {
    fn from(path: PathBuf) -> DeviceRef {
        DeviceRef::Path(path)
    }
}

impl fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRef::Path(p) => write!(f, "{}", p.display()),
            DeviceRef::Dev { major, minor } => write!(f, "{major}:{minor}"),
        }
    }
}

/// The kernel's dev_t encoding inside block-layer structs and tracepoints: `major << 20 | minor`
/// (not the userspace encoding `stat` returns).
pub fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xf_ffff)
}

/// A device as the block layer's tracepoints see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device as given.
    pub device: DeviceRef,
    pub major: u32,
    pub minor: u32,
    /// The device's kernel dev_t (`major << 20 | minor`): what its bios carry.
    pub kernel_dev: u32,
    /// For a partition, the whole disk's kernel dev_t: writes through the disk to the
    /// partition's sectors carry that one. (The block layer adds the partition start to a
    /// partition's bios before the queue tracepoint but leaves their device alone, so both
    /// arrive with absolute sectors.)
    pub disk_dev: Option<u32>,
    /// The device's first sector on `kernel_dev` (its partition start, else 0).
    pub start_sector: u64,
    /// Its size in 512-byte sectors.
    pub nr_sectors: u64,
    /// True when `device` is a partition.
    pub partition: bool,
}

impl DeviceInfo {
    /// Resolves `device` through sysfs (`/sys/dev/block/MAJ:MIN`).
    pub fn resolve(device: &DeviceRef) -> Result<DeviceInfo, BpfError> {
        let err = |detail: String| BpfError::Device { device: device.to_string(), detail };
        let (major, minor) = match device {
            DeviceRef::Path(path) => {
                let meta = fs::metadata(path).map_err(|e| err(format!("cannot stat it: {e}")))?;
                if !meta.file_type().is_block_device() {
                    return Err(err("not a block device".into()));
                }
                let rdev = meta.rdev();
                (libc::major(rdev), libc::minor(rdev))
            }
            DeviceRef::Dev { major, minor } => (*major, *minor),
        };
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let read = |p: &Path| {
            fs::read_to_string(p).map(|s| s.trim().to_owned()).map_err(|e| err(format!("reading {}: {e}", p.display())))
        };
        let number = |p: &Path| -> Result<u64, BpfError> {
            let s = read(p)?;
            s.parse().map_err(|_| err(format!("{} holds {s:?}, not a number", p.display())))
        };
        if !sys.exists() {
            return Err(err(format!("no block device {major}:{minor} in sysfs ({} is missing)", sys.display())));
        }
        let nr_sectors = number(&sys.join("size"))?;
        let partition = sys.join("partition").exists();
        let (disk_dev, start_sector) = if partition {
            let start = number(&sys.join("start"))?;
            let real = fs::canonicalize(&sys).map_err(|e| err(format!("resolving {}: {e}", sys.display())))?;
            let parent = real.parent().ok_or_else(|| err(format!("{} has no parent disk", real.display())))?;
            let dev = read(&parent.join("dev"))?;
            let (maj, min) = dev
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
                .ok_or_else(|| err(format!("{}/dev holds {dev:?}, not MAJ:MIN", parent.display())))?;
            (Some(kernel_dev(maj, min)), start)
        } else {
            (None, 0)
        };
        Ok(DeviceInfo {
            device: device.clone(),
            major,
            minor,
            kernel_dev: kernel_dev(major, minor),
            disk_dev,
            start_sector,
            nr_sectors,
            partition,
        })
    }
}
