//! The daemon's TOML configuration: one volume, this node, its peers.
//!
//! Bad input gets an error naming the file, the field and the reason, and changes nothing.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tandem_core::{Geometry, Mode, NodeId};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {field}: {reason}")]
    Invalid { file: PathBuf, field: &'static str, reason: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    volume: RawVolume,
    node: RawNode,
    #[serde(default, rename = "peer")]
    peers: Vec<RawPeer>,
    #[serde(default)]
    network: RawNetwork,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    keepalive: Option<String>,
    timeout: Option<String>,
    links: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: String,
    id: u64,
    size: String,
    #[serde(default = "default_block_size")]
    block_size: u32,
    #[serde(default = "default_track_size")]
    track_size: String,
    #[serde(default = "default_tracks_per_range")]
    tracks_per_range: u32,
    #[serde(default = "default_mode")]
    mode: String,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: NodeId,
    data: Option<PathBuf>,
    /// Attach mode: an existing block device Tandem does not sit in front of.
    attach: Option<PathBuf>,
    meta: PathBuf,
    listen: String,
    control: Option<PathBuf>,
    mountpoint: Option<PathBuf>,
    #[serde(default = "default_frontend")]
    frontend: String,
    /// The user-facing device-mapper name (default `tandem-<volume>`).
    dm_name: Option<String>,
    /// Where the record of written tracks lives: auto, bpf, memory.
    record: Option<String>,
    /// The record's pin directory name under /sys/fs/bpf/tandem/ (default: the volume name).
    record_pin: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    id: NodeId,
    address: String,
}

fn default_block_size() -> u32 {
    4096
}
fn default_track_size() -> String {
    "64KiB".into()
}
fn default_tracks_per_range() -> u32 {
    Geometry::DEFAULT_TRACKS_PER_RANGE
}
fn default_mode() -> String {
    "memory".into()
}
fn default_frontend() -> String {
    "auto".into()
}

/// `[volume] mode`: the modes built so far, by name.
const MODES: &[(Mode, &str)] = &[(Mode::Memory, "memory"), (Mode::Disk, "disk")];

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub file: PathBuf,
    pub volume: String,
    pub volume_id: u64,
    pub geometry: Geometry,
    pub mode: Mode,
    pub secret: Vec<u8>,
    pub node: NodeId,
    /// The backing file or device; in attach mode, the attached device.
    pub data: PathBuf,
    /// Attach mode (docs/attach.md): `data` is a block device an application writes
    /// directly; no frontend, and the daemon never writes it.
    pub attach: Option<PathBuf>,
    pub meta: PathBuf,
    pub listen: SocketAddr,
    pub control: PathBuf,
    pub mountpoint: PathBuf,
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// Ping interval on an idle link.
    pub keepalive: Duration,
    /// A link silent this long is lost (at most 5 s).
    pub timeout: Duration,
    /// `[node] record`: the kernel map (BPF), the in-process bitmaps, or the best available.
    pub record: crate::kernel_record::RecordChoice,
    /// `[node] record_pin`: the pinned maps are under `/sys/fs/bpf/tandem/<record_pin>/`.
    pub record_pin: String,
    /// `[node] frontend`: ublk, the FUSE file + loop device, or the best available.
    pub frontend: crate::kernel_frontend::FrontendChoice,
    /// `[node] dm_name`: the user-facing device is `/dev/mapper/<dm_name>`.
    pub dm_name: String,
}

/// Parses durations like `500ms`, `1s`, `4s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("'{s}' is not a duration (e.g. 500ms, 4s)"))?;
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        other => Err(format!("unknown duration unit '{other}' in '{s}' (use ms or s)")),
    }
}

/// Parses sizes like `256MiB`, `1GiB`, `4096`, `64KiB`, `10G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("'{s}' is not a size (e.g. 256MiB, 1GiB, 4096)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        other => return Err(format!("unknown size unit '{other}' in '{s}' (use KiB, MiB, GiB, TiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

impl Config {
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(file).map_err(|source| ConfigError::Read { file: file.to_owned(), source })?;
        Self::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: Raw =
            toml::from_str(text).map_err(|e| ConfigError::Parse { file: file.to_owned(), message: e.to_string() })?;
        let invalid =
            |field: &'static str, reason: String| ConfigError::Invalid { file: file.to_owned(), field, reason };
        let size = parse_size(&raw.volume.size).map_err(|r| invalid("volume.size", r))?;
        let track = parse_size(&raw.volume.track_size).map_err(|r| invalid("volume.track_size", r))?;
        let track = u32::try_from(track).map_err(|_| invalid("volume.track_size", "at most 4 MiB".into()))?;
        let geometry = Geometry::new(size, raw.volume.block_size, track, raw.volume.tracks_per_range)
            .map_err(|e| invalid("volume", e.to_string()))?;
        let mode = match raw.volume.mode.as_str() {
            "async" | "predictive" => {
                let built = crate::choice::names(MODES);
                return Err(invalid("volume.mode", format!("'{}' is not built yet ({built})", raw.volume.mode)));
            }
            other => crate::choice::parse("mode", other, MODES).map_err(|r| invalid("volume.mode", r))?,
        };
        let secret = match (raw.volume.secret, raw.volume.secret_file) {
            (Some(s), None) => s.into_bytes(),
            (None, Some(path)) => std::fs::read(&path)
                .map_err(|e| invalid("volume.secret_file", format!("{}: {e}", path.display())))?
                .trim_ascii()
                .to_vec(),
            (Some(_), Some(_)) => return Err(invalid("volume.secret", "give secret or secret_file, not both".into())),
            (None, None) => return Err(invalid("volume.secret", "missing: peers authenticate with it".into())),
        };
        if secret.len() < 16 {
            return Err(invalid("volume.secret", format!("{} bytes is too short (at least 16)", secret.len())));
        }
        let frontend = raw.node.frontend.parse().map_err(|reason| invalid("node.frontend", reason))?;
        let (data, attach) = match (raw.node.data, raw.node.attach) {
            (Some(data), None) => (data, None),
            (None, Some(device)) => {
                if raw.node.mountpoint.is_some() {
                    return Err(invalid(
                        "node.mountpoint",
                        "an attached volume has no frontend, so no FUSE mount point (remove it)".into(),
                    ));
                }
                (device.clone(), Some(device))
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "node.attach",
                    "give `data` (Tandem serves the volume from that file or device) or `attach` (Tandem \
                     replicates a device the application writes directly), not both"
                        .into(),
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "node.data",
                    "missing: the backing file or block device (or `attach` for an existing device)".into(),
                ))
            }
        };
        let listen =
            raw.node.listen.parse().map_err(|e| invalid("node.listen", format!("'{}': {e}", raw.node.listen)))?;
        let mut peers = Vec::new();
        for p in &raw.peers {
            let addr = p.address.parse().map_err(|e| invalid("peer.address", format!("'{}': {e}", p.address)))?;
            if p.id == raw.node.id || peers.iter().any(|(id, _)| *id == p.id) {
                return Err(invalid("peer.id", format!("node id {} appears twice", p.id)));
            }
            peers.push((p.id, addr));
        }
        if peers.len() > 2 {
            return Err(invalid("peer", format!("{} peers: at most 2 are supported", peers.len())));
        }
        let keepalive = match &raw.network.keepalive {
            Some(k) => parse_duration(k).map_err(|r| invalid("network.keepalive", r))?,
            None => Duration::from_secs(1),
        };
        let timeout = match &raw.network.timeout {
            Some(t) => parse_duration(t).map_err(|r| invalid("network.timeout", r))?,
            None => Duration::from_secs(4),
        };
        if timeout.is_zero() || timeout > Duration::from_secs(5) {
            return Err(invalid(
                "network.timeout",
                format!("{timeout:?}: a silent partition must be noticed within 5 s"),
            ));
        }
        if keepalive.is_zero() || keepalive >= timeout {
            return Err(invalid("network.keepalive", format!("{keepalive:?}: must be shorter than the timeout")));
        }
        match raw.network.links {
            None | Some(1) => {}
            Some(n) => {
                return Err(invalid(
                    "network.links",
                    format!(
                    "{n}: one TCP connection per peer is built so far (the protocol orders messages per connection)"
                ),
                ))
            }
        }
        let record = match &raw.node.record {
            Some(r) => r.parse().map_err(|reason| invalid("node.record", reason))?,
            None => crate::kernel_record::RecordChoice::Auto,
        };
        let record_pin = match raw.node.record_pin {
            Some(pin) => {
                tandem_bpf::pin_dir(&pin).map_err(|e| invalid("node.record_pin", e.to_string()))?;
                Some(pin)
            }
            None => None,
        };
        let name = raw.volume.name;
        let record_pin = record_pin.unwrap_or_else(|| name.clone());
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(invalid("volume.name", format!("'{name}': use letters, digits, '-' and '_'")));
        }
        let dm_name = raw.node.dm_name.unwrap_or_else(|| format!("tandem-{name}"));
        if dm_name.is_empty()
            || dm_name.len() > 127
            || !dm_name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid("node.dm_name", format!("'{dm_name}': use letters, digits, '-', '_' and '.'")));
        }
        Ok(Config {
            frontend,
            dm_name,
            file: file.to_owned(),
            control: raw.node.control.unwrap_or_else(|| PathBuf::from(format!("/run/tandem/{name}.sock"))),
            mountpoint: raw.node.mountpoint.unwrap_or_else(|| PathBuf::from(format!("/run/tandem/{name}"))),
            volume: name,
            volume_id: raw.volume.id,
            geometry,
            mode,
            secret,
            node: raw.node.id,
            data,
            attach,
            meta: raw.node.meta,
            listen,
            peers,
            keepalive,
            timeout,
            record,
            record_pin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[volume]
name = "vol0"
id = 7
size = "64MiB"
mode = "disk"
secret = "0123456789abcdef0123"

[node]
id = 0
data = "/tmp/a.img"
meta = "/tmp/a.meta"
listen = "127.0.0.1:7788"

[[peer]]
id = 1
address = "127.0.0.1:7789"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/tandem/vol0.toml"), text)
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.geometry.volume_size(), 64 << 20);
        assert_eq!(c.geometry.track_size(), 64 << 10);
        assert_eq!(c.mode, Mode::Disk);
        assert_eq!(c.control, PathBuf::from("/run/tandem/vol0.sock"));
        assert_eq!(c.peers, vec![(1, "127.0.0.1:7789".parse().unwrap())]);
    }

    #[test]
    fn errors_name_the_file_the_field_and_the_reason() {
        let bad = GOOD.replace("size = \"64MiB\"", "size = \"64 parsecs\"");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.starts_with("/etc/tandem/vol0.toml: volume.size:"), "{e}");
        assert!(e.contains("unknown size unit"), "{e}");

        let e = parse(&GOOD.replace("mode = \"disk\"", "mode = \"async\"")).unwrap_err().to_string();
        assert!(e.contains("volume.mode") && e.contains("not built yet"), "{e}");
        assert!(e.ends_with("'async' is not built yet (memory, disk)"), "{e}");
        let e = parse(&GOOD.replace("mode = \"disk\"", "mode = \"fast\"")).unwrap_err().to_string();
        assert_eq!(e, "/etc/tandem/vol0.toml: volume.mode: unknown mode 'fast' (memory, disk)");
        assert_eq!(parse(&GOOD.replace("mode = \"disk\"", "mode = \"memory\"")).unwrap().mode, Mode::Memory);

        let e = parse(&GOOD.replace("listen = \"127.0.0.1:7788\"", "listen = \"nowhere\"")).unwrap_err().to_string();
        assert!(e.contains("node.listen"), "{e}");

        let e =
            parse(&GOOD.replace("secret = \"0123456789abcdef0123\"", "secret = \"short\"")).unwrap_err().to_string();
        assert!(e.contains("volume.secret") && e.contains("too short"), "{e}");

        let e = parse(&GOOD.replace("[node]", "[node]\ncolour = \"red\"")).unwrap_err().to_string();
        assert!(e.contains("/etc/tandem/vol0.toml") && e.contains("colour"), "{e}");

        let e = parse(&GOOD.replace("size = \"64MiB\"", "size = \"1000\"")).unwrap_err().to_string();
        assert!(e.contains("volume:") && e.contains("multiple of the block size"), "{e}");
    }

    #[test]
    fn network_timers_are_checked() {
        let c = parse(&format!("{GOOD}\n[network]\nkeepalive = \"500ms\"\ntimeout = \"2s\"\n")).unwrap();
        assert_eq!((c.keepalive, c.timeout), (Duration::from_millis(500), Duration::from_secs(2)));
        let e = parse(&format!("{GOOD}\n[network]\ntimeout = \"30s\"\n")).unwrap_err().to_string();
        assert!(e.contains("network.timeout") && e.contains("within 5 s"), "{e}");
        let e = parse(&format!("{GOOD}\n[network]\nkeepalive = \"4s\"\n")).unwrap_err().to_string();
        assert!(e.contains("network.keepalive") && e.contains("shorter than the timeout"), "{e}");
        let e = parse(&format!("{GOOD}\n[network]\nlinks = 2\n")).unwrap_err().to_string();
        assert!(e.contains("network.links"), "{e}");
        let e = parse(&format!("{GOOD}\n[network]\ntimeout = \"4 fortnights\"\n")).unwrap_err().to_string();
        assert!(e.contains("unknown duration unit"), "{e}");
    }

    #[test]
    fn attach_and_data_are_exclusive() {
        let attached = GOOD.replace("data = \"/tmp/a.img\"", "attach = \"/dev/loop7\"");
        let c = parse(&attached).unwrap();
        assert_eq!(c.attach, Some(PathBuf::from("/dev/loop7")));
        assert_eq!(c.data, PathBuf::from("/dev/loop7"));
        let e = parse(&GOOD.replace("[node]", "[node]\nattach = \"/dev/loop7\"")).unwrap_err().to_string();
        assert!(e.starts_with("/etc/tandem/vol0.toml: node.attach: give `data`"), "{e}");
        assert!(e.contains("not both"), "{e}");
        let e = parse(&GOOD.replace("data = \"/tmp/a.img\"\n", "")).unwrap_err().to_string();
        assert!(e.contains("node.data: missing"), "{e}");
        let e = parse(&attached.replace("[node]", "[node]\nmountpoint = \"/mnt/x\"")).unwrap_err().to_string();
        assert!(e.contains("node.mountpoint") && e.contains("no frontend"), "{e}");
    }

    #[test]
    fn the_record_knobs_are_checked() {
        use crate::kernel_record::RecordChoice;
        let c = parse(GOOD).unwrap();
        assert_eq!((c.record, c.record_pin.as_str()), (RecordChoice::Auto, "vol0"));
        let c = parse(&GOOD.replace("[node]", "[node]\nrecord = \"bpf\"\nrecord_pin = \"vol0-n0\"")).unwrap();
        assert_eq!((c.record, c.record_pin.as_str()), (RecordChoice::Bpf, "vol0-n0"));
        let c = parse(&GOOD.replace("[node]", "[node]\nrecord = \"memory\"")).unwrap();
        assert_eq!(c.record, RecordChoice::Memory);
        let e = parse(&GOOD.replace("[node]", "[node]\nrecord = \"kernel\"")).unwrap_err().to_string();
        assert!(e.starts_with("/etc/tandem/vol0.toml: node.record: unknown record 'kernel'"), "{e}");
        assert!(e.contains("auto, bpf, memory"), "{e}");
        let e = parse(&GOOD.replace("[node]", "[node]\nrecord_pin = \"../etc\"")).unwrap_err().to_string();
        assert!(e.starts_with("/etc/tandem/vol0.toml: node.record_pin:") && e.contains("../etc"), "{e}");
    }

    #[test]
    fn the_frontend_is_checked() {
        use crate::kernel_frontend::FrontendChoice;
        let c = parse(GOOD).unwrap();
        assert_eq!((c.frontend, c.dm_name.as_str()), (FrontendChoice::Auto, "tandem-vol0"));
        let c = parse(&GOOD.replace("[node]", "[node]\nfrontend = \"ublk\"\ndm_name = \"tandem-vol0-n1\"")).unwrap();
        assert_eq!((c.frontend, c.dm_name.as_str()), (FrontendChoice::Ublk, "tandem-vol0-n1"));
        let e = parse(&GOOD.replace("[node]", "[node]\nfrontend = \"nbd\"")).unwrap_err().to_string();
        assert!(e.starts_with("/etc/tandem/vol0.toml: node.frontend: unknown frontend 'nbd'"), "{e}");
        let e = parse(&GOOD.replace("[node]", "[node]\ndm_name = \"a/b\"")).unwrap_err().to_string();
        assert!(e.contains("node.dm_name"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
