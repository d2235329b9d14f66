//! The user-facing device: `/dev/mapper/<name>` (default `tandem-<volume>`), a device-mapper
//! linear table over the frontend's device, made with `dmsetup`.
//!
//! Why a table on top: the user's device name stays the same whatever the frontend's number
//! (`/dev/ublkb3` today, `/dev/loop7` tomorrow), and a role change can `dmsetup suspend` it so
//! that I/O above waits instead of failing while the node changes role.
//!
//! Where there is no udev (containers, an initramfs, the VM test guest) dmsetup would wait
//! forever for a udev cookie: `DM_DISABLE_UDEV=1` makes it create the node itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DmError {
    #[error("dmsetup {args}: {detail}")]
    Dmsetup { args: String, detail: String },
    #[error(
        "/dev/mapper/{name} exists, is open, and maps another device ({table}), not {device}: \
         set a distinct [node] dm_name, or remove that table"
    )]
    Busy { name: String, table: String, device: PathBuf },
    #[error("{device}: {detail}")]
    Device { device: PathBuf, detail: String },
}

/// Why device-mapper cannot be used here, or `None` when it can. Loads `dm_mod` if it can.
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/mapper/control").exists() {
        // Best effort: a kernel without module loading says no, and the check below tells.
        let _ = Command::new("modprobe").arg("dm_mod").output();
    }
    if !Path::new("/dev/mapper/control").exists() {
        return Some(
            "/dev/mapper/control does not exist (no device-mapper: CONFIG_BLK_DEV_DM, `modprobe dm_mod`)".into(),
        );
    }
    match Command::new("dmsetup").arg("version").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("`dmsetup version` failed: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => Some(format!("cannot run dmsetup (package dmsetup): {e}")),
    }
}

/// No udev daemon answers dmsetup's cookies here (its control socket is missing).
fn without_udev() -> bool {
    !Path::new("/run/udev/control").exists()
}

/// One linear table over the frontend device.
#[derive(Clone, Debug)]
pub struct Linear {
    pub name: String,
}

impl Linear {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/mapper/{}", self.name))
    }

    /// Creates `/dev/mapper/<name>` over `device` (its whole size), or loads the table again
    /// into an existing one of that name (a restarted daemon's, whose frontend device may
    /// have a new number).
    pub fn create(name: &str, device: &Path) -> Result<Linear, DmError> {
        let sectors = sectors(device)?;
        let table = format!("0 {sectors} linear {} 0", device.display());
        let linear = Linear { name: name.to_owned() };
        if linear.exists() {
            let existing = linear.table()?;
            if existing.trim() == table_with_devno(&table, device)?.trim() {
                return Ok(linear);
            }
            // Another device under an open table: another node's table of the same name (two
            // nodes of one volume on one machine need distinct `dm_name`s), or a user's. Never
            // swapped from under its users.
            if linear.open_count()? > 0 {
                return Err(DmError::Busy {
                    name: name.to_owned(),
                    table: existing.trim().to_owned(),
                    device: device.to_owned(),
                });
            }
            dmsetup(&["suspend", name])?;
            let loaded = dmsetup(&["load", name, "--table", &table]);
            dmsetup(&["resume", name])?;
            loaded?;
            return Ok(linear);
        }
        dmsetup(&["create", name, "--table", &table])?;
        Ok(linear)
    }

    pub fn exists(&self) -> bool {
        dmsetup(&["info", &self.name]).is_ok()
    }

    /// How many openers hold the device (a mounted filesystem, an active LV, a process).
    pub fn open_count(&self) -> Result<u64, DmError> {
        let out = dmsetup(&["info", "-c", "--noheadings", "-o", "open", &self.name])?;
        out.trim().parse().map_err(|e| DmError::Dmsetup {
            args: format!("info -c -o open {}", self.name),
            detail: format!("unreadable open count {out:?}: {e}"),
        })
    }

    fn table(&self) -> Result<String, DmError> {
        dmsetup(&["table", &self.name])
    }

    /// I/O above waits from here until [`Linear::resume`] (in-flight I/O is completed first).
    pub fn suspend(&self) -> Result<(), DmError> {
        dmsetup(&["suspend", &self.name]).map(drop)
    }

    pub fn resume(&self) -> Result<(), DmError> {
        dmsetup(&["resume", &self.name]).map(drop)
    }

    /// Removes the device; fails while something holds it open (a mounted filesystem, an
    /// active LVM volume group).
    pub fn remove(&self) -> Result<(), DmError> {
        dmsetup(&["remove", &self.name]).map(drop)
    }
}

/// `dmsetup table` prints the device as `major:minor`.
fn table_with_devno(table: &str, device: &Path) -> Result<String, DmError> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::metadata(device).map_err(|e| DmError::Device { device: device.to_owned(), detail: e.to_string() })?;
    let rdev = meta.rdev();
    let devno = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
    Ok(table.replace(&device.display().to_string(), &devno))
}

/// The device's size in 512-byte sectors, from sysfs.
fn sectors(device: &Path) -> Result<u64, DmError> {
    let name = device
        .file_name()
        .ok_or_else(|| DmError::Device { device: device.to_owned(), detail: "not a device path".into() })?;
    let file = Path::new("/sys/class/block").join(name).join("size");
    let text = std::fs::read_to_string(&file)
        .map_err(|e| DmError::Device { device: device.to_owned(), detail: format!("{}: {e}", file.display()) })?;
    text.trim()
        .parse()
        .map_err(|e| DmError::Device { device: device.to_owned(), detail: format!("{}: {e}", file.display()) })
}

fn dmsetup(args: &[&str]) -> Result<String, DmError> {
    let mut cmd = Command::new("dmsetup");
    cmd.args(args);
    if without_udev() {
        cmd.env("DM_DISABLE_UDEV", "1");
    }
    let out = cmd
        .output()
        .map_err(|e| DmError::Dmsetup { args: args.join(" "), detail: format!("cannot run dmsetup: {e}") })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(DmError::Dmsetup { args: args.join(" "), detail: String::from_utf8_lossy(&out.stderr).trim().to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_devices_are_compared_as_major_minor() {
        // /dev/null is a character device 1:3: the path in the table becomes its number.
        let table = table_with_devno("0 8 linear /dev/null 0", Path::new("/dev/null")).unwrap();
        assert_eq!(table, "0 8 linear 1:3 0");
    }
}
