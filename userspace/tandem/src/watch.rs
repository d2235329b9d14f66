//! Waiting on the daemon: `verify` and `status --watch` poll it and draw progress bars on a
//! terminal (indicatif draws only when stderr is one; elsewhere the final text is all), and
//! `up` starts a daemon in the background and waits until it serves the volume.

use crate::config::Config;
use crate::control::{self, Reply, Request, StatusView};
use crate::report;
use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(200);

fn status(config: &Config) -> Result<StatusView> {
    match control::call(&config.control, &Request::Status)? {
        Reply::Status(s) => Ok(*s),
        other => bail!("unexpected reply {other:?}"),
    }
}

fn bar(multi: &MultiProgress, what: String) -> ProgressBar {
    let style =
        ProgressStyle::with_template("{prefix:>18} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}")
            .expect("a valid template")
            .progress_chars("=> ");
    multi.add(ProgressBar::new(0).with_style(style).with_prefix(what))
}

/// Exit status of `tandem verify`: 0 identical, 2 differences found (marked and being
/// resynced), 1 the verify could not finish.
pub fn verify(config: &Config, request: Request, wait: bool, json: bool) -> Result<ExitCode> {
    let peer = match control::call(&config.control, &request)? {
        Reply::Verifying { peer } => peer,
        Reply::Error { message } => bail!("{message}"),
        other => bail!("unexpected reply {other:?}"),
    };
    if !wait {
        println!("verify against peer-{peer} started; `tandem status` shows its progress");
        return Ok(ExitCode::SUCCESS);
    }
    let multi = MultiProgress::new();
    let progress = bar(&multi, format!("verify peer-{peer}"));
    let (view, track_size) = loop {
        let s = status(config)?;
        let Some(v) = s.verify else { bail!("the daemon forgot the verify it started") };
        let track = u64::from(s.track_size);
        progress.set_length(v.tracks * track);
        progress.set_position(v.compared * track);
        progress.set_message(format!("{} differing", v.differing_tracks));
        if v.state != "running" {
            break (v, s.track_size);
        }
        std::thread::sleep(POLL);
    };
    progress.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", report::render_verify(&view, track_size));
    }
    Ok(match (view.state.as_str(), view.differing_tracks) {
        ("finished", 0) => ExitCode::SUCCESS,
        ("finished", _) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    })
}

/// `status --watch`: bars for every resync and verify until every peer is connected and in
/// sync and nothing runs, then the status text.
pub fn status_watch(config: &Config) -> Result<()> {
    let multi = MultiProgress::new();
    let mut bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
    loop {
        let s = status(config)?;
        let track = u64::from(s.track_size);
        let mut running = BTreeMap::new();
        for p in &s.peers {
            if let Some((done, total)) = p.resync {
                running.insert(format!("resync peer-{}", p.peer), (done, total, String::new()));
            }
        }
        if let Some(v) = s.verify.as_ref().filter(|v| v.state == "running") {
            running.insert(
                format!("verify peer-{}", v.peer),
                (v.compared, v.tracks, format!("{} differing", v.differing_tracks)),
            );
        }
        bars.retain(|name, b| {
            let keep = running.contains_key(name);
            if !keep {
                b.finish_and_clear();
            }
            keep
        });
        for (name, (done, total, msg)) in running.iter() {
            let b = bars.entry(name.clone()).or_insert_with(|| bar(&multi, name.clone()));
            b.set_length(total * track);
            b.set_position(done * track);
            b.set_message(msg.clone());
        }
        let settled = s.peers.iter().all(|p| p.connection == "Connected") && running.is_empty();
        if settled {
            print!("{}", report::render_status(&s));
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

/// `tandem up`: the daemon in the background (its own process group, logs appended to
/// `log`), back once it serves the volume.
pub fn up(config: &Config, log: Option<PathBuf>) -> Result<()> {
    use std::os::unix::process::CommandExt;
    if let Ok(s) = status(config) {
        println!("{} is already up on {}", s.volume, s.device.as_deref().unwrap_or("-"));
        return Ok(());
    }
    let log = log.unwrap_or_else(|| config.meta.with_extension("log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening the log {}", log.display()))?;
    let exe = std::env::current_exe().context("finding the tandem binary")?;
    let mut child = std::process::Command::new(exe)
        .arg("--config")
        .arg(&config.file)
        .arg("daemon")
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0)
        .spawn()
        .context("starting the daemon")?;
    let start = Instant::now();
    loop {
        if let Some(exit) = child.try_wait()? {
            bail!("the daemon exited ({exit}); its log is {}", log.display());
        }
        if let Ok(s) = status(config) {
            if let Some(device) = s.device {
                println!("{} is up on {device} (daemon pid {}, log {})", s.volume, child.id(), log.display());
                return Ok(());
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "the daemon (pid {}) did not expose the volume within 30 s; its log is {}",
                child.id(),
                log.display()
            );
        }
        std::thread::sleep(POLL);
    }
}
