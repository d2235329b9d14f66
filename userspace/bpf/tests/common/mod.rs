//! Shared helpers of the root-only tests: environment checks, loop devices, O_DIRECT I/O,
//! bpftool.
#![allow(dead_code)]

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use tandem_bpf::{Flavor, FlavorChoice, Volume, VolumeConfig};

/// Why the BPF tests cannot run here, if they cannot. Set TANDEM_BPF_TESTS=require (CI) to
/// turn a skip into a failure.
pub fn skip(test: &str) -> bool {
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root (loading BPF programs, loop devices and mounts need root)".to_owned())
    } else if !Path::new(tandem_bpf::KERNEL_BTF).exists() {
        Some(format!("no kernel BTF at {}", tandem_bpf::KERNEL_BTF))
    } else if !tool_exists("losetup") {
        Some("losetup (util-linux) is not installed".to_owned())
    } else {
        None
    };
    match reason {
        None => false,
        Some(reason) if std::env::var("TANDEM_BPF_TESTS").as_deref() == Ok("require") => {
            panic!("{test}: cannot run ({reason}) and TANDEM_BPF_TESTS=require")
        }
        Some(reason) => {
            eprintln!("SKIPPED {test}: {reason}");
            true
        }
    }
}

pub fn tool_exists(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success()).unwrap_or(false)
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A unique volume name for this test process.
pub fn volume_name(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("test-{}-{}-{tag}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// Unpins a volume when dropped (so a failed test leaves nothing attached).
pub struct Pinned(pub String);

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = tandem_bpf::unpin(&self.0);
    }
}

/// A loop device over a temporary file, detached (only this one) when dropped.
pub struct LoopDevice {
    pub path: PathBuf,
    pub size: u64,
    /// The temporary file behind it.
    pub backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    pub fn new(size: u64, direct_io: bool) -> LoopDevice {
        LoopDevice::with_partitions(size, direct_io, &[])
    }

    /// With `partitions` ((start, size) in 512-byte sectors), the device is attached with
    /// partition scanning and the partitions are added with BLKPG (`addpart`), which needs no
    /// partition-table parser in the kernel (this one has neither MSDOS nor EFI support).
    pub fn with_partitions(size: u64, direct_io: bool, partitions: &[(u64, u64)]) -> LoopDevice {
        let dir = tempfile::Builder::new().prefix("tandem-bpf-test").tempdir().expect("temp dir");
        let file = dir.path().join("backing");
        File::create(&file).and_then(|f| f.set_len(size)).expect("backing file");
        let mut args = vec!["--show", "-f"];
        if direct_io {
            args.push("--direct-io=on");
        }
        if !partitions.is_empty() {
            args.push("-P");
        }
        let f = file.to_str().unwrap().to_owned();
        args.push(&f);
        let path = PathBuf::from(run("losetup", &args).trim());
        assert!(path.to_string_lossy().starts_with("/dev/loop"), "losetup printed {path:?}");
        let device = LoopDevice { path, size, backing: file, _dir: dir };
        for (i, (start, sectors)) in partitions.iter().enumerate() {
            let dev = device.path.to_str().unwrap();
            run("addpart", &[dev, &(i + 1).to_string(), &start.to_string(), &sectors.to_string()]);
        }
        device
    }

    pub fn open_direct(&self) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path)
            .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", self.path.display()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A zeroed buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, len }
    }
    pub fn as_slice(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        unsafe { dealloc(self.ptr, Layout::from_size_align(self.len, 4096).unwrap()) }
    }
}

/// Writes `len` bytes of `fill` at `offset` with O_DIRECT.
pub fn write_direct(file: &File, offset: u64, len: usize, fill: u8) {
    let mut buf = AlignedBuf::new(len);
    buf.as_mut_slice().fill(fill);
    file.write_all_at(buf.as_slice(), offset).unwrap_or_else(|e| panic!("pwrite at {offset} of {len}: {e}"));
}

/// `ioctl(BLKDISCARD)` / `ioctl(BLKZEROOUT)` over a byte range.
pub fn discard(file: &File, offset: u64, len: u64) {
    block_ioctl(file, 0x1277, offset, len, "BLKDISCARD")
}

pub fn zero_out(file: &File, offset: u64, len: u64) {
    block_ioctl(file, 0x127f, offset, len, "BLKZEROOUT")
}

fn block_ioctl(file: &File, request: u64, offset: u64, len: u64, name: &str) {
    use std::os::fd::AsRawFd;
    let range = [offset, len];
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, range.as_ptr()) };
    assert_eq!(rc, 0, "{name} {offset}+{len}: {}", std::io::Error::last_os_error());
}

pub fn config(
    name: &str,
    device: &Path,
    track_size: u32,
    tracks_per_range: u32,
    tracks: u64,
    flavor: Flavor,
) -> VolumeConfig {
    let mut c = VolumeConfig::new(name, device, track_size, tracks_per_range, tracks);
    c.flavor = match flavor {
        Flavor::TpBtf => FlavorChoice::TpBtf,
        Flavor::Classic => FlavorChoice::Classic,
    };
    c
}

/// `bpftool -j map dump pinned PATH`, parsed.
pub fn bpftool_dump(path: &Path) -> serde_json::Value {
    let out = run("bpftool", &["-j", "map", "dump", "pinned", path.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bpftool JSON for {}: {e}: {out}", path.display()))
}

/// The marked tracks, read with bpftool from the pinned `params` and `bitmap` maps, decoded
/// only from bpftool's output (the BTF-formatted values).
pub fn dirty_tracks_via_bpftool(volume: &Volume) -> Vec<u64> {
    let dir = volume.pin_dir();
    let params = bpftool_dump(&dir.join("params"));
    let p = &params[0]["formatted"]["value"];
    let field = |name: &str| p[name].as_u64().unwrap_or_else(|| panic!("params.{name} in {params}"));
    let (tracks, tpr, wpr) = (field("tracks"), field("tracks_per_range"), field("words_per_range"));
    let bitmap = bpftool_dump(&dir.join("bitmap"));
    let mut tracks_out = Vec::new();
    for entry in bitmap.as_array().expect("bitmap dump is an array") {
        let f = &entry["formatted"];
        let (index, word) = (f["key"].as_u64().unwrap(), f["value"].as_u64().unwrap());
        let range = index / (2 * wpr);
        let w = index % wpr;
        for b in 0..64 {
            let i = w * 64 + b;
            let t = range * tpr + i;
            if word & (1 << b) != 0 && i < tpr && t < tracks {
                tracks_out.push(t);
            }
        }
    }
    tracks_out.sort_unstable();
    tracks_out.dedup();
    tracks_out
}
