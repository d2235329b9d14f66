//! A small link emulator for the tests: a TCP forwarder between two nodes that can pass
//! traffic, swallow it silently (a partition TCP does not notice), or reset every connection
//! (a cut link). This kernel has no netem; a forwarder is enough for a TCP protocol.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PASS: u8 = 0;
const BLACKHOLE: u8 = 1;
const RESET: u8 = 2;

pub struct Link {
    pub port: u16,
    mode: Arc<AtomicU8>,
}

impl Link {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub fn new(target: u16) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let m = mode.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if m.load(Ordering::Relaxed) != PASS {
                    continue; // dropped: a cut or silent link takes no new connections
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                for (from, to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    let m = m.clone();
                    std::thread::spawn(move || pump(from, to, m));
                }
            }
        });
        Link { port, mode }
    }

    pub fn pass(&self) {
        self.mode.store(PASS, Ordering::Relaxed);
    }

    /// Nothing gets through and nothing is refused: only a keepalive notices.
    pub fn blackhole(&self) {
        self.mode.store(BLACKHOLE, Ordering::Relaxed);
    }

    /// Every connection is closed at once, and new ones are dropped until `pass`.
    pub fn reset(&self) {
        self.mode.store(RESET, Ordering::Relaxed);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, mode: Arc<AtomicU8>) {
    from.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match mode.load(Ordering::Relaxed) {
            RESET => break,
            BLACKHOLE => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            _ => {}
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Read before a partition began: TCP would have delivered it.
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
