//! Which kernel device (and which sectors of it) a volume's writes arrive on.

use std::fmt;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
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
    /// The disk's sequence number (`struct gendisk.diskseq`: for a partition, its whole
    /// disk's), which the kernel never gives two disks until reboot; `None` before Linux 5.15.
    /// With `kernel_dev` it names this very device: a dev_t goes to the next device that gets
    /// the number once this one is gone.
    pub diskseq: Option<u64>,
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
        // The disk's sysfs directory (a partition's parent) has its diskseq (Linux >= 5.15).
        let disk_sys = if partition {
            let real = fs::canonicalize(&sys).map_err(|e| err(format!("resolving {}: {e}", sys.display())))?;
            real.parent().ok_or_else(|| err(format!("{} has no parent disk", real.display())))?.to_owned()
        } else {
            sys.clone()
        };
        let diskseq = read_diskseq(&disk_sys.join("diskseq"), device).map_err(err)?;
        let (disk_dev, start_sector) = if partition {
            let start = number(&sys.join("start"))?;
            let parent = &disk_sys;
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
            diskseq,
            start_sector,
            nr_sectors,
            partition,
        })
    }
}

/// `BLKGETDISKSEQ`: `_IOR(0x12, 128, __u64)`.
const BLKGETDISKSEQ: libc::c_ulong = (2 << 30) | (8 << 16) | (0x12 << 8) | 128;

/// The disk's diskseq from sysfs, else (a kernel with the ioctl but not the attribute) from
/// `BLKGETDISKSEQ` on the device node; `None` when the kernel has neither (before 5.15).
fn read_diskseq(attr: &Path, device: &DeviceRef) -> Result<Option<u64>, String> {
    match fs::read_to_string(attr) {
        Ok(s) => {
            return s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| format!("{} holds {:?}, not a number", attr.display(), s.trim()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("reading {}: {e}", attr.display())),
    }
    let DeviceRef::Path(path) = device else { return Ok(None) };
    // O_NONBLOCK: never wait for media; the ioctl reads a field of the gendisk.
    let file = match fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path) {
        Ok(f) => f,
        Err(_) => return Ok(None),
    };
    let mut seq = 0u64;
    // SAFETY: a valid fd and a pointer to a u64, which is what BLKGETDISKSEQ writes.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETDISKSEQ as _, &mut seq as *mut u64) };
    Ok((rc == 0).then_some(seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ioctl fallback (kernels with BLKGETDISKSEQ but no sysfs attribute) reads what sysfs
    /// says. Needs root and a loop device node; elsewhere it says why it skips.
    #[test]
    fn the_diskseq_ioctl_agrees_with_sysfs() {
        let node = Path::new("/dev/loop0");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !node.exists() {
            eprintln!("skipped: needs root and {}", node.display());
            return;
        }
        let attr = Path::new("/sys/block/loop0/diskseq");
        let Some(before) = read_diskseq(attr, &DeviceRef::Path(node.into())).unwrap() else {
            eprintln!("skipped: this kernel has no diskseq");
            return;
        };
        let missing = Path::new("/sys/block/loop0/no-such-attribute");
        let ioctl = read_diskseq(missing, &DeviceRef::Path(node.into())).unwrap().expect("BLKGETDISKSEQ");
        // Another process may attach loop0 meanwhile, which advances it.
        let after = read_diskseq(attr, &DeviceRef::Path(node.into())).unwrap().unwrap();
        assert!((before..=after).contains(&ioctl), "ioctl {ioctl}, sysfs {before} then {after}");
        assert_eq!(read_diskseq(missing, &DeviceRef::Dev { major: 7, minor: 0 }).unwrap(), None);
    }
}
