//! Reading codec frames off a byte stream.
//!
//! The buffer never grows beyond one maximal frame (`HEADER_LEN + MAX_PAYLOAD`): the
//! codec's `peek_header` bounds the length before we wait for the payload, so a peer
//! cannot make us allocate more by announcing a huge frame. Bytes read past the end of a
//! frame stay buffered for the next one (the decider may send its first session frames
//! right behind its `HelloAck`).
//!
//! A frame carrying a large payload (`Data`, `ResyncData`, `ReadReply` of at least
//! [`BULK`] bytes) is read into a buffer of its own instead, and its payload handed over as
//! a slice of that buffer: no copy on top of the socket's. It is checked exactly as
//! `wire::decode` checks it (the checksum over the whole frame, then every field of the
//! frame with its payload left out); a frame that fails any check is passed to
//! `wire::decode` after all, so that the error is the codec's own.

use bytes::Bytes;
use std::io::{self, Read};
use tandem_core::wire::codec::msg_type;
use tandem_core::wire::{decode, peek_header, DecodeError, Frame, FrameHeader, Message, HEADER_LEN, MAX_PAYLOAD};

/// The largest frame the codec accepts, header included.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD as usize;
/// Enough for many small frames per read; grown on demand up to [`MAX_FRAME`].
const INITIAL: usize = 64 * 1024;
/// Payloads at least this large are read without a copy (see the module docs).
pub const BULK: usize = 64 * 1024;
/// Offsets of the header's `len` and `crc` fields (codec.rs: the header is frozen).
const OFF_LEN: usize = 28;
const OFF_CRC: usize = 32;

/// For the message types whose last field is a large `bytes`: the length of the fields
/// before its bytes, counting its own u32 length.
fn bulk_prefix(ty: u16) -> Option<usize> {
    match ty {
        msg_type::DATA => Some(8 + 8 + 1 + 4),
        msg_type::RESYNC_DATA | msg_type::READ_REPLY => Some(8 + 4),
        _ => None,
    }
}

#[derive(Debug)]
pub(crate) enum ReadError {
    Io(io::Error),
    /// End of stream; `buffered` bytes of an incomplete frame were left.
    Closed {
        buffered: usize,
    },
    Decode(DecodeError),
}

pub(crate) struct FrameReader {
    buf: Vec<u8>,
    /// `buf[start..end]` holds received bytes not yet consumed.
    start: usize,
    end: usize,
}

impl FrameReader {
    pub fn new() -> FrameReader {
        FrameReader { buf: vec![0; INITIAL], start: 0, end: 0 }
    }

    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.end - self.start);
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Whether a whole frame is buffered: the next [`FrameReader::next_frame`] returns it (or
    /// fails to decode it) without reading.
    pub fn has_frame(&self) -> bool {
        let buffered = self.buffered();
        buffered.len() >= HEADER_LEN && peek_header(buffered).is_ok_and(|header| header.frame_len() <= buffered.len())
    }

    /// Reads until at least `n` bytes are buffered (`n` at most [`MAX_FRAME`]).
    pub fn fill_to(&mut self, r: &mut impl Read, n: usize) -> Result<(), ReadError> {
        assert!(n <= MAX_FRAME, "asked to buffer {n} bytes, more than one frame");
        while self.end - self.start < n {
            if self.start + n > self.buf.len() {
                // Move the partial frame to the front, then grow only as far as needed
                // (doubling, to keep the number of reallocations for a big frame small).
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if n > self.buf.len() {
                    let grown = (self.buf.len() * 2).clamp(n, MAX_FRAME);
                    self.buf.resize(grown, 0);
                }
            }
            match r.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(ReadError::Closed { buffered: self.end - self.start }),
                Ok(got) => self.end += got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        Ok(())
    }

    /// The next complete frame, reading as much as it takes.
    pub fn next_frame(&mut self, r: &mut impl Read) -> Result<Frame, ReadError> {
        loop {
            if self.end - self.start >= HEADER_LEN {
                let header = peek_header(self.buffered()).map_err(ReadError::Decode)?;
                if let Some(prefix) = bulk_prefix(header.msg_type) {
                    if header.len as usize >= prefix + BULK {
                        return self.bulk_frame(r, header, prefix);
                    }
                }
            }
            match decode(self.buffered()) {
                Ok((frame, len)) => {
                    self.consume(len);
                    return Ok(frame);
                }
                Err(DecodeError::Incomplete { needed }) => self.fill_to(r, needed)?,
                Err(e) => return Err(ReadError::Decode(e)),
            }
        }
    }

    /// Reads the frame `header` announces (a bulk type, `prefix` as [`bulk_prefix`] says)
    /// into a buffer of its own and decodes it without copying its payload.
    fn bulk_frame(&mut self, r: &mut impl Read, header: FrameHeader, prefix: usize) -> Result<Frame, ReadError> {
        let total = header.frame_len();
        let mut frame = vec![0u8; total];
        let have = (self.end - self.start).min(total);
        frame[..have].copy_from_slice(&self.buf[self.start..self.start + have]);
        self.consume(have);
        let mut got = have;
        while got < total {
            match r.read(&mut frame[got..]) {
                Ok(0) => return Err(ReadError::Closed { buffered: got }),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        let frame = Bytes::from(frame);
        match decode_bulk(&frame, prefix) {
            Some(mut decoded) => {
                let body = frame.slice(HEADER_LEN + prefix..);
                match &mut decoded.message {
                    Message::Data { payload, .. }
                    | Message::ResyncData { payload, .. }
                    | Message::ReadReply { payload, .. } => *payload = body,
                    _ => unreachable!("bulk_prefix names only these types"),
                }
                Ok(decoded)
            }
            // Whatever is wrong with it, the codec says it best.
            None => match decode(&frame) {
                Ok((decoded, _)) => Ok(decoded),
                Err(e) => Err(ReadError::Decode(e)),
            },
        }
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }
}

/// Decodes a complete bulk frame, leaving its payload empty; `None` if any check fails.
fn decode_bulk(frame: &[u8], prefix: usize) -> Option<Frame> {
    let carried = u32::from_le_bytes(frame[OFF_CRC..OFF_CRC + 4].try_into().ok()?);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&frame[..OFF_CRC]), &[0; 4]);
    if crc32c::crc32c_append(crc, &frame[HEADER_LEN..]) != carried {
        return None;
    }
    let body = frame.len() - HEADER_LEN - prefix;
    let at = HEADER_LEN + prefix - 4;
    if u32::from_le_bytes(frame[at..at + 4].try_into().ok()?) as usize != body {
        return None;
    }
    // The same frame with an empty payload, which the codec checks field by field.
    let mut stub = frame[..HEADER_LEN + prefix].to_vec();
    stub[OFF_LEN..OFF_LEN + 4].copy_from_slice(&(prefix as u32).to_le_bytes());
    stub[at..at + 4].copy_from_slice(&[0; 4]);
    stub[OFF_CRC..OFF_CRC + 4].copy_from_slice(&[0; 4]);
    let crc = crc32c::crc32c(&stub);
    stub[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    let (mut decoded, _) = decode(&stub).ok()?;
    decoded.header.len = (frame.len() - HEADER_LEN) as u32;
    Some(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tandem_core::wire::{encode, Message};

    /// Hands out at most `chunk` bytes per read, like a slow socket.
    struct Trickle<'a> {
        data: &'a [u8],
        chunk: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.chunk.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn stream_of(msgs: &[Message]) -> Vec<u8> {
        let mut out = Vec::new();
        for (seq, m) in msgs.iter().enumerate() {
            encode(5, seq as u64, m, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn frames_split_anywhere_are_reassembled() {
        let msgs: Vec<Message> = (0..50)
            .map(|i| Message::Data {
                id: i,
                offset: i * 4096,
                fua: i % 2 == 0,
                payload: Bytes::from(vec![i as u8; 300]),
            })
            .collect();
        let bytes = stream_of(&msgs);
        for chunk in [1, 7, 36, 37, 1000, 1 << 20] {
            let mut r = FrameReader::new();
            let mut src = Trickle { data: &bytes, chunk };
            for (seq, m) in msgs.iter().enumerate() {
                let f = r.next_frame(&mut src).unwrap();
                assert_eq!(f.header.seq, seq as u64);
                assert_eq!(&f.message, m);
            }
            assert!(matches!(r.next_frame(&mut src), Err(ReadError::Closed { buffered: 0 })));
        }
    }

    #[test]
    fn a_maximal_frame_fits_and_the_buffer_stays_bounded() {
        let payload = Bytes::from(vec![0xA5; MAX_PAYLOAD as usize - 16]);
        let msgs = vec![Message::ResyncData { track: 1, payload: payload.clone() }, Message::Ping { nonce: 3 }];
        let bytes = stream_of(&msgs);
        let mut r = FrameReader::new();
        let mut src = Trickle { data: &bytes, chunk: 100_000 };
        assert_eq!(r.next_frame(&mut src).unwrap().message, msgs[0]);
        assert_eq!(r.next_frame(&mut src).unwrap().message, msgs[1]);
        assert!(r.capacity() <= MAX_FRAME);
    }

    #[test]
    fn an_announced_oversize_frame_is_refused_before_buffering() {
        let mut bytes = stream_of(&[Message::Ping { nonce: 1 }]);
        bytes[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut r = FrameReader::new();
        let err = r.next_frame(&mut Trickle { data: &bytes, chunk: 64 }).unwrap_err();
        assert!(matches!(err, ReadError::Decode(DecodeError::PayloadTooLong { .. })), "{err:?}");
        assert_eq!(r.capacity(), INITIAL);
    }

    fn bulk_messages() -> Vec<Message> {
        let big = Bytes::from((0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        vec![
            Message::Ping { nonce: 1 },
            Message::Data { id: 7, offset: 4096, fua: true, payload: big.slice(..BULK) },
            Message::ReceiptAck { id: 7 },
            Message::Data { id: 8, offset: 8192, fua: false, payload: big.clone() },
            Message::ResyncData { track: 3, payload: big.slice(5..100_005) },
            Message::ReadReply { id: 9, payload: big.slice(..70_000) },
            // Just below the bulk size: the ordinary path.
            Message::Data { id: 10, offset: 0, fua: false, payload: big.slice(..BULK - 1) },
        ]
    }

    #[test]
    fn bulk_frames_split_anywhere_are_reassembled_and_decoded_alike() {
        let msgs = bulk_messages();
        let bytes = stream_of(&msgs);
        for chunk in [7, 36, 37, 1000, 65_536, 1 << 20] {
            let mut r = FrameReader::new();
            let mut src = Trickle { data: &bytes, chunk };
            let mut at = 0;
            for (seq, m) in msgs.iter().enumerate() {
                let f = r.next_frame(&mut src).unwrap();
                let (expected, len) = decode(&bytes[at..]).unwrap();
                at += len;
                assert_eq!(f, expected, "chunk {chunk}, frame {seq}");
                assert_eq!(&f.message, m);
            }
            assert!(matches!(r.next_frame(&mut src), Err(ReadError::Closed { buffered: 0 })));
        }
    }

    /// Re-seals a frame's checksum after a deliberate change to its content.
    fn reseal(frame: &mut [u8]) {
        frame[OFF_CRC..OFF_CRC + 4].copy_from_slice(&[0; 4]);
        let crc = crc32c::crc32c(frame);
        frame[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn a_damaged_bulk_frame_fails_with_the_codecs_own_error() {
        let msg = Message::Data { id: 1, offset: 0, fua: true, payload: Bytes::from(vec![5; 100_000]) };
        let good = stream_of(&[msg]);
        type Damage = Box<dyn Fn(&mut Vec<u8>)>;
        let damages: Vec<(&str, Damage)> = vec![
            ("payload bit flip", Box::new(|f| f[50_000] ^= 1)),
            ("header bit flip", Box::new(|f| f[21] ^= 0x10)),
            (
                "fua neither 0 nor 1",
                Box::new(|f| {
                    f[HEADER_LEN + 16] = 2;
                    reseal(f)
                }),
            ),
            (
                "inner length short",
                Box::new(|f| {
                    f[HEADER_LEN + 17..HEADER_LEN + 21].copy_from_slice(&99_999u32.to_le_bytes());
                    reseal(f)
                }),
            ),
            (
                "inner length long",
                Box::new(|f| {
                    f[HEADER_LEN + 17..HEADER_LEN + 21].copy_from_slice(&100_001u32.to_le_bytes());
                    reseal(f)
                }),
            ),
            (
                "flags set",
                Box::new(|f| {
                    f[8] = 1;
                    reseal(f)
                }),
            ),
        ];
        for (what, damage) in damages {
            let mut bytes = good.clone();
            damage(&mut bytes);
            let expected = decode(&bytes).expect_err(what);
            let got = FrameReader::new().next_frame(&mut Trickle { data: &bytes, chunk: 4096 }).expect_err(what);
            assert!(matches!(&got, ReadError::Decode(e) if *e == expected), "{what}: {got:?} vs {expected:?}");
        }
    }

    #[test]
    fn a_stream_cut_inside_a_bulk_frame_reports_the_partial_bytes() {
        let bytes = stream_of(&[Message::ResyncData { track: 1, payload: Bytes::from(vec![1; 200_000]) }]);
        let mut r = FrameReader::new();
        let err = r.next_frame(&mut Trickle { data: &bytes[..150_000], chunk: 8192 }).unwrap_err();
        assert!(matches!(err, ReadError::Closed { buffered: 150_000 }), "{err:?}");
    }

    #[test]
    fn a_stream_cut_inside_a_frame_reports_the_partial_bytes() {
        let bytes = stream_of(&[Message::Ping { nonce: 1 }]);
        let mut r = FrameReader::new();
        let err = r.next_frame(&mut Trickle { data: &bytes[..40], chunk: 8 }).unwrap_err();
        assert!(matches!(err, ReadError::Closed { buffered: 40 }), "{err:?}");
    }
}
