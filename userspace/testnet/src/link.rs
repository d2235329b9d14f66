//! A link emulator for a TCP protocol: a forwarder between two nodes that can pass traffic,
//! delay it by a fixed one-way time in each direction, swallow it silently (a partition TCP
//! does not notice), or reset every connection (a cut link). This kernel has no netem.
//!
//! The delay is a timestamped queue per direction: a reader thread stamps each chunk with
//! the instant it arrived and queues it, a writer thread sends it once that instant plus the
//! delay has come. Chunks stay in order and the delay does not cut throughput (a sleep per
//! read would): 0.5 ms each way is a 1 ms round trip, whatever the window in flight.
//!
//! The listener and the outbound connection may live in different network namespaces
//! ([`Endpoint::netns`]): each socket is created on a thread that entered its namespace.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::maybe_in_netns;
use crate::{Error, Result};

const PASS: u8 = 0;
const BLACKHOLE: u8 = 1;
const RESET: u8 = 2;
/// The `Link` was dropped: everything closes and the threads end.
const CLOSED: u8 = 3;

/// How often idle threads look at the mode.
const TICK: Duration = Duration::from_millis(20);
/// Bytes a direction may hold in its delay queue before its reader stops reading (and TCP's
/// flow control pushes back on the sender).
const QUEUE_LIMIT: usize = 64 << 20;
/// How long the forwarder tries to reach the target for one accepted connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);

/// One side of a [`Link`]: an address, in the host's network namespace or in a named one
/// (made by `ip netns add`).
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub netns: Option<String>,
}

impl Endpoint {
    /// `127.0.0.1:port` in the host's namespace (port 0: any free port, for a listener).
    pub fn loopback(port: u16) -> Endpoint {
        Endpoint { addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)), netns: None }
    }

    /// `addr` inside the network namespace `netns`.
    pub fn in_netns(netns: &str, addr: SocketAddr) -> Endpoint {
        Endpoint { addr, netns: Some(netns.to_owned()) }
    }
}

struct Shared {
    mode: AtomicU8,
    delay_ns: AtomicU64,
    conns: Mutex<Vec<Weak<Conn>>>,
}

impl Shared {
    fn mode(&self) -> u8 {
        self.mode.load(Ordering::Relaxed)
    }

    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed))
    }

    /// Closes every live connection at once.
    fn close_all(&self) {
        let conns = std::mem::take(&mut *self.conns.lock().unwrap());
        for conn in conns.iter().filter_map(Weak::upgrade) {
            conn.close();
        }
    }
}

/// A TCP forwarder from a listener to a target, with a mode (pass, blackhole, reset) and a
/// one-way delay that both apply to every connection, current and future.
pub struct Link {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Link {
    /// Listens at `listen` (port 0: a free one) and forwards every connection to `target`.
    pub fn new(listen: Endpoint, target: Endpoint) -> Result<Link> {
        let listener = maybe_in_netns(listen.netns.as_deref(), || TcpListener::bind(listen.addr))
            .map_err(|e| Error::io(format!("binding the link's listener at {listen:?}"), e))?;
        let addr = listener.local_addr().map_err(|e| Error::io("the link's listener address", e))?;
        let shared =
            Arc::new(Shared { mode: AtomicU8::new(PASS), delay_ns: AtomicU64::new(0), conns: Mutex::new(Vec::new()) });
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("link-accept".into())
                .spawn(move || accept_loop(listener, target, shared))
                .map_err(|e| Error::io("starting the link's thread", e))?
        };
        Ok(Link { addr, shared, accept: Some(accept) })
    }

    /// A link on a free loopback port to `127.0.0.1:target_port`.
    pub fn loopback(target_port: u16) -> Result<Link> {
        Link::new(Endpoint::loopback(0), Endpoint::loopback(target_port))
    }

    /// Where the link listens: dial this instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Delays every chunk by `one_way` in each direction (so the round trip grows by twice
    /// that), from now on; zero for none.
    pub fn delay(&self, one_way: Duration) {
        self.shared.delay_ns.store(one_way.as_nanos().try_into().unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// [`Link::delay`], builder style.
    pub fn with_delay(self, one_way: Duration) -> Link {
        self.delay(one_way);
        self
    }

    /// Traffic flows (what a blackhole held back is delivered, as TCP's retransmissions
    /// would), and new connections are forwarded.
    pub fn pass(&self) {
        self.shared.mode.store(PASS, Ordering::Relaxed);
    }

    /// Nothing gets through and nothing is refused: connections stay open but silent, new
    /// ones are accepted and never answered. Only a keepalive notices.
    pub fn blackhole(&self) {
        self.shared.mode.store(BLACKHOLE, Ordering::Relaxed);
    }

    /// Every connection is closed at once, and new ones are closed as they come until
    /// [`Link::pass`].
    pub fn reset(&self) {
        self.shared.mode.store(RESET, Ordering::Relaxed);
        self.shared.close_all();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.mode.store(CLOSED, Ordering::Relaxed);
        self.shared.close_all();
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Waits up to [`TICK`] for the listener to have a connection.
fn readable(listener: &TcpListener) -> bool {
    let mut fd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, TICK.as_millis() as libc::c_int) };
    n > 0 && fd.revents & libc::POLLIN != 0
}

fn accept_loop(listener: TcpListener, target: Endpoint, shared: Arc<Shared>) {
    while shared.mode() != CLOSED {
        if !readable(&listener) {
            continue;
        }
        let Ok((client, _)) = listener.accept() else { continue };
        match shared.mode() {
            PASS => {
                let (target, shared) = (target.clone(), shared.clone());
                std::thread::spawn(move || forward(client, target, shared));
            }
            BLACKHOLE => {
                // Held open, never read or answered, until the blackhole ends.
                let shared = shared.clone();
                std::thread::spawn(move || {
                    while shared.mode() == BLACKHOLE {
                        std::thread::sleep(TICK);
                    }
                    drop(client);
                });
            }
            _ => drop(client),
        }
    }
}

/// One forwarded connection: both sockets and whether it has been closed.
struct Conn {
    sockets: [TcpStream; 2],
    closed: AtomicBool,
}

impl Conn {
    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        for s in &self.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

fn forward(client: TcpStream, target: Endpoint, shared: Arc<Shared>) {
    let server = maybe_in_netns(target.netns.as_deref(), || TcpStream::connect_timeout(&target.addr, CONNECT_TIMEOUT));
    let Ok(server) = server else { return }; // the client sees its connection closed
    for s in [&client, &server] {
        // The forwarder writes whatever arrived, at once: no Nagle wait for an ACK.
        let _ = s.set_nodelay(true);
    }
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { return };
    let conn = Arc::new(Conn { sockets: [client, server], closed: AtomicBool::new(false) });
    {
        let mut conns = shared.conns.lock().unwrap();
        conns.retain(|c| c.strong_count() > 0);
        conns.push(Arc::downgrade(&conn));
    }
    if shared.mode() != PASS {
        conn.close(); // reset or dropped while connecting
        return;
    }
    // client -> server and server -> client, each a reader and a writer around a queue.
    for (from, to) in [(0, s2), (1, c2)] {
        let queue = Arc::new(Queue::default());
        let (c, q, sh) = (conn.clone(), queue.clone(), shared.clone());
        std::thread::spawn(move || reader(&c.sockets[from], &q, &c, &sh));
        let (c, sh) = (conn.clone(), shared.clone());
        std::thread::spawn(move || writer(to, &queue, &c, &sh));
    }
}

/// Sleeps until `due`; with `spin`, the last stretch yielding in a loop instead: a sleeping
/// thread wakes tens of microseconds late, which lengthens a 0.5 ms delay by a tenth or more.
/// Spun only for a lone chunk (a request waiting for its answer, where latency is what is
/// measured), not under bulk traffic, where it would burn a core the nodes need.
fn wait_until(due: Instant, spin: bool) {
    const SPIN: Duration = Duration::from_micros(100);
    let spin = if spin { SPIN } else { Duration::ZERO };
    let now = Instant::now();
    if due > now + spin {
        std::thread::sleep(due - now - spin);
    }
    while Instant::now() < due {
        std::thread::yield_now();
    }
}

#[derive(Default)]
struct QueueState {
    chunks: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
    /// The reader has seen the end of its stream: deliver what is queued, then half-close.
    ended: bool,
}

/// One direction's chunks in flight, each with the instant it is due.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

fn reader(from: &TcpStream, queue: &Queue, conn: &Conn, shared: &Shared) {
    let mut from = from;
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = vec![0u8; 256 << 10];
    loop {
        if conn.closed() {
            return;
        }
        match shared.mode() {
            PASS => {}
            BLACKHOLE => {
                // Not read: the sender's window fills and it waits, as with lost packets.
                std::thread::sleep(TICK);
                continue;
            }
            _ => return conn.close(),
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                continue
            }
            Err(_) => return conn.close(),
        };
        let due = Instant::now() + shared.delay();
        let mut state = queue.state.lock().unwrap();
        while state.bytes > QUEUE_LIMIT && !conn.closed() {
            state = queue.changed.wait_timeout(state, TICK).unwrap().0;
        }
        state.bytes += n;
        state.chunks.push_back((due, buf[..n].to_vec()));
        queue.changed.notify_all();
    }
    queue.state.lock().unwrap().ended = true;
    queue.changed.notify_all();
}

fn writer(mut to: TcpStream, queue: &Queue, conn: &Conn, shared: &Shared) {
    // Wake for a due chunk within microseconds, not the default 50 µs timer slack.
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    loop {
        if conn.closed() {
            return;
        }
        match shared.mode() {
            PASS => {}
            BLACKHOLE => {
                // Held, not dropped: TCP would retransmit it once the partition heals.
                std::thread::sleep(TICK);
                continue;
            }
            _ => return conn.close(),
        }
        let (due, chunk, alone) = {
            let mut state = queue.state.lock().unwrap();
            if state.chunks.is_empty() {
                if state.ended {
                    drop(state);
                    // The sender closed its side: so do we, towards the receiver.
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
                let _ = queue.changed.wait_timeout(state, TICK).unwrap();
                continue;
            }
            let (due, chunk) = state.chunks.pop_front().expect("not empty");
            state.bytes -= chunk.len();
            queue.changed.notify_all();
            (due, chunk, state.chunks.is_empty())
        };
        wait_until(due, alone);
        if to.write_all(&chunk).is_err() {
            return conn.close();
        }
    }
}
