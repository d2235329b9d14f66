//! What a node needs to know to talk to its peers, and the checks that catch a
//! configuration that could not work before any socket is opened.

use crate::error::ConfigError;
use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;
use tandem_core::types::NodeId;
use tandem_core::wire::MAX_NODES;

/// The longest allowed `timeout`: a silent partition must be noticed within 5 s, whatever
/// TCP's own retransmit backoff would do (FIELD-NOTES: a 2.7 s blackhole cost ≈ 7 s).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(5);

/// Network configuration of one node for one volume.
#[derive(Clone)]
pub struct NetConfig {
    pub node: NodeId,
    pub volume: u64,
    /// Shared secret of the volume's nodes, the key of the HMAC-SHA256 challenge-response.
    pub secret: Vec<u8>,
    pub listen: SocketAddr,
    /// The other nodes of the volume. Only the addresses of peers with a higher id than
    /// ours are dialed; a lower-id peer dials us (see the crate docs for why).
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// Ping interval on an idle link.
    pub keepalive: Duration,
    /// A link on which nothing arrives for this long is lost. Also the limit for a
    /// handshake, for connecting, and for a send that makes no progress (and the socket's
    /// `TCP_USER_TIMEOUT`). At most [`MAX_TIMEOUT`].
    pub timeout: Duration,
    /// Reconnect delay after a failed attempt: starts at the first, doubles up to the second.
    pub connect_backoff: (Duration, Duration),
    /// Bytes (encoded frame sizes) a link may queue for sending. `Net::send` never blocks:
    /// a link whose queue overflows is dropped (`Lost`), because silently dropping one
    /// message from the middle of an ordered stream would break the protocol above.
    pub send_queue_limit: usize,
}

impl NetConfig {
    /// A configuration with the default timers: keepalive 1 s, timeout 4 s, backoff
    /// 200 ms .. 5 s, a 64 MiB send queue.
    pub fn new(
        node: NodeId,
        volume: u64,
        secret: impl Into<Vec<u8>>,
        listen: SocketAddr,
        peers: Vec<(NodeId, SocketAddr)>,
    ) -> NetConfig {
        NetConfig {
            node,
            volume,
            secret: secret.into(),
            listen,
            peers,
            keepalive: Duration::from_secs(1),
            timeout: Duration::from_secs(4),
            connect_backoff: (Duration::from_millis(200), Duration::from_secs(5)),
            send_queue_limit: 64 << 20,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            return Err(ConfigError::Timeout(self.timeout));
        }
        if self.keepalive.is_zero() || self.keepalive >= self.timeout {
            return Err(ConfigError::Keepalive { keepalive: self.keepalive, timeout: self.timeout });
        }
        let (min, max) = self.connect_backoff;
        if min.is_zero() || min > max {
            return Err(ConfigError::Backoff { min, max });
        }
        if self.secret.is_empty() {
            return Err(ConfigError::EmptySecret);
        }
        if self.send_queue_limit == 0 {
            return Err(ConfigError::QueueLimit);
        }
        let mut seen = BTreeSet::new();
        for node in std::iter::once(self.node).chain(self.peers.iter().map(|p| p.0)) {
            if usize::from(node) >= MAX_NODES {
                return Err(ConfigError::NodeOutOfRange { node, max: MAX_NODES });
            }
            if !seen.insert(node) {
                return Err(if node == self.node {
                    ConfigError::SelfAsPeer { node }
                } else {
                    ConfigError::DuplicatePeer { node }
                });
            }
        }
        Ok(())
    }

    pub(crate) fn peer_addr(&self, node: NodeId) -> Option<SocketAddr> {
        self.peers.iter().find(|p| p.0 == node).map(|p| p.1)
    }
}

/// Shows everything but the secret, so that configurations can be logged.
impl fmt::Debug for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetConfig")
            .field("node", &self.node)
            .field("volume", &format_args!("{:#x}", self.volume))
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("keepalive", &self.keepalive)
            .field("timeout", &self.timeout)
            .field("connect_backoff", &self.connect_backoff)
            .field("send_queue_limit", &self.send_queue_limit)
            .finish()
    }
}
