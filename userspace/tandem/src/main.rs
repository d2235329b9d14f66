//! `tandem`: the daemon (`tandem daemon`) and the operator's commands, which talk to the
//! local daemon over its control socket.

mod config;
mod control;
mod daemon;
mod runtime;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use config::Config;
use control::{Reply, Request, StatusView};
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
    /// Role, connection, disk state, device, out-of-sync bytes and resync progress
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The recorded track runs per peer
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
    /// Write the man pages into a directory
    Man { dir: PathBuf },
    /// Print shell completions
    Completions { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir).with_context(|| format!("writing to {}", dir.display()))?;
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tandem", &mut std::io::stdout());
            Ok(())
        }
        command => {
            let config = Config::load(&cli.config)?;
            match command {
                Command::Status { json } => status(&config, json),
                Command::Dirty { json } => dirty(&config, json),
                Command::Primary { force } => simple(&config, Request::Primary { force }),
                Command::Secondary => simple(&config, Request::Secondary),
                Command::Invalidate => simple(&config, Request::Invalidate),
                Command::Connect => simple(&config, Request::Connect),
                Command::Down => simple(&config, Request::Down),
                Command::Daemon => {
                    init_logging();
                    runtime::run_daemon(config)
                }
                Command::CreateMd { force } => runtime::create_metadata(&config, force),
                Command::Man { .. } | Command::Completions { .. } => unreachable!("handled above"),
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
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
        print!("{}", render_status(&s));
    }
    Ok(())
}

/// `drbdadm status`-like text, the shape DRBD operators read.
fn render_status(s: &StatusView) -> String {
    let mut out = format!("{} role:{}\n", s.volume, s.role);
    out += &format!(
        "  disk:{} mode:{} device:{} generation:{}\n",
        s.disk,
        s.mode,
        s.device.as_deref().unwrap_or("-"),
        s.generation
    );
    for p in &s.peers {
        out += &format!(
            "  peer-{} connection:{} role:{} disk:{}\n    out-of-sync: {} ({} tracks)",
            p.peer,
            p.connection,
            p.role.as_deref().unwrap_or("Unknown"),
            p.disk.as_deref().unwrap_or("DUnknown"),
            human_bytes(p.out_of_sync_bytes),
            p.out_of_sync_tracks
        );
        if let Some((done, total)) = p.resync {
            out += &format!("  resync: {done}/{total} tracks");
        } else if let Some(bytes) = p.last_resync_bytes {
            out += &format!("  last resync: {}", human_bytes(bytes));
        }
        out += "\n";
    }
    out
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn dirty(config: &Config, json: bool) -> Result<()> {
    let Reply::Dirty { track_size, runs } = control::call(&config.control, &Request::Dirty)? else {
        bail!("unexpected reply")
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
        return Ok(());
    }
    for r in runs {
        let start = r.first_track * u64::from(track_size);
        println!(
            "peer-{} tracks {}..{} (bytes {}..{}, {})",
            r.peer,
            r.first_track,
            r.first_track + r.tracks,
            start,
            start + r.tracks * u64::from(track_size),
            human_bytes(r.tracks * u64::from(track_size))
        );
    }
    Ok(())
}
