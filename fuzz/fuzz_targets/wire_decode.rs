//! Feeds arbitrary bytes to the wire decoder as a stream of frames.
//!
//! Two passes per input: the raw bytes, which exercise framing, magic, version, length and
//! checksum handling; and the input's tail framed behind a correct header and checksum
//! (the first two bytes choose the message type), which random bytes would almost never
//! produce but which is what reaches the payload parsers.
//!
//! Every frame that decodes must re-encode to exactly the bytes it came from (the encoding
//! is canonical) and decode again to the same frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_core::wire::{decode, encode, DecodeError, HEADER_LEN, MAX_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    consume(data);
    if let [lo, hi, payload @ ..] = data {
        consume(&checksummed(u16::from_le_bytes([*lo, *hi]), payload));
    }
});

fn consume(mut buf: &[u8]) {
    loop {
        match decode(buf) {
            Ok((frame, used)) => {
                assert!(used >= HEADER_LEN && used <= buf.len());
                assert_eq!(used, frame.header.frame_len());
                let mut again = Vec::new();
                let n = encode(frame.header.volume, frame.header.seq, &frame.message, &mut again)
                    .expect("a decoded message must encode");
                assert_eq!(n, used);
                assert_eq!(again, &buf[..used], "encoding is not canonical");
                let (back, m) = decode(&again).expect("a re-encoded frame must decode");
                assert_eq!(m, n);
                assert_eq!(back, frame);
                buf = &buf[used..];
            }
            Err(DecodeError::Incomplete { needed }) => {
                assert!(needed > buf.len());
                assert!(needed <= HEADER_LEN + MAX_PAYLOAD as usize);
                return;
            }
            Err(_) => return,
        }
    }
}

/// A version-1 frame around `payload`, laid out by hand from the documented header format
/// rather than through the codec under test.
fn checksummed(msg_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + payload.len());
    f.extend_from_slice(b"TNDM");
    f.extend_from_slice(&1u16.to_le_bytes());
    f.extend_from_slice(&msg_type.to_le_bytes());
    f.extend_from_slice(&[0; 4]); // flags, reserved
    f.extend_from_slice(&7u64.to_le_bytes()); // volume
    f.extend_from_slice(&1u64.to_le_bytes()); // seq
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(payload);
    let crc = crc32c::crc32c(&f);
    f[32..36].copy_from_slice(&crc.to_le_bytes());
    f
}
