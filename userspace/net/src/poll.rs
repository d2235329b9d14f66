//! Short, adaptive busy-polling of a link's socket by its reader.
//!
//! Waking a thread that sleeps in `read` costs tens of microseconds on a virtual machine
//! (measured here: a TCP ping-pong between two threads on loopback takes 80 µs with both
//! sleeping, 20 µs with one polling), which is most of what a replicated 4 KiB write waits
//! for. So right after data arrived, when more is likely to follow soon (the peer's ack, the
//! next write), the reader polls the socket without blocking for up to [`POLL_WINDOW`],
//! yielding the CPU between attempts, and sleeps in a blocking read as before once the
//! window has passed. It stops polling at once when a yield shows that another thread
//! wanted the CPU: on a busy machine polling would only take time from the threads that
//! produce the work. An idle link therefore costs nothing, and the read timeout (keepalive)
//! works unchanged.

use std::io::{self, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How long after the last data the reader keeps polling.
pub(crate) const POLL_WINDOW: Duration = Duration::from_micros(200);
/// A yield that took longer than this ran another thread: the CPU is wanted elsewhere.
pub(crate) const YIELD_BUSY: Duration = Duration::from_micros(10);

/// A socket read side that polls briefly before it blocks.
pub(crate) struct PollingReader<'a> {
    stream: &'a TcpStream,
    window: Duration,
    last_data: Instant,
}

impl<'a> PollingReader<'a> {
    pub fn new(stream: &'a TcpStream, window: Duration) -> Self {
        // Nothing arrived yet: start blocking.
        PollingReader { stream, window, last_data: Instant::now() - window }
    }
}

impl Read for PollingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.last_data.elapsed() < self.window {
            match nonblocking_read(self.stream, buf) {
                Ok(n) => {
                    self.last_data = Instant::now();
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let before = Instant::now();
                    std::thread::yield_now();
                    if before.elapsed() > YIELD_BUSY {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let n = (&mut &*self.stream).read(buf)?;
        self.last_data = Instant::now();
        Ok(n)
    }
}

fn nonblocking_read(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes.
    let n = unsafe {
        libc::recv(std::os::fd::AsRawFd::as_raw_fd(stream), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
