//! Framed binary encoding of [`Message`]s.
//!
//! # Frame header
//!
//! Every frame is a fixed [`HEADER_LEN`]-byte header followed by the payload. All integers
//! are little-endian.
//!
//! | offset | size | field      | meaning                                                      |
//! |-------:|-----:|------------|--------------------------------------------------------------|
//! |      0 |    4 | `magic`    | [`MAGIC`] `0x4D444E54`: the bytes `"TNDM"` on the wire         |
//! |      4 |    2 | `version`  | frame format version, [`PROTOCOL_VERSION`]                   |
//! |      6 |    2 | `msg_type` | one of [`msg_type`]                                          |
//! |      8 |    2 | `flags`    | none defined in version 1: must be 0                         |
//! |     10 |    2 | `reserved` | must be 0                                                    |
//! |     12 |    8 | `volume`   | volume id the frame belongs to                               |
//! |     20 |    8 | `seq`      | per-connection frame counter, chosen by the sender           |
//! |     28 |    4 | `len`      | payload length in bytes, at most [`MAX_PAYLOAD`]             |
//! |     32 |    4 | `crc`      | CRC32C of the header (with `crc` zeroed) followed by the payload |
//! |     36 |  len | payload    | per message type, below                                      |
//!
//! Compatibility rule for later versions: the header layout and the `Hello`/`HelloAck`
//! payloads are frozen, and those two messages are always framed with version 1, so that
//! any two builds can at least tell each other that they have no version in common.
//!
//! # Payloads
//!
//! Fields follow in the order listed, with no padding. `u8`/`u16`/`u32`/`u64` are
//! fixed-width little-endian; `bool` is a `u8` that must be 0 or 1; `bytes` is a `u32`
//! length followed by that many bytes. A payload must be consumed exactly: trailing bytes
//! are an error, which keeps the encoding canonical (decode then encode gives back the
//! same bytes).
//!
//! | type     | message           | payload                                                       |
//! |---------:|-------------------|---------------------------------------------------------------|
//! | `0x0001` | `Hello`           | min_version u16, max_version u16, features u64, node u8, volume u64 |
//! | `0x0002` | `HelloAck`        | version u16, features u64                                     |
//! | `0x0003` | `State`           | node u8, role u8, disk u8, mode u8, generations, crashed bool, volume_size u64, track_size u32, primary u8 (0xFF: none), replicating u64 (bit per node) |
//! | `0x0004` | `Ping`            | nonce u64                                                     |
//! | `0x0005` | `Pong`            | nonce u64                                                     |
//! | `0x0010` | `RecordPage`      | range u32, bits bytes                                         |
//! | `0x0011` | `RecordEnd`       | tracks u64                                                    |
//! | `0x0020` | `Data`            | id u64, offset u64, fua bool, payload bytes                   |
//! | `0x0021` | `Discard`         | id u64, offset u64, len u64, zeroes bool                      |
//! | `0x0022` | `ReceiptAck`      | id u64                                                        |
//! | `0x0023` | `HardenedAck`     | id u64                                                        |
//! | `0x0024` | `Flush`           | id u64                                                        |
//! | `0x0025` | `FlushAck`        | id u64                                                        |
//! | `0x0030` | `DestageStart`    | range u32                                                     |
//! | `0x0031` | `DestageAck`      | range u32                                                     |
//! | `0x0032` | `DestageDone`     | range u32                                                     |
//! | `0x0033` | `ToggleNotice`    | range u32                                                     |
//! | `0x0034` | `ToggleAck`       | range u32                                                     |
//! | `0x0035` | `ClearOld`        | range u32                                                     |
//! | `0x0040` | `RecordExtend`    | generation u64, first u64, count u32                          |
//! | `0x0041` | `RecordExtendAck` | generation u64                                                |
//! | `0x0042` | `RecordTrim`      | generation u64                                                |
//! | `0x0050` | `ResyncRequest`   | first u64, count u32                                          |
//! | `0x0051` | `ResyncData`      | track u64, payload bytes                                      |
//! | `0x0052` | `ResyncAck`       | track u64                                                     |
//! | `0x0053` | `ResyncEnd`       | tracks u64                                                    |
//! | `0x0054` | `VerifyRequest`   | track u64, digest 32 bytes (BLAKE3 of the track)              |
//! | `0x0055` | `VerifyReply`     | track u64, same bool                                          |
//! | `0x0060` | `ReadRequest`     | id u64, offset u64, len u32                                   |
//! | `0x0061` | `ReadReply`       | id u64, payload bytes                                         |
//! | `0x0070` | `AsyncCommit`     | group u32, cycle u64, writes u32                              |
//! | `0x0071` | `AsyncCommitAck`  | group u32, cycle u64                                          |
//!
//! `generations` is: current u64, history count u8 (at most [`Generations::HISTORY`]), then
//! that many u64, newest first.
//!
//! Enumerations are `u8`. Zero is never a valid value, so that a zero-filled field is
//! rejected rather than read as the first variant:
//!
//! | value | `role`      | `disk`         | `mode`       |
//! |------:|-------------|----------------|--------------|
//! |     1 | `Primary`   | `UpToDate`     | `Memory`     |
//! |     2 | `Secondary` | `Consistent`   | `Disk`       |
//! |     3 |             | `Outdated`     | `Async`      |
//! |     4 |             | `Inconsistent` | `Predictive` |
//! |     5 |             | `Failed`       |              |

use super::message::{Hello, Message, StateReport, MAX_NODES};

/// `State.primary` when the sender replicates with no primary.
const NO_PRIMARY: u8 = 0xFF;
use crate::types::{DiskState, Generations, Mode, Role};
use bytes::Bytes;
use thiserror::Error;

/// `"TNDM"` read as a little-endian `u32`.
pub const MAGIC: u32 = 0x4D44_4E54;
/// The frame format version this build writes.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest frame format version this build reads.
pub const MIN_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 36;
/// One 4 MiB track of resync data plus headroom for the fields around it.
pub const MAX_PAYLOAD: u32 = 4 * 1024 * 1024 + 64 * 1024;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_TYPE: usize = 6;
const OFF_FLAGS: usize = 8;
const OFF_RESERVED: usize = 10;
const OFF_VOLUME: usize = 12;
const OFF_SEQ: usize = 20;
const OFF_LEN: usize = 28;
const OFF_CRC: usize = 32;

/// Message type numbers, grouped by protocol area so that related messages stay adjacent
/// as the protocol grows.
pub mod msg_type {
    pub const HELLO: u16 = 0x0001;
    pub const HELLO_ACK: u16 = 0x0002;
    pub const STATE: u16 = 0x0003;
    pub const PING: u16 = 0x0004;
    pub const PONG: u16 = 0x0005;
    pub const RECORD_PAGE: u16 = 0x0010;
    pub const RECORD_END: u16 = 0x0011;
    pub const DATA: u16 = 0x0020;
    pub const DISCARD: u16 = 0x0021;
    pub const RECEIPT_ACK: u16 = 0x0022;
    pub const HARDENED_ACK: u16 = 0x0023;
    pub const FLUSH: u16 = 0x0024;
    pub const FLUSH_ACK: u16 = 0x0025;
    pub const DESTAGE_START: u16 = 0x0030;
    pub const DESTAGE_ACK: u16 = 0x0031;
    pub const DESTAGE_DONE: u16 = 0x0032;
    pub const TOGGLE_NOTICE: u16 = 0x0033;
    pub const TOGGLE_ACK: u16 = 0x0034;
    pub const CLEAR_OLD: u16 = 0x0035;
    pub const RECORD_EXTEND: u16 = 0x0040;
    pub const RECORD_EXTEND_ACK: u16 = 0x0041;
    pub const RECORD_TRIM: u16 = 0x0042;
    pub const RESYNC_REQUEST: u16 = 0x0050;
    pub const RESYNC_DATA: u16 = 0x0051;
    pub const RESYNC_ACK: u16 = 0x0052;
    pub const RESYNC_END: u16 = 0x0053;
    pub const VERIFY_REQUEST: u16 = 0x0054;
    pub const VERIFY_REPLY: u16 = 0x0055;
    pub const READ_REQUEST: u16 = 0x0060;
    pub const READ_REPLY: u16 = 0x0061;
    pub const ASYNC_COMMIT: u16 = 0x0070;
    pub const ASYNC_COMMIT_ACK: u16 = 0x0071;
}

/// The decoded fixed header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub msg_type: u16,
    pub flags: u16,
    pub volume: u64,
    pub seq: u64,
    /// Payload length; the whole frame is `HEADER_LEN + len` bytes.
    pub len: u32,
}

impl FrameHeader {
    /// Length of the whole frame, header included.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.len as usize
    }
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub header: FrameHeader,
    pub message: Message,
}

/// Why a payload field could not be read.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum MalformedReason {
    #[error("needs {needed} bytes but only {remaining} remain in the payload")]
    Truncated { needed: usize, remaining: usize },
    #[error("{len} entries exceed the limit of {max}")]
    TooMany { len: usize, max: usize },
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Not an error on a stream: read until the buffer holds at least `needed` bytes (the
    /// total, counted from the start of the frame) and decode again.
    #[error("incomplete frame: at least {needed} bytes needed")]
    Incomplete { needed: usize },
    #[error("bad magic {found:#010x}, expected {MAGIC:#010x}: not a Tandem frame or framing lost")]
    BadMagic { found: u32 },
    #[error("unsupported frame version {theirs}: this build reads versions {min}..={max}")]
    UnsupportedVersion { theirs: u16, min: u16, max: u16 },
    #[error("unknown message type {msg_type} ({msg_type:#06x})")]
    UnknownType { msg_type: u16 },
    #[error("payload length {len} exceeds the maximum of {max}")]
    PayloadTooLong { len: u32, max: u32 },
    #[error("checksum mismatch: frame carries {carried:#010x}, content gives {computed:#010x}")]
    ChecksumMismatch { carried: u32, computed: u32 },
    #[error("reserved header bits set: flags {flags:#06x}, reserved {reserved:#06x} (both must be 0)")]
    ReservedBits { flags: u16, reserved: u16 },
    #[error("malformed {message} payload: field `{field}` {reason}")]
    Malformed { message: &'static str, field: &'static str, reason: MalformedReason },
    #[error("{message} payload has {extra} trailing bytes")]
    TrailingBytes { message: &'static str, extra: usize },
    #[error("invalid value {value} for {message}.{field}")]
    InvalidEnum { message: &'static str, field: &'static str, value: u8 },
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("{message} payload of {len} bytes exceeds the maximum of {max}")]
    PayloadTooLong { message: &'static str, len: usize, max: u32 },
    #[error("generation history of {len} entries exceeds the limit of {max}")]
    HistoryTooLong { len: usize, max: usize },
}

/// The `msg_type` under which `msg` travels.
pub fn message_type(msg: &Message) -> u16 {
    use msg_type::*;
    match msg {
        Message::Hello(_) => HELLO,
        Message::HelloAck { .. } => HELLO_ACK,
        Message::State(_) => STATE,
        Message::Ping { .. } => PING,
        Message::Pong { .. } => PONG,
        Message::RecordPage { .. } => RECORD_PAGE,
        Message::RecordEnd { .. } => RECORD_END,
        Message::Data { .. } => DATA,
        Message::Discard { .. } => DISCARD,
        Message::ReceiptAck { .. } => RECEIPT_ACK,
        Message::HardenedAck { .. } => HARDENED_ACK,
        Message::Flush { .. } => FLUSH,
        Message::FlushAck { .. } => FLUSH_ACK,
        Message::DestageStart { .. } => DESTAGE_START,
        Message::DestageAck { .. } => DESTAGE_ACK,
        Message::DestageDone { .. } => DESTAGE_DONE,
        Message::ToggleNotice { .. } => TOGGLE_NOTICE,
        Message::ToggleAck { .. } => TOGGLE_ACK,
        Message::ClearOld { .. } => CLEAR_OLD,
        Message::RecordExtend { .. } => RECORD_EXTEND,
        Message::RecordExtendAck { .. } => RECORD_EXTEND_ACK,
        Message::RecordTrim { .. } => RECORD_TRIM,
        Message::ResyncRequest { .. } => RESYNC_REQUEST,
        Message::ResyncData { .. } => RESYNC_DATA,
        Message::ResyncAck { .. } => RESYNC_ACK,
        Message::ResyncEnd { .. } => RESYNC_END,
        Message::VerifyRequest { .. } => VERIFY_REQUEST,
        Message::VerifyReply { .. } => VERIFY_REPLY,
        Message::ReadRequest { .. } => READ_REQUEST,
        Message::ReadReply { .. } => READ_REPLY,
        Message::AsyncCommit { .. } => ASYNC_COMMIT,
        Message::AsyncCommitAck { .. } => ASYNC_COMMIT_ACK,
    }
}

// ---------------------------------------------------------------------------------------
// Encoding

/// Appends one frame carrying `msg` to `out` and returns the frame's length.
///
/// On error `out` is left as it was: the message cannot be framed (too large, or a
/// generation history the decoder would reject), which is a bug in the caller's splitting
/// of work rather than a transport problem.
pub fn encode(volume: u64, seq: u64, msg: &Message, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
    if let Message::State(s) = msg {
        let len = s.generations.history.len();
        if len > Generations::HISTORY {
            return Err(EncodeError::HistoryTooLong { len, max: Generations::HISTORY });
        }
    }
    // Measuring with the same writer that produces the bytes keeps the length check
    // honest without a hand-maintained size table, and avoids copying a huge payload only
    // to throw it away.
    let mut counter = Counter(0);
    write_payload(msg, &mut counter);
    let len = counter.0;
    if len > MAX_PAYLOAD as usize {
        return Err(EncodeError::PayloadTooLong { message: msg.name(), len, max: MAX_PAYLOAD });
    }

    let start = out.len();
    out.reserve(HEADER_LEN + len);
    out.put(&MAGIC.to_le_bytes());
    out.put(&PROTOCOL_VERSION.to_le_bytes());
    out.put(&message_type(msg).to_le_bytes());
    out.put(&0u16.to_le_bytes()); // flags
    out.put(&0u16.to_le_bytes()); // reserved
    out.put(&volume.to_le_bytes());
    out.put(&seq.to_le_bytes());
    out.put(&(len as u32).to_le_bytes());
    out.put(&0u32.to_le_bytes()); // crc, patched below
    write_payload(msg, out);
    debug_assert_eq!(out.len() - start, HEADER_LEN + len);

    let crc = crc32c::crc32c(&out[start..]);
    out[start + OFF_CRC..start + OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(HEADER_LEN + len)
}

/// Length of the frame [`encode`] would produce for `msg`, without checking the limits.
pub fn encoded_len(msg: &Message) -> usize {
    let mut counter = Counter(0);
    write_payload(msg, &mut counter);
    HEADER_LEN + counter.0
}

trait Sink {
    fn put(&mut self, bytes: &[u8]);

    fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.put(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    fn bytes(&mut self, v: &[u8]) {
        // Saturating only matters while measuring an oversized message, which `encode`
        // then rejects; a frame that is actually written always fits.
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.put(v);
    }
}

struct Counter(usize);

impl Sink for Counter {
    fn put(&mut self, bytes: &[u8]) {
        self.0 = self.0.saturating_add(bytes.len());
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

fn write_payload(msg: &Message, w: &mut impl Sink) {
    match msg {
        Message::Hello(h) => {
            w.u16(h.min_version);
            w.u16(h.max_version);
            w.u64(h.features);
            w.u8(h.node);
            w.u64(h.volume);
        }
        Message::HelloAck { version, features } => {
            w.u16(*version);
            w.u64(*features);
        }
        Message::State(s) => {
            w.u8(s.node);
            w.u8(role_to_wire(s.role));
            w.u8(disk_to_wire(s.disk));
            w.u8(mode_to_wire(s.mode));
            w.u64(s.generations.current);
            // `encode` has checked the bound; the saturation only keeps `encoded_len`
            // total on values it will never be asked to frame.
            w.u8(u8::try_from(s.generations.history.len()).unwrap_or(u8::MAX));
            for g in &s.generations.history {
                w.u64(*g);
            }
            w.bool(s.crashed);
            w.u64(s.volume_size);
            w.u32(s.track_size);
            w.u8(s.primary.unwrap_or(NO_PRIMARY));
            w.u64(s.replicating);
        }
        Message::RecordPage { range, bits } => {
            w.u32(*range);
            w.bytes(bits);
        }
        Message::RecordEnd { tracks } | Message::ResyncEnd { tracks } => w.u64(*tracks),
        Message::Data { id, offset, fua, payload } => {
            w.u64(*id);
            w.u64(*offset);
            w.bool(*fua);
            w.bytes(payload);
        }
        Message::Discard { id, offset, len, zeroes } => {
            w.u64(*id);
            w.u64(*offset);
            w.u64(*len);
            w.bool(*zeroes);
        }
        Message::ReceiptAck { id } | Message::HardenedAck { id } | Message::Flush { id } | Message::FlushAck { id } => {
            w.u64(*id)
        }
        Message::DestageStart { range }
        | Message::DestageAck { range }
        | Message::DestageDone { range }
        | Message::ToggleNotice { range }
        | Message::ToggleAck { range }
        | Message::ClearOld { range } => w.u32(*range),
        Message::RecordExtend { generation, first, count } => {
            w.u64(*generation);
            w.u64(*first);
            w.u32(*count);
        }
        Message::RecordExtendAck { generation } | Message::RecordTrim { generation } => w.u64(*generation),
        Message::ResyncRequest { first, count } => {
            w.u64(*first);
            w.u32(*count);
        }
        Message::ResyncData { track, payload } => {
            w.u64(*track);
            w.bytes(payload);
        }
        Message::ResyncAck { track } => w.u64(*track),
        Message::VerifyRequest { track, digest } => {
            w.u64(*track);
            w.put(digest);
        }
        Message::VerifyReply { track, same } => {
            w.u64(*track);
            w.bool(*same);
        }
        Message::ReadRequest { id, offset, len } => {
            w.u64(*id);
            w.u64(*offset);
            w.u32(*len);
        }
        Message::ReadReply { id, payload } => {
            w.u64(*id);
            w.bytes(payload);
        }
        Message::AsyncCommit { group, cycle, writes } => {
            w.u32(*group);
            w.u64(*cycle);
            w.u32(*writes);
        }
        Message::AsyncCommitAck { group, cycle } => {
            w.u32(*group);
            w.u64(*cycle);
        }
        Message::Ping { nonce } | Message::Pong { nonce } => w.u64(*nonce),
    }
}

fn role_to_wire(r: Role) -> u8 {
    match r {
        Role::Primary => 1,
        Role::Secondary => 2,
    }
}

fn disk_to_wire(d: DiskState) -> u8 {
    match d {
        DiskState::UpToDate => 1,
        DiskState::Consistent => 2,
        DiskState::Outdated => 3,
        DiskState::Inconsistent => 4,
        DiskState::Failed => 5,
    }
}

fn mode_to_wire(m: Mode) -> u8 {
    match m {
        Mode::Memory => 1,
        Mode::Disk => 2,
        Mode::Async => 3,
        Mode::Predictive => 4,
    }
}

// ---------------------------------------------------------------------------------------
// Decoding

/// Reads and checks the fixed header at the start of `buf`, which is all a stream reader
/// needs to learn how long the frame is ([`FrameHeader::frame_len`]).
///
/// Checks only what must hold before the payload can be trusted to arrive: the magic, the
/// version (a different version may frame differently) and the length bound (so that a
/// reader never waits for, or buffers, more than [`MAX_PAYLOAD`]). Everything else is
/// checked by [`decode`] after the checksum, so that corruption is reported as such.
pub fn peek_header(buf: &[u8]) -> Result<FrameHeader, DecodeError> {
    let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::Incomplete { needed: HEADER_LEN });
    };
    let magic = u32::from_le_bytes(field(h, OFF_MAGIC));
    if magic != MAGIC {
        return Err(DecodeError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes(field(h, OFF_VERSION));
    if !(MIN_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(DecodeError::UnsupportedVersion { theirs: version, min: MIN_VERSION, max: PROTOCOL_VERSION });
    }
    let len = u32::from_le_bytes(field(h, OFF_LEN));
    if len > MAX_PAYLOAD {
        return Err(DecodeError::PayloadTooLong { len, max: MAX_PAYLOAD });
    }
    Ok(FrameHeader {
        version,
        msg_type: u16::from_le_bytes(field(h, OFF_TYPE)),
        flags: u16::from_le_bytes(field(h, OFF_FLAGS)),
        volume: u64::from_le_bytes(field(h, OFF_VOLUME)),
        seq: u64::from_le_bytes(field(h, OFF_SEQ)),
        len,
    })
}

/// Decodes the frame at the start of `buf` and returns it with the number of bytes it
/// occupied; bytes after it are left alone (they belong to the next frame).
///
/// Never panics, and allocates at most the payload's byte fields, which are bounded by
/// [`MAX_PAYLOAD`] and by the bytes actually present.
pub fn decode(buf: &[u8]) -> Result<(Frame, usize), DecodeError> {
    let header = peek_header(buf)?;
    let total = header.frame_len();
    let Some(frame) = buf.get(..total) else {
        return Err(DecodeError::Incomplete { needed: total });
    };
    let (head, payload) = frame.split_at(HEADER_LEN);

    let carried = u32::from_le_bytes([head[OFF_CRC], head[OFF_CRC + 1], head[OFF_CRC + 2], head[OFF_CRC + 3]]);
    let mut computed = crc32c::crc32c(&head[..OFF_CRC]);
    computed = crc32c::crc32c_append(computed, &[0; 4]);
    computed = crc32c::crc32c_append(computed, payload);
    if computed != carried {
        return Err(DecodeError::ChecksumMismatch { carried, computed });
    }

    let reserved = u16::from_le_bytes([head[OFF_RESERVED], head[OFF_RESERVED + 1]]);
    if header.flags != 0 || reserved != 0 {
        return Err(DecodeError::ReservedBits { flags: header.flags, reserved });
    }

    let message = decode_payload(header.msg_type, payload)?;
    Ok((Frame { header, message }, total))
}

fn field<const N: usize>(h: &[u8; HEADER_LEN], at: usize) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(&h[at..at + N]);
    a
}

/// Cursor over a payload that names the message and field in every error.
struct Reader<'a> {
    buf: &'a [u8],
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.malformed(field, MalformedReason::Truncated { needed: n, remaining: self.buf.len() }));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(field, N)?);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_le_bytes)
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_le_bytes)
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.array(field).map(u64::from_le_bytes)
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(self.invalid(field, value)),
        }
    }

    /// The length is checked against the bytes present before anything is allocated.
    fn bytes(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.u32(field)? as usize;
        self.take(field, len).map(Bytes::copy_from_slice)
    }

    fn role(&mut self, field: &'static str) -> Result<Role, DecodeError> {
        match self.u8(field)? {
            1 => Ok(Role::Primary),
            2 => Ok(Role::Secondary),
            value => Err(self.invalid(field, value)),
        }
    }

    fn disk(&mut self, field: &'static str) -> Result<DiskState, DecodeError> {
        match self.u8(field)? {
            1 => Ok(DiskState::UpToDate),
            2 => Ok(DiskState::Consistent),
            3 => Ok(DiskState::Outdated),
            4 => Ok(DiskState::Inconsistent),
            5 => Ok(DiskState::Failed),
            value => Err(self.invalid(field, value)),
        }
    }

    fn mode(&mut self, field: &'static str) -> Result<Mode, DecodeError> {
        match self.u8(field)? {
            1 => Ok(Mode::Memory),
            2 => Ok(Mode::Disk),
            3 => Ok(Mode::Async),
            4 => Ok(Mode::Predictive),
            value => Err(self.invalid(field, value)),
        }
    }

    fn generations(&mut self) -> Result<Generations, DecodeError> {
        let current = self.u64("generations.current")?;
        let count = self.u8("generations.history")? as usize;
        if count > Generations::HISTORY {
            return Err(self
                .malformed("generations.history", MalformedReason::TooMany { len: count, max: Generations::HISTORY }));
        }
        let mut history = Vec::with_capacity(count);
        for _ in 0..count {
            history.push(self.u64("generations.history")?);
        }
        Ok(Generations { current, history })
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { message: self.message, extra: self.buf.len() })
        }
    }

    fn malformed(&self, field: &'static str, reason: MalformedReason) -> DecodeError {
        DecodeError::Malformed { message: self.message, field, reason }
    }

    fn invalid(&self, field: &'static str, value: u8) -> DecodeError {
        DecodeError::InvalidEnum { message: self.message, field, value }
    }
}

fn decode_payload(ty: u16, payload: &[u8]) -> Result<Message, DecodeError> {
    use msg_type::*;
    let message = match ty {
        HELLO => "Hello",
        HELLO_ACK => "HelloAck",
        STATE => "State",
        PING => "Ping",
        PONG => "Pong",
        RECORD_PAGE => "RecordPage",
        RECORD_END => "RecordEnd",
        DATA => "Data",
        DISCARD => "Discard",
        RECEIPT_ACK => "ReceiptAck",
        HARDENED_ACK => "HardenedAck",
        FLUSH => "Flush",
        FLUSH_ACK => "FlushAck",
        DESTAGE_START => "DestageStart",
        DESTAGE_ACK => "DestageAck",
        DESTAGE_DONE => "DestageDone",
        TOGGLE_NOTICE => "ToggleNotice",
        TOGGLE_ACK => "ToggleAck",
        CLEAR_OLD => "ClearOld",
        RECORD_EXTEND => "RecordExtend",
        RECORD_EXTEND_ACK => "RecordExtendAck",
        RECORD_TRIM => "RecordTrim",
        RESYNC_REQUEST => "ResyncRequest",
        RESYNC_DATA => "ResyncData",
        RESYNC_ACK => "ResyncAck",
        RESYNC_END => "ResyncEnd",
        VERIFY_REQUEST => "VerifyRequest",
        VERIFY_REPLY => "VerifyReply",
        READ_REQUEST => "ReadRequest",
        READ_REPLY => "ReadReply",
        ASYNC_COMMIT => "AsyncCommit",
        ASYNC_COMMIT_ACK => "AsyncCommitAck",
        msg_type => return Err(DecodeError::UnknownType { msg_type }),
    };
    let mut r = Reader { buf: payload, message };
    let msg = match ty {
        HELLO => Message::Hello(Hello {
            min_version: r.u16("min_version")?,
            max_version: r.u16("max_version")?,
            features: r.u64("features")?,
            node: r.u8("node")?,
            volume: r.u64("volume")?,
        }),
        HELLO_ACK => Message::HelloAck { version: r.u16("version")?, features: r.u64("features")? },
        STATE => Message::State(StateReport {
            node: r.u8("node")?,
            role: r.role("role")?,
            disk: r.disk("disk")?,
            mode: r.mode("mode")?,
            generations: r.generations()?,
            crashed: r.bool("crashed")?,
            volume_size: r.u64("volume_size")?,
            track_size: r.u32("track_size")?,
            primary: match r.u8("primary")? {
                NO_PRIMARY => None,
                n if usize::from(n) < MAX_NODES => Some(n),
                n => return Err(r.invalid("primary", n)),
            },
            replicating: r.u64("replicating")?,
        }),
        PING => Message::Ping { nonce: r.u64("nonce")? },
        PONG => Message::Pong { nonce: r.u64("nonce")? },
        RECORD_PAGE => Message::RecordPage { range: r.u32("range")?, bits: r.bytes("bits")? },
        RECORD_END => Message::RecordEnd { tracks: r.u64("tracks")? },
        DATA => Message::Data {
            id: r.u64("id")?,
            offset: r.u64("offset")?,
            fua: r.bool("fua")?,
            payload: r.bytes("payload")?,
        },
        DISCARD => Message::Discard {
            id: r.u64("id")?,
            offset: r.u64("offset")?,
            len: r.u64("len")?,
            zeroes: r.bool("zeroes")?,
        },
        RECEIPT_ACK => Message::ReceiptAck { id: r.u64("id")? },
        HARDENED_ACK => Message::HardenedAck { id: r.u64("id")? },
        FLUSH => Message::Flush { id: r.u64("id")? },
        FLUSH_ACK => Message::FlushAck { id: r.u64("id")? },
        DESTAGE_START => Message::DestageStart { range: r.u32("range")? },
        DESTAGE_ACK => Message::DestageAck { range: r.u32("range")? },
        DESTAGE_DONE => Message::DestageDone { range: r.u32("range")? },
        TOGGLE_NOTICE => Message::ToggleNotice { range: r.u32("range")? },
        TOGGLE_ACK => Message::ToggleAck { range: r.u32("range")? },
        CLEAR_OLD => Message::ClearOld { range: r.u32("range")? },
        RECORD_EXTEND => {
            Message::RecordExtend { generation: r.u64("generation")?, first: r.u64("first")?, count: r.u32("count")? }
        }
        RECORD_EXTEND_ACK => Message::RecordExtendAck { generation: r.u64("generation")? },
        RECORD_TRIM => Message::RecordTrim { generation: r.u64("generation")? },
        RESYNC_REQUEST => Message::ResyncRequest { first: r.u64("first")?, count: r.u32("count")? },
        RESYNC_DATA => Message::ResyncData { track: r.u64("track")?, payload: r.bytes("payload")? },
        RESYNC_ACK => Message::ResyncAck { track: r.u64("track")? },
        RESYNC_END => Message::ResyncEnd { tracks: r.u64("tracks")? },
        VERIFY_REQUEST => Message::VerifyRequest { track: r.u64("track")?, digest: r.array("digest")? },
        VERIFY_REPLY => Message::VerifyReply { track: r.u64("track")?, same: r.bool("same")? },
        READ_REQUEST => Message::ReadRequest { id: r.u64("id")?, offset: r.u64("offset")?, len: r.u32("len")? },
        READ_REPLY => Message::ReadReply { id: r.u64("id")?, payload: r.bytes("payload")? },
        ASYNC_COMMIT => {
            Message::AsyncCommit { group: r.u32("group")?, cycle: r.u64("cycle")?, writes: r.u32("writes")? }
        }
        ASYNC_COMMIT_ACK => Message::AsyncCommitAck { group: r.u32("group")?, cycle: r.u64("cycle")? },
        // The first match returned for every other value.
        _ => return Err(DecodeError::UnknownType { msg_type: ty }),
    };
    r.finish()?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::GenId;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..48).prop_map(Bytes::from)
    }

    fn arb_generations() -> impl Strategy<Value = Generations> {
        (any::<GenId>(), vec(any::<GenId>(), 0..=Generations::HISTORY))
            .prop_map(|(current, history)| Generations { current, history })
    }

    fn arb_state() -> impl Strategy<Value = StateReport> {
        let role = prop_oneof![Just(Role::Primary), Just(Role::Secondary)];
        let disk = prop_oneof![
            Just(DiskState::UpToDate),
            Just(DiskState::Consistent),
            Just(DiskState::Outdated),
            Just(DiskState::Inconsistent),
            Just(DiskState::Failed),
        ];
        let mode = prop_oneof![Just(Mode::Memory), Just(Mode::Disk), Just(Mode::Async), Just(Mode::Predictive)];
        let peers = (proptest::option::of(0u8..MAX_NODES as u8), any::<u64>());
        (any::<u8>(), role, disk, mode, arb_generations(), any::<bool>(), any::<u64>(), any::<u32>(), peers).prop_map(
            |(node, role, disk, mode, generations, crashed, volume_size, track_size, (primary, replicating))| {
                StateReport {
                    node,
                    role,
                    disk,
                    mode,
                    generations,
                    crashed,
                    volume_size,
                    track_size,
                    primary,
                    replicating,
                }
            },
        )
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let hello = (any::<u16>(), any::<u16>(), any::<u64>(), any::<u8>(), any::<u64>()).prop_map(
            |(min_version, max_version, features, node, volume)| {
                Message::Hello(Hello { min_version, max_version, features, node, volume })
            },
        );
        prop_oneof![
            hello,
            (any::<u16>(), any::<u64>()).prop_map(|(version, features)| Message::HelloAck { version, features }),
            arb_state().prop_map(Message::State),
            (any::<u32>(), arb_bytes()).prop_map(|(range, bits)| Message::RecordPage { range, bits }),
            any::<u64>().prop_map(|tracks| Message::RecordEnd { tracks }),
            (any::<u64>(), any::<u64>(), any::<bool>(), arb_bytes())
                .prop_map(|(id, offset, fua, payload)| Message::Data { id, offset, fua, payload }),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>())
                .prop_map(|(id, offset, len, zeroes)| Message::Discard { id, offset, len, zeroes }),
            any::<u64>().prop_map(|id| Message::ReceiptAck { id }),
            any::<u64>().prop_map(|id| Message::HardenedAck { id }),
            any::<u64>().prop_map(|id| Message::Flush { id }),
            any::<u64>().prop_map(|id| Message::FlushAck { id }),
            any::<u32>().prop_map(|range| Message::DestageStart { range }),
            any::<u32>().prop_map(|range| Message::DestageAck { range }),
            any::<u32>().prop_map(|range| Message::DestageDone { range }),
            any::<u32>().prop_map(|range| Message::ToggleNotice { range }),
            any::<u32>().prop_map(|range| Message::ToggleAck { range }),
            any::<u32>().prop_map(|range| Message::ClearOld { range }),
            (any::<u64>(), any::<u64>(), any::<u32>())
                .prop_map(|(generation, first, count)| { Message::RecordExtend { generation, first, count } }),
            any::<u64>().prop_map(|generation| Message::RecordExtendAck { generation }),
            any::<u64>().prop_map(|generation| Message::RecordTrim { generation }),
            (any::<u64>(), any::<u32>()).prop_map(|(first, count)| Message::ResyncRequest { first, count }),
            (any::<u64>(), arb_bytes()).prop_map(|(track, payload)| Message::ResyncData { track, payload }),
            any::<u64>().prop_map(|track| Message::ResyncAck { track }),
            any::<u64>().prop_map(|tracks| Message::ResyncEnd { tracks }),
            (any::<u64>(), any::<[u8; 32]>()).prop_map(|(track, digest)| Message::VerifyRequest { track, digest }),
            (any::<u64>(), any::<bool>()).prop_map(|(track, same)| Message::VerifyReply { track, same }),
            (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(id, offset, len)| Message::ReadRequest {
                id,
                offset,
                len
            }),
            (any::<u64>(), arb_bytes()).prop_map(|(id, payload)| Message::ReadReply { id, payload }),
            (any::<u32>(), any::<u64>(), any::<u32>())
                .prop_map(|(group, cycle, writes)| { Message::AsyncCommit { group, cycle, writes } }),
            (any::<u32>(), any::<u64>()).prop_map(|(group, cycle)| Message::AsyncCommitAck { group, cycle }),
            any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
            any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
        ]
    }

    /// One message of every variant, with non-trivial field values.
    fn samples() -> Vec<Message> {
        let bytes = Bytes::from_static(b"\x00\x01\xfe\xff tandem");
        vec![
            Message::Hello(Hello { min_version: 1, max_version: 3, features: 0b11, node: 2, volume: 9 }),
            Message::HelloAck { version: 1, features: 0b11 },
            Message::State(StateReport {
                node: 1,
                role: Role::Primary,
                disk: DiskState::Inconsistent,
                mode: Mode::Async,
                generations: Generations { current: 5, history: vec![4, 3, 2] },
                crashed: true,
                volume_size: 1 << 40,
                track_size: 1 << 22,
                primary: Some(1),
                replicating: 0b101,
            }),
            Message::RecordPage { range: 17, bits: bytes.clone() },
            Message::RecordEnd { tracks: 262_144 },
            Message::Data { id: 1, offset: 4096, fua: true, payload: bytes.clone() },
            Message::Discard { id: 2, offset: 8192, len: 1 << 20, zeroes: true },
            Message::ReceiptAck { id: 3 },
            Message::HardenedAck { id: 4 },
            Message::Flush { id: 5 },
            Message::FlushAck { id: 6 },
            Message::DestageStart { range: 7 },
            Message::DestageAck { range: 8 },
            Message::DestageDone { range: 9 },
            Message::ToggleNotice { range: 10 },
            Message::ToggleAck { range: 11 },
            Message::ClearOld { range: 12 },
            Message::RecordExtend { generation: 13, first: 14, count: 15 },
            Message::RecordExtendAck { generation: 16 },
            Message::RecordTrim { generation: 17 },
            Message::ResyncRequest { first: 18, count: 19 },
            Message::ResyncData { track: 20, payload: bytes.clone() },
            Message::ResyncAck { track: 21 },
            Message::ResyncEnd { tracks: 33 },
            Message::VerifyRequest { track: 34, digest: [0xA5; 32] },
            Message::VerifyReply { track: 35, same: false },
            Message::ReadRequest { id: 22, offset: 23, len: 24 },
            Message::ReadReply { id: 25, payload: Bytes::new() },
            Message::AsyncCommit { group: 26, cycle: 27, writes: 28 },
            Message::AsyncCommitAck { group: 29, cycle: 30 },
            Message::Ping { nonce: 31 },
            Message::Pong { nonce: 32 },
        ]
    }

    fn encoded(volume: u64, seq: u64, msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        encode(volume, seq, msg, &mut out).unwrap();
        out
    }

    /// Builds a frame by hand (not through `encode`) with a correct checksum, so that tests
    /// can reach the payload parsers with any header values and payload bytes.
    fn raw_frame(msg_type: u16, flags: u16, reserved: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(b"TNDM");
        f.extend_from_slice(&1u16.to_le_bytes());
        f.extend_from_slice(&msg_type.to_le_bytes());
        f.extend_from_slice(&flags.to_le_bytes());
        f.extend_from_slice(&reserved.to_le_bytes());
        f.extend_from_slice(&42u64.to_le_bytes());
        f.extend_from_slice(&1u64.to_le_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(payload);
        let crc = crc32c::crc32c(&f);
        f[32..36].copy_from_slice(&crc.to_le_bytes());
        f
    }

    fn decode_err(buf: &[u8]) -> DecodeError {
        decode(buf).expect_err("frame must be rejected")
    }

    #[test]
    fn every_variant_round_trips_under_a_distinct_type() {
        let samples = samples();
        let mut types: Vec<u16> = samples.iter().map(message_type).collect();
        types.sort_unstable();
        types.dedup();
        // `message_type` matches exhaustively, so a new variant fails to compile there; this
        // count then makes sure it also gets a sample here.
        assert_eq!(types.len(), 32);
        assert_eq!(samples.len(), 32);
        for msg in &samples {
            let bytes = encoded(3, 4, msg);
            let (frame, used) = decode(&bytes).unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(&frame.message, msg);
            assert_eq!(frame.header.msg_type, message_type(msg));
        }
    }

    #[test]
    fn golden_ping_frame() {
        let bytes = encoded(0x1122_3344_5566_7788, 7, &Message::Ping { nonce: 0x0102_0304_0506_0708 });
        // The checksum was computed independently with a bitwise CRC-32C (poly 0x82F63B78).
        #[rustfmt::skip]
        let golden = [
            0x54, 0x4e, 0x44, 0x4d, // magic "TNDM"
            0x01, 0x00,             // version
            0x04, 0x00,             // type: Ping
            0x00, 0x00,             // flags
            0x00, 0x00,             // reserved
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // volume
            0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // seq
            0x08, 0x00, 0x00, 0x00, // len
            0x44, 0x34, 0x03, 0x6b, // crc32c
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // nonce
        ];
        assert_eq!(bytes, golden);
        let (frame, _) = decode(&golden).unwrap();
        assert_eq!(
            frame.header,
            FrameHeader {
                version: 1,
                msg_type: msg_type::PING,
                flags: 0,
                volume: 0x1122_3344_5566_7788,
                seq: 7,
                len: 8,
            }
        );
    }

    #[test]
    fn golden_state_payload() {
        let msg = Message::State(StateReport {
            node: 2,
            role: Role::Secondary,
            disk: DiskState::Outdated,
            mode: Mode::Predictive,
            generations: Generations { current: 0x0a, history: vec![0x0b] },
            crashed: true,
            volume_size: 0x1000,
            track_size: 0x40,
            primary: None,
            replicating: 0b11,
        });
        let bytes = encoded(0, 0, &msg);
        #[rustfmt::skip]
        let payload = [
            0x02,                   // node
            0x02,                   // role: Secondary
            0x03,                   // disk: Outdated
            0x04,                   // mode: Predictive
            0x0a, 0, 0, 0, 0, 0, 0, 0, // generations.current
            0x01,                   // history count
            0x0b, 0, 0, 0, 0, 0, 0, 0, // history[0]
            0x01,                   // crashed
            0x00, 0x10, 0, 0, 0, 0, 0, 0, // volume_size
            0x40, 0, 0, 0,          // track_size
            0xff,                   // primary: none
            0x03, 0, 0, 0, 0, 0, 0, 0, // replicating: nodes 0 and 1
        ];
        assert_eq!(&bytes[HEADER_LEN..], payload);
        assert_eq!(&bytes[6..8], &msg_type::STATE.to_le_bytes());
    }

    #[test]
    fn byte_by_byte_is_incomplete_until_the_last_byte() {
        for msg in samples() {
            let bytes = encoded(1, 2, &msg);
            for cut in 0..bytes.len() {
                match decode(&bytes[..cut]) {
                    Err(DecodeError::Incomplete { needed }) => {
                        let expect = if cut < HEADER_LEN { HEADER_LEN } else { bytes.len() };
                        assert_eq!(needed, expect, "{} cut at {cut}", msg.name());
                    }
                    other => panic!("{} cut at {cut}: {other:?}", msg.name()),
                }
            }
            assert_eq!(decode(&bytes).unwrap().0.message, msg);
        }
    }

    #[test]
    fn concatenated_frames_decode_in_turn() {
        let a = Message::Data { id: 1, offset: 0, fua: false, payload: Bytes::from_static(b"abc") };
        let b = Message::Flush { id: 2 };
        let mut buf = Vec::new();
        let la = encode(5, 0, &a, &mut buf).unwrap();
        let lb = encode(5, 1, &b, &mut buf).unwrap();
        // A third frame still in flight.
        let mut third = Vec::new();
        encode(5, 2, &Message::Ping { nonce: 3 }, &mut third).unwrap();
        buf.extend_from_slice(&third[..10]);

        let (fa, used) = decode(&buf).unwrap();
        assert_eq!((fa.message, fa.header.seq, used), (a, 0, la));
        let (fb, used) = decode(&buf[la..]).unwrap();
        assert_eq!((fb.message, fb.header.seq, used), (b, 1, lb));
        assert_eq!(decode(&buf[la + lb..]), Err(DecodeError::Incomplete { needed: HEADER_LEN }));
    }

    #[test]
    fn encode_appends_without_touching_what_is_there() {
        let mut out = b"prefix".to_vec();
        let n = encode(1, 1, &Message::Pong { nonce: 9 }, &mut out).unwrap();
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(out.len(), 6 + n);
        assert_eq!(decode(&out[6..]).unwrap().0.message, Message::Pong { nonce: 9 });
    }

    #[test]
    fn a_full_track_fits_and_more_than_the_maximum_is_refused() {
        let track = Message::ResyncData { track: 1, payload: Bytes::from(vec![0xa5; 4 << 20]) };
        let bytes = encoded(1, 1, &track);
        assert_eq!(bytes.len(), encoded_len(&track));
        assert_eq!(decode(&bytes).unwrap().0.message, track);

        // The fields around the byte string take 12 bytes, so this is one byte too many.
        let payload = Bytes::from(vec![0; MAX_PAYLOAD as usize - 11]);
        let mut out = b"x".to_vec();
        assert_eq!(
            encode(1, 1, &Message::ReadReply { id: 1, payload }, &mut out),
            Err(EncodeError::PayloadTooLong { message: "ReadReply", len: MAX_PAYLOAD as usize + 1, max: MAX_PAYLOAD })
        );
        assert_eq!(out, b"x");
    }

    #[test]
    fn encode_refuses_a_history_the_decoder_would_reject() {
        let mut generations = Generations::new(1);
        generations.history = (0..=Generations::HISTORY as u64).collect();
        let msg = Message::State(StateReport {
            node: 0,
            role: Role::Primary,
            disk: DiskState::UpToDate,
            mode: Mode::Disk,
            generations,
            crashed: false,
            volume_size: 0,
            track_size: 0,
            primary: Some(0),
            replicating: 0,
        });
        let mut out = Vec::new();
        assert_eq!(encode(0, 0, &msg, &mut out), Err(EncodeError::HistoryTooLong { len: 9, max: 8 }));
        assert!(out.is_empty());
    }

    #[test]
    fn bad_magic_shows_the_value() {
        let mut bytes = encoded(0, 0, &Message::Ping { nonce: 0 });
        bytes[..4].copy_from_slice(b"HTTP");
        let err = decode_err(&bytes);
        assert_eq!(err, DecodeError::BadMagic { found: 0x5054_5448 });
        assert!(err.to_string().contains("0x50545448"), "{err}");
    }

    #[test]
    fn other_versions_are_refused_before_the_payload_arrives() {
        let mut bytes = encoded(0, 0, &Message::Ping { nonce: 0 });
        bytes[4..6].copy_from_slice(&2u16.to_le_bytes());
        let err = decode_err(&bytes[..HEADER_LEN]);
        assert_eq!(err, DecodeError::UnsupportedVersion { theirs: 2, min: 1, max: 1 });
        assert_eq!(err.to_string(), "unsupported frame version 2: this build reads versions 1..=1");
        bytes[4..6].copy_from_slice(&0u16.to_le_bytes());
        assert!(matches!(decode_err(&bytes), DecodeError::UnsupportedVersion { theirs: 0, .. }));
    }

    #[test]
    fn an_oversized_length_is_refused_from_the_header_alone() {
        let mut bytes = encoded(0, 0, &Message::Ping { nonce: 0 });
        bytes[28..32].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        let expect = DecodeError::PayloadTooLong { len: MAX_PAYLOAD + 1, max: MAX_PAYLOAD };
        assert_eq!(peek_header(&bytes[..HEADER_LEN]), Err(expect.clone()));
        assert_eq!(decode_err(&bytes[..HEADER_LEN]), expect);
        bytes[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_err(&bytes), DecodeError::PayloadTooLong { len: u32::MAX, .. }));
    }

    #[test]
    fn peek_header_reports_the_frame_length() {
        let msg = Message::RecordPage { range: 1, bits: Bytes::from_static(&[0xff; 100]) };
        let bytes = encoded(8, 9, &msg);
        assert_eq!(peek_header(&bytes[..HEADER_LEN - 1]), Err(DecodeError::Incomplete { needed: HEADER_LEN }));
        let h = peek_header(&bytes[..HEADER_LEN]).unwrap();
        assert_eq!(h.frame_len(), bytes.len());
        assert_eq!((h.volume, h.seq, h.len), (8, 9, 108));
    }

    #[test]
    fn unknown_types_are_named() {
        let err = decode_err(&raw_frame(0x0006, 0, 0, &[]));
        assert_eq!(err, DecodeError::UnknownType { msg_type: 6 });
        assert_eq!(decode_err(&raw_frame(0, 0, 0, &[])), DecodeError::UnknownType { msg_type: 0 });
        assert_eq!(err.to_string(), "unknown message type 6 (0x0006)");
    }

    #[test]
    fn reserved_header_bits_must_be_zero() {
        let nonce = 5u64.to_le_bytes();
        assert_eq!(
            decode_err(&raw_frame(msg_type::PING, 0x0001, 0, &nonce)),
            DecodeError::ReservedBits { flags: 1, reserved: 0 }
        );
        assert_eq!(
            decode_err(&raw_frame(msg_type::PING, 0, 0x8000, &nonce)),
            DecodeError::ReservedBits { flags: 0, reserved: 0x8000 }
        );
        assert!(decode(&raw_frame(msg_type::PING, 0, 0, &nonce)).is_ok());
    }

    #[test]
    fn trailing_payload_bytes_are_refused() {
        let err = decode_err(&raw_frame(msg_type::PING, 0, 0, &[0; 9]));
        assert_eq!(err, DecodeError::TrailingBytes { message: "Ping", extra: 1 });
        // Inside a byte string the length prefix, not the frame, bounds the field.
        let mut p = 1u64.to_le_bytes().to_vec();
        p.extend_from_slice(&2u32.to_le_bytes());
        p.extend_from_slice(b"abc");
        assert_eq!(
            decode_err(&raw_frame(msg_type::READ_REPLY, 0, 0, &p)),
            DecodeError::TrailingBytes { message: "ReadReply", extra: 1 }
        );
    }

    #[test]
    fn truncated_fields_are_named() {
        let err = decode_err(&raw_frame(msg_type::ASYNC_COMMIT, 0, 0, &[0; 13]));
        assert_eq!(
            err,
            DecodeError::Malformed {
                message: "AsyncCommit",
                field: "writes",
                reason: MalformedReason::Truncated { needed: 4, remaining: 1 },
            }
        );
        assert_eq!(
            err.to_string(),
            "malformed AsyncCommit payload: field `writes` needs 4 bytes but only 1 remain in the payload"
        );
    }

    #[test]
    fn a_length_prefix_beyond_the_payload_is_refused_without_allocating() {
        let mut p = 1u64.to_le_bytes().to_vec();
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        p.extend_from_slice(b"abc");
        assert_eq!(
            decode_err(&raw_frame(msg_type::RESYNC_DATA, 0, 0, &p)),
            DecodeError::Malformed {
                message: "ResyncData",
                field: "payload",
                reason: MalformedReason::Truncated { needed: u32::MAX as usize, remaining: 3 },
            }
        );
    }

    fn state_payload(role: u8, disk: u8, mode: u8, history: u8, crashed: u8) -> Vec<u8> {
        let mut p = vec![0, role, disk, mode];
        p.extend_from_slice(&1u64.to_le_bytes());
        p.push(history);
        for g in 0..history {
            p.extend_from_slice(&u64::from(g).to_le_bytes());
        }
        p.push(crashed);
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.push(0xff);
        p.extend_from_slice(&0u64.to_le_bytes());
        p
    }

    #[test]
    fn enum_values_outside_the_table_are_refused() {
        let state = |p: Vec<u8>| decode(&raw_frame(msg_type::STATE, 0, 0, &p));
        assert!(state(state_payload(1, 1, 1, 0, 0)).is_ok());
        let invalid = |field, value| Err(DecodeError::InvalidEnum { message: "State", field, value });
        assert_eq!(state(state_payload(0, 1, 1, 0, 0)), invalid("role", 0));
        assert_eq!(state(state_payload(3, 1, 1, 0, 0)), invalid("role", 3));
        assert_eq!(state(state_payload(1, 6, 1, 0, 0)), invalid("disk", 6));
        assert_eq!(state(state_payload(1, 1, 5, 0, 0)), invalid("mode", 5));
        assert_eq!(state(state_payload(1, 1, 1, 0, 2)), invalid("crashed", 2));
        let mut p = state_payload(1, 1, 1, 0, 0);
        let at = p.len() - 9;
        p[at] = 64;
        assert_eq!(state(p), invalid("primary", 64));

        let mut data = vec![0; 16];
        data.push(7);
        data.extend_from_slice(&0u32.to_le_bytes());
        let err = decode_err(&raw_frame(msg_type::DATA, 0, 0, &data));
        assert_eq!(err, DecodeError::InvalidEnum { message: "Data", field: "fua", value: 7 });
        assert_eq!(err.to_string(), "invalid value 7 for Data.fua");
    }

    #[test]
    fn a_history_longer_than_kept_is_malformed() {
        let max = Generations::HISTORY as u8;
        let ok = decode(&raw_frame(msg_type::STATE, 0, 0, &state_payload(1, 1, 1, max, 0))).unwrap();
        let Message::State(s) = ok.0.message else { panic!("not a State") };
        assert_eq!(s.generations.history.len(), Generations::HISTORY);

        assert_eq!(
            decode_err(&raw_frame(msg_type::STATE, 0, 0, &state_payload(1, 1, 1, max + 1, 0))),
            DecodeError::Malformed {
                message: "State",
                field: "generations.history",
                reason: MalformedReason::TooMany { len: 9, max: 8 },
            }
        );
        // A count byte of 255 must not make the decoder reserve or read 255 entries.
        let mut p = state_payload(1, 1, 1, 0, 0);
        p[12] = 255;
        assert!(matches!(
            decode_err(&raw_frame(msg_type::STATE, 0, 0, &p)),
            DecodeError::Malformed { reason: MalformedReason::TooMany { len: 255, .. }, .. }
        ));
    }

    /// What a checksum-valid frame may fail with: payload problems only.
    fn is_payload_error(e: &DecodeError) -> bool {
        matches!(
            e,
            DecodeError::UnknownType { .. }
                | DecodeError::Malformed { .. }
                | DecodeError::TrailingBytes { .. }
                | DecodeError::InvalidEnum { .. }
        )
    }

    const KNOWN_TYPES: [u16; 32] = {
        use msg_type::*;
        [
            HELLO,
            HELLO_ACK,
            STATE,
            PING,
            PONG,
            RECORD_PAGE,
            RECORD_END,
            DATA,
            DISCARD,
            RECEIPT_ACK,
            HARDENED_ACK,
            FLUSH,
            FLUSH_ACK,
            DESTAGE_START,
            DESTAGE_ACK,
            DESTAGE_DONE,
            TOGGLE_NOTICE,
            TOGGLE_ACK,
            CLEAR_OLD,
            RECORD_EXTEND,
            RECORD_EXTEND_ACK,
            RECORD_TRIM,
            RESYNC_REQUEST,
            RESYNC_DATA,
            RESYNC_ACK,
            RESYNC_END,
            VERIFY_REQUEST,
            VERIFY_REPLY,
            READ_REQUEST,
            READ_REPLY,
            ASYNC_COMMIT,
            ASYNC_COMMIT_ACK,
        ]
    };

    proptest! {
        #[test]
        fn round_trip(msg in arb_message(), volume in any::<u64>(), seq in any::<u64>()) {
            let mut out = Vec::new();
            let n = encode(volume, seq, &msg, &mut out).unwrap();
            prop_assert_eq!(n, out.len());
            prop_assert_eq!(n, encoded_len(&msg));
            let (frame, used) = decode(&out).unwrap();
            prop_assert_eq!(used, n);
            prop_assert_eq!(
                frame.header,
                FrameHeader {
                    version: PROTOCOL_VERSION,
                    msg_type: message_type(&msg),
                    flags: 0,
                    volume,
                    seq,
                    len: (n - HEADER_LEN) as u32,
                }
            );
            prop_assert_eq!(frame.message, msg);
        }

        /// CRC-32C detects every single-bit error, and the fields checked before the CRC
        /// (magic, version, length) fail on their own terms: no flip yields a valid frame.
        #[test]
        fn any_single_bit_flip_is_rejected(msg in arb_message()) {
            let bytes = encoded(11, 12, &msg);
            for bit in 0..bytes.len() * 8 {
                let mut bad = bytes.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                let err = decode(&bad).expect_err("a flipped bit decoded");
                let ok = match bit / 8 {
                    0..=3 => matches!(err, DecodeError::BadMagic { .. }),
                    4..=5 => matches!(err, DecodeError::UnsupportedVersion { .. }),
                    28..=31 => matches!(
                        err,
                        DecodeError::ChecksumMismatch { .. }
                            | DecodeError::Incomplete { .. }
                            | DecodeError::PayloadTooLong { .. }
                    ),
                    _ => matches!(err, DecodeError::ChecksumMismatch { .. }),
                };
                prop_assert!(ok, "bit {}: {:?}", bit, err);
            }
        }

        /// Payload garbage behind a valid checksum reaches the field parsers; whatever they
        /// accept must be canonical (re-encodes to the same bytes).
        #[test]
        fn checksummed_garbage_is_rejected_or_canonical(
            ty in prop_oneof![proptest::sample::select(&KNOWN_TYPES[..]), any::<u16>()],
            payload in vec(any::<u8>(), 0..96),
        ) {
            let frame = raw_frame(ty, 0, 0, &payload);
            match decode(&frame) {
                Ok((f, used)) => {
                    prop_assert_eq!(used, frame.len());
                    prop_assert_eq!(encoded(42, 1, &f.message), frame);
                }
                Err(e) => prop_assert!(is_payload_error(&e), "{:?}", e),
            }
        }

        /// Near-valid payloads (one byte changed, cut short or extended) behind a valid
        /// checksum: the same property, closer to the parsers' edge cases.
        #[test]
        fn mutated_payloads_are_rejected_or_canonical(
            msg in arb_message(),
            edit in 0usize..3,
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let good = encoded(42, 1, &msg);
            let mut payload = good[HEADER_LEN..].to_vec();
            match edit {
                0 if !payload.is_empty() => {
                    let i = at.index(payload.len());
                    payload[i] = byte;
                }
                1 => payload.truncate(at.index(payload.len() + 1)),
                _ => payload.push(byte),
            }
            let frame = raw_frame(message_type(&msg), 0, 0, &payload);
            match decode(&frame) {
                Ok((f, _)) => prop_assert_eq!(encoded(42, 1, &f.message), frame),
                Err(e) => prop_assert!(is_payload_error(&e), "{:?}", e),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn random_bytes_never_panic(buf in vec(any::<u8>(), 0..512)) {
            match decode(&buf) {
                Ok((f, used)) => {
                    prop_assert!(used <= buf.len());
                    prop_assert_eq!(used, f.header.frame_len());
                }
                Err(DecodeError::Incomplete { needed }) => prop_assert!(needed > buf.len()),
                Err(_) => {}
            }
        }

        /// Random bytes almost never get past the magic; this starts them behind a valid
        /// magic and version so the length and checksum paths see them too.
        #[test]
        fn random_bytes_behind_a_valid_prefix_never_panic(tail in vec(any::<u8>(), 0..512)) {
            let mut buf = b"TNDM\x01\x00".to_vec();
            buf.extend_from_slice(&tail);
            match decode(&buf) {
                Ok((_, used)) => prop_assert!(used <= buf.len()),
                Err(DecodeError::Incomplete { needed }) => {
                    prop_assert!(needed > buf.len());
                    prop_assert!(needed <= HEADER_LEN + MAX_PAYLOAD as usize);
                }
                Err(_) => {}
            }
        }
    }
}
