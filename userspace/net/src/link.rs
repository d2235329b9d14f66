//! An established link: a reader (the calling thread) and a writer thread on one socket.
//!
//! The reader is the only thread that delivers messages, and it returns the reason the
//! link ended only after its last delivery, which is what lets the caller promise "no
//! `Message` after `Lost`". Anything else that wants the link gone (the writer on a send
//! error, `Net::disconnect`, shutdown, a queue overflow) calls [`Closer::close`]: it
//! records the first reason and shuts the socket down, which wakes the reader.

use crate::error::LinkError;
use crate::frames::{FrameReader, ReadError};
use crate::poll::{PollingReader, POLL_WINDOW};
use crate::queue::{write_batch, PushError, SendQueue, Taken};
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};
use tandem_core::types::NodeId;
use tandem_core::wire::Message;
use tracing::{debug, trace};

/// Ends a link from any thread; the first reason given is the one reported.
pub(crate) struct Closer {
    stream: TcpStream,
    queue: Arc<SendQueue>,
    reason: Mutex<Option<LinkError>>,
}

impl Closer {
    pub fn new(stream: TcpStream, queue: Arc<SendQueue>) -> Closer {
        Closer { stream, queue, reason: Mutex::new(None) }
    }

    pub fn close(&self, reason: LinkError) {
        {
            let mut r = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.queue.close();
        // Wakes the reader (its read returns) and the writer (its write fails).
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn take_reason(&self) -> Option<LinkError> {
        self.reason.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// What the link needs to know about its session.
#[derive(Clone, Copy)]
pub(crate) struct Session {
    pub peer: NodeId,
    pub volume: u64,
    pub keepalive: Duration,
    pub timeout: Duration,
    pub recv_seq: u64,
}

/// What the reader hands its owner.
pub(crate) enum Delivered {
    /// A message that is not keepalive traffic, in the order received.
    Message(Message),
    /// The messages delivered since the last `Drained` were all those the reader had
    /// buffered: it is about to wait for the socket (or the link is ending).
    Drained,
}

/// Runs the link until it ends and returns why; `deliver` gets what it reads.
pub(crate) fn run(
    stream: TcpStream,
    reader: FrameReader,
    session: Session,
    queue: Arc<SendQueue>,
    closer: Arc<Closer>,
    deliver: &mut dyn FnMut(Delivered),
) -> LinkError {
    // One read timeout covers "nothing arrives for `timeout`": the peer pings every
    // `keepalive` when it has nothing else to say, so a read that waits longer means the
    // peer or the path is gone. The write timeout catches a send that makes no progress.
    let timeouts =
        stream.set_read_timeout(Some(session.timeout)).and_then(|()| stream.set_write_timeout(Some(session.timeout)));
    if let Err(e) = timeouts {
        closer.close(LinkError::Read(e));
        return ended_reason(&closer);
    }
    let epoch = Instant::now();
    let writer = stream.try_clone().and_then(|out| {
        let (queue, closer) = (queue.clone(), closer.clone());
        thread::Builder::new()
            .name(format!("tandem-net-tx{}", session.peer))
            .spawn(move || write_loop(out, session, epoch, &queue, &closer))
    });
    let ended = match writer {
        Ok(writer) => {
            let ended = read_loop(&stream, reader, &session, &queue, epoch, deliver);
            closer.close(ended);
            let _ = writer.join();
            ended_reason(&closer)
        }
        Err(e) => {
            closer.close(LinkError::Write(e));
            ended_reason(&closer)
        }
    };
    debug!(peer = session.peer, "link ended: {ended}");
    ended
}

fn ended_reason(closer: &Closer) -> LinkError {
    closer.take_reason().expect("close() was called before")
}

fn read_loop(
    stream: &TcpStream,
    reader: FrameReader,
    s: &Session,
    queue: &SendQueue,
    epoch: Instant,
    deliver: &mut dyn FnMut(Delivered),
) -> LinkError {
    let mut undrained = false;
    let ended = read_frames(stream, reader, s, queue, epoch, &mut |d| {
        undrained = matches!(d, Delivered::Message(_));
        deliver(d)
    });
    if undrained {
        deliver(Delivered::Drained);
    }
    ended
}

fn read_frames(
    stream: &TcpStream,
    mut reader: FrameReader,
    s: &Session,
    queue: &SendQueue,
    epoch: Instant,
    deliver: &mut dyn FnMut(Delivered),
) -> LinkError {
    let mut expected = s.recv_seq;
    let mut input = PollingReader::new(stream, POLL_WINDOW);
    let mut undrained = false;
    loop {
        if undrained && !reader.has_frame() {
            // A burst's messages go out together: the owner may act on them at once.
            deliver(Delivered::Drained);
            undrained = false;
        }
        let frame = match reader.next_frame(&mut input) {
            Ok(frame) => frame,
            Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return LinkError::Silent(s.timeout),
            Err(ReadError::Io(e)) => return LinkError::Read(e),
            Err(ReadError::Closed { buffered: 0 }) => return LinkError::PeerClosed,
            Err(ReadError::Closed { buffered }) => return LinkError::Truncated { buffered },
            Err(ReadError::Decode(e)) => return LinkError::Decode(e),
        };
        if frame.header.volume != s.volume {
            return LinkError::WrongVolume { ours: s.volume, theirs: frame.header.volume };
        }
        // TCP neither loses nor reorders, so a gap means a broken sender (or a tampered
        // stream): nothing after it can be trusted to mean what the protocol says.
        if frame.header.seq != expected {
            return LinkError::SeqGap { expected, got: frame.header.seq };
        }
        expected = expected.wrapping_add(1);
        match frame.message {
            Message::Ping { nonce } => match queue.push(&Message::Pong { nonce }, true) {
                Ok(()) | Err(PushError::Closed) => {}
                Err(e) => return push_error(e, queue),
            },
            Message::Pong { nonce } => {
                let rtt = Duration::from_micros((epoch.elapsed().as_micros() as u64).saturating_sub(nonce));
                trace!(peer = s.peer, ?rtt, "pong");
            }
            Message::Hello(_) => return LinkError::LateHandshake("Hello"),
            Message::HelloAck { .. } => return LinkError::LateHandshake("HelloAck"),
            msg => {
                deliver(Delivered::Message(msg));
                undrained = true;
            }
        }
    }
}

fn write_loop(mut stream: TcpStream, s: Session, epoch: Instant, queue: &SendQueue, closer: &Closer) {
    // The nonce of a ping is our send time, so the `Pong` tells the round-trip time.
    let ping = || Message::Ping { nonce: epoch.elapsed().as_micros() as u64 };
    loop {
        let batch = match queue.take(s.keepalive, ping) {
            Ok(Taken::Closed) => return,
            Ok(Taken::Batch(batch)) => batch,
            Err(e) => return closer.close(push_error(e, queue)),
        };
        if let Err(e) = write_batch(&mut stream, &batch) {
            closer.close(match e.kind() {
                io::ErrorKind::WouldBlock => LinkError::Stalled(s.timeout),
                _ => LinkError::Write(e),
            });
            return;
        }
        queue.written(&batch);
    }
}

/// The reason a link ends when a frame cannot be queued. Skipping the message would leave
/// the peer's view of the stream silently wrong; a dropped link is noticed and recovered from.
pub(crate) fn push_error(e: PushError, queue: &SendQueue) -> LinkError {
    match e {
        PushError::Closed => LinkError::ShuttingDown,
        PushError::Full { queued } => LinkError::QueueFull { queued, limit: queue.limit() },
        PushError::Encode { message, source } => LinkError::Encode { message, source },
    }
}
