//! The send side of a link: a bounded queue of encoded frames between `Net::send` (any
//! thread, never blocks) and the link's writer thread, with a fast path that skips the
//! writer. Bounded in bytes rather than messages, because one message may be a 4 MiB track
//! and another a 44-byte ack.
//!
//! Frames are numbered and encoded when they are pushed, under the queue's lock, so the
//! stream carries them in push order. A push may leave its frame queued (`flush: false`,
//! for a caller that has more to send right away) or flush: when the writer is not in the
//! middle of a write, the pushing thread then sends the small frames at the head of the
//! queue itself, all in one non-blocking `sendmsg`. So an ack or a 4 KiB write on a link
//! that keeps up costs one system call and no thread wake-up, and a burst of them costs one
//! system call in all. Whatever the socket does not take at once (all of it when its buffer
//! is full), and every large frame, which the writer copies into the socket in parallel with
//! the caller, is left to the writer thread. The writer sends everything queued with vectored
//! blocking writes under the send timeout, so back-pressure, the stall timeout and keepalive
//! work as before: a ping goes out once nothing was sent for `keepalive`, and frames queued
//! without a flush go out then at the latest.
//!
//! Large payloads (`Data`, `ResyncData`, `ReadReply`) are not copied into the frame: a
//! frame is its encoded head plus the payload's `Bytes`, written with one `writev`; the
//! checksum is computed over both, so the bytes on the wire are exactly `wire::encode`'s.

use bytes::Bytes;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::TcpStream;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tandem_core::wire::{encode, EncodeError, Message, HEADER_LEN, MAX_PAYLOAD};

/// Payloads at least this large travel by reference (a `writev` slice) instead of being
/// copied into the frame.
const BY_REFERENCE: usize = 16 * 1024;
/// Frames up to this size may be sent by the pushing thread, up to `DIRECT_BATCH` bytes in
/// one flush; larger ones always go through the writer, so that the caller does not spend
/// its time copying them into the socket.
const DIRECT_MAX: usize = 64 * 1024;
const DIRECT_BATCH: usize = 256 * 1024;
/// Frames the writer takes for one `writev` sequence (each is at most two slices; Linux
/// takes up to 1024 slices per call).
const BATCH_FRAMES: usize = 256;
/// Byte offsets of the header's `len` and `crc` fields (codec.rs: the header is frozen).
const OFF_LEN: usize = 28;
const OFF_CRC: usize = 32;

/// One encoded frame: `head` followed by `body` on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Encoded {
    head: Vec<u8>,
    body: Bytes,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// The frame's bytes from `from` on, as at most two slices.
    fn slices(&self, from: usize) -> impl Iterator<Item = IoSlice<'_>> {
        let h = from.min(self.head.len());
        let b = from - h;
        [IoSlice::new(&self.head[h..]), IoSlice::new(&self.body[b..])].into_iter().filter(|s| !s.is_empty())
    }

    #[cfg(test)]
    fn to_vec(&self) -> Vec<u8> {
        [&self.head[..], &self.body[..]].concat()
    }
}

/// Frames `msg` exactly as [`tandem_core::wire::encode`] does, without copying a large payload.
pub(crate) fn encode_frame(volume: u64, seq: u64, msg: &Message) -> Result<Encoded, EncodeError> {
    // Each of these carries its payload as the last field, a `bytes` (u32 length, then the
    // bytes): the head is the frame of the same message with an empty payload, with the
    // two lengths and the checksum fixed up.
    let (stub, body) = match msg {
        Message::Data { id, offset, fua, payload } if payload.len() >= BY_REFERENCE => {
            (Message::Data { id: *id, offset: *offset, fua: *fua, payload: Bytes::new() }, payload)
        }
        Message::ResyncData { track, payload } if payload.len() >= BY_REFERENCE => {
            (Message::ResyncData { track: *track, payload: Bytes::new() }, payload)
        }
        Message::ReadReply { id, payload } if payload.len() >= BY_REFERENCE => {
            (Message::ReadReply { id: *id, payload: Bytes::new() }, payload)
        }
        _ => {
            let mut head = Vec::new();
            encode(volume, seq, msg, &mut head)?;
            return Ok(Encoded { head, body: Bytes::new() });
        }
    };
    let mut head = Vec::with_capacity(HEADER_LEN + 32);
    encode(volume, seq, &stub, &mut head)?;
    let len = head.len() - HEADER_LEN + body.len();
    if len > MAX_PAYLOAD as usize {
        return Err(EncodeError::PayloadTooLong { message: msg.name(), len, max: MAX_PAYLOAD });
    }
    let end = head.len();
    head[OFF_LEN..OFF_LEN + 4].copy_from_slice(&(len as u32).to_le_bytes());
    head[end - 4..].copy_from_slice(&(body.len() as u32).to_le_bytes());
    head[OFF_CRC..OFF_CRC + 4].copy_from_slice(&[0; 4]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head), body);
    head[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(Encoded { head, body: body.clone() })
}

/// A queued frame and how much of it the socket already took.
#[derive(Debug)]
pub(crate) struct Pending {
    frame: Encoded,
    sent: usize,
}

pub(crate) struct SendQueue {
    state: Mutex<State>,
    ready: Condvar,
    limit: usize,
    volume: u64,
    /// The link's socket, for the pushing thread's non-blocking sends (`None`: always
    /// through the writer).
    direct: Option<TcpStream>,
}

struct State {
    frames: VecDeque<Pending>,
    /// Bytes not yet written of the queued frames and of those the writer is writing.
    bytes: usize,
    next_seq: u64,
    /// The writer took frames and is writing them: pushes queue behind them.
    writing: bool,
    /// The writer waits on `ready`.
    waiting: bool,
    closed: bool,
    /// When bytes were last handed to the socket; a ping is due `keepalive` later.
    last_sent: Instant,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    Closed,
    Full { queued: usize },
    Encode { message: &'static str, source: EncodeError },
}

#[derive(Debug)]
pub(crate) enum Taken {
    /// Frames to write, in order; report them with [`SendQueue::written`].
    Batch(Vec<Pending>),
    Closed,
}

impl SendQueue {
    /// `first_seq`: the seq of the first frame pushed.
    pub fn new(volume: u64, first_seq: u64, limit: usize, direct: Option<TcpStream>) -> SendQueue {
        SendQueue {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                bytes: 0,
                next_seq: first_seq,
                writing: false,
                waiting: false,
                closed: false,
                last_sent: Instant::now(),
            }),
            ready: Condvar::new(),
            limit,
            volume,
            direct,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Numbers, encodes and queues `msg`; with `flush`, then sends what is queued (see
    /// [`SendQueue::flush`]). A frame larger than the whole limit is still taken when nothing
    /// is queued, so that a small limit cannot make a message unsendable.
    pub fn push(&self, msg: &Message, flush: bool) -> Result<(), PushError> {
        let mut s = self.lock();
        if s.closed {
            return Err(PushError::Closed);
        }
        let frame = encode_frame(self.volume, s.next_seq, msg)
            .map_err(|source| PushError::Encode { message: msg.name(), source })?;
        let size = frame.len();
        if s.bytes > 0 && s.bytes + size > self.limit {
            return Err(PushError::Full { queued: s.bytes });
        }
        s.next_seq = s.next_seq.wrapping_add(1);
        s.bytes += size;
        s.frames.push_back(Pending { frame, sent: 0 });
        if flush {
            self.flush_locked(s);
        }
        Ok(())
    }

    /// Sends the queued frames: the small ones at the head right here with one non-blocking
    /// `sendmsg` if the writer is idle, the rest through the writer.
    pub fn flush(&self) {
        let s = self.lock();
        if !s.frames.is_empty() {
            self.flush_locked(s);
        }
    }

    fn flush_locked(&self, mut s: MutexGuard<'_, State>) {
        if s.writing {
            // The writer looks at the queue again when its write is done.
            return;
        }
        if let Some(socket) = &self.direct {
            let mut slices = Vec::new();
            let mut total = 0;
            for p in s.frames.iter() {
                let left = p.frame.len() - p.sent;
                if p.frame.len() > DIRECT_MAX || (total > 0 && total + left > DIRECT_BATCH) {
                    break;
                }
                total += left;
                slices.extend(p.frame.slices(p.sent));
            }
            // An error other than a full buffer is left for the writer, which meets it
            // again on its blocking write and ends the link with it.
            let mut sent = if slices.is_empty() { 0 } else { send_now(socket, &slices).unwrap_or(0) };
            drop(slices);
            if sent > 0 {
                s.last_sent = Instant::now();
                s.bytes -= sent;
            }
            while let Some(p) = s.frames.front_mut() {
                let left = p.frame.len() - p.sent;
                if sent < left {
                    p.sent += sent;
                    break;
                }
                sent -= left;
                s.frames.pop_front();
            }
        }
        let wake = !s.frames.is_empty() && s.waiting;
        drop(s);
        if wake {
            self.ready.notify_one();
        }
    }

    /// For the writer: waits for frames and takes those at the head (at most
    /// `BATCH_FRAMES`). When nothing was sent for `keepalive`, queues a ping made by `ping`
    /// first. Nothing else is written to the socket until [`SendQueue::written`].
    pub fn take(&self, keepalive: Duration, ping: impl Fn() -> Message) -> Result<Taken, PushError> {
        let mut s = self.lock();
        loop {
            if s.closed {
                return Ok(Taken::Closed);
            }
            if !s.frames.is_empty() {
                break;
            }
            let now = Instant::now();
            let due = s.last_sent + keepalive;
            if now >= due {
                let msg = ping();
                let frame = encode_frame(self.volume, s.next_seq, &msg)
                    .map_err(|source| PushError::Encode { message: msg.name(), source })?;
                s.next_seq = s.next_seq.wrapping_add(1);
                s.bytes += frame.len();
                s.frames.push_back(Pending { frame, sent: 0 });
                break;
            }
            s.waiting = true;
            s = self.ready.wait_timeout(s, due - now).unwrap_or_else(PoisonError::into_inner).0;
            s.waiting = false;
        }
        let n = s.frames.len().min(BATCH_FRAMES);
        let batch: Vec<Pending> = s.frames.drain(..n).collect();
        s.writing = true;
        Ok(Taken::Batch(batch))
    }

    /// For the writer: the batch it took is written.
    pub fn written(&self, batch: &[Pending]) {
        let mut s = self.lock();
        let n: usize = batch.iter().map(|p| p.frame.len() - p.sent).sum();
        s.bytes = s.bytes.saturating_sub(n);
        s.writing = false;
        s.last_sent = Instant::now();
    }

    /// Refuses further pushes and wakes the writer; queued frames are discarded (the link
    /// is going down and cannot deliver them).
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.frames.clear();
        s.bytes = 0;
        drop(s);
        self.ready.notify_all();
    }
}

/// One non-blocking `sendmsg`; the bytes the socket took.
fn send_now(socket: &TcpStream, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    loop {
        match socket2::SockRef::from(socket).send_vectored_with_flags(slices, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Writes a batch the writer took, with as few `writev`s as the socket allows.
pub(crate) fn write_batch(out: &mut impl io::Write, batch: &[Pending]) -> io::Result<()> {
    let mut owned: Vec<IoSlice<'_>> = batch.iter().flat_map(|p| p.frame.slices(p.sent)).collect();
    let mut slices = &mut owned[..];
    while !slices.is_empty() {
        match out.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tandem_core::wire::{decode, encoded_len};

    fn ack(id: u64) -> Message {
        Message::ReceiptAck { id }
    }

    fn drain(q: &SendQueue) -> Vec<u8> {
        let Ok(Taken::Batch(batch)) = q.take(Duration::from_secs(60), || unreachable!()) else { panic!() };
        let mut out = Vec::new();
        write_batch(&mut out, &batch).unwrap();
        q.written(&batch);
        out
    }

    fn messages(mut bytes: &[u8]) -> Vec<(u64, Message)> {
        let mut msgs = Vec::new();
        while !bytes.is_empty() {
            let (frame, len) = decode(bytes).unwrap();
            msgs.push((frame.header.seq, frame.message));
            bytes = &bytes[len..];
        }
        msgs
    }

    #[test]
    fn frames_are_byte_for_byte_those_of_the_codec() {
        let big = Bytes::from((0..300_000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>());
        let msgs = [
            ack(3),
            Message::Data { id: 1, offset: 4096, fua: true, payload: big.slice(..4096) },
            Message::Data { id: 2, offset: 1 << 30, fua: false, payload: big.clone() },
            Message::Data { id: 3, offset: 0, fua: true, payload: big.slice(..BY_REFERENCE) },
            Message::ResyncData { track: 9, payload: big.slice(..65536) },
            Message::ReadReply { id: 4, payload: big.slice(1..200_001) },
            Message::Ping { nonce: 77 },
        ];
        for (seq, msg) in msgs.iter().enumerate() {
            let mut expected = Vec::new();
            encode(0xABCD, seq as u64 + 5, msg, &mut expected).unwrap();
            let frame = encode_frame(0xABCD, seq as u64 + 5, msg).unwrap();
            assert_eq!(frame.to_vec(), expected, "{}", msg.name());
            assert_eq!(frame.len(), encoded_len(msg));
        }
    }

    #[test]
    fn an_oversize_payload_is_an_encode_error() {
        let huge = Message::ResyncData { track: 0, payload: Bytes::from(vec![0; MAX_PAYLOAD as usize]) };
        let mut expected = Vec::new();
        let codec = encode(1, 0, &huge, &mut expected).unwrap_err();
        assert_eq!(encode_frame(1, 0, &huge).unwrap_err(), codec);
        let q = SendQueue::new(1, 0, 1 << 30, None);
        assert!(matches!(q.push(&huge, true), Err(PushError::Encode { message: "ResyncData", .. })));
    }

    #[test]
    fn frames_keep_order_and_seq() {
        let q = SendQueue::new(7, 10, 1 << 20, None);
        let data = Message::Data { id: 5, offset: 0, fua: false, payload: Bytes::from(vec![1; 100_000]) };
        q.push(&ack(0), false).unwrap();
        q.push(&data, false).unwrap();
        q.push(&ack(1), false).unwrap();
        let got = messages(&drain(&q));
        assert_eq!(got, vec![(10, ack(0)), (11, data), (12, ack(1))]);
    }

    #[test]
    fn the_limit_counts_bytes_but_always_admits_one_frame() {
        let big = Message::ResyncData { track: 0, payload: Bytes::from(vec![0; 1000]) };
        let q = SendQueue::new(1, 0, 100, None);
        q.push(&big, false).unwrap();
        assert_eq!(q.push(&ack(1), false), Err(PushError::Full { queued: encoded_len(&big) }));
        assert_eq!(messages(&drain(&q)).len(), 1);
        q.push(&ack(1), false).unwrap();
    }

    #[test]
    fn an_idle_queue_yields_a_ping() {
        let q = SendQueue::new(1, 3, 100, None);
        let start = Instant::now();
        let Ok(Taken::Batch(batch)) = q.take(Duration::from_millis(30), || Message::Ping { nonce: 9 }) else {
            panic!()
        };
        assert!(start.elapsed() >= Duration::from_millis(30));
        let mut out = Vec::new();
        write_batch(&mut out, &batch).unwrap();
        q.written(&batch);
        assert_eq!(messages(&out), vec![(3, Message::Ping { nonce: 9 })]);
    }

    #[test]
    fn small_frames_go_straight_to_the_socket_and_the_rest_queues_behind_the_writer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut rx, _) = listener.accept().unwrap();
        let q = SendQueue::new(2, 0, 1 << 20, Some(tx.try_clone().unwrap()));
        q.push(&ack(0), false).unwrap();
        q.push(&ack(1), true).unwrap();
        // Sent by push itself, both in one go: nothing for the writer.
        assert!(q.lock().frames.is_empty());
        assert_eq!(q.lock().bytes, 0);
        let big = Message::ResyncData { track: 1, payload: Bytes::from(vec![3; 200_000]) };
        q.push(&big, true).unwrap();
        q.push(&ack(2), true).unwrap();
        // Too large to be sent by the caller, and the ack must wait behind it.
        assert_eq!(q.lock().frames.len(), 2);
        let Ok(Taken::Batch(batch)) = q.take(Duration::from_secs(60), || unreachable!()) else { panic!() };
        write_batch(&mut &tx, &batch).unwrap();
        q.written(&batch);
        drop(tx);
        drop(q);
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut rx, &mut bytes).unwrap();
        assert_eq!(messages(&bytes), vec![(0, ack(0)), (1, ack(1)), (2, big), (3, ack(2))]);
    }

    #[test]
    fn close_wakes_a_waiting_writer_and_refuses_pushes() {
        let q = Arc::new(SendQueue::new(1, 0, 100, None));
        let q2 = q.clone();
        let t = std::thread::spawn(move || {
            matches!(q2.take(Duration::from_secs(30), || unreachable!()), Ok(Taken::Closed))
        });
        std::thread::sleep(Duration::from_millis(20));
        q.close();
        assert!(t.join().unwrap());
        assert_eq!(q.push(&ack(1), false), Err(PushError::Closed));
    }
}
