//! The guest's initramfs: busybox, the modules that mount the host's root (9p over virtio and
//! overlayfs, with their dependencies from `modules.dep`) and the two init scripts, written as
//! an uncompressed newc cpio archive (the format the kernel unpacks; no host `cpio` needed).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The modules the first-stage init loads, in this order after their dependencies. virtio-pci
/// and virtio-console are built into Debian's kernel; these are not.
const MODULES: &[&str] = &["9pnet_virtio", "9p", "overlay"];

/// Stage 1 (`/init`): mounts the host's root read-only over 9p under a tmpfs overlay and
/// switches to it.
const INIT: &str = include_str!("init.sh");
/// Stage 2: runs as PID 1 in the new root, mounts the API filesystems, runs the command.
const STAGE2: &str = include_str!("stage2.sh");

/// What stage 2 needs to know about this run, baked into the archive as `/tandem-vm.env`.
pub struct Settings<'a> {
    /// The guest kernel's release.
    pub release: &'a str,
    /// The host path of `lib/modules/<release>` (visible at the same path in the guest).
    pub modules: &'a Path,
    /// The modprobe the guest kernel calls (`/proc/sys/kernel/modprobe`).
    pub modprobe: &'a str,
}

/// Writes the archive to `path`.
pub fn build(path: &Path, busybox: &Path, settings: &Settings) -> Result<()> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "modules", "lower", "rw", "newroot"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before anything mounts devtmpfs.
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.file("bin/busybox", 0o755, &fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?);
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("stage2", 0o755, STAGE2.as_bytes());
    cpio.file(
        "tandem-vm.env",
        0o644,
        format!(
            "RELEASE='{}'\nMODULES='{}'\nMODPROBE='{}'\n",
            settings.release,
            settings.modules.display(),
            settings.modprobe
        )
        .as_bytes(),
    );
    let order = module_order(settings.modules, MODULES)?;
    let mut names = String::new();
    for module in &order {
        let name = file_stem(module);
        // busybox's insmod hands the file to init_module(2) as is: store the modules plain.
        cpio.file(&format!("modules/{name}.ko"), 0o644, &decompress(module)?);
        names.push_str(&format!("{name}.ko\n"));
    }
    cpio.file("modules/order", 0o644, names.as_bytes());
    let bytes = cpio.finish();
    let partial = path.with_extension("partial");
    fs::write(&partial, bytes).with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, path)?;
    Ok(())
}

/// The module files to load for `wanted`, dependencies first, from `modules.dep`.
fn module_order(modules: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let dep_file = modules.join("modules.dep");
    let text = fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    // "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz"
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in text.lines() {
        let Some((module, rest)) = line.split_once(':') else { continue };
        let path_deps = rest.split_whitespace().map(str::to_string).collect();
        deps.insert(module_name(module), (module.to_string(), path_deps));
    }
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let Some((path, path_deps)) = deps.get(name) else {
            bail!("module {name} is not in modules.dep (built in, or missing from this kernel?)");
        };
        for dep in path_deps {
            visit(&module_name(dep), deps, seen, order)?;
        }
        order.push(path.clone());
        Ok(())
    }
    for name in wanted {
        visit(&module_name(name), &deps, &mut seen, &mut order)?;
    }
    Ok(order.into_iter().map(|path| modules.join(path)).collect())
}

/// A module's name as the kernel spells it: file name without `.ko[.xz|.zst|.gz]`, `-` as `_`.
fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

fn file_stem(path: &Path) -> String {
    module_name(&path.to_string_lossy())
}

/// The module's bytes, decompressed by the host's `xz` when the file is `.ko.xz`.
fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    if !name.ends_with(".xz") {
        return fs::read(path).with_context(|| format!("reading {name}"));
    }
    let output = Command::new("xz")
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("could not start `xz -dc {name}` (is xz-utils installed?)"))?;
    if !output.status.success() {
        bail!("xz -dc {name}: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(output.stdout)
}

/// A newc ("070701") cpio archive being built in memory.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, 0, &[]);
    }

    fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100000 | permissions, 0, data);
    }

    fn char_device(&mut self, name: &str, permissions: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | permissions, (major << 8) | minor, &[]);
    }

    /// One header + name + data, each padded to 4 bytes. `rdev` packs major and minor as
    /// `major << 8 | minor` (small numbers only: /dev/console).
    fn entry(&mut self, name: &str, mode: u32, rdev: u32, data: &[u8]) {
        self.next_inode += 1;
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev >> 8,
            rdev & 0xff,
            name.len() as u32 + 1,
            0, // check
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, &[]);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_follow_the_kernel() {
        assert_eq!(module_name("kernel/drivers/md/dm-mod.ko.xz"), "dm_mod");
        assert_eq!(module_name("kernel/fs/9p/9p.ko"), "9p");
        assert_eq!(module_name("9pnet_virtio"), "9pnet_virtio");
    }

    #[test]
    fn cpio_entries_are_aligned_and_end_with_the_trailer() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = cpio.finish();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // The header's file size field (7th) is the data length in hex.
        assert_eq!(&bytes[6 + 6 * 8..6 + 7 * 8], b"0000000a");
    }
}
