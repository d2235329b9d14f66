//! The wire protocol: messages and their framed binary encoding.

mod message;

pub use message::*;
