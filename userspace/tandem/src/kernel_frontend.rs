//! Which frontend serves the volume (`[node] frontend`), and the ublk one's life in the daemon:
//! the device number persisted beside the metadata, user recovery after a restart, the
//! device-mapper table on top, and the orderly stop.
//!
//! # Restart under a mounted filesystem
//!
//! The ublk device outlives a daemon killed with `kill -9`: the kernel quiesces it and holds
//! its I/O (user recovery). The restarted daemon finds the device number in `<meta>.ublk`
//! and, when the kernel reports that device quiesced, re-attaches to it instead of adding a
//! new one. A node that died as primary comes back secondary (its metadata says it crashed),
//! and a write reissued to a secondary would fail: so it re-attaches only once it is primary
//! again (`tandem primary`, after the handshake with its peer); until then the kernel keeps
//! holding the I/O and the filesystem above waits. A node that died as secondary re-attaches
//! at once (nothing above writes to it, and a quiesced device would hang an LVM scan).
//!
//! The device keeps its dev_t and its disk's diskseq across the restart, so the daemon keeps
//! the kernel record the previous one left pinned (see `kernel_record`, "Restart"): the
//! programs that marked the requests the kernel holds go on recording their reissue.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem_frontend::{UblkBackend, UblkDevice, UblkFrontend, UblkOptions, UblkStart, UblkState};

crate::choice::choice! {
    /// `[node] frontend`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum FrontendChoice: "frontend" {
        /// ublk when `/dev/ublk-control` exists (after trying `modprobe ublk_drv`), else file.
        Auto = "auto",
        Ublk = "ublk",
        /// FUSE file + loop device.
        File = "file",
    }
}

/// The frontend this daemon uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selected {
    Ublk,
    /// With why ublk is not used (`frontend = "auto"` on a kernel without it).
    File {
        reason: Option<String>,
    },
}

/// Picks the frontend; `frontend = "ublk"` without ublk is an error naming the field.
pub fn select(config: &Config) -> Result<Selected> {
    if config.frontend == FrontendChoice::File {
        return Ok(Selected::File { reason: None });
    }
    if tandem_frontend::ublk_unavailable().is_some() {
        // Fails quietly where modules cannot be loaded; the check below says why.
        let _ = Command::new("modprobe").arg("ublk_drv").output();
    }
    match tandem_frontend::ublk_unavailable() {
        None => Ok(Selected::Ublk),
        Some(why) if config.frontend == FrontendChoice::Ublk => {
            bail!("{}: node.frontend: \"ublk\", but {why}", config.file.display())
        }
        Some(why) => Ok(Selected::File { reason: Some(format!("ublk unavailable: {why}")) }),
    }
}

/// Where the ublk device number is kept between daemon runs: beside the metadata.
pub fn id_file(config: &Config) -> PathBuf {
    let mut name = config.meta.clone().into_os_string();
    name.push(".ublk");
    PathBuf::from(name)
}

/// A new device, or the one a dead daemon left quiesced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    Add,
    Recover { id: u32 },
}

impl Plan {
    /// The block device a recovery takes over, which the previous daemon served too (its
    /// dev_t and diskseq survive the daemon); `None` for a new device.
    pub fn surviving_device(&self) -> Option<PathBuf> {
        match self {
            Plan::Recover { id } => Some(block_device(*id)),
            Plan::Add => None,
        }
    }
}

/// `/dev/ublkb<id>`.
fn block_device(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// Reads `<meta>.ublk` and asks the kernel what became of that device.
pub fn plan(config: &Config) -> Result<Plan> {
    let file = id_file(config);
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Plan::Add),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let id: u32 =
        text.trim().parse().with_context(|| format!("{}: not a ublk device number: {text:?}", file.display()))?;
    match tandem_frontend::device_state(id).with_context(|| format!("/dev/ublkc{id} (from {})", file.display()))? {
        Some(UblkState::Quiesced) => Ok(Plan::Recover { id }),
        Some(UblkState::Live) => {
            bail!("/dev/ublkb{id} (recorded in {}) is live: another daemon serves this volume", file.display())
        }
        Some(state) => {
            tracing::warn!(id, ?state, "the ublk device of the last run is not recoverable: adding a new one");
            Ok(Plan::Add)
        }
        None => Ok(Plan::Add),
    }
}

/// A ublk device served on its own thread.
pub struct Serving {
    pub device: UblkDevice,
    thread: std::thread::JoinHandle<Result<()>>,
    /// The device is served (false while a recovery waits for the node to be primary).
    pub live: Arc<AtomicBool>,
    /// Ends a recovery that still waits for the node to be primary.
    stopping: Arc<AtomicBool>,
}

impl Serving {
    /// Adds a device (returns once it is live) or takes over a quiesced one (returns at once;
    /// the re-attach waits for `primary` when `wait_for_primary`, see the module's comment).
    pub fn start(
        config: &Config,
        backend: Arc<dyn UblkBackend>,
        plan: Plan,
        primary: Arc<AtomicBool>,
        wait_for_primary: bool,
    ) -> Result<Serving> {
        let frontend = UblkFrontend::new(backend, UblkOptions::default())?;
        let live = Arc::new(AtomicBool::new(false));
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let (tx, rx) = std::sync::mpsc::channel::<UblkDevice>();
        let id_file = id_file(config);
        let (is_live, file) = (live.clone(), id_file.clone());
        let ready = move |device: &UblkDevice| {
            if let Err(e) = std::fs::write(&file, format!("{}\n", device.id)) {
                tracing::error!(file = %file.display(), error = %e, "cannot persist the ublk device number: a restart will not re-attach");
            }
            is_live.store(true, Ordering::Release);
            tracing::info!(device = %device.block_device.display(), "ublk device live");
            let _ = tx.send(device.clone());
        };
        let thread = std::thread::Builder::new().name("ublk".into()).spawn(move || -> Result<()> {
            let start = match plan {
                Plan::Add => UblkStart::Add,
                Plan::Recover { id } => {
                    if wait_for_primary && !primary.load(Ordering::Acquire) {
                        tracing::warn!(
                            device = %format!("/dev/ublkb{id}"),
                            "this node died as primary: the device's I/O stays held by the kernel until `tandem primary`"
                        );
                        while !primary.load(Ordering::Acquire) {
                            if stop.load(Ordering::Acquire) {
                                return Ok(());
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    tracing::info!(id, "re-attaching to the ublk device (user recovery)");
                    UblkStart::Recover { id }
                }
            };
            frontend.serve(start, ready).context("serving the ublk device")
        })?;
        let device = match plan {
            Plan::Recover { id } => UblkDevice { id, block_device: block_device(id) },
            Plan::Add => match rx.recv() {
                Ok(device) => device,
                Err(_) => {
                    let outcome = thread.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the ublk thread panicked")));
                    return Err(outcome.err().unwrap_or_else(|| anyhow::anyhow!("the ublk device never went live")));
                }
            },
        };
        Ok(Serving { device, thread, live, stopping })
    }

    /// Orderly stop: the device is deleted, and the next start adds a new one. A device still
    /// waiting to be re-attached is left as it is, quiesced with its I/O held, for the next
    /// start: deleting it would fail that I/O under the filesystem above.
    pub fn stop(self, config: &Config) {
        self.stopping.store(true, Ordering::Release);
        // A waiting recovery ends on the flag; one that went live meanwhile serves until stopped.
        while !self.live.load(Ordering::Acquire) && !self.thread.is_finished() {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !self.live.load(Ordering::Acquire) {
            let _ = self.thread.join();
            tracing::warn!(
                device = %self.device.block_device.display(),
                "left the device quiesced (its I/O held) for the next start to re-attach"
            );
            return;
        }
        if let Err(e) = tandem_frontend::stop_device(self.device.id) {
            tracing::warn!(error = %e, "stopping the ublk device");
        }
        match self.thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "the ublk device's serving ended with an error"),
            Err(_) => tracing::warn!("the ublk thread panicked"),
        }
        let _ = std::fs::remove_file(id_file(config));
    }
}

/// Wraps a role change in `dmsetup suspend` / `resume` of the user-facing table, so that I/O
/// above waits while the node changes role instead of failing.
pub struct RoleWrap {
    linear: crate::dm::Linear,
    /// Suspend only while the frontend serves: suspending waits for the I/O in flight, and a
    /// quiesced ublk device (waiting to be recovered by this very promotion) completes none.
    live: Arc<AtomicBool>,
    /// One role change at a time: two control connections must not interleave their
    /// suspends and resumes (the first resume would let I/O meet the second change).
    serial: std::sync::Mutex<()>,
}

impl RoleWrap {
    pub fn new(linear: crate::dm::Linear, live: Arc<AtomicBool>) -> RoleWrap {
        RoleWrap { linear, live, serial: std::sync::Mutex::new(()) }
    }

    /// Suspends, runs `change`, resumes (also when `change` fails).
    pub fn around<T>(&self, change: impl FnOnce() -> T) -> T {
        let _one_at_a_time = self.serial.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let suspended = self.live.load(Ordering::Acquire)
            && match self.linear.suspend() {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot suspend the device for the role change");
                    false
                }
            };
        let out = change();
        if suspended {
            match self.linear.resume() {
                Ok(()) => tracing::info!(
                    device = %self.linear.path().display(),
                    "role change done with the device suspended (I/O above waited)"
                ),
                Err(e) => tracing::error!(error = %e, "cannot resume the device after the role change"),
            }
        }
        out
    }

    /// Why `tandem down` must not go ahead, if it must not: the table is still open, and
    /// removing it would fail after the node had already ended (leaving a table over a device
    /// nobody serves).
    pub fn refuse_down(&self) -> Option<String> {
        match self.linear.open_count() {
            Ok(0) => None,
            Ok(n) => Some(format!(
                "{} is still open ({n} opener{}: a mounted filesystem, an active volume group?): unmount it or \
                 deactivate the volume group (`vgchange -an`) first; nothing was changed",
                self.linear.path().display(),
                if n == 1 { "" } else { "s" }
            )),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the table's open count before `down`");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(frontend: &str) -> Config {
        let text = format!(
            "[volume]\nname = \"v\"\nid = 1\nsize = \"64MiB\"\nsecret = \"0123456789abcdef\"\n\
             [node]\nid = 0\ndata = \"/tmp/v.img\"\nmeta = \"/tmp/v.meta\"\nlisten = \"127.0.0.1:1\"\n\
             frontend = \"{frontend}\"\n"
        );
        Config::parse(std::path::Path::new("/etc/tandem/v.toml"), &text).unwrap()
    }

    #[test]
    fn the_choice_parses_and_prints() {
        for name in ["auto", "ublk", "file"] {
            assert_eq!(name.parse::<FrontendChoice>().unwrap().to_string(), name);
        }
        assert!("nbd".parse::<FrontendChoice>().unwrap_err().contains("auto, ublk, file"));
    }

    #[test]
    fn the_device_number_lives_beside_the_metadata() {
        assert_eq!(id_file(&config("auto")), PathBuf::from("/tmp/v.meta.ublk"));
    }

    #[test]
    fn file_is_file_and_forced_ublk_without_ublk_names_the_field() {
        assert_eq!(select(&config("file")).unwrap(), Selected::File { reason: None });
        // Only meaningful on a kernel without ublk (this project's hosts); select() may load
        // the module elsewhere.
        if tandem_frontend::ublk_unavailable().is_none() {
            return;
        }
        let auto = select(&config("auto")).unwrap();
        if auto == Selected::Ublk {
            return; // `modprobe ublk_drv` just worked
        }
        assert!(matches!(&auto, Selected::File { reason: Some(r) } if r.contains("/dev/ublk-control")), "{auto:?}");
        let e = format!("{:#}", select(&config("ublk")).unwrap_err());
        assert!(e.starts_with("/etc/tandem/v.toml: node.frontend: \"ublk\", but /dev/ublk-control"), "{e}");
    }
}
