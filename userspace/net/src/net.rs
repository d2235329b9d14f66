//! `Net`: the listener, one dialer per higher-id peer, and the table of links.
//!
//! # Who dials
//!
//! Of two nodes, only the one with the lower id dials; the higher one only accepts. If
//! both dialed, a simultaneous open (both nodes restart together, or both notice a loss
//! at once) would produce two authenticated connections for one pair, and choosing which
//! one survives would take a tie-break exchange of its own, during which messages could
//! travel on the connection about to be dropped. With one dialer per pair there is never
//! more than one candidate; a connection that arrives from a peer we already have a link
//! with means the peer lost the old one, so the new one replaces it. The decider of the
//! version exchange is the lower id too, so the dialer is always the decider.
//!
//! # Ordering of events
//!
//! For each peer, events come in the order `Connected`, `Message`*, `Lost`, repeated for
//! every connection, and no `Message` of a connection comes after its `Lost`:
//!
//! - `Connected` is sent under the table lock, in the same step that installs the link;
//!   a link is installed only in an empty slot (an old link is closed first and its
//!   `Lost` awaited), so a new `Connected` always follows the previous `Lost`;
//! - the link's reader thread is the only sender of its `Message`s, and it sends `Lost`
//!   (under the table lock, in the same step that empties the slot) only after its last
//!   delivery; everything else that ends a link only closes its socket.
//!
//! `Refused` is about an address, not a peer: a connection that never became a link.

use crate::config::NetConfig;
use crate::error::{LinkError, NetError, Refusal};
use crate::handshake::{self, Established, Role};
use crate::link::{self, Closer, Session};
use crate::queue::{PushError, SendQueue};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tandem_core::types::NodeId;
use tandem_core::wire::handshake::FeatureNames;
use tandem_core::wire::Message;
use tracing::{debug, info, trace, warn};

/// How often the listener looks up from `accept` to check for shutdown (Linux honours
/// `SO_RCVTIMEO` on a listening socket); a backstop, as shutdown also wakes it directly.
const ACCEPT_POLL: Duration = Duration::from_millis(200);
/// Connections allowed in their handshake at once: a flood of strangers costs at most
/// this many threads, each for at most one `timeout`.
const MAX_HANDSHAKES: usize = 32;

/// What the network tells its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetEvent {
    /// A link is up: transport connected, peer authenticated, versions negotiated.
    Connected { peer: NodeId },
    /// The link is gone; nothing more arrives from it.
    Lost { peer: NodeId, reason: String },
    /// A message from the peer, in the order it sent them (keepalive traffic excluded).
    Message { peer: NodeId, msg: Message },
    /// A connection to or from `addr` failed its handshake: a stranger, a wrong secret,
    /// another protocol version, a wrong volume or node id, or an operator's stand-alone.
    Refused { addr: SocketAddr, reason: String },
}

/// Where a [`Net`] delivers its events: a channel, or a function that puts them straight
/// into the owner's own queue (saving a thread hand-off per message). It is called from the
/// network's threads, in the order described in the module docs, and must not block for long
/// or call back into the `Net` (its `disconnect` waits for a `Lost` this would be holding up).
pub trait EventSink: Send + Sync + 'static {
    fn event(&self, event: NetEvent);

    /// The `Message`s of `peer` delivered since its last `drained` were every one its link's
    /// reader had buffered: the reader is about to wait for the socket, or the link is ending
    /// (before its `Lost`). An owner that queues messages to act on a burst at once acts now.
    fn drained(&self, _peer: NodeId) {}
}

impl EventSink for Sender<NetEvent> {
    fn event(&self, event: NetEvent) {
        // A dropped receiver means the owner is going away; nothing to tell.
        let _ = self.send(event);
    }
}

impl<F: Fn(NetEvent) + Send + Sync + 'static> EventSink for F {
    fn event(&self, event: NetEvent) {
        self(event)
    }
}

/// The TCP links of one node for one volume. See the crate docs.
pub struct Net {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

struct Shared {
    cfg: NetConfig,
    events: Box<dyn EventSink>,
    table: Mutex<Table>,
    /// Signalled on every change of `Table`: links installed and retired, stand-alone
    /// flags, reconnect requests, shutdown.
    changed: Condvar,
    next_id: AtomicU64,
}

struct Table {
    shutdown: bool,
    /// A handle on the listening socket, shut down at stop to end `accept` at once.
    listener: Option<TcpListener>,
    peers: BTreeMap<NodeId, Slot>,
    /// Connections in their handshake, so that shutdown can cut them short.
    handshaking: HashMap<u64, TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

struct Slot {
    link: Option<LinkHandle>,
    /// Set by `disconnect(.., true)`: no link with this peer until `reconnect`.
    stand_alone: bool,
    /// Set by `reconnect`: the dialer skips the rest of its backoff.
    dial_now: bool,
}

struct LinkHandle {
    id: u64,
    queue: Arc<SendQueue>,
    closer: Arc<Closer>,
}

fn lock(m: &Mutex<Table>) -> MutexGuard<'_, Table> {
    // A panicking network thread must not take the whole node's networking with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Net {
    /// Binds the listener and starts the dialers. Events go to `events`: a
    /// `Sender<NetEvent>` or an `Fn(NetEvent)`.
    pub fn start(cfg: NetConfig, events: impl EventSink) -> Result<Net, NetError> {
        cfg.validate()?;
        let listener = bind(cfg.listen)?;
        let local_addr = listener.local_addr().map_err(|source| NetError::Listen { addr: cfg.listen, source })?;
        let peers = cfg.peers.iter().map(|&(id, _)| (id, Slot { link: None, stand_alone: false, dial_now: false }));
        let table = Table {
            shutdown: false,
            listener: listener.try_clone().ok(),
            peers: peers.collect(),
            handshaking: HashMap::new(),
            threads: Vec::new(),
        };
        let shared = Arc::new(Shared {
            cfg,
            events: Box::new(events),
            table: Mutex::new(table),
            changed: Condvar::new(),
            next_id: AtomicU64::new(0),
        });
        let net = Net { shared: shared.clone(), local_addr };

        let s = shared.clone();
        shared.spawn("tandem-net-listen".into(), move || s.accept_loop(listener)).map_err(NetError::Spawn)?;
        for &(peer, addr) in &shared.cfg.peers {
            if peer > shared.cfg.node {
                let s = shared.clone();
                // On error `net` is dropped, which stops the threads already started.
                shared
                    .spawn(format!("tandem-net-dial{peer}"), move || s.dial_loop(peer, addr))
                    .map_err(NetError::Spawn)?;
            }
        }
        info!(
            node = shared.cfg.node,
            "node {} listening on {local_addr} for volume {:#x}", shared.cfg.node, shared.cfg.volume
        );
        Ok(net)
    }

    /// The address the listener is bound to (tells the port when `listen` used port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether a link with `peer` is up right now.
    pub fn is_connected(&self, peer: NodeId) -> bool {
        lock(&self.shared.table).peers.get(&peer).is_some_and(|s| s.link.is_some())
    }

    /// Sends `msg` to `peer` (with whatever [`Net::queue`] left for it) without blocking:
    /// a small message on a link that keeps up leaves from the calling thread at once, the
    /// rest through the link's writer thread. Dropped if no link is up: the protocol above
    /// learns of that through `Lost` and resynchronises after `Connected`. A link whose send
    /// queue overflows is dropped rather than losing one message.
    pub fn send(&self, peer: NodeId, msg: Message) {
        self.push(peer, msg, true);
    }

    /// Queues `msg` for `peer` like [`Net::send`], but leaves it there until the next
    /// `send` to that peer or [`Net::flush`] (or, at the latest, the keepalive interval), so
    /// that a burst of messages travels in one system call and one TCP segment.
    pub fn queue(&self, peer: NodeId, msg: Message) {
        self.push(peer, msg, false);
    }

    /// Sends everything [`Net::queue`] left, on every link.
    pub fn flush(&self) {
        let queues: Vec<Arc<SendQueue>> = {
            let table = lock(&self.shared.table);
            table.peers.values().filter_map(|s| s.link.as_ref()).map(|l| l.queue.clone()).collect()
        };
        for queue in queues {
            queue.flush();
        }
    }

    fn push(&self, peer: NodeId, msg: Message, flush: bool) {
        let link = {
            let table = lock(&self.shared.table);
            table.peers.get(&peer).and_then(|s| s.link.as_ref()).map(|l| (l.queue.clone(), l.closer.clone()))
        };
        let Some((queue, closer)) = link else {
            trace!(peer, "dropping {}: not connected", msg.name());
            return;
        };
        match queue.push(&msg, flush) {
            Ok(()) | Err(PushError::Closed) => {}
            Err(e) => closer.close(link::push_error(e, &queue)),
        }
    }

    /// Drops the link with `peer`. Without `stand_alone` the lower id of the pair dials
    /// again after its backoff; with it, no link with `peer` is made (neither dialed nor
    /// accepted) until [`Net::reconnect`]. When this returns, the `Lost` event of the
    /// dropped link has been sent (unless it is stuck for longer than the timeout).
    pub fn disconnect(&self, peer: NodeId, stand_alone: bool) {
        let shared = &self.shared;
        let mut table = lock(&shared.table);
        let Some(slot) = table.peers.get_mut(&peer) else {
            warn!(peer, "disconnect: node {peer} is not a configured peer");
            return;
        };
        slot.stand_alone |= stand_alone;
        let Some(link) = &slot.link else { return };
        let id = link.id;
        link.closer.close(LinkError::Disconnected { stand_alone });
        shared.changed.notify_all();
        let deadline = Instant::now() + shared.cfg.timeout;
        while table.peers[&peer].link.as_ref().is_some_and(|l| l.id == id) {
            let now = Instant::now();
            if now >= deadline {
                warn!(peer, "disconnect: the link with node {peer} is slow to end");
                return;
            }
            table = shared.changed.wait_timeout(table, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Ends stand-alone for `peer` and, if we are its dialer, dials at once.
    pub fn reconnect(&self, peer: NodeId) {
        let mut table = lock(&self.shared.table);
        let Some(slot) = table.peers.get_mut(&peer) else {
            warn!(peer, "reconnect: node {peer} is not a configured peer");
            return;
        };
        slot.stand_alone = false;
        slot.dial_now = true;
        self.shared.changed.notify_all();
    }

    /// Closes every link (each yields its `Lost`) and the listener, and waits for all
    /// network threads.
    pub fn shutdown(self) {
        // Drop does the work, so that a `Net` dropped without shutdown stops too.
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.shared.stop();
    }
}

/// Binds the listening socket with a precise error for the common failure.
fn bind(addr: SocketAddr) -> Result<TcpListener, NetError> {
    let listen_error = |source: io::Error| match source.kind() {
        io::ErrorKind::AddrInUse => NetError::AddrInUse { addr },
        _ => NetError::Listen { addr, source },
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(listen_error)?;
    // Lets a restarted daemon bind while old connections linger in TIME_WAIT; on Linux it
    // does not let two listeners share the port, so "in use" is still detected.
    socket.set_reuse_address(true).map_err(listen_error)?;
    socket.bind(&addr.into()).map_err(listen_error)?;
    socket.listen(128).map_err(listen_error)?;
    socket.set_read_timeout(Some(ACCEPT_POLL)).map_err(listen_error)?;
    Ok(socket.into())
}

/// Socket options of every connection. `TCP_NODELAY`: acks and small protocol messages
/// must not wait for Nagle. `TCP_USER_TIMEOUT`: the kernel gives up on unacknowledged
/// data after our timeout instead of retransmitting for minutes.
fn configure(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    let sock = SockRef::from(stream);
    sock.set_nodelay(true)?;
    sock.set_tcp_user_timeout(Some(timeout))
}

/// How one dial attempt ended, for the backoff.
enum Dialed {
    /// A link was up and has ended.
    Served,
    Failed,
}

impl Shared {
    fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let mut table = lock(&self.table);
        if table.shutdown {
            return Ok(());
        }
        // Reap finished threads so that the list does not grow with every connection.
        let (done, running) = std::mem::take(&mut table.threads).into_iter().partition(|h| h.is_finished());
        table.threads = running;
        let done: Vec<JoinHandle<()>> = done;
        done.into_iter().for_each(|h| drop(h.join()));
        table.threads.push(thread::Builder::new().name(name).spawn(f)?);
        Ok(())
    }

    fn stop(&self) {
        {
            let mut table = lock(&self.table);
            if table.shutdown {
                return;
            }
            table.shutdown = true;
            // First the listener, so that a peer redialing at once is not accepted by a
            // node that is going away; shutting a listening socket down wakes `accept`.
            if let Some(listener) = table.listener.take() {
                let _ = SockRef::from(&listener).shutdown(Shutdown::Both);
            }
            for link in table.peers.values().filter_map(|s| s.link.as_ref()) {
                link.closer.close(LinkError::ShuttingDown);
            }
            for stream in table.handshaking.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
            self.changed.notify_all();
        }
        loop {
            let threads = std::mem::take(&mut lock(&self.table).threads);
            if threads.is_empty() {
                break;
            }
            threads.into_iter().for_each(|h| drop(h.join()));
        }
        info!(node = self.cfg.node, "network stopped");
    }

    fn shutting_down(&self) -> bool {
        lock(&self.table).shutdown
    }

    fn accept_loop(self: &Arc<Self>, listener: TcpListener) {
        loop {
            if self.shutting_down() {
                return;
            }
            let (stream, addr) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(_) if self.shutting_down() => return,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => continue,
                Err(e) => {
                    // Typically out of file descriptors: wait instead of spinning.
                    warn!("accept on {:?} failed: {e}", listener.local_addr());
                    thread::sleep(ACCEPT_POLL);
                    continue;
                }
            };
            let id = match self.register_handshake(&stream) {
                Ok(id) => id,
                Err(refusal) => {
                    self.refused(addr, "from", refusal);
                    continue;
                }
            };
            let s = self.clone();
            if let Err(e) = self.spawn(format!("tandem-net-in{id}"), move || s.accepted(id, stream, addr)) {
                warn!(%addr, "cannot start a thread for the connection from {addr}: {e}");
                self.unregister_handshake(id);
            }
        }
    }

    fn register_handshake(&self, stream: &TcpStream) -> Result<u64, Refusal> {
        let clone = stream.try_clone().map_err(|source| Refusal::Io { stage: "socket setup", source })?;
        let mut table = lock(&self.table);
        if table.handshaking.len() >= MAX_HANDSHAKES {
            return Err(Refusal::Busy { limit: MAX_HANDSHAKES });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        table.handshaking.insert(id, clone);
        Ok(id)
    }

    fn unregister_handshake(&self, id: u64) {
        lock(&self.table).handshaking.remove(&id);
    }

    /// A connection from `addr`: handshake, then serve it until it ends.
    fn accepted(self: &Arc<Self>, id: u64, stream: TcpStream, addr: SocketAddr) {
        let admit = |peer| self.admit(peer);
        let result = configure(&stream, self.cfg.timeout)
            .map_err(|source| Refusal::Io { stage: "socket setup", source })
            .and_then(|()| handshake::run(&stream, &self.cfg, Role::Acceptor { admit: &admit }));
        self.unregister_handshake(id);
        match result {
            Ok(est) => {
                if let Err(refusal) = self.serve(stream, addr, est) {
                    self.refused(addr, "from", refusal);
                }
            }
            Err(refusal) => self.refused(addr, "from", refusal),
        }
    }

    /// Whether an authenticated peer may have a link now.
    fn admit(&self, peer: NodeId) -> Result<(), Refusal> {
        let table = lock(&self.table);
        if table.shutdown {
            return Err(Refusal::ShuttingDown);
        }
        match table.peers.get(&peer) {
            None => Err(Refusal::UnknownNode { node: peer }),
            Some(slot) if slot.stand_alone => Err(Refusal::StandAlone { node: peer }),
            Some(_) => Ok(()),
        }
    }

    /// Keeps a link with `peer` (a higher id) up: dial, serve, back off, repeat.
    fn dial_loop(self: &Arc<Self>, peer: NodeId, addr: SocketAddr) {
        let (min, max) = self.cfg.connect_backoff;
        let mut delay = min;
        let mut quiet = false;
        while self.wait_dialable(peer) {
            match self.dial_once(peer, addr, &mut quiet) {
                Dialed::Served => {
                    // Pause briefly even after a good link, so that a peer that accepts
                    // and drops at once is not hammered.
                    delay = min;
                    quiet = false;
                    if !self.backoff(peer, min) {
                        return;
                    }
                }
                Dialed::Failed => {
                    if !self.backoff(peer, delay) {
                        return;
                    }
                    delay = (delay * 2).min(max);
                }
            }
        }
    }

    /// Waits until `peer` has no link and is not stand-alone; false on shutdown.
    fn wait_dialable(&self, peer: NodeId) -> bool {
        let mut table = lock(&self.table);
        loop {
            if table.shutdown {
                return false;
            }
            let slot = table.peers.get_mut(&peer).expect("dialers run for configured peers");
            if !slot.stand_alone && slot.link.is_none() {
                slot.dial_now = false;
                return true;
            }
            table = self.changed.wait(table).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Sleeps `delay`, cut short by `reconnect`; false on shutdown.
    fn backoff(&self, peer: NodeId, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        let mut table = lock(&self.table);
        loop {
            if table.shutdown {
                return false;
            }
            let slot = table.peers.get_mut(&peer).expect("dialers run for configured peers");
            let now = Instant::now();
            if slot.dial_now || now >= deadline {
                slot.dial_now = false;
                return true;
            }
            table = self.changed.wait_timeout(table, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// `quiet`: the peer was already reported unreachable since the last link, so repeats
    /// go to debug level instead of filling the log while it is down.
    fn dial_once(self: &Arc<Self>, peer: NodeId, addr: SocketAddr, quiet: &mut bool) -> Dialed {
        let stream = match TcpStream::connect_timeout(&addr, self.cfg.timeout) {
            Ok(stream) => stream,
            Err(e) => {
                if *quiet {
                    debug!(peer, %addr, "node {peer} at {addr} still unreachable: {e}");
                } else {
                    info!(peer, %addr, "node {peer} at {addr} unreachable: {e} (retrying)");
                    *quiet = true;
                }
                return Dialed::Failed;
            }
        };
        let id = match self.register_handshake(&stream) {
            Ok(id) => id,
            Err(refusal) => {
                // Busy: strangers hold the handshake slots; try again after the backoff.
                self.refused(addr, "to", refusal);
                return Dialed::Failed;
            }
        };
        let result = configure(&stream, self.cfg.timeout)
            .map_err(|source| Refusal::Io { stage: "socket setup", source })
            .and_then(|()| handshake::run(&stream, &self.cfg, Role::Dialer { expect: peer }));
        self.unregister_handshake(id);
        let served = result.and_then(|est| self.serve(stream, addr, est));
        match served {
            Ok(()) => Dialed::Served,
            Err(refusal) => {
                self.refused(addr, "to", refusal);
                Dialed::Failed
            }
        }
    }

    /// Installs an established connection as the peer's link and runs it until it ends.
    fn serve(self: &Arc<Self>, stream: TcpStream, addr: SocketAddr, est: Established) -> Result<(), Refusal> {
        let Established { peer, negotiated, reader, send_seq, recv_seq } = est;
        let direct = stream.try_clone().map_err(|source| Refusal::Io { stage: "link setup", source })?;
        let queue = Arc::new(SendQueue::new(self.cfg.volume, send_seq, self.cfg.send_queue_limit, Some(direct)));
        let closer = stream
            .try_clone()
            .map(|clone| Arc::new(Closer::new(clone, queue.clone())))
            .map_err(|source| Refusal::Io { stage: "link setup", source })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.install(peer, LinkHandle { id, queue: queue.clone(), closer: closer.clone() })?;
        info!(
            peer,
            %addr,
            "connected to node {peer} at {addr} (protocol version {}, features {})",
            negotiated.version,
            FeatureNames(negotiated.features)
        );
        let session = Session {
            peer,
            volume: self.cfg.volume,
            keepalive: self.cfg.keepalive,
            timeout: self.cfg.timeout,
            recv_seq,
        };
        let events = &self.events;
        let reason = link::run(stream, reader, session, queue, closer, &mut |delivered| match delivered {
            link::Delivered::Message(msg) => events.event(NetEvent::Message { peer, msg }),
            link::Delivered::Drained => events.drained(peer),
        });
        self.retire(peer, id, addr, reason);
        Ok(())
    }

    /// Puts the link in the peer's slot and sends `Connected`, after retiring an old link
    /// (see the module docs for why this keeps the event order).
    fn install(&self, peer: NodeId, link: LinkHandle) -> Result<(), Refusal> {
        let mut table = lock(&self.table);
        loop {
            if table.shutdown {
                return Err(Refusal::ShuttingDown);
            }
            let slot = table.peers.get_mut(&peer).ok_or(Refusal::UnknownNode { node: peer })?;
            if slot.stand_alone {
                return Err(Refusal::StandAlone { node: peer });
            }
            match &slot.link {
                None => {
                    self.events.event(NetEvent::Connected { peer });
                    slot.link = Some(link);
                    self.changed.notify_all();
                    return Ok(());
                }
                Some(old) => {
                    old.closer.close(LinkError::Replaced);
                    table = self.changed.wait(table).unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    /// Sends `Lost` and empties the slot, in one step under the lock.
    fn retire(&self, peer: NodeId, id: u64, addr: SocketAddr, reason: LinkError) {
        {
            let mut table = lock(&self.table);
            self.events.event(NetEvent::Lost { peer, reason: reason.to_string() });
            if let Some(slot) = table.peers.get_mut(&peer) {
                if slot.link.as_ref().is_some_and(|l| l.id == id) {
                    slot.link = None;
                }
            }
            self.changed.notify_all();
        }
        if reason.is_local() {
            info!(peer, %addr, "disconnected from node {peer} at {addr}: {reason}");
        } else {
            warn!(peer, %addr, "lost the connection to node {peer} at {addr}: {reason}");
        }
    }

    /// The one log line and the event for a connection that did not become a link.
    fn refused(&self, addr: SocketAddr, direction: &str, refusal: Refusal) {
        if self.shutting_down() {
            debug!(%addr, "connection {direction} {addr} abandoned at shutdown: {refusal}");
            return;
        }
        if refusal.is_administrative() {
            info!(%addr, "refused the connection {direction} {addr}: {refusal}");
        } else {
            warn!(%addr, "refused the connection {direction} {addr}: {refusal}");
        }
        self.events.event(NetEvent::Refused { addr, reason: refusal.to_string() });
    }
}
