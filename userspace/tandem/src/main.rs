//! `tandem`: the daemon (`tandem daemon`) and the operator's commands, which talk to the
//! local daemon over its control socket.

mod attach;
mod choice;
mod config;
mod control;
mod daemon;
mod dm;
mod inbox;
mod kernel_frontend;
mod kernel_record;
mod report;
mod runtime;
mod watch;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use config::Config;
use control::{Reply, Request};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "tandem", version, about = "Tandem: a replicated block device. The daemon and its operator commands.")]
struct Cli {
    /// The volume's configuration file
    #[arg(long, short, global = true, default_value = "/etc/tandem/tandem.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (systemd-friendly; logs to stderr)
    Daemon,
    /// Initialise this node's metadata (refuses to overwrite existing metadata without --force)
    CreateMd {
        #[arg(long)]
        force: bool,
    },
    /// Start the daemon in the background and wait until it exposes the volume
    Up {
        /// Where the daemon's log goes (default: the metadata file's path with `.log`)
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Role, connection, disk state, device, out-of-sync bytes, resync and verify progress
    Status {
        #[arg(long)]
        json: bool,
        /// Show progress bars until every peer is connected and in sync and no verify runs
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Compare this replica with a peer's by per-track checksums; differing tracks are
    /// marked out of sync and resynced. Exit status: 0 identical, 2 differences, 1 error
    Verify {
        /// The peer to compare with (default: the connected one)
        #[arg(long)]
        peer: Option<u8>,
        /// First track to compare
        #[arg(long)]
        first: Option<u64>,
        /// Number of tracks to compare (default: to the end of the volume)
        #[arg(long)]
        count: Option<u64>,
        /// Start it and return; `tandem status` shows the progress
        #[arg(long)]
        no_wait: bool,
        /// Stop the running verify (differences found so far stay marked)
        #[arg(long, conflicts_with_all = ["peer", "first", "count", "no_wait"])]
        stop: bool,
        #[arg(long)]
        json: bool,
    },
    /// The dirty track runs per range from the kernel map (read directly: works while the
    /// daemon is down), else the daemon's in-process records per peer
    Dirty {
        #[arg(long)]
        json: bool,
    },
    /// Make this node primary (--force: even if its disk is not known UpToDate)
    Primary {
        #[arg(long)]
        force: bool,
    },
    /// Make this node secondary
    Secondary,
    /// Discard this replica's data: the next connection resyncs all of it from the peer
    Invalidate,
    /// Connect again after a refusal (e.g. once a split brain is resolved)
    Connect,
    /// Orderly shutdown of the daemon: harden, persist the records, stop
    Down,
    /// Attach mode: freeze the filesystem on the attached device, ship every written track
    /// to the peers and have them harden it, thaw (always, also on error or timeout). The
    /// secondary then holds a crash-consistent image of this moment
    SnapshotPoint {
        /// The filesystem to freeze (default: the one mounted from the attached device)
        #[arg(long)]
        mountpoint: Option<PathBuf>,
        /// Give up (and thaw) after this long, e.g. 500ms, 60s
        #[arg(long, default_value = "60s", value_parser = config::parse_duration)]
        timeout: std::time::Duration,
        /// A shell command the daemon runs at the snapshot point, after the peers hardened
        /// everything and before the thaw (e.g. to snapshot the secondary's backing LV)
        #[arg(long)]
        exec: Option<String>,
    },
    /// Write the man pages into a directory
    Man { dir: PathBuf },
    /// Print shell completions
    Completions { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir).with_context(|| format!("writing to {}", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tandem", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { stop: true, .. } => {
            simple(&Config::load(&cli.config)?, Request::VerifyStop).map(|()| ExitCode::SUCCESS)
        }
        Command::Verify { peer, first, count, no_wait, json, stop: false } => {
            watch::verify(&Config::load(&cli.config)?, Request::Verify { peer, first, count }, !no_wait, json)
        }
        command => {
            let config = Config::load(&cli.config)?;
            match command {
                Command::Up { log } => {
                    if config.record == kernel_record::RecordChoice::Bpf {
                        kernel_record::require_bpf().map_err(|why| {
                            anyhow::anyhow!("record = \"bpf\" in {}, but {why}", config.file.display())
                        })?;
                    }
                    watch::up(&config, log)
                }
                Command::Status { watch: true, .. } => watch::status_watch(&config),
                Command::Status { json, .. } => status(&config, json),
                Command::Dirty { json } => dirty(&config, json),
                Command::Primary { force } => simple(&config, Request::Primary { force }),
                Command::Secondary => simple(&config, Request::Secondary),
                Command::Invalidate => simple(&config, Request::Invalidate),
                Command::Connect => simple(&config, Request::Connect),
                Command::Down => simple(&config, Request::Down).and_then(|()| wait_gone(&config)),
                Command::SnapshotPoint { mountpoint, timeout, exec } => {
                    snapshot_point(&config, mountpoint, timeout, exec)
                }
                Command::Daemon => {
                    init_logging();
                    runtime::run_daemon(config)
                }
                Command::CreateMd { force } => runtime::create_metadata(&config, force),
                Command::Man { .. } | Command::Completions { .. } | Command::Verify { .. } => {
                    unreachable!("handled above")
                }
            }
            .map(|()| ExitCode::SUCCESS)
        }
    }
}

fn snapshot_point(
    config: &Config,
    mountpoint: Option<PathBuf>,
    timeout: std::time::Duration,
    exec: Option<String>,
) -> Result<()> {
    let mountpoint = match mountpoint {
        // The daemon may run with another working directory.
        Some(m) => Some(std::fs::canonicalize(&m).with_context(|| format!("--mountpoint {}", m.display()))?),
        None => None,
    };
    let request = Request::SnapshotPoint { mountpoint, timeout_ms: timeout.as_millis() as u64, exec };
    // The daemon answers once it thawed: give it the timeout and some more.
    match control::call_waiting(&config.control, &request, timeout + std::time::Duration::from_secs(30))? {
        Reply::SnapshotPoint { message } => {
            println!("{message}");
            Ok(())
        }
        Reply::Error { message } => bail!("{message}"),
        other => bail!("unexpected reply {other:?}"),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // `tandem up` sends the log to a file: no colour codes there.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

/// `down` is answered once the node is down; the daemon then removes the device-mapper table
/// and the frontend device, and its control socket last: wait for that, so that the device
/// is gone when `tandem down` returns.
fn wait_gone(config: &Config) -> Result<()> {
    let start = std::time::Instant::now();
    while config.control.exists() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            bail!("the daemon answered `down` but still runs after 60 s ({} exists)", config.control.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

fn simple(config: &Config, request: Request) -> Result<()> {
    match control::call(&config.control, &request)? {
        Reply::Ok => Ok(()),
        Reply::Error { message } => bail!("{message}"),
        other => bail!("unexpected reply {other:?}"),
    }
}

fn status(config: &Config, json: bool) -> Result<()> {
    let Reply::Status(s) = control::call(&config.control, &Request::Status)? else { bail!("unexpected reply") };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", report::render_status(&s));
    }
    Ok(())
}

/// `tandem dirty`: the pinned maps first (they outlive the daemon), the daemon's records too
/// when it answers.
fn dirty(config: &Config, json: bool) -> Result<()> {
    let (map, no_map) = match kernel_record::inspect(&config.record_pin) {
        Ok(Some(map)) => (Some(map), None),
        Ok(None) => (None, Some(format!("nothing is pinned at {}/{}", tandem_bpf::PIN_ROOT, config.record_pin))),
        Err(e) => (None, Some(e.to_string())),
    };
    let daemon = match control::call(&config.control, &Request::Dirty) {
        Ok(Reply::Dirty { runs, .. }) => Some(runs),
        Ok(other) => bail!("unexpected reply {other:?}"),
        Err(e) if map.is_none() => return Err(e.context(no_map.unwrap_or_default())),
        Err(_) => None,
    };
    let view = control::DirtyView {
        volume: config.volume.clone(),
        source: if map.is_some() { "kernel-map" } else { "daemon" }.into(),
        map,
        no_map,
        daemon,
        track_size: config.geometry.track_size(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", report::render_dirty_view(&view));
    }
    Ok(())
}
