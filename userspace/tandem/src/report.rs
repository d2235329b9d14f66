//! What the operator's commands print: DRBD-shaped text for people, JSON for scripts.

use crate::control::{DirtyRun, StatusView, VerifyView};

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
    if let Some(v) = &s.verify {
        out += "  ";
        out += &render_verify(v, s.track_size);
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
