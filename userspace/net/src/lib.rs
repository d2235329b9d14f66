//! TCP links between Tandem nodes: authentication, framing on top of `tandem_core::wire`,
//! keepalive and reconnects. Plain std threads and blocking sockets.
//!
//! # Shape
//!
//! [`Net::start`] binds the listener and starts one dialer thread per peer with a higher
//! node id than ours (the lower id dials, see [`net`] for why). Every new TCP
//! connection, dialed or accepted, runs the handshake under one deadline (`timeout`):
//!
//! 1. mutual HMAC-SHA256 challenge-response in the crate's own framing (magic `"TNDA"`,
//!    layout in [`auth`]);
//! 2. `Hello` both ways and `HelloAck` from the lower id, as `tandem_core::wire::handshake`
//!    prescribes.
//!
//! A connection that fails either step is closed with one log line naming the address
//! and the reason, and a [`NetEvent::Refused`]; other links are unaffected. A connection
//! that passes becomes the peer's link ([`NetEvent::Connected`]): a reader thread decodes
//! frames and delivers [`NetEvent::Message`]s (to a channel, or straight into the owner's
//! queue through an [`EventSink`] function). `Net::send` sends a small frame at once from
//! the calling thread when the link is idle, and otherwise queues it, bounded, for the
//! link's writer thread, which writes everything queued with vectored writes. Both directions number their frames (`seq`, starting at 0 with the `Hello`); a
//! gap, an undecodable frame, or silence for `timeout` ends the link
//! ([`NetEvent::Lost`] with the reason). An idle link sends a `Ping` every `keepalive`;
//! `Ping`/`Pong` never reach the owner.
//!
//! # Event order
//!
//! Per peer: `Connected`, `Message`*, `Lost`, again for each connection; never a `Message`
//! of a connection after its `Lost`. How that is kept is described in
//! [`net`].
//!
//! # One connection per peer, for now
//!
//! The brief asks for several links per peer later (e.g. one for bulk resync next to one
//! for replication). The table keeps one link per peer slot, and everything a link
//! needs (its queue, seq counters, closer) is per link, so a later version can hold a
//! small array of links per slot, tagged in the `Hello`'s features, without changing the
//! handshake or the framing.

pub mod auth;
pub mod config;
pub mod error;
mod frames;
mod handshake;
mod link;
pub mod net;
mod poll;
mod queue;

pub use config::{NetConfig, MAX_TIMEOUT};
pub use error::{ConfigError, LinkError, NetError, Refusal};
pub use net::{EventSink, Net, NetEvent};

#[cfg(test)]
mod tests;
