//! Everything that happens on a new TCP connection before it becomes a link, under one
//! deadline (the configured `timeout`, at most 5 s):
//!
//! 1. authentication in the net crate's own framing ([`crate::auth`]);
//! 2. the codec's version exchange (`tandem_core::wire::handshake`): `Hello` both ways,
//!    then the decider (the lower node id, which is always the dialer) answers `HelloAck`.
//!
//! Frame `seq` numbers start at 0 with the `Hello` and run on into the session.
//!
//! The dialer sends its `Hello` right after authentication; the acceptor reads it first,
//! then decides whether to admit the peer at all (an operator may hold it stand-alone)
//! and sends either its own `Hello` or a reject frame. Reading the dialer's `Hello` first
//! matters: closing a socket with unread data makes Linux send a reset, which could
//! destroy the reject frame before the dialer reads it. And the acceptor sends its `Hello`
//! before checking the negotiation, so that both sides report the same negotiation error
//! (the checks are symmetric) instead of one of them seeing a bare close.

use crate::auth::{self, Identity, AUTH_MAGIC, REJECT_LEN, REJECT_STAND_ALONE};
use crate::config::NetConfig;
use crate::error::Refusal;
use crate::frames::{FrameReader, ReadError};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};
use tandem_core::types::NodeId;
use tandem_core::wire::handshake::sends_ack;
use tandem_core::wire::{check_ack, encode, hello, negotiate, Message, Negotiated};

/// Blocking reads and writes that fail once the handshake's deadline has passed.
pub(crate) struct HandshakeIo<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
    limit: Duration,
    /// Named in timeout and close errors.
    pub stage: &'static str,
}

impl<'a> HandshakeIo<'a> {
    pub fn new(stream: &'a TcpStream, limit: Duration) -> HandshakeIo<'a> {
        HandshakeIo { stream, deadline: Instant::now() + limit, limit, stage: "authentication" }
    }

    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }

    pub fn refusal(&self, e: io::Error) -> Refusal {
        Refusal::from_io(e, self.stage, self.limit)
    }

    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Refusal> {
        Read::read_exact(self, buf).map_err(|e| self.refusal(e))
    }

    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), Refusal> {
        Write::write_all(self, buf).map_err(|e| self.refusal(e))
    }

    fn read_error(&self, e: ReadError) -> Refusal {
        match e {
            ReadError::Io(e) => self.refusal(e),
            ReadError::Closed { .. } => Refusal::Closed { stage: self.stage },
            ReadError::Decode(e) => Refusal::Decode(e),
        }
    }
}

impl Read for HandshakeIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.remaining()?))?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for HandshakeIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.remaining()?))?;
        (&mut &*self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Which end of the connection we are.
pub(crate) enum Role<'a> {
    /// We dialed `expect`.
    Dialer { expect: NodeId },
    /// We accepted; `admit` decides, once the peer is authenticated, whether it may
    /// connect now (not stand-alone here, not shutting down).
    Acceptor { admit: &'a dyn Fn(NodeId) -> Result<(), Refusal> },
}

/// A connection that passed the handshake.
pub(crate) struct Established {
    pub peer: NodeId,
    pub negotiated: Negotiated,
    /// May already hold the first session frames.
    pub reader: FrameReader,
    pub send_seq: u64,
    pub recv_seq: u64,
}

/// Whether `claimed` may be on the other end of a connection in `role`, before we answer
/// its challenge.
fn check_claim(cfg: &NetConfig, role: &Role, claimed: NodeId) -> Result<(), Refusal> {
    match role {
        Role::Dialer { expect } if claimed != *expect => {
            Err(Refusal::UnexpectedNode { expected: *expect, found: claimed })
        }
        Role::Dialer { .. } => Ok(()),
        Role::Acceptor { .. } if cfg.peer_addr(claimed).is_none() => Err(Refusal::UnknownNode { node: claimed }),
        // The lower id dials; a higher one dialing us means the two configurations
        // disagree, and accepting would allow two connections for one pair.
        Role::Acceptor { .. } if claimed > cfg.node => Err(Refusal::WrongDirection { node: claimed, ours: cfg.node }),
        Role::Acceptor { .. } => Ok(()),
    }
}

/// Runs the whole handshake on a fresh connection.
pub(crate) fn run(stream: &TcpStream, cfg: &NetConfig, role: Role) -> Result<Established, Refusal> {
    let mut io = HandshakeIo::new(stream, cfg.timeout);
    let ident = Identity { node: cfg.node, volume: cfg.volume, secret: &cfg.secret };
    let peer = auth::authenticate(&mut io, &ident, |claimed| check_claim(cfg, &role, claimed))?;

    io.stage = "version negotiation";
    let mut x = Exchange { io, reader: FrameReader::new(), volume: cfg.volume, send_seq: 0, recv_seq: 0 };
    let ours = hello(cfg.node, cfg.volume);
    if let Role::Dialer { .. } = role {
        x.send(&Message::Hello(ours.clone()))?;
        x.check_reject()?;
    }
    let theirs = match x.recv("Hello")? {
        Message::Hello(h) => h,
        other => return Err(x.unexpected("Hello", &other)),
    };
    if theirs.node != peer {
        return Err(Refusal::HelloNodeMismatch { authenticated: peer, claimed: theirs.node });
    }
    if let Role::Acceptor { admit } = role {
        if let Err(refusal) = admit(peer) {
            if let Refusal::StandAlone { .. } = refusal {
                // Best effort: the refusal stands whether or not the peer hears why.
                let _ = x.io.write_all(&auth::reject_frame(cfg.node, REJECT_STAND_ALONE));
                let _ = stream.shutdown(Shutdown::Write);
            }
            return Err(refusal);
        }
        x.send(&Message::Hello(ours.clone()))?;
    }

    let mut negotiated = negotiate(&ours, &theirs)?;
    if sends_ack(&ours, &theirs) {
        x.send(&Message::HelloAck { version: negotiated.version, features: negotiated.features })?;
    } else {
        negotiated = match x.recv("HelloAck")? {
            Message::HelloAck { version, features } => check_ack(&ours, version, features)?,
            other => return Err(x.unexpected("HelloAck", &other)),
        };
    }
    Ok(Established { peer, negotiated, reader: x.reader, send_seq: x.send_seq, recv_seq: x.recv_seq })
}

/// The codec half of the handshake: frames with their `seq` bookkeeping.
struct Exchange<'a> {
    io: HandshakeIo<'a>,
    reader: FrameReader,
    volume: u64,
    send_seq: u64,
    recv_seq: u64,
}

impl Exchange<'_> {
    fn send(&mut self, msg: &Message) -> Result<(), Refusal> {
        let mut out = Vec::new();
        encode(self.volume, self.send_seq, msg, &mut out)
            .map_err(|source| Refusal::Encode { message: msg.name(), source })?;
        self.send_seq += 1;
        self.io.write_all(&out)
    }

    fn recv(&mut self, expected: &'static str) -> Result<Message, Refusal> {
        let frame = self.reader.next_frame(&mut self.io).map_err(|e| self.io.read_error(e))?;
        if frame.header.volume != self.volume {
            return Err(Refusal::WrongVolume { ours: self.volume, theirs: frame.header.volume });
        }
        if frame.header.seq != self.recv_seq {
            return Err(Refusal::UnexpectedFrame {
                expected,
                seq: self.recv_seq,
                got: format!("{} with seq {}", frame.message.name(), frame.header.seq),
            });
        }
        self.recv_seq += 1;
        Ok(frame.message)
    }

    fn unexpected(&self, expected: &'static str, got: &Message) -> Refusal {
        Refusal::UnexpectedFrame { expected, seq: self.recv_seq - 1, got: got.name().to_string() }
    }

    /// The dialer's first read after authentication: a reject frame (auth magic) in place
    /// of the acceptor's `Hello` ends the handshake with the acceptor's reason.
    fn check_reject(&mut self) -> Result<(), Refusal> {
        self.reader.fill_to(&mut self.io, AUTH_MAGIC.len()).map_err(|e| self.io.read_error(e))?;
        if self.reader.buffered()[..AUTH_MAGIC.len()] != AUTH_MAGIC {
            return Ok(());
        }
        self.reader.fill_to(&mut self.io, REJECT_LEN).map_err(|e| self.io.read_error(e))?;
        let frame: [u8; REJECT_LEN] = self.reader.buffered()[..REJECT_LEN].try_into().expect("filled");
        Err(auth::parse_reject(&frame))
    }
}
