//! Reading codec frames off a byte stream.
//!
//! The buffer never grows beyond one maximal frame (`HEADER_LEN + MAX_PAYLOAD`): the
//! codec's `peek_header` bounds the length before we wait for the payload, so a peer
//! cannot make us allocate more by announcing a huge frame. Bytes read past the end of a
//! frame stay buffered for the next one (the decider may send its first session frames
//! right behind its `HelloAck`).

use std::io::{self, Read};
use tandem_core::wire::{decode, DecodeError, Frame, HEADER_LEN, MAX_PAYLOAD};

/// The largest frame the codec accepts, header included.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD as usize;
/// Enough for many small frames per read; grown on demand up to [`MAX_FRAME`].
const INITIAL: usize = 64 * 1024;

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

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }
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

    #[test]
    fn a_stream_cut_inside_a_frame_reports_the_partial_bytes() {
        let bytes = stream_of(&[Message::Ping { nonce: 1 }]);
        let mut r = FrameReader::new();
        let err = r.next_frame(&mut Trickle { data: &bytes[..40], chunk: 8 }).unwrap_err();
        assert!(matches!(err, ReadError::Closed { buffered: 40 }), "{err:?}");
    }
}
