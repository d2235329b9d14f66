//! The test network rig of Tandem's end-to-end tests and of `cargo xtask` (demo, bench).
//!
//! This kernel has network namespaces, veth, tc `tbf`/`htb` and nftables, but no `sch_netem`
//! (FIELD-NOTES, "Test network on one machine"). So:
//!
//! - [`netns::Pair`]: two hosts on one machine, network namespaces joined by a veth pair, with
//!   a rate limit (`tbf`), ingress packet loss and a silent partition (nftables `netdev`
//!   ingress tables), and the link taken down (`ip link set down`);
//! - [`link::Link`]: a TCP forwarder that can pass, delay (a fixed one-way delay per
//!   direction, pipelined), blackhole or reset a node's connections, on loopback or between
//!   two namespaces.
//!
//! Nothing is installed here: `cargo xtask test` installs iproute2 and nftables.

pub mod link;
pub mod netns;

#[cfg(test)]
mod tests;

use std::fmt;

/// A failed step of the rig: the command (or system call) and what it said.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command ran and failed (or could not be started).
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    /// A system call or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: impl fmt::Display, source: std::io::Error) -> Error {
        Error::Io { what: what.to_string(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether this process is root (effective uid 0): namespaces, tc and nftables need it.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
