//! What the operator's commands print: DRBD-shaped text for people, JSON for scripts.

use crate::control::{DirtyRun, DirtyView, RecordView, StatusView, TrackRun, VerifyView};

/// `drbdadm status`-like text, the shape DRBD operators read.
pub fn render_status(s: &StatusView) -> String {
    let mut out = format!("{} role:{}\n", s.volume, s.role);
    out += &format!(
        "  disk:{} mode:{} device:{} generation:{}\n",
        s.disk,
        s.mode,
        s.device.as_deref().unwrap_or("-"),
        s.generation
    );
    if let Some(f) = &s.frontend {
        out += &format!("  frontend:{} {}", f.kind, f.device);
        if let Some(dm) = &f.dm {
            out += &format!(" under {dm}");
        }
        out += "\n";
        for note in &f.notes {
            out += &format!("    {note}\n");
        }
    }
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
    if let Some(r) = &s.record {
        out += &render_record(r);
    }
    if let Some(a) = &s.attach {
        out += &format!(
            "  attached:{} shipping:{} dirty:{} tracks shipped:{} tracks in {} cycles\n",
            a.device, a.state, a.dirty_tracks, a.shipped_tracks, a.cycles
        );
        if let Some(last) = &a.last_snapshot_point {
            out += &format!("    last snapshot point: {last}\n");
        }
    }
    if let Some(v) = &s.verify {
        out += "  ";
        out += &render_verify(v, s.track_size);
    }
    out
}

/// The record line of `tandem status`.
pub fn render_record(r: &RecordView) -> String {
    match r.source.as_str() {
        "bpf" => {
            let mut out = format!(
                "  record:bpf flavor:{} pin:{} marked:{} tracks cycles:{} cleared:{} tracks\n",
                r.flavor.as_deref().unwrap_or("?"),
                r.pin_dir.as_deref().unwrap_or("-"),
                r.marked_tracks.unwrap_or(0),
                r.cycles,
                r.cleared_tracks
            );
            if let Some(why) = &r.reason {
                out += &format!("    {why}\n");
            }
            out
        }
        _ => format!("  record:memory ({})\n", r.reason.as_deref().unwrap_or("BPF write recording unavailable")),
    }
}

fn runs_text(runs: &[TrackRun]) -> String {
    let parts: Vec<String> = runs
        .iter()
        .map(|r| match r.tracks {
            1 => r.first_track.to_string(),
            n => format!("{}-{}", r.first_track, r.first_track + n - 1),
        })
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

/// `tandem dirty`: the kernel map's runs per range (and the daemon's records when it
/// answered), or the daemon's records alone.
pub fn render_dirty_view(v: &DirtyView) -> String {
    let mut out = String::new();
    match &v.map {
        Some(m) => {
            let track = u64::from(m.track_size);
            out += &format!(
                "{}: source kernel map {} ({}, {}), device {}\n",
                v.volume,
                m.pin_dir,
                m.flavor.as_deref().unwrap_or("unknown flavour"),
                if m.attached { "recording" } else { "programs detached" },
                m.device
            );
            out += &format!(
                "  {} of {} tracks of {} marked ({}); {} ranges of {} tracks\n",
                m.marked_tracks,
                m.tracks,
                human_bytes(track),
                human_bytes(m.marked_tracks * track),
                m.ranges.len(),
                m.tracks_per_range
            );
            for r in &m.ranges {
                if r.current.is_empty() && r.old.is_empty() && r.inflight == [0, 0] {
                    continue;
                }
                out += &format!(
                    "  range {}: current (side {}) {}  old {}  in flight {}/{}  toggles {}\n",
                    r.range,
                    r.current_side,
                    runs_text(&r.current),
                    runs_text(&r.old),
                    r.inflight[0],
                    r.inflight[1],
                    r.toggles
                );
            }
            for r in &m.runs {
                let start = r.first_track * track;
                out += &format!(
                    "  tracks {}..{} (bytes {}..{}, {})\n",
                    r.first_track,
                    r.first_track + r.tracks,
                    start,
                    start + r.tracks * track,
                    human_bytes(r.tracks * track)
                );
            }
        }
        None => {
            out += &format!(
                "{}: source the daemon's in-process record (no kernel map: {})\n",
                v.volume,
                v.no_map.as_deref().unwrap_or("-")
            );
        }
    }
    match &v.daemon {
        Some(runs) if v.map.is_some() => {
            out += if runs.is_empty() {
                "  the daemon's records per peer: clean\n"
            } else {
                "  the daemon's records per peer:\n"
            };
            out += &render_dirty(v.track_size, runs).lines().map(|l| format!("    {l}\n")).collect::<String>();
        }
        Some(runs) => out += &render_dirty(v.track_size, runs),
        None => out += "  (the daemon does not answer)\n",
    }
    out
}

pub fn human_bytes(b: u64) -> String {
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

/// The recorded track runs, one line each.
pub fn render_dirty(track_size: u32, runs: &[DirtyRun]) -> String {
    let track = u64::from(track_size);
    runs.iter()
        .map(|r| {
            let start = r.first_track * track;
            format!(
                "peer-{} tracks {}..{} (bytes {}..{}, {})\n",
                r.peer,
                r.first_track,
                r.first_track + r.tracks,
                start,
                start + r.tracks * track,
                human_bytes(r.tracks * track)
            )
        })
        .collect()
}

/// A verify's outcome, with the differing runs (as `dirty` shows records).
pub fn render_verify(v: &VerifyView, track_size: u32) -> String {
    let track = u64::from(track_size);
    let mut out = format!(
        "verify against peer-{}: {} of {} tracks compared ({}), {} differing",
        v.peer,
        v.compared,
        v.tracks,
        human_bytes(v.compared * track),
        v.differing_tracks
    );
    match (v.state.as_str(), &v.aborted) {
        ("running", _) => out += " (running)",
        (_, Some(why)) => out += &format!(" (aborted: {why})"),
        _ => {}
    }
    out += "\n";
    for r in &v.differing {
        out += &format!(
            "  differs: tracks {}..{} (bytes {}..{})\n",
            r.first_track,
            r.first_track + r.tracks,
            r.first_track * track,
            (r.first_track + r.tracks) * track
        );
    }
    if v.differing_tracks > 0 && v.state == "finished" {
        out += "  marked out of sync; the connection was re-established to resync them\n";
    }
    out
}
