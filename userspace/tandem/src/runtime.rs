//! Starting a node for real: metadata, store, links, the file frontend and the control
//! socket around the daemon's loop; and tearing them down in the right order.

use crate::config::Config;
use crate::daemon::{Daemon, Edges, HostOp, Input};
use crate::inbox::Inbox;
use crate::kernel_frontend::{self, Plan, Selected, Serving};
use crate::kernel_record::{self, Clearing, KernelRecord, Record, RecordChoice, RecordSpec};
use anyhow::{Context, Result};
use bytes::Bytes;
use std::collections::HashSet;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use tandem_core::node::{Action, HostError, IoError};
use tandem_core::wire::Message;
use tandem_core::NodeId;
use tandem_frontend::{BackendError, BlockBackend, Change, Done, LoopOptions, UblkBackend};
use tandem_net::{Net, NetConfig, NetEvent};
use tandem_store::{create_md, Completion, MetaFile, MetaHeader, Store};

fn header(config: &Config) -> MetaHeader {
    MetaHeader::new(u128::from(config.volume_id), config.node, config.geometry)
}

/// `tandem create-md`: the metadata file, and a sparse backing file if there is none.
pub fn create_metadata(config: &Config, force: bool) -> Result<()> {
    if config.attach.is_some() {
        // The attached device holds the application's data: it must exist, and nothing is
        // created or written on it.
        crate::attach::check_for_create_md(config)?;
    } else if !config.data.exists() {
        let f = std::fs::File::create_new(&config.data)
            .with_context(|| format!("creating the backing file {}", config.data.display()))?;
        f.set_len(config.geometry.volume_size())?;
        println!("created {} ({} bytes, sparse)", config.data.display(), config.geometry.volume_size());
    }
    create_md(&config.meta, &header(config), force)?;
    println!("initialised metadata {} for volume {} node {}", config.meta.display(), config.volume, config.node);
    Ok(())
}

/// The frontend's view for `status`, filled in once it is up, and whether it serves.
type SharedFrontend = Arc<Mutex<Option<(crate::control::FrontendView, Arc<AtomicBool>)>>>;

/// The links' half of a node's edges (the file/ublk runtime's and attach mode's).
pub struct Links {
    net: Arc<Net>,
    /// A flush of the messages queued on `net` is waiting in the inbox.
    flush_queued: Arc<AtomicBool>,
    /// Peers whose link is being dropped (off the node, see `disconnect`): nothing more is
    /// sent to them on it.
    cutting: Arc<Mutex<HashSet<NodeId>>>,
    inbox: Inbox,
}

impl Links {
    pub fn new(net: Net, inbox: Inbox) -> Links {
        Links {
            net: Arc::new(net),
            flush_queued: Arc::new(AtomicBool::new(false)),
            cutting: Arc::new(Mutex::new(HashSet::new())),
            inbox,
        }
    }

    /// Queues the message and, once per turn of the node, a flush behind the inputs already
    /// waiting: the messages of a burst of inputs leave together, in one system call per
    /// link, and a lone message leaves as soon as the turn that made it is over.
    pub fn send(&mut self, peer: NodeId, msg: Message) {
        if self.cutting.lock().expect("cutting lock").contains(&peer) {
            tracing::trace!(peer, "not sending {}: the link is being dropped", msg.name());
            return;
        }
        self.net.queue(peer, msg);
        if !self.flush_queued.swap(true, Ordering::Relaxed) {
            let (net, flush_queued) = (self.net.clone(), self.flush_queued.clone());
            let flush = Input::Run(Box::new(move || {
                flush_queued.store(false, Ordering::Relaxed);
                net.flush();
            }));
            if self.inbox.send(flush).is_err() {
                self.net.flush();
            }
        }
    }

    /// Drops the link with `peer`, off the node: `Net::disconnect` waits for the link's
    /// reader to deliver its `Lost`, and that reader may be the very thread driving the node.
    pub fn disconnect(&mut self, peer: NodeId, stand_alone: bool) {
        // What the node sent before deciding to drop the link goes first.
        self.net.flush();
        self.cutting.lock().expect("cutting lock").insert(peer);
        let (net, cutting) = (self.net.clone(), self.cutting.clone());
        self.inbox.off_node(Box::new(move || {
            net.disconnect(peer, stand_alone);
            cutting.lock().expect("cutting lock").remove(&peer);
        }));
    }

    /// Off the node too, so that it follows a `disconnect` decided before it.
    pub fn reconnect(&mut self, peer: NodeId) {
        let net = self.net.clone();
        self.inbox.off_node(Box::new(move || net.reconnect(peer)));
    }
}

/// The network's events as the node's inputs. `Connected` and `Lost` come under the network's
/// lock, which the node's sends take: they are posted to the home thread. A link's messages are
/// queued as they are read and run in one turn once the reader has no more buffered, so that
/// a burst costs one turn and its acknowledgements leave in one send.
pub struct NodeSink(pub Inbox);

impl tandem_net::EventSink for NodeSink {
    fn event(&self, event: NetEvent) {
        let _ = match event {
            NetEvent::Connected { peer } => self.0.post(Input::Connected(peer)),
            NetEvent::Lost { peer, reason } => self.0.post(Input::Lost(peer, reason)),
            NetEvent::Message { peer, msg } => self.0.queue(Input::Message(peer, msg)),
            NetEvent::Refused { .. } => Ok(()), // logged by the net crate
        };
    }

    fn drained(&self, _peer: NodeId) {
        self.0.drive();
    }
}

/// The edges of a running node.
struct RealEdges {
    store: Arc<Store>,
    links: Links,
    /// Known once the frontend is up, which needs the daemon's loop running already.
    device: Arc<Mutex<Option<String>>>,
    /// The frontend under the user-facing device, and whether it serves (ublk: false while a
    /// re-attach waits for the node to be primary).
    frontend: SharedFrontend,
    inbox: Inbox,
}

impl Edges for RealEdges {
    fn submit_io(&mut self, action: Action) {
        let Some(io) = action.local_io() else { return };
        if let Err(e) = self.store.submit_action(action) {
            // A refused op never completes by itself: the node must still hear of it.
            let _ = self.inbox.send(Input::IoDone { io, result: Err(IoError(e.to_string())) });
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
        self.device.lock().expect("device lock").clone()
    }

    fn frontend(&self) -> Option<crate::control::FrontendView> {
        let guard = self.frontend.lock().expect("frontend lock");
        let (view, live) = guard.as_ref()?;
        let mut view = view.clone();
        if !live.load(Ordering::Acquire) {
            view.notes.push(
                "re-attach pending: this node died as primary; the kernel holds the device's I/O until `tandem primary`"
                    .into(),
            );
        }
        Some(view)
    }
}

/// The block device's backend: writes go through the node (replicated), reads come from
/// the local store, and only on the primary.
struct VolumeBackend {
    inbox: Inbox,
    store: Arc<Store>,
    primary: Arc<AtomicBool>,
    size: u64,
    block_size: u32,
}

impl VolumeBackend {
    /// Hands `op` to the node; `reply` gets the answer, from whichever thread drives it.
    fn start(&self, op: HostOp, reply: impl FnOnce(Result<(), BackendError>) + Send + 'static) {
        let reply = Box::new(move |result: Result<(), HostError>| reply(result.map_err(backend_error)));
        // Refused once the daemon stops: the reply is dropped with the input, which its
        // waiter sees (a ublk request fails with EIO, `host` says the daemon stopped).
        let _ = self.inbox.send(Input::Host { op, reply });
    }

    fn host(&self, op: HostOp) -> Result<(), BackendError> {
        let (tx, rx) = channel();
        self.start(op, move |result| {
            let _ = tx.send(result);
        });
        rx.recv().unwrap_or_else(|_| Err(BackendError::io("the daemon stopped before answering")))
    }

    fn check_readable(&self) -> Result<(), BackendError> {
        if !self.primary.load(Ordering::Acquire) {
            return Err(BackendError::io("this node is secondary: its replica is not readable yet"));
        }
        Ok(())
    }
}

fn backend_error(e: HostError) -> BackendError {
    match e {
        HostError::NotPrimary => BackendError::read_only("this node is secondary"),
        HostError::Geometry(e) => BackendError::invalid(e.to_string()),
        e => BackendError::io(e.to_string()),
    }
}

impl BlockBackend for VolumeBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        self.check_readable()?;
        self.store.read_sync(offset, u64::from(len)).map_err(BackendError::from)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.host(HostOp::Write { offset, data: Bytes::copy_from_slice(data), fua })
    }
    fn flush(&self) -> Result<(), BackendError> {
        if !self.primary.load(Ordering::Acquire) {
            // No host write reaches a secondary, so there is nothing to flush; the kernel
            // flushes the file when the loop device attaches and detaches.
            return Ok(());
        }
        self.host(HostOp::Flush)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.host(HostOp::Discard { offset, len })
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.host(HostOp::WriteZeroes { offset, len })
    }
}

/// The same volume for the ublk queues: reads on the queue's own ring from the store's file,
/// changes through the node without a thread of their own (the queue thread drives the node
/// when nobody else does, see `inbox`), answered from whichever thread completes them.
impl UblkBackend for VolumeBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn read_source(&self) -> Result<RawFd, BackendError> {
        self.check_readable()?;
        Ok(self.store.data_fd().as_raw_fd())
    }
    fn submit(&self, change: Change<'_>, done: Done) {
        let op = match change {
            Change::Write { offset, data, fua } => HostOp::Write { offset, data: Bytes::copy_from_slice(data), fua },
            Change::Flush if !self.primary.load(Ordering::Acquire) => return done.complete(Ok(())),
            Change::Flush => HostOp::Flush,
            Change::Discard { offset, len } => HostOp::Discard { offset, len },
            Change::WriteZeroes { offset, len } => HostOp::WriteZeroes { offset, len },
        };
        self.start(op, move |result| done.complete(result));
    }
}

/// A daemon that died without `tandem down` left its kernel record pinned: what it holds
/// goes into the persisted `out_of_sync`, durably, before anything is unpinned or loaded
/// again, so the restarted node resyncs those tracks (see `kernel_record`, "Restart").
///
/// `surviving`: the frontend device this daemon will serve, when it is the one the dead
/// daemon served (a ublk device under user recovery). If the pinned programs record that very
/// disk (dev_t and diskseq), they are kept and returned as this daemon's record: replacing
/// them would leave the requests the kernel reissues on recovery in no record. Otherwise
/// (the file frontend's new loop device, a new ublk device) they are unpinned, and the
/// daemon loads the programs afresh once its device exists.
fn recover_kernel_record(
    config: &Config,
    meta_file: &mut MetaFile,
    meta: &mut tandem_core::node::Meta,
    surviving: Option<&std::path::Path>,
) -> Result<Option<KernelRecord>> {
    let recovered = match kernel_record::recover_pinned(&config.record_pin, &config.geometry) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(None),
        Err(e @ kernel_record::KernelRecordError::InUse { .. }) => return Err(e.into()),
        Err(e) if config.record == RecordChoice::Bpf => {
            return Err(anyhow::Error::new(e).context("reading the kernel record a previous daemon left pinned"))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a kernel record a previous daemon may have left pinned");
            return Ok(None);
        }
    };
    if let Some(why) = &recovered.untrusted {
        tracing::warn!(pin = %recovered.pin_dir.display(), %why, "untrusted kernel record: every track counts as written");
    }
    let before = meta.out_of_sync.count_ones();
    for &t in &recovered.tracks {
        if let Some(mut bit) = meta.out_of_sync.get_mut(t as usize) {
            *bit = true;
        }
    }
    let added = meta.out_of_sync.count_ones() - before;
    meta_file.write(meta).context("persisting the tracks of the pinned kernel record")?;
    tracing::info!(
        pin = %recovered.pin_dir.display(),
        flavor = %recovered.flavor.map(|f| f.to_string()).unwrap_or_else(|| "unknown".into()),
        tracks = recovered.tracks.len(),
        added,
        runs = ?kernel_record::track_runs(&recovered.tracks),
        "a previous daemon left its kernel record pinned: its tracks are now out of sync (persisted)"
    );
    let recovered = match surviving {
        Some(device) if config.record != RecordChoice::Memory => match recovered.keep_for(device) {
            Ok(record) => {
                tracing::info!(
                    pin = %record.pin_dir().display(),
                    device = %device.display(),
                    "the device survived the previous daemon: its pinned programs keep recording it"
                );
                return Ok(Some(record));
            }
            Err((recovered, why)) => {
                tracing::info!(device = %device.display(), %why, "replacing the pinned kernel record");
                recovered
            }
        },
        _ => recovered,
    };
    recovered.unpin().context("unpinning the previous daemon's kernel record")?;
    Ok(None)
}

/// `tandem daemon`: runs until `tandem down`.
pub fn run_daemon(config: Config) -> Result<()> {
    if config.attach.is_some() {
        return crate::attach::run_daemon(config);
    }
    tracing::info!(config = %config.file.display(), volume = %config.volume, node = config.node, "starting");
    let frontend = kernel_frontend::select(&config)?;
    let plan = match frontend {
        Selected::Ublk => {
            let plan = kernel_frontend::plan(&config)?;
            let recovering = match plan {
                Plan::Recover { id } => Some(id),
                Plan::Add => None,
            };
            // Before any thread starts: unshare(CLONE_NEWNS) refuses a threaded process.
            tandem_frontend::private_mount_namespace(recovering)
                .context("moving the ublk server into its own mount namespace")?;
            Some(plan)
        }
        Selected::File { .. } => None,
    };
    if config.peers.is_empty() {
        tracing::warn!("no [[peer]] configured: this volume is not replicated");
    }
    if config.record == RecordChoice::Bpf {
        kernel_record::require_bpf()
            .map_err(|why| anyhow::anyhow!("record = \"bpf\" in {}, but {why}", config.file.display()))?;
    }
    // Every thread of the daemon may drive the node and write the backing store while the
    // kernel waits on the device it serves: none may be throttled into writeback of that very
    // device. Threads inherit the flag, so it is set before any starts.
    if let Err(e) = tandem_frontend::set_io_flusher() {
        tracing::warn!(error = %e, "PR_SET_IO_FLUSHER refused: under memory pressure the daemon could wait on its own device");
    }
    let (mut meta_file, mut meta) =
        MetaFile::open(&config.meta).context("opening the metadata (run `tandem create-md` first?)")?;
    meta_file.expect(u128::from(config.volume_id), config.node, &config.geometry)?;
    // It comes back secondary (the core demotes a crashed node): see `kernel_frontend`.
    let died_primary = !meta.clean && meta.role == tandem_core::Role::Primary;
    let surviving = plan.and_then(|p| p.surviving_device());
    let kept = recover_kernel_record(&config, &mut meta_file, &mut meta, surviving.as_deref())?;
    let generation = meta.generations.current;
    let inbox = Inbox::new();
    // The store and the links hand their completions and messages to the node from their
    // own threads, which drive it themselves when nobody else does (see `inbox`).
    let to_node = inbox.clone();
    let store = Arc::new(Store::open_with_meta_and_sink(&config.data, meta_file, move |c: Completion| {
        let _ = to_node.send(Input::IoDone { io: c.io, result: c.result });
    })?);

    let mut net_config =
        NetConfig::new(config.node, config.volume_id, config.secret.clone(), config.listen, config.peers.clone());
    net_config.keepalive = config.keepalive;
    net_config.timeout = config.timeout;
    let net = Net::start(net_config, NodeSink(inbox.clone()))?;

    let primary = Arc::new(AtomicBool::new(false));
    let device = Arc::new(Mutex::new(None));
    let frontend_view = Arc::new(Mutex::new(None));
    let edges = RealEdges {
        frontend: frontend_view.clone(),
        store: store.clone(),
        links: Links::new(net, inbox.clone()),
        device: device.clone(),
        inbox: inbox.clone(),
    };
    let daemon = Daemon::new(config.clone(), meta, edges, primary.clone())?;
    let is_primary = primary.clone();
    // The node must run before the device exists: attaching it flushes the file, which
    // the frontend answers through the node.
    let node_thread = inbox.start(Box::new(daemon))?;

    let backend = Arc::new(VolumeBackend {
        inbox: inbox.clone(),
        store: store.clone(),
        primary,
        size: config.geometry.volume_size(),
        block_size: config.geometry.block_size(),
    });
    let mut notes = Vec::new();
    let (exposed, live) = match plan {
        Some(plan) => {
            let serving = Serving::start(&config, backend, plan, is_primary, died_primary)?;
            let live = serving.live.clone();
            if let Plan::Recover { id } = plan {
                notes.push(format!("took over /dev/ublkb{id}, left quiesced by the previous daemon (user recovery)"));
            }
            (Exposed::Ublk(serving), live)
        }
        None => {
            if let Selected::File { reason: Some(reason) } = &frontend {
                tracing::info!(%reason, "using the file frontend (FUSE + loop)");
                notes.push(reason.clone());
            }
            std::fs::create_dir_all(&config.mountpoint)
                .with_context(|| format!("creating the mount point {}", config.mountpoint.display()))?;
            let mounted = tandem_frontend::mount(backend, &config.mountpoint)?;
            let options =
                LoopOptions { direct_io: true, block_size: Some(config.geometry.block_size()), read_only: false };
            let loop_device = tandem_frontend::attach_loop_with(mounted.file(), &options)?;
            (Exposed::File { mounted, loop_device }, Arc::new(AtomicBool::new(true)))
        }
    };
    let frontend_device = exposed.device();
    let device_path = frontend_device.display().to_string();
    // The record watches the frontend device: bios remapped by the dm table above reach it
    // too. A ublk device outlives a killed daemon, so a restart records the same dev_t.
    let spec = RecordSpec {
        pin: config.record_pin.clone(),
        device: frontend_device.clone(),
        geometry: config.geometry,
        generation,
    };
    let record = match kept {
        Some(record) => Record::Kernel(Box::new(Clearing::new(record, &config.geometry))),
        None => kernel_record::start(config.record, &spec)
            .with_context(|| format!("record = \"{}\" in {}", config.record, config.file.display()))?,
    };
    match &record {
        Record::Kernel(c) => {
            let view = c.view();
            let (flavor, dir) = (view.flavor.unwrap_or_default(), view.pin_dir.unwrap_or_default());
            tracing::info!(%flavor, pin = %dir, device = %device_path, "recording writes in the kernel map");
            if let Some(why) = view.reason {
                tracing::warn!(%why, "BPF write recording with limits");
            }
        }
        Record::Memory { reason } => {
            tracing::warn!(%reason, "BPF write recording unavailable: the in-process bitmaps are the only record")
        }
    }
    // The user-facing device: a dm linear table over the frontend's, where there is dm.
    let linear = match crate::dm::unavailable() {
        None => match crate::dm::Linear::create(&config.dm_name, &frontend_device) {
            Ok(linear) => Some(linear),
            Err(e) => {
                tracing::error!(error = %e, "cannot create the device-mapper table: exposing the frontend device directly");
                notes.push(format!("no device-mapper table: {e}"));
                None
            }
        },
        Some(why) => {
            tracing::warn!(%why, "no device-mapper here: exposing the frontend device directly");
            notes.push(format!("no device-mapper table: {why}"));
            None
        }
    };
    let user_device = linear.as_ref().map_or_else(|| device_path.clone(), |l| l.path().display().to_string());
    *frontend_view.lock().expect("frontend lock") = Some((
        crate::control::FrontendView {
            kind: exposed.kind().into(),
            device: device_path.clone(),
            dm: linear.as_ref().map(|l| l.path().display().to_string()),
            notes,
        },
        live.clone(),
    ));
    // Ahead of every control request: `tandem status` shows the record from the start.
    let _ = inbox.send(Input::Record(record));
    *device.lock().expect("device lock") = Some(user_device.clone());
    tracing::info!(volume = %config.volume, device = %user_device, frontend = %device_path, "volume exposed");
    let wrap = linear.clone().map(|linear| Arc::new(kernel_frontend::RoleWrap::new(linear, live)));
    let control = crate::control::serve_with(&config.control, inbox, wrap)?;

    let result = node_thread.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the node's home thread panicked")));
    // The table holds the frontend device open: it goes first.
    if let Some(linear) = &linear {
        match linear.remove() {
            Ok(()) => tracing::info!(device = %linear.path().display(), "removed the device-mapper table"),
            Err(e) => tracing::warn!(error = %e, "cannot remove the device-mapper table (still in use?)"),
        }
    }
    match exposed {
        Exposed::Ublk(serving) => serving.stop(&config),
        Exposed::File { mut mounted, mut loop_device } => {
            // The loop device holds the FUSE file open: it goes first.
            let _ = loop_device.detach();
            let _ = mounted.unmount();
        }
    }
    control.finish(std::time::Duration::from_secs(5));
    let _ = std::fs::remove_file(&config.control);
    result
}

/// The frontend serving the volume.
enum Exposed {
    Ublk(Serving),
    File { mounted: tandem_frontend::Mounted, loop_device: tandem_frontend::LoopDevice },
}

impl Exposed {
    fn device(&self) -> std::path::PathBuf {
        match self {
            Exposed::Ublk(serving) => serving.device.block_device.clone(),
            Exposed::File { loop_device, .. } => loop_device.path().to_owned(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Exposed::Ublk(_) => "ublk",
            Exposed::File { .. } => "file",
        }
    }
}
