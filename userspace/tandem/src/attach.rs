//! Attach mode: replicating a block device an application writes directly (an LV, a disk, a
//! loop device), without Tandem in front of it. See docs/attach.md.
//!
//! - The BPF programs record every write queued to the device into the kernel map (the
//!   volume's record, `kernel_record`). The map is marked when a write is *queued*, before the
//!   device writes it: that mark is what keeps invariant 2 (every track that may differ is
//!   recorded before the local write).
//! - The node is the regular replication state machine, as primary (`Node::start_attached`),
//!   so handshakes, generations, resyncs and verify work unchanged. Its local I/O goes to
//!   [`DeviceIo`]: reads with `O_DIRECT` (the application's writes bypass the device's page
//!   cache, which would serve stale pages), hardens as `fdatasync`, and no writes at all: the
//!   device is opened read-only, so nothing here can write under the application.
//! - The shipping loop ([`Shipper`], a thread of its own, so the node never waits)
//!   cycles each range of the kernel map: toggle, wait for the writes queued before the toggle
//!   to complete, read each old track from the device, hand it to the node as a write already
//!   on the device (`Event::HostWritten`: sent to the peers and recorded, never written
//!   back), wait until each is acknowledged per the replication mode, mark again any track the
//!   node still has to resync to a peer, clear old. It repeats forever: the secondary follows
//!   the device within a cycle or two.
//! - `tandem snapshot-point` freezes the filesystem on the device, cycles until the kernel
//!   map is clean and every peer is connected and in sync, flushes (the peers harden), and
//!   always thaws. The secondary is crash-consistent only at those points.

use crate::config::Config;
use crate::control::{AttachView, Reply};
use crate::daemon::{reply_to, Daemon, Edges, HostOp, Input};
use crate::inbox::Inbox;
use crate::kernel_record::{KernelRecord, KernelRecordError, RecordSpec, TrackSet};
use crate::runtime::{Links, NodeSink};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_core::node::{Action, HostError, IoError, Node};
use tandem_core::wire::Message;
use tandem_core::{ConnState, Geometry, NodeId};
use tandem_net::{Net, NetConfig};
use tandem_store::MetaFile;

/// Track reads handed to the node at once by the shipping loop.
const SHIP_WINDOW: usize = 16;
/// A range whose tracks are all still owed to an absent peer waits this long between cycles.
const OWED_BACKOFF: Duration = Duration::from_secs(1);
/// How long the shipping loop waits for the writes queued before a toggle.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The shipping loop's pause when nothing is dirty or no peer takes writes.
const IDLE_POLL: Duration = Duration::from_millis(25);

/// `FIFREEZE` / `FITHAW` (`_IOWR('X', 119/120, int)`), what `fsfreeze(8)` calls.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Opens the attached device for the daemon's reads: read-only (attach mode never writes
/// it) and `O_DIRECT` (the page cache of the device node is not coherent with the writes of
/// a filesystem mounted on it). Refuses, naming the configuration, a device that does not
/// exist, is not a block device or is smaller than the volume.
pub fn open_device(config: &Config) -> Result<File> {
    let path = config.attach.as_deref().ok_or_else(|| anyhow!("{}: no `attach` device", config.file.display()))?;
    let field = |why: String| anyhow!("{}: node.attach: {}: {why}", config.file.display(), path.display());
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => field("no such device".into()),
        _ => field(format!("cannot stat it: {e}")),
    })?;
    if !meta.file_type().is_block_device() {
        return Err(field(
            "not a block device (attach mode replicates a disk, a partition, an LV or a loop device; use `data` for \
             a file)"
                .into(),
        ));
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| field(format!("cannot open it: {e}")))?;
    let size = file.seek(SeekFrom::End(0)).map_err(|e| field(format!("cannot size it: {e}")))?;
    let volume = config.geometry.volume_size();
    if size < volume {
        return Err(field(format!("{size} bytes, smaller than the volume's {volume} (volume.size)")));
    }
    Ok(file)
}

/// A buffer aligned for `O_DIRECT`.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len.max(4096).next_multiple_of(4096), 4096).expect("layout");
        // SAFETY: a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Aligned { ptr, layout }
    }

    fn bytes(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.layout.size());
        // SAFETY: `len` bytes owned by self, borrowed through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Reads `len` bytes at `offset` with `O_DIRECT` (offset and length are multiples of the
/// volume's block size, which the device's logical block size divides).
fn read_direct(file: &File, offset: u64, len: u64) -> std::io::Result<Bytes> {
    let len = usize::try_from(len).map_err(|_| std::io::Error::other("read too large"))?;
    let mut buf = Aligned::new(len);
    let aligned = len.next_multiple_of(4096).min(buf.layout.size());
    // Read whole 4 KiB blocks (a 512-byte tail block is then read with its neighbours).
    let n = file.read_at(buf.bytes(aligned), offset)?;
    if n < len {
        // read_at on a block device returns short only at its end.
        let mut filled = n;
        while filled < len {
            let more = file.read_at(&mut buf.bytes(aligned)[filled..], offset + filled as u64)?;
            if more == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the device's end"));
            }
            filled += more;
        }
    }
    Ok(Bytes::copy_from_slice(&buf.bytes(len)[..len]))
}

/// The node's local I/O in attach mode, on a thread of its own: reads and hardens of the
/// attached device, metadata writes. A write is refused: the core never asks for one in
/// attach mode, and the device is open read-only anyway.
struct DeviceIo {
    jobs: Sender<Action>,
}

impl DeviceIo {
    fn start(device: Arc<File>, mut meta: MetaFile, inbox: Inbox) -> Result<DeviceIo> {
        let (jobs, rx) = channel::<Action>();
        std::thread::Builder::new().name("attach-io".into()).spawn(move || {
            for action in rx {
                let (io, result) = match action {
                    Action::ReadLocal { io, offset, len } => {
                        (io, read_direct(&device, offset, len).map(Some).map_err(|e| IoError(e.to_string())))
                    }
                    // fdatasync of a block device: write back, then flush the device's cache.
                    Action::Harden { io, .. } => {
                        (io, device.sync_data().map(|()| None).map_err(|e| IoError(e.to_string())))
                    }
                    Action::PersistMeta { io, meta: m } => {
                        (io, meta.write(&m).map(|()| None).map_err(|e| IoError(e.to_string())))
                    }
                    Action::WriteLocal { io, offset, .. } => (
                        io,
                        Err(IoError(format!(
                            "attach mode never writes the attached device (a write at {offset} was asked for)"
                        ))),
                    ),
                    _ => continue,
                };
                if inbox.send(Input::IoDone { io, result }).is_err() {
                    break;
                }
            }
        })?;
        Ok(DeviceIo { jobs })
    }
}

/// A `snapshot-point` request on its way to the shipping loop.
pub struct SnapshotRequest {
    pub mountpoint: Option<PathBuf>,
    pub timeout: Duration,
    pub exec: Option<String>,
    pub reply: Sender<Reply>,
}

/// The edges of an attached node: [`DeviceIo`] for local I/O, the links for messages.
struct AttachEdges {
    io: DeviceIo,
    links: Links,
    inbox: Inbox,
    device: String,
    view: Arc<Mutex<AttachView>>,
    snapshots: Sender<SnapshotRequest>,
}

impl Edges for AttachEdges {
    fn submit_io(&mut self, action: Action) {
        let Some(io) = action.local_io() else { return };
        if self.io.jobs.send(action).is_err() {
            let _ = self.inbox.send(Input::IoDone { io, result: Err(IoError("the I/O thread stopped".into())) });
        }
    }

    fn send(&mut self, peer: NodeId, msg: Message) {
        self.links.send(peer, msg);
    }

    fn disconnect(&mut self, peer: NodeId, stand_alone: bool) {
        self.links.disconnect(peer, stand_alone);
    }

    fn reconnect(&mut self, peer: NodeId) {
        self.links.reconnect(peer);
    }

    fn device(&self) -> Option<String> {
        Some(self.device.clone())
    }

    fn attach_view(&self) -> Option<AttachView> {
        Some(self.view.lock().expect("attach view").clone())
    }

    fn snapshot_point(
        &mut self,
        mountpoint: Option<PathBuf>,
        timeout: Duration,
        exec: Option<String>,
        reply: Sender<Reply>,
    ) {
        if let Err(e) = self.snapshots.send(SnapshotRequest { mountpoint, timeout, exec, reply }) {
            let _ = e.0.reply.send(Reply::Error { message: "the shipping loop stopped".into() });
        }
    }
}

/// What the shipping loop learns from the node, while driving it.
struct NodeLook {
    /// Peers that take replicated writes now.
    replicating: usize,
    /// Every peer is connected and in sync (no resync running, none absent).
    all_in_sync: bool,
    /// Why not, for the operator.
    peers: String,
}

fn look(node: &Node) -> NodeLook {
    let s = node.status();
    let replicating = s.peers.iter().filter(|p| matches!(p.conn, ConnState::Connected | ConnState::SyncSource)).count();
    let all_in_sync = !s.peers.is_empty() && s.peers.iter().all(|p| p.conn == ConnState::Connected);
    let peers = s.peers.iter().map(|p| format!("peer {} {}", p.peer, p.conn)).collect::<Vec<_>>().join(", ");
    NodeLook { replicating, all_in_sync, peers }
}

/// Tracks the node still has to bring to a peer some other way than by a write in flight:
/// written while a peer was absent (`out_of_sync`) or in a resync not yet confirmed. They
/// stay in the kernel map when their old side is cleared. (Tracks merely recorded for a
/// connected peer until its next destage scan are not among them: the peer has them.)
fn still_owed(node: &Node, into: &mut TrackSet) {
    into.clear();
    for t in node.meta().out_of_sync.iter_ones() {
        into.insert(t as u64);
    }
    for &peer in &node.config().peers {
        for t in node.resync_unconfirmed(peer) {
            into.insert(t);
        }
    }
}

/// The shipping loop: see the module's documentation.
struct Shipper {
    record: KernelRecord,
    device: Arc<File>,
    inbox: Inbox,
    geometry: Geometry,
    view: Arc<Mutex<AttachView>>,
    snapshots: Receiver<SnapshotRequest>,
    next_range: u32,
    /// Ranges whose last cycle cleared nothing (every track is still owed to an absent
    /// peer) are not cycled again before this: shipping them again would only repeat itself.
    not_before: Vec<Option<Instant>>,
}

impl Shipper {
    /// Runs `f` on the node and returns its answer (None once the node is gone).
    fn ask<T: Send + 'static>(&self, f: impl FnOnce(&Node) -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = channel();
        self.inbox
            .send(Input::Inspect(Box::new(move |node| {
                let _ = tx.send(f(node));
            })))
            .ok()?;
        rx.recv().ok()
    }

    /// What `tandem status` shows; `dirty`: the kernel map's count, when known.
    fn set_state(&self, state: &str, dirty: Option<u64>) {
        let mut v = self.view.lock().expect("attach view");
        if v.state != state {
            // Under a write load it flips between shipping and current every cycle.
            tracing::debug!(state, "shipping");
            v.state = state.to_owned();
        }
        if let Some(d) = dirty {
            v.dirty_tracks = d;
        }
    }

    fn run(mut self) {
        // Idle (nothing dirty, or no peer): wait a little for a snapshot-point request.
        let mut wait = Duration::ZERO;
        loop {
            match self.snapshots.recv_timeout(wait) {
                Ok(request) => {
                    let answer = match self.snapshot_point(request.mountpoint, request.timeout, request.exec) {
                        Ok(message) => Reply::SnapshotPoint { message },
                        Err(e) => Reply::Error { message: format!("{e:#}") },
                    };
                    self.view.lock().expect("attach view").last_snapshot_point = Some(match &answer {
                        Reply::SnapshotPoint { message } => message.clone(),
                        Reply::Error { message } => format!("failed: {message}"),
                        _ => unreachable!(),
                    });
                    let _ = request.reply.send(answer);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            let Some(node) = self.ask(look) else { return };
            if node.replicating == 0 {
                // The kernel map keeps everything meanwhile; the handshake's resync and
                // then this loop ship it once a peer is back.
                let dirty = self.record.volume().dirty_count();
                self.set_state(&format!("waiting for a peer ({})", node.peers), Some(dirty));
                wait = IDLE_POLL * 4;
                continue;
            }
            wait = Duration::ZERO;
            match self.next_dirty_range() {
                Ok(Some(range)) => {
                    self.set_state("shipping", None);
                    if let Err(e) = self.cycle(range, Instant::now() + DRAIN_TIMEOUT) {
                        tracing::warn!(range, error = %format!("{e:#}"), "shipping cycle failed; the tracks stay recorded");
                        self.set_state(&format!("retrying after an error: {e:#}"), None);
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                Ok(None) => {
                    // No range to cycle now: nothing is dirty, unless ranges wait in their
                    // backoff with tracks owed to an absent peer.
                    let now = Instant::now();
                    let dirty = if self.not_before.iter().any(|b| b.is_some_and(|at| now < at)) {
                        self.record.volume().dirty_count()
                    } else {
                        0
                    };
                    let state = match (dirty, node.all_in_sync) {
                        (0, true) => "current".to_owned(),
                        (0, false) => format!("resyncing ({})", node.peers),
                        (_, _) => format!("tracks owed to an absent peer ({})", node.peers),
                    };
                    self.set_state(&state, Some(dirty));
                    wait = IDLE_POLL;
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "reading the kernel map");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// The next range (round robin) whose kernel map holds a track.
    fn next_dirty_range(&mut self) -> Result<Option<u32>> {
        let n = self.record.range_count();
        let now = Instant::now();
        for i in 0..n {
            let range = (self.next_range + i) % n;
            if self.not_before[range as usize].is_some_and(|at| now < at) {
                continue;
            }
            let t = self.record.volume().range_tracks(range).with_context(|| format!("reading range {range}"))?;
            if !t.current.is_empty() || !t.old.is_empty() {
                self.next_range = (range + 1) % n;
                return Ok(Some(range));
            }
        }
        Ok(None)
    }

    /// One shipping cycle of `range`.
    fn cycle(&mut self, range: u32, deadline: Instant) -> Result<u64> {
        self.record.begin(range).with_context(|| format!("toggling range {range}"))?;
        let old = loop {
            match self.record.poll_drained(range) {
                Ok(Some(old)) => break old,
                Ok(None) => {}
                Err(e) => {
                    self.abandon(range);
                    return Err(e).context(format!("draining range {range}"));
                }
            }
            if Instant::now() >= deadline {
                self.abandon(range);
                bail!("the writes queued to range {range} before its toggle did not complete in time");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if let Err(e) = self.ship(&old) {
            self.abandon(range);
            return Err(e);
        }
        let tracks = self.geometry.track_count();
        let owed = self
            .ask(move |node| {
                let mut owed = TrackSet::new(tracks);
                still_owed(node, &mut owed);
                owed
            })
            .ok_or_else(|| anyhow!("the node stopped"))?;
        let mut shipped = TrackSet::new(tracks);
        for &t in &old {
            shipped.insert(t);
        }
        // `finish` reads the old side again: a track found there now that was not shipped
        // is kept, whatever put it there.
        let done = self
            .record
            .finish(range, |t| owed.contains(t) || !shipped.contains(t))
            .with_context(|| format!("clearing range {range}"))?;
        self.not_before[range as usize] = (done.cleared == 0).then(|| Instant::now() + OWED_BACKOFF);
        let mut v = self.view.lock().expect("attach view");
        v.shipped_tracks += old.len() as u64;
        v.cycles += 1;
        v.dirty_tracks = self.record.volume().dirty_count();
        tracing::debug!(range, shipped = old.len(), kept = done.kept, "shipped");
        Ok(old.len() as u64)
    }

    /// A cycle that cannot finish: its old side stays marked (the next toggle of the range
    /// carries it over), so nothing is forgotten.
    fn abandon(&mut self, range: u32) {
        // `finish` is the only way back to idle; without it, the range stays in its cycle.
        // Wait for the drain (bounded) and finish keeping every old track.
        let start = Instant::now();
        while start.elapsed() < DRAIN_TIMEOUT {
            match self.record.poll_drained(range) {
                Ok(Some(_)) => {
                    if let Err(e) = self.record.finish(range, |_| true) {
                        tracing::warn!(range, error = %e, "keeping the tracks of an abandoned cycle");
                    }
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => {
                    tracing::warn!(range, error = %e, "abandoning a cycle");
                    return;
                }
            }
        }
    }

    /// Reads each track from the device and hands it to the node as a write already on the
    /// device; returns once every one is acknowledged per the replication mode.
    fn ship(&self, tracks: &[u64]) -> Result<()> {
        let mut pending: std::collections::VecDeque<(u64, Receiver<Result<(), HostError>>)> = Default::default();
        let wait = |(track, rx): (u64, Receiver<Result<(), HostError>>)| -> Result<()> {
            match rx.recv() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow!("track {track}: the node refused it: {e}")),
                Err(_) => Err(anyhow!("track {track}: the node stopped before answering")),
            }
        };
        for &track in tracks {
            if pending.len() >= SHIP_WINDOW {
                wait(pending.pop_front().expect("pending"))?;
            }
            let extent = self.geometry.track_extent(track).context("a recorded track beyond the volume")?;
            let data = read_direct(&self.device, extent.offset, extent.len)
                .with_context(|| format!("reading track {track} of the attached device"))?;
            let (tx, rx) = channel();
            self.inbox
                .send(Input::Host { op: HostOp::Written { offset: extent.offset, data }, reply: reply_to(tx) })
                .map_err(|_| anyhow!("the node stopped"))?;
            pending.push_back((track, rx));
        }
        while let Some(p) = pending.pop_front() {
            wait(p)?;
        }
        Ok(())
    }

    /// `tandem snapshot-point`: freeze, ship everything, flush, thaw (always).
    fn snapshot_point(
        &mut self,
        mountpoint: Option<PathBuf>,
        timeout: Duration,
        exec: Option<String>,
    ) -> Result<String> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mountpoint = match mountpoint {
            Some(m) => m,
            None => self.find_mountpoint()?,
        };
        let node = self.ask(look).ok_or_else(|| anyhow!("the node stopped"))?;
        if node.replicating == 0 {
            bail!("no peer takes writes now ({}): nothing was frozen", node.peers);
        }
        self.set_state("snapshot point: freezing", None);
        let frozen = Frozen::freeze(&mountpoint)?;
        let shipped = self.ship_everything(deadline).and_then(|tracks| match &exec {
            Some(command) => run_at_snapshot_point(command, &mountpoint, deadline).map(|out| (tracks, Some(out))),
            None => Ok((tracks, None)),
        });
        let thawed = frozen.thaw();
        let elapsed = start.elapsed();
        match (shipped, thawed) {
            (Ok((tracks, ran)), Ok(())) => Ok(format!(
                "snapshot point: {} frozen, {tracks} tracks shipped, every peer has everything and hardened it{}; \
                 thawed after {elapsed:.2?}",
                mountpoint.display(),
                ran.map(|out| format!(", `{}` ran{out}", exec.as_deref().unwrap_or_default())).unwrap_or_default()
            )),
            (Err(e), Ok(())) => Err(e.context(format!("no snapshot point; {} was thawed", mountpoint.display()))),
            (Ok(_), Err(t)) => Err(t.context("the peers have a snapshot point, but THAWING FAILED")),
            (Err(e), Err(t)) => Err(anyhow!("no snapshot point ({e:#}), and THAWING FAILED: {t:#}")),
        }
    }

    /// Cycles every dirty range until the kernel map is clean, every peer is connected and in
    /// sync and all is acknowledged; then flushes, so that the peers harden it.
    fn ship_everything(&mut self, deadline: Instant) -> Result<u64> {
        self.set_state("snapshot point: shipping", None);
        let mut shipped = 0;
        loop {
            if let Some(range) = self.next_dirty_range()? {
                shipped += self.cycle(range, deadline)?;
            } else {
                let node = self.ask(look).ok_or_else(|| anyhow!("the node stopped"))?;
                if node.all_in_sync && self.record.volume().dirty_count() == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("timed out: {} tracks still to ship, {}", self.record.volume().dirty_count(), node.peers);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if Instant::now() >= deadline {
                bail!("timed out: {} tracks still to ship", self.record.volume().dirty_count());
            }
        }
        let (tx, rx) = channel();
        self.inbox
            .send(Input::Host { op: HostOp::Flush, reply: reply_to(tx) })
            .map_err(|_| anyhow!("the node stopped"))?;
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("the flush failed: {e}"),
            Err(_) => bail!("timed out waiting for the peers to harden"),
        }
        // A flush writes nothing: the map must still be clean (else a write slipped past the
        // freeze, e.g. to a second filesystem or a raw writer on the same device).
        let left = self.record.volume().dirty_count();
        if left > 0 {
            bail!("{left} tracks were written during the freeze (another writer on the device?)");
        }
        Ok(shipped)
    }

    /// The mount point of the filesystem on the attached device, from /proc/self/mountinfo.
    fn find_mountpoint(&self) -> Result<PathBuf> {
        let device = self.device.metadata().context("stat of the attached device")?;
        let (major, minor) = (libc::major(device.rdev()), libc::minor(device.rdev()));
        let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
        mountpoint_of(&info, major, minor)
            .ok_or_else(|| anyhow!("no filesystem on device {major}:{minor} is mounted here: give --mountpoint"))
    }
}

/// `--exec`: runs `command` with `sh -c` while the filesystem is frozen and the peers hold
/// it, killing it at the deadline. Returns its output (for the reply), or why it failed.
fn run_at_snapshot_point(command: &str, mountpoint: &Path, deadline: Instant) -> Result<String> {
    use std::process::{Command, Stdio};
    let child = Command::new("sh")
        .args(["-c", command])
        .env("TANDEM_MOUNTPOINT", mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{command}`"))?;
    let pid = child.id();
    // Its output is read while it runs (a full pipe would stall it).
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(out) => out.context("waiting for --exec")?,
        Err(_) => {
            // SAFETY: kill takes no pointers; the child is not reaped before the waiting
            // thread sees it exit, so the pid is still ours.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            bail!("`{command}` did not finish in time: killed");
        }
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let text = text.trim();
    if !out.status.success() {
        bail!("`{command}` failed ({}): {text}", out.status);
    }
    Ok(if text.is_empty() { String::new() } else { format!(": {text}") })
}

/// The first mount point of device `major:minor` in a mountinfo text (octal escapes undone).
fn mountpoint_of(mountinfo: &str, major: u32, minor: u32) -> Option<PathBuf> {
    let want = format!("{major}:{minor}");
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let dev = fields.nth(2)?;
        let _root = fields.next()?;
        let point = fields.next()?;
        (dev == want).then(|| PathBuf::from(unescape(point)))
    })
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A frozen filesystem; thawed by [`Frozen::thaw`], or when dropped (a panic, an early
/// return): never left frozen by this process.
struct Frozen {
    dir: Option<File>,
    path: PathBuf,
}

impl Frozen {
    fn freeze(path: &Path) -> Result<Frozen> {
        let dir = File::open(path).with_context(|| format!("opening the mount point {}", path.display()))?;
        // SAFETY: a valid fd; FIFREEZE takes no argument.
        if unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            bail!("freezing {}: {e}", path.display());
        }
        tracing::info!(mountpoint = %path.display(), "frozen");
        Ok(Frozen { dir: Some(dir), path: path.to_owned() })
    }

    fn thaw(mut self) -> Result<()> {
        self.thaw_now()
    }

    fn thaw_now(&mut self) -> Result<()> {
        let Some(dir) = self.dir.take() else { return Ok(()) };
        // SAFETY: a valid fd; FITHAW takes no argument.
        if unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW as _, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            tracing::error!(mountpoint = %self.path.display(), error = %e, "THAWING FAILED: run `fsfreeze --unfreeze`");
            bail!("thawing {}: {e} (run `fsfreeze --unfreeze {}`)", self.path.display(), self.path.display());
        }
        tracing::info!(mountpoint = %self.path.display(), "thawed");
        Ok(())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = self.thaw_now();
    }
}

/// The kernel record of the attached device. The one a previous daemon left pinned is taken
/// over when its programs are still attached and record this very device with this geometry:
/// they kept recording while no daemon ran, so it holds every track written since. Otherwise
/// (first start, after a reboot, another device or geometry) a fresh one, with every track
/// marked: what was written while nothing recorded is unknown. That is also the first full
/// copy to a new secondary.
fn kernel_record(config: &Config, generation: u64) -> Result<KernelRecord> {
    let pin = &config.record_pin;
    let dir = tandem_bpf::pin_dir(pin).context("the kernel record's pin name")?;
    if dir.is_dir() {
        match KernelRecord::take_over(pin) {
            Ok(record) => match records_this_device(&record, config) {
                Ok(()) => {
                    let dirty = record.volume().dirty_count();
                    tracing::info!(pin = %dir.display(), dirty, "took over the pinned kernel record: it kept recording");
                    return Ok(record);
                }
                Err(why) => tracing::warn!(pin = %dir.display(), %why, "the pinned kernel record does not fit"),
            },
            // A live daemon holds it: never taken from under it.
            Err(e @ KernelRecordError::InUse { .. }) => return Err(e.into()),
            Err(e) => tracing::warn!(pin = %dir.display(), error = %e, "cannot take over the pinned kernel record"),
        }
    }
    if let Some(previous) = crate::kernel_record::recover_pinned(pin, &config.geometry)
        .context("looking for a kernel record a previous daemon left pinned")?
    {
        previous.unpin().context("removing the previous kernel record")?;
    }
    let spec = RecordSpec { pin: pin.clone(), device: config.data.clone(), geometry: config.geometry, generation };
    let record = KernelRecord::load(&spec).with_context(|| {
        format!("attach mode needs the BPF write recording of {} (it is how writes are found)", config.data.display())
    })?;
    record.volume().mark_all();
    tracing::info!(pin = %dir.display(), "a new kernel record: every track will be shipped");
    Ok(record)
}

/// Why a pinned record cannot stand for the attached device, if it cannot.
fn records_this_device(record: &KernelRecord, config: &Config) -> Result<(), String> {
    let v = record.volume();
    if !v.is_attached() {
        return Err("its programs are detached: writes since then were not recorded".into());
    }
    let device = tandem_bpf::DeviceInfo::resolve(&tandem_bpf::DeviceRef::Path(config.data.clone()))
        .map_err(|e| e.to_string())?;
    // The device number alone is not enough: a number freed while no daemon ran may now
    // name another disk (its diskseq differs), whose writes the programs would not cover.
    if let Some(why) = v.device_mismatch(&device) {
        return Err(why);
    }
    let (p, g) = (v.params(), &config.geometry);
    let checks = [
        ("tracks", p.tracks, g.track_count()),
        ("track size", 1u64 << p.track_shift, u64::from(g.track_size())),
        ("tracks per range", u64::from(p.tracks_per_range), u64::from(g.tracks_per_range())),
    ];
    match checks.into_iter().find(|(_, pinned, ours)| pinned != ours) {
        Some((what, pinned, ours)) => Err(format!("it records {what} {pinned}, the configuration says {ours}")),
        None => Ok(()),
    }
}

/// `tandem create-md` for an attached volume: the device must exist; nothing is created.
pub fn check_for_create_md(config: &Config) -> Result<()> {
    open_device(config).map(|_| ())
}

/// `tandem daemon` in attach mode: runs until the node ends.
pub fn run_daemon(config: Config) -> Result<()> {
    let device = Arc::new(open_device(&config)?);
    let device_path = config.data.display().to_string();
    tracing::info!(config = %config.file.display(), volume = %config.volume, node = config.node, device = %device_path, "starting in attach mode");
    if config.peers.is_empty() {
        tracing::warn!("no [[peer]] configured: this volume is not replicated");
    }
    let (meta_file, meta) =
        MetaFile::open(&config.meta).context("opening the metadata (run `tandem create-md` first?)")?;
    meta_file.expect(u128::from(config.volume_id), config.node, &config.geometry)?;

    let record = kernel_record(&config, meta.generations.current)?;

    let inbox = Inbox::new();
    let io = DeviceIo::start(device.clone(), meta_file, inbox.clone())?;
    let mut net_config =
        NetConfig::new(config.node, config.volume_id, config.secret.clone(), config.listen, config.peers.clone());
    net_config.keepalive = config.keepalive;
    net_config.timeout = config.timeout;
    let net = Net::start(net_config, NodeSink(inbox.clone()))?;

    let view = Arc::new(Mutex::new(AttachView {
        device: device_path.clone(),
        pin_dir: record.pin_dir().display().to_string(),
        flavor: record.flavor().map(|f| f.to_string()),
        state: "starting".into(),
        dirty_tracks: record.volume().dirty_count(),
        shipped_tracks: 0,
        cycles: 0,
        last_snapshot_point: None,
    }));
    let (snapshots_tx, snapshots_rx) = channel();
    let edges = AttachEdges {
        io,
        links: Links::new(net, inbox.clone()),
        inbox: inbox.clone(),
        device: device_path,
        view: view.clone(),
        snapshots: snapshots_tx,
    };
    let primary = Arc::new(AtomicBool::new(false));
    let daemon = Daemon::new(config.clone(), meta, edges, primary)?;
    let node_thread = inbox.start(Box::new(daemon))?;
    let shipper = Shipper {
        record,
        device,
        inbox: inbox.clone(),
        geometry: config.geometry,
        view,
        snapshots: snapshots_rx,
        next_range: 0,
        not_before: vec![None; config.geometry.range_count() as usize],
    };
    std::thread::Builder::new().name("attach-ship".into()).spawn(move || shipper.run())?;
    let control = crate::control::serve(&config.control, inbox)?;
    // The kernel record stays pinned, also after `tandem down`: the programs go on recording
    // the application's writes, and the next start ships just those (docs/attach.md).
    let result = node_thread.join().unwrap_or_else(|_| Err(anyhow!("the node's home thread panicked")));
    control.finish(Duration::from_secs(5));
    let _ = std::fs::remove_file(&config.control);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_found_by_device_number() {
        let info = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    97 30 7:3 / /mnt/with\\040space rw,relatime shared:50 - ext4 /dev/loop3 rw\n\
                    98 30 7:3 / /srv/bind rw,relatime - ext4 /dev/loop3 rw\n";
        assert_eq!(mountpoint_of(info, 7, 3), Some(PathBuf::from("/mnt/with space")));
        assert_eq!(mountpoint_of(info, 7, 4), None);
        assert_eq!(mountpoint_of(info, 0, 21), Some(PathBuf::from("/proc")));
    }
}
