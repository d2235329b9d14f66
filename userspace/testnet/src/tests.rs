//! The forwarder on loopback (any user), and the namespaces with their impairments (root
//! only: elsewhere they print why they skip).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::link::{Endpoint, Link};
use crate::netns::{self, Pair};

/// An echo server on `listener`: every connection gets back what it sends.
fn echo(listener: TcpListener) -> SocketAddr {
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut back = stream.try_clone().unwrap();
                let _ = std::io::copy(&mut &stream, &mut back);
            });
        }
    });
    addr
}

fn loopback_echo() -> u16 {
    echo(TcpListener::bind("127.0.0.1:0").unwrap()).port()
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// One byte there and back.
fn round_trip(s: &mut TcpStream) -> Duration {
    let t = Instant::now();
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    t.elapsed()
}

/// `n` bytes of a pattern that shows any reordering, loss or duplication.
fn pattern(n: usize) -> Vec<u8> {
    (0..n as u64).map(|i| (i.wrapping_mul(0x9E37_79B9) >> 7) as u8 ^ (i >> 16) as u8).collect()
}

/// Sends `data` on one thread while reading the echo on this one; the echo.
fn echo_through(s: &TcpStream, data: &[u8]) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let mut r = s.try_clone().unwrap();
    std::thread::scope(|scope| {
        scope.spawn(|| w.write_all(data).unwrap());
        let mut got = vec![0u8; data.len()];
        r.read_exact(&mut got).unwrap();
        got
    })
}

/// Whether the stream ends (EOF or an error) within `within`.
fn closes_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

#[test]
fn delay_is_at_least_the_configured_one_way_time_in_each_direction() {
    let link = Link::loopback(loopback_echo()).unwrap().with_delay(Duration::from_millis(20));
    let mut s = connect(link.addr());
    for _ in 0..5 {
        let rtt = round_trip(&mut s);
        assert!(rtt >= Duration::from_millis(40), "20 ms each way, round trip {rtt:?}");
        assert!(rtt < Duration::from_secs(1), "round trip {rtt:?}");
    }
    // The bench's setting: 0.5 ms one way, a 1 ms round trip.
    link.delay(Duration::from_micros(500));
    let mut rtts: Vec<Duration> = (0..20).map(|_| round_trip(&mut s)).collect();
    rtts.sort();
    eprintln!("0.5 ms each way: round trips {:?} .. {:?}, median {:?}", rtts[0], rtts[19], rtts[10]);
    assert!(rtts[0] >= Duration::from_millis(1), "0.5 ms each way, shortest round trip {:?}", rtts[0]);
    assert!(rtts[10] < Duration::from_millis(50), "median round trip {:?}", rtts[10]);
    // And none at all.
    link.delay(Duration::ZERO);
    let mut rtts: Vec<Duration> = (0..20).map(|_| round_trip(&mut s)).collect();
    rtts.sort();
    eprintln!("no delay: round trips {:?} .. {:?}, median {:?}", rtts[0], rtts[19], rtts[10]);
    assert!(rtts[10] < Duration::from_millis(20), "no delay, median round trip {:?}", rtts[10]);
}

#[test]
fn order_is_kept_and_the_delay_does_not_cut_throughput() {
    let link = Link::loopback(loopback_echo()).unwrap().with_delay(Duration::from_millis(20));
    let s = connect(link.addr());
    // Bulk: 16 MiB there and back, byte for byte.
    let data = pattern(16 << 20);
    assert!(echo_through(&s, &data) == data, "16 MiB came back in order, intact");

    // 400 separate small writes: a sleep of 20 ms per read would take 2 × 8 s; a pipelined
    // queue takes the sending time plus 40 ms.
    let data = pattern(400 << 10);
    let mut w = s.try_clone().unwrap();
    let mut r = s.try_clone().unwrap();
    let t = Instant::now();
    let got = std::thread::scope(|scope| {
        scope.spawn(|| {
            for chunk in data.chunks(1 << 10) {
                w.write_all(chunk).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let mut got = vec![0u8; data.len()];
        r.read_exact(&mut got).unwrap();
        got
    });
    let took = t.elapsed();
    assert!(got == data, "400 small writes came back in order");
    assert!(took >= Duration::from_millis(440), "sending time plus the delay: {took:?}");
    assert!(took < Duration::from_secs(4), "the delay is pipelined, not paid per chunk: {took:?}");
}

#[test]
fn reset_closes_every_connection_and_new_ones_until_pass() {
    let link = Link::loopback(loopback_echo()).unwrap();
    let mut a = connect(link.addr());
    let mut b = connect(link.addr());
    round_trip(&mut a);
    round_trip(&mut b);
    link.reset();
    assert!(closes_within(&mut a, Duration::from_secs(1)), "reset closes connection a");
    assert!(closes_within(&mut b, Duration::from_secs(1)), "reset closes connection b");
    let mut c = connect(link.addr());
    let _ = c.write_all(b"x");
    assert!(closes_within(&mut c, Duration::from_secs(1)), "a new connection is closed too");
    link.pass();
    let mut d = connect(link.addr());
    round_trip(&mut d);
}

#[test]
fn blackhole_stalls_silently_and_pass_delivers_what_was_held() {
    let link = Link::loopback(loopback_echo()).unwrap();
    let mut s = connect(link.addr());
    round_trip(&mut s);
    link.blackhole();
    std::thread::sleep(Duration::from_millis(100)); // the pumps see the mode within a tick
    s.write_all(b"held").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut b = [0u8; 4];
    let err = s.read(&mut b).expect_err("nothing comes back through a blackhole, not even an EOF");
    assert!(matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{err}");
    // A new connection is accepted and never answered.
    let mut n = connect(link.addr());
    let _ = n.write_all(b"x");
    assert!(!closes_within(&mut n, Duration::from_millis(300)), "no refusal either");
    link.pass();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"held");
    round_trip(&mut s);
}

#[test]
fn dropping_the_link_closes_its_connections() {
    let link = Link::loopback(loopback_echo()).unwrap();
    let mut s = connect(link.addr());
    round_trip(&mut s);
    drop(link);
    assert!(closes_within(&mut s, Duration::from_secs(1)));
}

/// The namespace pair, or None with the reason printed.
fn pair() -> Option<Pair> {
    if let Some(why) = netns::unavailable() {
        eprintln!("skipped: {why}");
        return None;
    }
    Some(Pair::new().unwrap_or_else(|e| panic!("as root, network namespaces must work here: {e}")))
}

/// An echo server in node `i`'s namespace on its address.
fn echo_in(pair: &Pair, i: usize, port: u16) -> SocketAddr {
    let addr = SocketAddr::new(pair.addr(i), port);
    echo(pair.in_node(i, || TcpListener::bind(addr)).unwrap())
}

fn connect_from(pair: &Pair, i: usize, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = pair.in_node(i, || TcpStream::connect_timeout(&addr, timeout))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

#[test]
fn namespaces_talk_over_veth_and_a_link_taken_down_fails_at_once() {
    let Some(pair) = pair() else { return };
    let server = echo_in(&pair, 1, 7001);
    let mut s = connect_from(&pair, 0, server, Duration::from_secs(2)).unwrap();
    round_trip(&mut s);
    pair.link(0, false).unwrap();
    let t = Instant::now();
    assert!(connect_from(&pair, 0, server, Duration::from_secs(2)).is_err());
    assert!(t.elapsed() < Duration::from_secs(1), "a link down fails at once: {:?}", t.elapsed());
    pair.link(0, true).unwrap();
    let mut s = connect_from(&pair, 0, server, Duration::from_secs(2)).unwrap();
    round_trip(&mut s);
    let names = pair.names.clone();
    drop(pair);
    for n in names {
        assert!(!netns::netns_path(&n).exists(), "{n} is deleted with the pair");
    }
}

#[test]
fn a_link_between_namespaces_forwards_with_its_delay() {
    let Some(pair) = pair() else { return };
    let server = echo_in(&pair, 1, 7002);
    // Listener in node 0's namespace, outbound connection made in node 1's.
    let link = Link::new(
        Endpoint::in_netns(&pair.names[0], SocketAddr::new(pair.addr(0), 0)),
        Endpoint::in_netns(&pair.names[1], server),
    )
    .unwrap()
    .with_delay(Duration::from_millis(5));
    assert_eq!(link.addr().ip(), pair.addr(0));
    let mut s = connect_from(&pair, 0, link.addr(), Duration::from_secs(2)).unwrap();
    let rtt = round_trip(&mut s);
    assert!(rtt >= Duration::from_millis(10), "5 ms each way: {rtt:?}");
    let data = pattern(1 << 20);
    assert!(echo_through(&s, &data) == data);
}

#[test]
fn nftables_blackhole_is_silent_and_heals() {
    let Some(pair) = pair() else { return };
    let server = echo_in(&pair, 1, 7003);
    let mut s = connect_from(&pair, 0, server, Duration::from_secs(2)).unwrap();
    round_trip(&mut s);
    pair.blackhole().unwrap();
    s.write_all(b"held").unwrap(); // accepted by the kernel: TCP notices nothing
    s.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    let mut b = [0u8; 4];
    let err = s.read(&mut b).expect_err("nothing comes back through a blackhole");
    assert!(matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{err}");
    let t = Instant::now();
    let refused = connect_from(&pair, 0, server, Duration::from_millis(500));
    assert!(refused.is_err() && t.elapsed() >= Duration::from_millis(450), "a new connection just times out");
    pair.blackhole_off().unwrap();
    // TCP's retransmission (backing off) delivers it.
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"held");
    pair.blackhole_off().unwrap(); // idempotent
}

#[test]
fn tbf_rate_limit_and_ingress_loss() {
    let Some(pair) = pair() else { return };
    let server = echo_in(&pair, 1, 7004);
    let s = connect_from(&pair, 0, server, Duration::from_secs(2)).unwrap();
    let data = pattern(1 << 20);
    // 8 Mbit/s out of node 0: 1 MiB takes at least ≈ 1 s.
    pair.rate(0, 8_000_000).unwrap();
    let t = Instant::now();
    assert!(echo_through(&s, &data) == data);
    let limited = t.elapsed();
    assert!(limited >= Duration::from_millis(800), "1 MiB at 8 Mbit/s in {limited:?}");
    pair.rate_off(0).unwrap();
    pair.rate_off(0).unwrap(); // idempotent
    let t = Instant::now();
    assert!(echo_through(&s, &data) == data);
    assert!(t.elapsed() < limited / 2, "without the limit: {:?}", t.elapsed());

    // 5 % loss on what node 1 receives: packets are dropped, TCP delivers everything.
    pair.loss(1, 50).unwrap();
    let data = pattern(4 << 20);
    assert!(echo_through(&s, &data) == data);
    let dropped = pair.loss_dropped(1).unwrap();
    assert!(dropped > 0, "the loss dropped packets");
    pair.loss(1, 0).unwrap();
    pair.loss_off(1).unwrap(); // idempotent
    assert_eq!(pair.loss_dropped(1).unwrap(), 0, "no loss table left");
}
