//! Loopback tests of whole `Net`s, and of `Net`s against hand-driven raw sockets that
//! play a misbehaving peer. Timers are short (timeout 500 ms) so that the suite is fast.

use super::*;
use crate::auth::Identity;
use crate::frames::FrameReader;
use crate::handshake::HandshakeIo;
use bytes::Bytes;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};
use tandem_core::types::NodeId;
use tandem_core::wire::{encode, features, hello, Hello, Message};

const SECRET: &[u8] = b"correct horse battery staple";
const VOLUME: u64 = 0x7a;
const TIMEOUT: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_millis(200);
/// Scheduling slack on a loaded test machine.
const SLACK: Duration = Duration::from_millis(400);
/// Never dialed: an acceptor only dials higher ids.
const UNUSED: &str = "127.0.0.1:9";

fn config(node: NodeId, peers: Vec<(NodeId, SocketAddr)>) -> NetConfig {
    let mut c = NetConfig::new(node, VOLUME, SECRET, "127.0.0.1:0".parse().unwrap(), peers);
    c.keepalive = Duration::from_millis(100);
    c.timeout = TIMEOUT;
    c.connect_backoff = (Duration::from_millis(20), BACKOFF_MAX);
    c
}

struct Node {
    net: Net,
    events: Receiver<NetEvent>,
}

impl Node {
    fn start(cfg: NetConfig) -> Node {
        capture_logs();
        let (tx, events) = channel();
        Node { net: Net::start(cfg, tx).expect("start"), events }
    }

    fn addr(&self) -> SocketAddr {
        self.net.local_addr()
    }

    fn next(&self, within: Duration) -> NetEvent {
        self.events.recv_timeout(within).unwrap_or_else(|e| panic!("no event within {within:?}: {e}"))
    }

    /// The next event, which must match.
    fn expect(&self, within: Duration, what: &str, pred: impl Fn(&NetEvent) -> bool) -> NetEvent {
        let ev = self.next(within);
        assert!(pred(&ev), "expected {what}, got {ev:?}");
        ev
    }

    fn expect_connected(&self, peer: NodeId) {
        self.expect(Duration::from_secs(3), "Connected", |e| *e == NetEvent::Connected { peer });
    }

    fn expect_lost(&self, peer: NodeId, within: Duration) -> String {
        match self.expect(within, "Lost", |e| matches!(e, NetEvent::Lost { peer: p, .. } if *p == peer)) {
            NetEvent::Lost { reason, .. } => reason,
            _ => unreachable!(),
        }
    }

    fn expect_refused(&self, within: Duration) -> (SocketAddr, String) {
        match self.expect(within, "Refused", |e| matches!(e, NetEvent::Refused { .. })) {
            NetEvent::Refused { addr, reason } => (addr, reason),
            _ => unreachable!(),
        }
    }

    /// Events during `dur`, none of which may be a `Connected`.
    fn no_connection_for(&self, dur: Duration) -> Vec<NetEvent> {
        let end = Instant::now() + dur;
        let mut seen = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(ev) => {
                    assert!(!matches!(ev, NetEvent::Connected { .. }), "unexpected {ev:?} after {seen:?}");
                    seen.push(ev);
                }
                Err(_) => break,
            }
        }
        seen
    }
}

/// Node 1 accepting, then node 0 dialing it; both connected.
fn pair_with(a_cfg: impl FnOnce(&mut NetConfig), b_cfg: impl FnOnce(&mut NetConfig)) -> (Node, Node) {
    let mut cb = config(1, vec![(0, UNUSED.parse().unwrap())]);
    b_cfg(&mut cb);
    let b = Node::start(cb);
    let mut ca = config(0, vec![(1, b.addr())]);
    a_cfg(&mut ca);
    let a = Node::start(ca);
    (a, b)
}

fn connected_pair() -> (Node, Node) {
    let (a, b) = pair_with(|_| {}, |_| {});
    a.expect_connected(1);
    b.expect_connected(0);
    (a, b)
}

fn data(id: u64, len: usize) -> Message {
    Message::Data { id, offset: id * 4096, fua: false, payload: Bytes::from(vec![id as u8; len]) }
}

// ---------------------------------------------------------------------------------------
// Captured logs, to check the "one clear warn line" promise.

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || Capture(sink.clone()))
            .try_init();
        buf
    });
}

fn log_lines(level: &str, mentioning: &str) -> Vec<String> {
    let logs = LOGS.get().expect("capture_logs ran").lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| l.contains(level) && l.contains(mentioning))
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------
// A raw peer driven by hand.

struct Raw {
    stream: TcpStream,
    reader: FrameReader,
    send_seq: u64,
}

impl Raw {
    /// Connects to `addr` and authenticates as `node` with `secret` and `volume`.
    fn authenticated(addr: SocketAddr, node: NodeId, volume: u64, secret: &[u8]) -> Result<Raw, Refusal> {
        let stream = TcpStream::connect(addr).unwrap();
        let mut io = HandshakeIo::new(&stream, Duration::from_secs(3));
        auth::authenticate(&mut io, &Identity { node, volume, secret }, |_| Ok(()))?;
        Ok(Raw { stream, reader: FrameReader::new(), send_seq: 0 })
    }

    fn send(&mut self, msg: &Message) {
        self.send_with_seq(self.send_seq, msg);
        self.send_seq += 1;
    }

    fn send_with_seq(&mut self, seq: u64, msg: &Message) {
        let mut out = Vec::new();
        encode(VOLUME, seq, msg, &mut out).unwrap();
        self.stream.write_all(&out).unwrap();
    }

    fn recv(&mut self) -> Message {
        self.stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        self.reader.next_frame(&mut &self.stream).map(|f| f.message).unwrap_or_else(|e| panic!("recv: {e:?}"))
    }

    /// Completes the version exchange as the decider (a node with a lower id).
    fn connect_as_decider(addr: SocketAddr, node: NodeId) -> Raw {
        let mut raw = Raw::authenticated(addr, node, VOLUME, SECRET).unwrap();
        raw.send(&Message::Hello(hello(node, VOLUME)));
        assert!(matches!(raw.recv(), Message::Hello(_)));
        raw.send(&Message::HelloAck { version: 1, features: features::SUPPORTED });
        raw
    }

    /// Whether the other end closed the connection within `within`.
    fn closed_within(&mut self, within: Duration) -> bool {
        self.stream.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Two Nets.

#[test]
fn two_nets_exchange_messages_both_ways_in_order() {
    let (a, b) = connected_pair();
    assert!(a.net.is_connected(1) && b.net.is_connected(0));
    const N: u64 = 2000;
    for id in 0..N {
        a.net.send(1, data(id, 100));
        b.net.send(0, Message::ReceiptAck { id });
    }
    for id in 0..N {
        assert_eq!(b.next(Duration::from_secs(5)), NetEvent::Message { peer: 0, msg: data(id, 100) });
        assert_eq!(a.next(Duration::from_secs(5)), NetEvent::Message { peer: 1, msg: Message::ReceiptAck { id } });
    }
}

#[test]
fn a_4_mib_resync_track_passes() {
    let (a, b) = connected_pair();
    let track: Vec<u8> = (0..4usize << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    let msgs: Vec<Message> =
        (0..3).map(|t| Message::ResyncData { track: t, payload: Bytes::from(track.clone()) }).collect();
    for m in &msgs {
        a.net.send(1, m.clone());
        b.net.send(0, m.clone());
    }
    for m in &msgs {
        assert_eq!(b.next(Duration::from_secs(10)), NetEvent::Message { peer: 0, msg: m.clone() });
        assert_eq!(a.next(Duration::from_secs(10)), NetEvent::Message { peer: 1, msg: m.clone() });
    }
}

#[test]
fn queued_messages_leave_with_a_flush_or_a_send_in_order() {
    let (a, b) = connected_pair();
    // A mix of small frames (sent by the flushing thread) and large ones (by the writer).
    let msgs: Vec<Message> = (0..300).map(|id| if id % 50 == 7 { data(id, 300_000) } else { data(id, 4096) }).collect();
    for m in &msgs[..200] {
        a.net.queue(1, m.clone());
    }
    a.net.flush();
    for m in &msgs[200..250] {
        a.net.queue(1, m.clone());
    }
    // A send takes what was queued before it along.
    a.net.send(1, msgs[250].clone());
    for m in &msgs[251..] {
        a.net.queue(1, m.clone());
    }
    a.net.flush();
    for m in &msgs {
        assert_eq!(b.next(Duration::from_secs(5)), NetEvent::Message { peer: 0, msg: m.clone() });
    }
}

#[test]
fn a_queued_message_that_is_never_flushed_still_leaves_within_the_keepalive() {
    let (a, b) = connected_pair();
    thread::sleep(Duration::from_millis(20));
    a.net.queue(1, Message::Flush { id: 3 });
    let msg = b.next(Duration::from_millis(100) + SLACK);
    assert_eq!(msg, NetEvent::Message { peer: 0, msg: Message::Flush { id: 3 } });
}

#[test]
fn events_can_go_to_a_function() {
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let b = Net::start(config(1, vec![(0, UNUSED.parse().unwrap())]), move |e| {
        let _ = tx.lock().unwrap().send(e);
    })
    .expect("start");
    let a = Node::start(config(0, vec![(1, b.local_addr())]));
    a.expect_connected(1);
    assert_eq!(rx.recv_timeout(Duration::from_secs(3)).unwrap(), NetEvent::Connected { peer: 0 });
    a.net.send(1, Message::ReceiptAck { id: 5 });
    let got = rx.recv_timeout(Duration::from_secs(3)).unwrap();
    assert_eq!(got, NetEvent::Message { peer: 0, msg: Message::ReceiptAck { id: 5 } });
}

/// Records events and `drained` calls in the order they happen.
struct Recording(Mutex<std::sync::mpsc::Sender<String>>);

impl EventSink for Recording {
    fn event(&self, e: NetEvent) {
        let said = match e {
            NetEvent::Message { msg: Message::Flush { id }, .. } => format!("m{id}"),
            NetEvent::Lost { .. } => "lost".into(),
            other => format!("{other:?}"),
        };
        let _ = self.0.lock().unwrap().send(said);
    }

    fn drained(&self, peer: NodeId) {
        let _ = self.0.lock().unwrap().send(format!("drained{peer}"));
    }
}

#[test]
fn a_burst_is_delivered_then_drained_and_the_last_drain_comes_before_lost() {
    let (tx, rx) = channel();
    let b = Net::start(config(1, vec![(0, UNUSED.parse().unwrap())]), Recording(Mutex::new(tx))).expect("start");
    let a = Node::start(config(0, vec![(1, b.local_addr())]));
    a.expect_connected(1);
    let next = || rx.recv_timeout(Duration::from_secs(3)).expect("an event");
    assert_eq!(next(), "Connected { peer: 0 }");
    // One send system call carries the whole burst.
    for id in 0..200 {
        a.net.queue(1, Message::Flush { id });
    }
    a.net.flush();
    let (mut messages, mut drains) = (0, 0);
    let mut last = String::new();
    while messages < 200 || last != "drained0" {
        last = next();
        match last.as_str() {
            "drained0" => drains += 1,
            m => {
                assert_eq!(m, format!("m{messages}"), "messages in order");
                messages += 1;
            }
        }
    }
    assert!(drains < messages, "{drains} drains for {messages} messages: a burst should be drained as one");
    // Messages then the link's end: the owner hears `drained` before `Lost`.
    a.net.send(1, Message::Flush { id: 200 });
    drop(a);
    assert_eq!(next(), "m200");
    assert_eq!(next(), "drained0");
    assert_eq!(next(), "lost");
}

#[test]
fn an_idle_link_is_kept_alive_by_pings() {
    let (a, b) = connected_pair();
    thread::sleep(TIMEOUT * 3);
    assert!(a.events.try_recv().is_err(), "idle link must stay up and pings must not be forwarded");
    assert!(b.events.try_recv().is_err());
    a.net.send(1, Message::Flush { id: 9 });
    assert_eq!(b.next(Duration::from_secs(1)), NetEvent::Message { peer: 0, msg: Message::Flush { id: 9 } });
}

#[test]
fn wrong_secret_is_refused_on_both_sides() {
    let (a, b) = pair_with(|c| c.secret = b"one secret".to_vec(), |c| c.secret = b"another secret".to_vec());
    let (_, ra) = a.expect_refused(Duration::from_secs(2));
    let (_, rb) = b.expect_refused(Duration::from_secs(2));
    assert!(ra.contains("authentication failed") && ra.contains("node 1"), "{ra}");
    assert!(rb.contains("authentication failed") && rb.contains("node 0"), "{rb}");
    // The dialer keeps trying with backoff; every attempt is refused, none connects.
    a.no_connection_for(Duration::from_millis(600));
    b.no_connection_for(Duration::from_millis(100));
    assert!(!a.net.is_connected(1) && !b.net.is_connected(0));
}

#[test]
fn shutdown_of_one_side_is_lost_on_the_other_within_the_timeout() {
    let (a, b) = connected_pair();
    let t = Instant::now();
    b.net.shutdown();
    let reason = a.expect_lost(1, TIMEOUT + SLACK);
    assert!(t.elapsed() < TIMEOUT, "a clean close is seen at once, took {:?}", t.elapsed());
    assert!(reason.contains("closed"), "{reason}");
    assert!(b
        .events
        .iter()
        .any(|e| matches!(e, NetEvent::Lost { peer: 0, ref reason } if reason.contains("shutting down"))));
}

#[test]
fn a_restarted_peer_is_reconnected() {
    let (a, b) = connected_pair();
    let addr = b.addr();
    drop(b);
    a.expect_lost(1, TIMEOUT + SLACK);
    let mut cb = config(1, vec![(0, UNUSED.parse().unwrap())]);
    cb.listen = addr;
    let b = Node::start(cb);
    a.expect_connected(1);
    b.expect_connected(0);
    a.net.send(1, Message::Flush { id: 1 });
    assert_eq!(b.next(Duration::from_secs(1)), NetEvent::Message { peer: 0, msg: Message::Flush { id: 1 } });
}

#[test]
fn stand_alone_on_the_dialer_holds_until_reconnect() {
    let (a, b) = connected_pair();
    a.net.disconnect(1, true);
    // disconnect() returns after the Lost was sent.
    let reason = match a.events.try_recv() {
        Ok(NetEvent::Lost { peer: 1, reason }) => reason,
        other => panic!("expected Lost right after disconnect, got {other:?}"),
    };
    assert!(reason.contains("stand-alone"), "{reason}");
    b.expect_lost(0, TIMEOUT + SLACK);
    assert!(a.no_connection_for(BACKOFF_MAX * 4).is_empty(), "a stand-alone dialer does not even dial");
    b.no_connection_for(Duration::ZERO);
    a.net.reconnect(1);
    a.expect_connected(1);
    b.expect_connected(0);
}

#[test]
fn stand_alone_on_the_acceptor_holds_until_reconnect() {
    let (a, b) = connected_pair();
    b.net.disconnect(0, true);
    b.expect_lost(0, Duration::from_millis(1));
    a.expect_lost(1, TIMEOUT + SLACK);
    // The dialer keeps trying and is told why it is turned away.
    let (_, ra) = a.expect_refused(Duration::from_secs(2));
    assert!(ra.contains("stand-alone on its side"), "{ra}");
    let (_, rb) = b.expect_refused(Duration::from_secs(2));
    assert!(rb.contains("stand-alone here"), "{rb}");
    a.no_connection_for(BACKOFF_MAX * 3);
    b.no_connection_for(Duration::ZERO);
    b.net.reconnect(0);
    // The lower id dials: the link is back after at most one backoff. Attempts that were
    // under way when reconnect() ran may still be refused first.
    for node in [&a, &b] {
        let deadline = Instant::now() + BACKOFF_MAX + SLACK * 2;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match node.next(left) {
                NetEvent::Connected { .. } => break,
                NetEvent::Refused { .. } => continue,
                other => panic!("expected Connected, got {other:?}"),
            }
        }
    }
}

#[test]
fn a_plain_disconnect_reconnects_by_itself() {
    let (a, b) = connected_pair();
    b.net.disconnect(0, false);
    b.expect_lost(0, Duration::from_millis(1));
    a.expect_lost(1, TIMEOUT + SLACK);
    a.expect_connected(1);
    b.expect_connected(0);
}

/// Per peer, events must follow `(Connected Message* Lost)*`, and messages of one
/// connection must arrive in the order sent.
#[test]
fn events_keep_their_order_through_link_churn() {
    let (a, b) = connected_pair();
    let stop = Arc::new(AtomicBool::new(false));
    let Node { net: a_net, events: _a_events } = a;
    let a_net = Arc::new(a_net);
    let sender = {
        let (a_net, stop) = (a_net.clone(), stop.clone());
        thread::spawn(move || {
            let mut id = 0;
            while !stop.load(Ordering::Relaxed) {
                a_net.send(1, Message::ReceiptAck { id });
                id += 1;
                if id % 64 == 0 {
                    thread::sleep(Duration::from_micros(200));
                }
            }
        })
    };
    for round in 0..6 {
        thread::sleep(Duration::from_millis(60));
        if round % 2 == 0 {
            b.net.disconnect(0, false);
        } else {
            a_net.disconnect(1, false);
        }
    }
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    thread::sleep(Duration::from_millis(100));

    // connected_pair() consumed the first Connected.
    let (mut up, mut last, mut links, mut msgs) = (true, None::<u64>, 1, 0);
    for ev in b.events.try_iter() {
        match ev {
            NetEvent::Connected { peer: 0 } => {
                assert!(!up, "Connected twice without Lost");
                up = true;
                last = None;
                links += 1;
            }
            NetEvent::Message { peer: 0, msg: Message::ReceiptAck { id } } => {
                assert!(up, "Message outside a connection");
                assert!(last.is_none_or(|l| id > l), "out of order: {id} after {last:?}");
                last = Some(id);
                msgs += 1;
            }
            NetEvent::Lost { peer: 0, .. } => {
                assert!(up, "Lost without Connected");
                up = false;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(links >= 3, "only {links} links came up");
    assert!(msgs > 100, "only {msgs} messages arrived");
}

/// A forwarder that can swallow traffic silently, like a network blackhole.
fn blackhole_proxy(target: SocketAddr) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hole = Arc::new(AtomicBool::new(false));
    let h = hole.clone();
    thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { return };
            let outbound = TcpStream::connect(target).unwrap();
            for (mut from, mut to) in
                [(inbound.try_clone().unwrap(), outbound.try_clone().unwrap()), (outbound, inbound)]
            {
                let h = h.clone();
                thread::spawn(move || {
                    let mut buf = vec![0; 64 * 1024];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        if !h.load(Ordering::Relaxed) && to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    // A blackhole passes nothing on, not even a close.
                    if !h.load(Ordering::Relaxed) {
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    }
                });
            }
        }
    });
    (addr, hole)
}

#[test]
fn a_silent_partition_is_noticed_within_the_timeout() {
    let b = Node::start(config(1, vec![(0, UNUSED.parse().unwrap())]));
    let (proxy, hole) = blackhole_proxy(b.addr());
    let a = Node::start(config(0, vec![(1, proxy)]));
    a.expect_connected(1);
    b.expect_connected(0);
    let t = Instant::now();
    hole.store(true, Ordering::Relaxed);
    let ra = a.expect_lost(1, TIMEOUT + SLACK);
    let rb = b.expect_lost(0, TIMEOUT + SLACK);
    assert!(t.elapsed() >= TIMEOUT - Duration::from_millis(150), "lost too early: {:?}", t.elapsed());
    assert!(ra.contains("nothing received") && rb.contains("nothing received"), "{ra} / {rb}");
}

// ---------------------------------------------------------------------------------------
// Strangers and misbehaving peers against one Net (node 1, accepting).

fn acceptor() -> Node {
    Node::start(config(1, vec![(0, UNUSED.parse().unwrap()), (2, UNUSED.parse().unwrap())]))
}

#[test]
fn a_stranger_sending_garbage_is_refused_and_the_listener_keeps_working() {
    let b = acceptor();
    let mut stranger = TcpStream::connect(b.addr()).unwrap();
    let stranger_addr = stranger.local_addr().unwrap();
    let t = Instant::now();
    stranger.write_all(b"GET / HTTP/1.1\r\nHost: tandem\r\n\r\n").unwrap();
    let (addr, reason) = b.expect_refused(TIMEOUT);
    assert!(t.elapsed() < TIMEOUT, "garbage is refused at once, not by timeout");
    assert_eq!(addr, stranger_addr);
    assert!(reason.contains("not a Tandem peer") && reason.contains("GET "), "{reason}");
    let warns = log_lines("WARN", &stranger_addr.to_string());
    assert_eq!(warns.len(), 1, "exactly one warn line per refusal: {warns:#?}");
    assert!(warns[0].contains("not a Tandem peer"), "{}", warns[0]);

    let mut binary = TcpStream::connect(b.addr()).unwrap();
    binary.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    assert!(b.expect_refused(TIMEOUT).1.contains(r"\x16\x03\x01\x02"));

    // A proper peer still gets in.
    let a = Node::start(config(0, vec![(1, b.addr())]));
    a.expect_connected(1);
    b.expect_connected(0);
}

#[test]
fn a_silent_stranger_is_refused_within_the_timeout() {
    let b = acceptor();
    let _silent = TcpStream::connect(b.addr()).unwrap();
    let t = Instant::now();
    let (_, reason) = b.expect_refused(TIMEOUT + SLACK);
    assert!(t.elapsed() >= TIMEOUT - Duration::from_millis(100), "refused too early: {:?}", t.elapsed());
    assert!(reason.contains("timed out during authentication"), "{reason}");
}

#[test]
fn a_peer_that_stops_talking_after_the_handshake_is_lost_within_the_timeout() {
    let b = acceptor();
    let _raw = Raw::connect_as_decider(b.addr(), 0);
    b.expect_connected(0);
    let t = Instant::now();
    let reason = b.expect_lost(0, TIMEOUT + SLACK);
    assert!(t.elapsed() >= TIMEOUT - Duration::from_millis(150), "lost too early: {:?}", t.elapsed());
    assert!(reason.contains("nothing received"), "{reason}");
}

#[test]
fn another_protocol_version_is_refused_with_the_versions_named() {
    let b = acceptor();
    let mut raw = Raw::authenticated(b.addr(), 0, VOLUME, SECRET).unwrap();
    let v7 = Hello { min_version: 7, max_version: 7, features: features::SUPPORTED, node: 0, volume: VOLUME };
    raw.send(&Message::Hello(v7));
    // The acceptor still sends its Hello, so that we can diagnose the same failure.
    assert!(matches!(raw.recv(), Message::Hello(Hello { min_version: 1, max_version: 1, .. })));
    let (_, reason) = b.expect_refused(TIMEOUT);
    assert!(reason.contains("no common protocol version: we speak 1..=1, the peer 7..=7"), "{reason}");
    assert!(raw.closed_within(TIMEOUT));
    b.no_connection_for(Duration::from_millis(100));
}

#[test]
fn a_wrong_secret_from_a_raw_peer_is_refused() {
    let b = acceptor();
    let err = Raw::authenticated(b.addr(), 0, VOLUME, b"guess").err().expect("must fail");
    assert!(matches!(err, Refusal::BadMac { node: 1 }), "{err}");
    assert!(b.expect_refused(TIMEOUT).1.contains("authentication failed: node 0's answer"));
}

#[test]
fn wrong_volume_unknown_node_and_wrong_direction_are_refused() {
    let b = acceptor();
    let cases: [(NodeId, u64, &str); 4] = [
        (0, VOLUME + 1, "volume mismatch: we serve volume 0x7a, the peer volume 0x7b"),
        (9, VOLUME, "claims node id 9, which is not a configured peer"),
        (2, VOLUME, "node 2 dialed us, but only a node with a lower id"),
        (1, VOLUME, "claims our own node id 1"),
    ];
    for (node, volume, expected) in cases {
        let err = Raw::authenticated(b.addr(), node, volume, SECRET).err().expect("must fail");
        assert!(
            matches!(err, Refusal::Closed { .. } | Refusal::WrongVolume { .. } | Refusal::SameNode { .. }),
            "{err}"
        );
        let (_, reason) = b.expect_refused(TIMEOUT);
        assert!(reason.contains(expected), "{reason} should say {expected}");
    }
}

#[test]
fn a_seq_gap_drops_the_link() {
    let b = acceptor();
    let mut raw = Raw::connect_as_decider(b.addr(), 0);
    b.expect_connected(0);
    raw.send(&Message::Flush { id: 1 });
    raw.send_with_seq(7, &Message::Flush { id: 2 });
    assert_eq!(b.next(TIMEOUT), NetEvent::Message { peer: 0, msg: Message::Flush { id: 1 } });
    let reason = b.expect_lost(0, TIMEOUT);
    assert!(reason.contains("frame seq 7, expected 3"), "{reason}");
}

#[test]
fn garbage_after_the_handshake_drops_the_link_with_the_decode_error() {
    let b = acceptor();
    let mut raw = Raw::connect_as_decider(b.addr(), 0);
    b.expect_connected(0);
    raw.stream.write_all(&[0xEE; 64]).unwrap();
    let reason = b.expect_lost(0, TIMEOUT);
    assert!(reason.contains("undecodable frame") && reason.contains("bad magic"), "{reason}");
}

#[test]
fn a_new_connection_from_a_connected_peer_replaces_the_old_one() {
    let b = acceptor();
    let mut first = Raw::connect_as_decider(b.addr(), 0);
    b.expect_connected(0);
    let _second = Raw::connect_as_decider(b.addr(), 0);
    let reason = b.expect_lost(0, TIMEOUT);
    assert!(reason.contains("replaced"), "{reason}");
    b.expect_connected(0);
    assert!(first.closed_within(TIMEOUT));
}

#[test]
fn a_send_queue_overflow_drops_the_link_instead_of_a_message() {
    let mut cfg = config(1, vec![(0, UNUSED.parse().unwrap())]);
    cfg.send_queue_limit = 64 * 1024;
    let b = Node::start(cfg);
    // A peer that never reads: socket buffers fill, then the queue.
    let _raw = Raw::connect_as_decider(b.addr(), 0);
    b.expect_connected(0);
    let track = Bytes::from(vec![0; 1 << 20]);
    for t in 0..200 {
        b.net.send(0, Message::ResyncData { track: t, payload: track.clone() });
    }
    let reason = b.expect_lost(0, TIMEOUT);
    assert!(reason.contains("send queue overflow") && reason.contains("limit 65536"), "{reason}");
}

// ---------------------------------------------------------------------------------------
// Start-up errors.

#[test]
fn a_taken_port_is_a_precise_error() {
    let b = acceptor();
    let mut cfg = config(1, vec![]);
    cfg.listen = b.addr();
    let err = Net::start(cfg, channel().0).err().expect("port is taken");
    assert!(matches!(err, NetError::AddrInUse { addr } if addr == b.addr()), "{err}");
    assert!(err.to_string().contains("already in use"), "{err}");
}

#[test]
fn configurations_that_cannot_work_are_rejected() {
    let ok = config(0, vec![(1, UNUSED.parse().unwrap())]);
    assert_eq!(ok.validate(), Ok(()));
    let bad = |f: fn(&mut NetConfig)| {
        let mut c = ok.clone();
        f(&mut c);
        c.validate().unwrap_err()
    };
    assert_eq!(bad(|c| c.timeout = Duration::from_secs(6)), ConfigError::Timeout(Duration::from_secs(6)));
    assert!(matches!(bad(|c| c.keepalive = c.timeout), ConfigError::Keepalive { .. }));
    assert!(matches!(
        bad(|c| c.connect_backoff = (Duration::from_secs(2), Duration::from_secs(1))),
        ConfigError::Backoff { .. }
    ));
    assert_eq!(bad(|c| c.secret.clear()), ConfigError::EmptySecret);
    assert_eq!(bad(|c| c.peers.push((0, UNUSED.parse().unwrap()))), ConfigError::SelfAsPeer { node: 0 });
    assert_eq!(bad(|c| c.peers.push((1, UNUSED.parse().unwrap()))), ConfigError::DuplicatePeer { node: 1 });
    assert!(matches!(
        bad(|c| c.peers.push((64, UNUSED.parse().unwrap()))),
        ConfigError::NodeOutOfRange { node: 64, .. }
    ));
    assert!(!format!("{ok:?}").contains("horse"), "Debug must not show the secret");
}
