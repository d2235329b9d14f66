//! Mounting the volume file and taking it down again.
//!
//! Mount namespaces: the FUSE mount lives in the mount namespace of the daemon. A daemon started
//! with `ip netns exec NAME` gets a mount namespace of its own, so its `<mountpoint>/volume` (and
//! a loop device's backing path as `losetup -l` prints it) is invisible outside; the loop device
//! itself is global. Start it with `nsenter --net=/run/netns/NAME` to share the host's mounts.
//!
//! As root, fuser mounts with mount(2) directly; no fusermount is needed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption, Session};
use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};

use crate::align::AlignedVolume;
use crate::backend::{check_geometry, BlockBackend};
use crate::error::{FrontendError, Result};
use crate::fuse::VolumeFs;

/// Options of the file frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFrontendOptions {
    /// Name of the volume file inside the mountpoint.
    pub file_name: String,
    /// FUSE serving threads (at least 2). Each blocks in one backend call at a time, so this is
    /// the frontend's queue depth towards the daemon: with a replication round trip per write,
    /// IOPS ≈ threads / latency. An idle thread costs a stack and an untouched 16 MiB buffer.
    pub threads: usize,
    /// Source name shown in /proc/mounts (`fsname=`), e.g. `tandem:<volume>`.
    pub fs_name: String,
    /// How long [`Mounted::unmount`] retries while the mount is busy. A loop device detached a
    /// moment ago can still hold the file while its last opener (udev's blkid) lets go of it.
    pub unmount_patience: Duration,
}

impl Default for FileFrontendOptions {
    fn default() -> Self {
        Self {
            file_name: "volume".into(),
            threads: 16,
            fs_name: "tandem".into(),
            unmount_patience: Duration::from_secs(3),
        }
    }
}

/// The volume served as one regular file through FUSE.
pub struct FileFrontend {
    volume: Arc<AlignedVolume>,
    options: FileFrontendOptions,
}

impl std::fmt::Debug for FileFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileFrontend")
            .field("size", &self.volume.size())
            .field("block_size", &self.volume.block_size())
            .field("options", &self.options)
            .finish()
    }
}

impl FileFrontend {
    /// A frontend for `backend` with default options.
    pub fn new(backend: Arc<dyn BlockBackend>) -> Result<Self> {
        Self::with_options(backend, FileFrontendOptions::default())
    }

    /// A frontend for `backend`; checks the geometry and the options.
    pub fn with_options(backend: Arc<dyn BlockBackend>, options: FileFrontendOptions) -> Result<Self> {
        check_geometry(backend.as_ref()).map_err(FrontendError::Geometry)?;
        if !(2..=256).contains(&options.threads) {
            // One thread blocked in a slow flush would stall every read and write behind it.
            return Err(FrontendError::Options(format!("threads = {}, need 2..=256", options.threads)));
        }
        let name = &options.file_name;
        if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
            return Err(FrontendError::Options(format!("file_name {name:?} is not a plain file name")));
        }
        if options.fs_name.contains([',', '\0']) {
            return Err(FrontendError::Options(format!("fs_name {:?} contains ',' or NUL", options.fs_name)));
        }
        Ok(Self { volume: Arc::new(AlignedVolume::new(backend)), options })
    }

    /// Mount on `mountpoint` (an existing directory) and serve from background threads.
    /// Returns once the kernel has completed the FUSE handshake: the file is usable at once.
    pub fn mount(self, mountpoint: &Path) -> Result<Mounted> {
        let mount_err = |source| FrontendError::Mount { mountpoint: mountpoint.to_path_buf(), source };
        // fuser mounts the canonical path; unmount must name the same one.
        let mountpoint = mountpoint.canonicalize().map_err(mount_err)?;
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(self.options.fs_name.clone()),
            MountOption::Subtype("tandem".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
        ];
        config.n_threads = Some(self.options.threads);
        // One /dev/fuse fd per thread (FUSE_DEV_IOC_CLONE): requests are spread by the kernel.
        config.clone_fd = true;
        let fs = VolumeFs::new(self.volume, self.options.file_name.clone(), self.options.threads);
        let session = Session::new(fs, &mountpoint, &config).map_err(mount_err)?;
        let session = session.spawn().map_err(mount_err)?;
        let file = mountpoint.join(&self.options.file_name);
        Ok(Mounted { mountpoint, file, session: Some(session), patience: self.options.unmount_patience })
    }
}

/// Mount `backend` on `mountpoint` with default options (the file is `<mountpoint>/volume`).
pub fn mount(backend: Arc<dyn BlockBackend>, mountpoint: &Path) -> Result<Mounted> {
    FileFrontend::new(backend)?.mount(mountpoint)
}

/// A mounted volume file. Unmounts on drop (lazily, if still busy then).
#[derive(Debug)]
pub struct Mounted {
    mountpoint: PathBuf,
    file: PathBuf,
    /// `None` once unmounted.
    session: Option<BackgroundSession>,
    patience: Duration,
}

impl Mounted {
    /// The volume file, `<mountpoint>/<file_name>`: give this to [`crate::attach_loop`].
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The (canonical) mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmount and wait for the serving threads to finish. Idempotent.
    ///
    /// Fails with [`FrontendError::Busy`] (and stays mounted, so it can be retried) while the
    /// file is held open, typically by a loop device: detach that first.
    pub fn unmount(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else { return Ok(()) };
        let deadline = Instant::now() + self.patience;
        loop {
            match umount2(&self.mountpoint, MntFlags::empty()) {
                Ok(()) => break,
                Err(Errno::EBUSY) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(Errno::EBUSY) => {
                    self.session = Some(session);
                    return Err(FrontendError::Busy { mountpoint: self.mountpoint.clone() });
                }
                Err(err) => {
                    self.session = Some(session);
                    return Err(FrontendError::Unmount { mountpoint: self.mountpoint.clone(), source: err.into() });
                }
            }
        }
        // The kernel aborted the connection: every serving thread reads ENODEV and returns.
        session.join().map_err(|source| FrontendError::Session { mountpoint: self.mountpoint.clone(), source })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        match self.unmount() {
            Ok(()) => {}
            Err(FrontendError::Busy { .. }) => {
                // Last resort: detach from the tree now; the kernel ends the connection (and the
                // serving threads exit) when the last user of the file lets go.
                tracing::warn!(mountpoint = %self.mountpoint.display(), "volume file busy at drop; lazy unmount");
                if let Err(err) = umount2(&self.mountpoint, MntFlags::MNT_DETACH) {
                    tracing::warn!(%err, mountpoint = %self.mountpoint.display(), "lazy unmount failed");
                }
                // Dropping the session detaches its thread without waiting for it.
                self.session = None;
            }
            Err(err) => tracing::warn!(%err, "unmount at drop failed"),
        }
    }
}
