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
    /// Attach mode: freeze the filesystem on the attached device, ship everything, thaw.
    SnapshotPoint {
        mountpoint: Option<std::path::PathBuf>,
        timeout_ms: u64,
        /// A shell command the daemon runs at the snapshot point, before it thaws.
        #[serde(default)]
        exec: Option<String>,
    },
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
    /// Where the record of written tracks lives (kernel map or in-process bitmaps).
    #[serde(default)]
    pub record: Option<RecordView>,
    /// Attach mode: the attached device and the shipping loop's progress.
    #[serde(default)]
    pub attach: Option<AttachView>,
    /// The frontend device under the user-facing one, and the device-mapper table.
    #[serde(default)]
    pub frontend: Option<FrontendView>,
}

/// How the volume is exposed: `device` (above) is `/dev/mapper/<dm>` when device-mapper is
/// there, the frontend's own device otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendView {
    /// `ublk` or `file`.
    pub kind: String,
    /// `/dev/ublkbN` or `/dev/loopN`.
    pub device: String,
    /// `/dev/mapper/<name>` over it, or None.
    pub dm: Option<String>,
    /// Why the file frontend (ublk unavailable), why no dm table, a recovery waiting, ...
    pub notes: Vec<String>,
}

/// An attached device (attach mode, docs/attach.md) and its shipping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachView {
    pub device: String,
    pub pin_dir: String,
    pub flavor: Option<String>,
    /// `current`, `shipping`, `resyncing (...)`, `tracks owed to an absent peer (...)`,
    /// `waiting for a peer (...)`, `snapshot point: ...`, `retrying after an error: ...`.
    pub state: String,
    /// Tracks marked in the kernel map: written and not yet shipped (or still owed to a peer).
    pub dirty_tracks: u64,
    /// Tracks shipped since the daemon started, and the cycles that shipped them.
    pub shipped_tracks: u64,
    pub cycles: u64,
    /// What the last `snapshot-point` said.
    pub last_snapshot_point: Option<String>,
}

/// The record of written tracks: the pinned BPF maps, or the in-process bitmaps and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordView {
    /// `bpf` (the kernel map) or `memory` (the core's in-process bitmaps only).
    pub source: String,
    /// `tp_btf` or `classic tracepoint`.
    pub flavor: Option<String>,
    pub pin_dir: Option<String>,
    /// Tracks marked in the map (current ∪ old of every range).
    pub marked_tracks: Option<u64>,
    /// Clearing cycles completed, and the tracks they cleared.
    pub cycles: u64,
    pub cleared_tracks: u64,
    /// Why the in-process bitmaps (or the classic flavour) are used.
    pub reason: Option<String>,
}

/// `tandem dirty` from the pinned maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapDirtyView {
    pub pin_dir: String,
    pub flavor: Option<String>,
    /// The programs are attached (their links pinned) and still recording.
    pub attached: bool,
    /// The recorded device, `major:minor`.
    pub device: String,
    pub track_size: u32,
    pub tracks: u64,
    pub tracks_per_range: u32,
    pub generation: String,
    pub marked_tracks: u64,
    /// current ∪ old of every range.
    pub runs: Vec<TrackRun>,
    pub ranges: Vec<MapRangeView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRangeView {
    pub range: u32,
    pub current_side: u32,
    pub current: Vec<TrackRun>,
    pub old: Vec<TrackRun>,
    /// Write bios in flight counted on side 0 and side 1.
    pub inflight: [u64; 2],
    pub toggles: u32,
    pub untracked: u64,
}

/// What `tandem dirty --json` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyView {
    pub volume: String,
    /// `kernel-map` (read from the pinned maps) or `daemon` (the daemon's in-process record).
    pub source: String,
    pub map: Option<MapDirtyView>,
    /// Why there is no map to read.
    pub no_map: Option<String>,
    /// The daemon's per-peer records, when it answers.
    pub daemon: Option<Vec<DirtyRun>>,
    pub track_size: u32,
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
    SnapshotPoint { message: String },
    Error { message: String },
}

/// Sends one request to the daemon listening on `socket` and returns its reply.
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<Reply> {
    call_waiting(socket, request, Duration::from_secs(30))
}

/// [`call`], waiting up to `timeout` for the reply (for requests that take long).
pub fn call_waiting(socket: &Path, request: &Request, timeout: Duration) -> anyhow::Result<Reply> {
    use anyhow::Context;
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot reach the daemon at {} (is `tandem daemon` running?)", socket.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).context("the daemon closed the connection without a reply")?;
    serde_json::from_str(&reply).with_context(|| format!("unreadable reply from the daemon: {reply:?}"))
}

/// The control socket being served: the answers still being written.
pub struct Serving {
    answering: std::sync::Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>,
}

impl Serving {
    /// Waits (up to `limit`) for the answers being written: the daemon's last act, `down`'s
    /// reply, must reach the command before the process exits.
    pub fn finish(&self, limit: std::time::Duration) {
        let (count, done) = &*self.answering;
        let count = count.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (count, waited) =
            done.wait_timeout_while(count, limit, |n| *n > 0).unwrap_or_else(std::sync::PoisonError::into_inner);
        if waited.timed_out() {
            tracing::warn!(connections = *count, "control connections still answering at exit");
        }
    }
}

/// Decrements the count of answers in flight when an answer is written (or abandoned).
struct Answering(std::sync::Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>);

impl Drop for Answering {
    fn drop(&mut self) {
        let (count, done) = &*self.0;
        *count.lock().unwrap_or_else(std::sync::PoisonError::into_inner) -= 1;
        done.notify_all();
    }
}

/// Serves the control socket: each connection sends one request line and gets one reply.
pub fn serve(socket: &Path, daemon: crate::inbox::Inbox) -> anyhow::Result<Serving> {
    serve_with(socket, daemon, None)
}

/// [`serve`], with role changes wrapped by `wrap` (a device-mapper suspend / resume).
pub fn serve_with(
    socket: &Path,
    daemon: crate::inbox::Inbox,
    wrap: Option<std::sync::Arc<crate::kernel_frontend::RoleWrap>>,
) -> anyhow::Result<Serving> {
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
    let answering = std::sync::Arc::new((std::sync::Mutex::new(0usize), std::sync::Condvar::new()));
    let counted = answering.clone();
    std::thread::Builder::new().name("control".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let (daemon, wrap) = (daemon.clone(), wrap.clone());
            *counted.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
            let guard = Answering(counted.clone());
            let _ = std::thread::Builder::new().name("control-conn".into()).spawn(move || {
                let _guard = guard;
                answer(stream, daemon, wrap)
            });
        }
    })?;
    Ok(Serving { answering })
}

fn answer(
    stream: UnixStream,
    daemon: crate::inbox::Inbox,
    wrap: Option<std::sync::Arc<crate::kernel_frontend::RoleWrap>>,
) {
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            let role_change = matches!(request, Request::Primary { .. } | Request::Secondary);
            let down = matches!(request, Request::Down);
            let ask = move || {
                let (tx, rx) = std::sync::mpsc::channel();
                if daemon.send(crate::daemon::Input::Control { request, reply: tx }).is_err() {
                    Reply::Error { message: "the daemon is stopping".into() }
                } else {
                    rx.recv().unwrap_or(Reply::Error { message: "the daemon stopped before answering".into() })
                }
            };
            // Suspended here, before the request reaches the node: the suspend waits for
            // the I/O in flight, which only the node completes.
            match wrap {
                Some(wrap) if role_change => wrap.around(ask),
                Some(wrap) if down => match wrap.refuse_down() {
                    Some(why) => Reply::Error { message: why },
                    None => ask(),
                },
                _ => ask(),
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
