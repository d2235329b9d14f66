//! The wire protocol: messages, their framed binary encoding, and the handshake.

pub mod codec;
pub mod handshake;
mod message;

pub use codec::{
    decode, encode, encoded_len, peek_header, DecodeError, EncodeError, Frame, FrameHeader, HEADER_LEN, MAX_PAYLOAD,
    MIN_VERSION, PROTOCOL_VERSION,
};
pub use handshake::{check_ack, hello, negotiate, HandshakeError, Negotiated};
pub use message::*;
