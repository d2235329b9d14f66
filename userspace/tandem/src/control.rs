//! The operator's control channel: one JSON request per line on the daemon's Unix socket,
//! one JSON reply per line.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Dirty,
    Primary {
        force: bool,
    },
    Secondary,
    Invalidate,
    Connect,
    Down,
    /// Compare this replica with a peer's (all tracks by default).
    Verify {
        peer: Option<u8>,
        first: Option<u64>,
        count: Option<u64>,
    },
    VerifyStop,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    pub peer: u8,
    pub connection: String,
    pub role: Option<String>,
    pub disk: Option<String>,
    pub out_of_sync_tracks: u64,
    pub out_of_sync_bytes: u64,
    pub resync: Option<(u64, u64)>,
    /// Bytes the last completed resync with this peer shipped or received.
    pub last_resync_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub volume: String,
    pub node: u8,
    pub role: String,
    pub disk: String,
    pub mode: String,
    pub track_size: u32,
    pub device: Option<String>,
    pub generation: String,
    pub peers: Vec<PeerView>,
    /// The verify running now, or the last one this node ran.
    pub verify: Option<VerifyView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyView {
    pub peer: u8,
    pub first_track: u64,
    pub tracks: u64,
    pub compared: u64,
    pub differing_tracks: u64,
    /// The differing tracks as runs.
    pub differing: Vec<TrackRun>,
    /// `running`, `finished` or `aborted`.
    pub state: String,
    pub aborted: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackRun {
    pub first_track: u64,
    pub tracks: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyRun {
    pub peer: u8,
    pub first_track: u64,
    pub tracks: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Ok,
    Status(Box<StatusView>),
    Dirty { track_size: u32, runs: Vec<DirtyRun> },
    Verifying { peer: u8 },
    Error { message: String },
}

/// Sends one request to the daemon listening on `socket` and returns its reply.
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<Reply> {
    use anyhow::Context;
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot reach the daemon at {} (is `tandem daemon` running?)", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).context("the daemon closed the connection without a reply")?;
    serde_json::from_str(&reply).with_context(|| format!("unreadable reply from the daemon: {reply:?}"))
}

/// Serves the control socket: each connection sends one request line and gets one reply.
pub fn serve(socket: &Path, daemon: std::sync::mpsc::Sender<crate::daemon::Input>) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if socket.exists() {
        // A live daemon would answer: refuse to steal its socket.
        if UnixStream::connect(socket).is_ok() {
            anyhow::bail!("{} is in use: another daemon runs this volume", socket.display());
        }
        std::fs::remove_file(socket).with_context(|| format!("removing the stale {}", socket.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .with_context(|| format!("binding the control socket {}", socket.display()))?;
    std::thread::Builder::new().name("control".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let daemon = daemon.clone();
            let _ = std::thread::Builder::new().name("control-conn".into()).spawn(move || answer(stream, daemon));
        }
    })?;
    Ok(())
}

fn answer(stream: UnixStream, daemon: std::sync::mpsc::Sender<crate::daemon::Input>) {
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            let (tx, rx) = std::sync::mpsc::channel();
            if daemon.send(crate::daemon::Input::Control { request, reply: tx }).is_err() {
                Reply::Error { message: "the daemon is stopping".into() }
            } else {
                rx.recv().unwrap_or(Reply::Error { message: "the daemon stopped before answering".into() })
            }
        }
        Err(e) => Reply::Error { message: format!("bad request {line:?}: {e}") },
    };
    let mut out = serde_json::to_string(&reply).unwrap_or_else(|_| r#"{"reply":"error","message":"?"}"#.into());
    out.push('\n');
    let _ = (&stream).write_all(out.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line() {
        let r = Request::Primary { force: true };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"cmd":"primary","force":true}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
    }
}
