//! The daemon: the node's state machine and what surrounds it (host replies, timers, the
//! kernel record, control requests). Everything else (the frontend's threads, the network
//! links, the store's completions, the control socket) hands it inputs through its
//! [`Inbox`](crate::inbox::Inbox), which runs it on one thread at a time, so the protocol
//! logic stays single-threaded and sans-IO.

use crate::config::Config;
use crate::control::{DirtyRun, PeerView, Reply, Request, StatusView, TrackRun, VerifyView};
use crate::inbox::{Next, Runner};
use anyhow::{Context, Result};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::node::{Action, Event, HostError, HostIoId, IoError, IoId, Node, NodeConfig, Timer};
use tandem_core::wire::Message;
use tandem_core::{NodeId, Role};

/// A host request from the frontend, or (`Written`) from attach mode's shipping loop: data
/// already on the local device, shipped and never written back.
#[derive(Debug)]
pub enum HostOp {
    Write { offset: u64, data: Bytes, fua: bool },
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
    Flush,
    Written { offset: u64, data: Bytes },
}

/// How a host request is answered: called once, from whichever thread drives the node
/// (dropped unanswered if the daemon stops first).
pub type HostReply = Box<dyn FnOnce(Result<(), HostError>) + Send>;

/// A [`HostReply`] that sends the answer to `tx`, for a caller that waits on a channel.
pub fn reply_to(tx: Sender<Result<(), HostError>>) -> HostReply {
    Box::new(move |result| {
        let _ = tx.send(result);
    })
}

/// What the node receives. `Run`: work the edges want done while driving the node
/// after the inputs queued before it (sending in one go what the last turns queued).
/// `Inspect`: a look at the node from another thread (attach mode's shipping loop).
/// `Record`: the record of written tracks, once the device exists (see `kernel_record`).
pub enum Input {
    Host { op: HostOp, reply: HostReply },
    Connected(NodeId),
    Lost(NodeId, String),
    Message(NodeId, Message),
    IoDone { io: IoId, result: Result<Option<Bytes>, IoError> },
    Control { request: Request, reply: Sender<Reply> },
    Run(Box<dyn FnOnce() + Send>),
    Inspect(Box<dyn FnOnce(&Node) + Send>),
    Record(crate::kernel_record::Record),
}

/// The node's side of the edges: where actions go. They run on whichever thread drives the
/// node, so none may wait for another thread (see `inbox`, "What must not run on the node").
pub trait Edges: Send {
    fn submit_io(&mut self, action: Action);
    fn send(&mut self, peer: NodeId, msg: Message);
    fn disconnect(&mut self, peer: NodeId, stand_alone: bool);
    fn reconnect(&mut self, peer: NodeId);
    fn device(&self) -> Option<String>;
    /// The frontend device under the user-facing one (ublk or file, dm or not).
    fn frontend(&self) -> Option<crate::control::FrontendView> {
        None
    }
    /// Attach mode: the attached device and its shipping.
    fn attach_view(&self) -> Option<crate::control::AttachView> {
        None
    }
    /// Attach mode: hands a `snapshot-point` to the shipping loop, which answers `reply`.
    fn snapshot_point(
        &mut self,
        _mountpoint: Option<std::path::PathBuf>,
        _timeout: Duration,
        _exec: Option<String>,
        reply: Sender<Reply>,
    ) {
        let message = "this volume is not attached (snapshot-point is for attach mode)".into();
        let _ = reply.send(Reply::Error { message });
    }
}

pub struct Daemon<E: Edges> {
    config: Config,
    node: Node,
    edges: E,
    host: HashMap<HostIoId, HostReply>,
    next_host: HostIoId,
    timers: Vec<(u64, Timer)>,
    start: Instant,
    /// Shared with the frontend, which serves reads only on the primary.
    primary: Arc<AtomicBool>,
    down: Option<Sender<Reply>>,
    /// The kernel map and its clearing cycles, or why there is none.
    record: Option<crate::kernel_record::Record>,
}

impl<E: Edges> Daemon<E> {
    pub fn new(config: Config, meta: tandem_core::node::Meta, edges: E, primary: Arc<AtomicBool>) -> Result<Self> {
        let peers = config.peers.iter().map(|(id, _)| *id).collect();
        let mut node_config = NodeConfig::new(config.node, peers, config.geometry, config.mode);
        node_config.attached = config.attach.is_some();
        let mut node = Node::new(node_config, meta, random_seed()).context("starting the replication state machine")?;
        if config.attach.is_some() {
            node.start_attached().context("starting as the primary of the attached device")?;
        }
        Ok(Daemon {
            config,
            node,
            edges,
            host: HashMap::new(),
            next_host: 1,
            timers: Vec::new(),
            start: Instant::now(),
            primary,
            down: None,
            record: None,
        })
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// When the node wants to run next without an input: its earliest timer, the kernel
    /// record's next clearing step, and at least once a second.
    fn next(&self) -> Next {
        let now = Instant::now();
        let mut next = now + Duration::from_secs(1);
        if let Some(at) = self.timers.iter().map(|(at, _)| *at).min() {
            next = next.min(self.start + Duration::from_nanos(at));
        }
        if let Some(crate::kernel_record::Record::Kernel(c)) = &self.record {
            next = next.min(c.due());
        }
        Next::At(next)
    }

    /// After the inputs: the due timers, the actions, the record's clearing, and the end.
    fn finish_turn(&mut self) -> Next {
        self.fire_timers();
        self.apply();
        if let Some(crate::kernel_record::Record::Kernel(c)) = &mut self.record {
            if c.due() <= Instant::now() {
                c.tick(&self.node);
            }
        }
        if self.down.is_some() && self.node.is_down() {
            tracing::info!("orderly shutdown complete");
            // The records are persisted: the kernel map is no longer needed, and `down`
            // leaves nothing pinned.
            if let Some(crate::kernel_record::Record::Kernel(c)) = self.record.take() {
                match c.unpin() {
                    Ok(()) => tracing::info!("unpinned the kernel record"),
                    Err(e) => tracing::warn!(error = %e, "unpinning the kernel record"),
                }
            }
            if let Some(reply) = self.down.take() {
                let _ = reply.send(Reply::Ok);
            }
            return Next::Stop;
        }
        self.next()
    }

    fn handle(&mut self, event: Event) {
        let now = self.now();
        self.node.handle(now, event);
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Host { op, reply } => {
                let id = self.next_host;
                self.next_host += 1;
                self.host.insert(id, reply);
                let event = match op {
                    HostOp::Write { offset, data, fua } => Event::HostWrite { id, offset, data, fua },
                    HostOp::Discard { offset, len } => Event::HostDiscard { id, offset, len, zeroes: false },
                    HostOp::WriteZeroes { offset, len } => Event::HostDiscard { id, offset, len, zeroes: true },
                    HostOp::Flush => Event::HostFlush { id },
                    HostOp::Written { offset, data } => Event::HostWritten { id, offset, data },
                };
                self.handle(event);
            }
            Input::Connected(peer) => {
                tracing::info!(peer, "peer connected");
                self.handle(Event::PeerConnected { peer });
            }
            Input::Lost(peer, reason) => {
                tracing::warn!(peer, %reason, "peer lost");
                self.handle(Event::PeerLost { peer });
            }
            Input::Message(peer, msg) => self.handle(Event::Received { peer, msg }),
            Input::Run(work) => work(),
            Input::Inspect(look) => look(&self.node),
            Input::IoDone { io, result } => self.handle(Event::IoDone { io, result }),
            Input::Control { request, reply } => self.control(request, reply),
            Input::Record(record) => {
                if let crate::kernel_record::Record::Kernel(c) = &mut *self.record.insert(record) {
                    // Mark at once what the core already holds (e.g. `out_of_sync`).
                    c.tick(&self.node);
                }
            }
        }
    }

    fn fire_timers(&mut self) {
        let now = self.now();
        let (due, later): (Vec<_>, Vec<_>) = self.timers.drain(..).partition(|(at, _)| *at <= now);
        self.timers = later;
        for (_, timer) in due {
            self.handle(Event::Timer(timer));
        }
    }

    /// Carries out everything the node asked for.
    fn apply(&mut self) {
        while let Some(action) = self.node.poll() {
            match action {
                a @ (Action::WriteLocal { .. }
                | Action::ReadLocal { .. }
                | Action::Harden { .. }
                | Action::PersistMeta { .. }) => self.edges.submit_io(a),
                Action::Send { peer, msg } => self.edges.send(peer, msg),
                Action::CompleteHost { id, result } => {
                    if let Some(reply) = self.host.remove(&id) {
                        reply(result);
                    }
                }
                Action::SetTimer { timer, at } => self.timers.push((at, timer)),
                Action::Disconnect { peer, reason, stand_alone } => {
                    tracing::warn!(peer, %reason, stand_alone, "dropping the connection");
                    self.edges.disconnect(peer, stand_alone);
                }
            }
        }
        self.primary.store(self.node.role() == Role::Primary, Ordering::Release);
    }

    fn control(&mut self, request: Request, reply: Sender<Reply>) {
        let admin = |r: Result<(), tandem_core::node::AdminError>| match r {
            Ok(()) => Reply::Ok,
            Err(e) => Reply::Error { message: e.to_string() },
        };
        let answer = match request {
            Request::Status => Reply::Status(Box::new(self.status())),
            Request::Dirty => Reply::Dirty { track_size: self.config.geometry.track_size(), runs: self.dirty() },
            Request::Primary { force } => admin(self.node.promote(force)),
            Request::Secondary => admin(self.node.demote()),
            Request::Invalidate => admin(self.node.invalidate()),
            Request::Connect => {
                for (peer, _) in self.config.peers.clone() {
                    self.node.reconnect(peer);
                    self.edges.reconnect(peer);
                }
                Reply::Ok
            }
            Request::Verify { peer, first, count } => {
                let tracks = match (first, count) {
                    (None, None) => None,
                    (first, count) => {
                        let first = first.unwrap_or(0);
                        Some((first, count.unwrap_or(self.config.geometry.track_count().saturating_sub(first))))
                    }
                };
                match self.node.verify(peer, tracks) {
                    Ok(peer) => {
                        tracing::info!(peer, ?tracks, "verify started");
                        Reply::Verifying { peer }
                    }
                    Err(e) => Reply::Error { message: e.to_string() },
                }
            }
            Request::VerifyStop => {
                if self.node.stop_verify() {
                    Reply::Ok
                } else {
                    Reply::Error { message: "no verify is running".into() }
                }
            }
            Request::SnapshotPoint { mountpoint, timeout_ms, exec } => {
                // Answered by the shipping loop, off this thread.
                self.edges.snapshot_point(mountpoint, Duration::from_millis(timeout_ms), exec, reply);
                return;
            }
            Request::Down => match self.node.shutdown() {
                Ok(()) => {
                    // Answered once the metadata says clean.
                    self.down = Some(reply);
                    return;
                }
                Err(e) => Reply::Error { message: e.to_string() },
            },
        };
        let _ = reply.send(answer);
    }

    fn status(&self) -> StatusView {
        let s = self.node.status();
        let track = u64::from(self.config.geometry.track_size());
        StatusView {
            volume: self.config.volume.clone(),
            node: s.node,
            role: s.role.to_string(),
            disk: s.disk.to_string(),
            mode: format!("{:?}", s.mode).to_lowercase(),
            track_size: self.config.geometry.track_size(),
            device: self.edges.device(),
            generation: format!("{:#018x}", s.generations.current),
            peers: s
                .peers
                .iter()
                .map(|p| PeerView {
                    peer: p.peer,
                    connection: p.conn.to_string(),
                    role: p.role.map(|r| r.to_string()),
                    disk: p.disk.map(|d| d.to_string()),
                    out_of_sync_tracks: p.out_of_sync_tracks,
                    out_of_sync_bytes: p.out_of_sync_tracks * track,
                    resync: p.resync,
                    last_resync_bytes: p.last_resync.map(|t| t * track),
                })
                .collect(),
            verify: s.verify.map(verify_view),
            record: self.record.as_ref().map(|r| r.view()),
            attach: self.edges.attach_view(),
            frontend: self.edges.frontend(),
        }
    }

    fn dirty(&self) -> Vec<DirtyRun> {
        let mut runs = Vec::new();
        for (peer, _) in &self.config.peers {
            if let Some(record) = self.node.record(*peer) {
                runs.extend(record.union_runs().map(|r| DirtyRun {
                    peer: *peer,
                    first_track: r.first,
                    tracks: r.count,
                }));
            }
        }
        runs
    }
}

impl<E: Edges> Runner for Daemon<E> {
    fn start(&mut self) -> Next {
        let now = self.now();
        self.node.start(now);
        self.apply();
        self.next()
    }

    fn turn(&mut self, inputs: Vec<Input>) -> Next {
        // All that is queued before the actions: one round of `apply` per burst.
        for input in inputs {
            self.on_input(input);
        }
        self.finish_turn()
    }
}

fn verify_view(v: tandem_core::node::VerifyReport) -> VerifyView {
    use tandem_core::node::VerifyState;
    let mut differing: Vec<TrackRun> = Vec::new();
    for &t in &v.differing {
        match differing.last_mut() {
            Some(run) if run.first_track + run.tracks == t => run.tracks += 1,
            _ => differing.push(TrackRun { first_track: t, tracks: 1 }),
        }
    }
    let (state, aborted) = match v.state {
        VerifyState::Running => ("running", None),
        VerifyState::Finished => ("finished", None),
        VerifyState::Aborted(why) => ("aborted", Some(why)),
    };
    VerifyView {
        peer: v.peer,
        first_track: v.first,
        tracks: v.tracks,
        compared: v.compared,
        differing_tracks: v.differing.len() as u64,
        differing,
        state: state.into(),
        aborted,
    }
}

/// Generation ids must differ between nodes and restarts.
fn random_seed() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => Instant::now().elapsed().as_nanos() as u64 ^ u64::from(std::process::id()),
    }
}
