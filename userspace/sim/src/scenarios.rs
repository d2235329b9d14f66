//! Scripted scenarios the random runs cannot reach, checked the same way.

use crate::disk::BLOCK;
use crate::world::World;
use crate::{FaultClass, SimConfig};
use tandem_core::node::{VerifyReport, VerifyState};
use tandem_core::{ConnState, DiskState, Mode, NodeId};

fn connected(w: &World) -> bool {
    w.script_settled()
        && [0, 1].iter().all(|&id| {
            w.script_node(id)
                .is_some_and(|n| n.conn(1 - id) == Some(ConnState::Connected) && n.disk() == DiskState::UpToDate)
        })
}

fn verify_ended(w: &World, id: NodeId) -> bool {
    w.script_node(id).and_then(|n| n.status().verify).is_some_and(|v| v.state != VerifyState::Running)
}

fn run_verify(w: &mut World, writes_meanwhile: &[u64]) -> Result<VerifyReport, String> {
    w.script_admin(0, |n| n.verify(None, None).map(|_| ())).map_err(|e| format!("verify refused: {e}"))?;
    // The host keeps writing while the verify runs.
    for &block in writes_meanwhile {
        w.script_write(0, block, 8);
    }
    if !w.script_run_until(5_000_000, |w| verify_ended(w, 0)) {
        return Err("the verify never ended".into());
    }
    Ok(w.script_node(0).and_then(|n| n.status().verify).expect("a verify ran"))
}

/// One block of the secondary rots while the volume is in use. A verify on the primary,
/// run under write load, must name exactly that track; the reconnection that follows must
/// resync it; and a second verify must find the replicas identical.
pub fn verify_finds_and_repairs_rot(seed: u64, mode: Mode) -> Result<(), String> {
    let mut cfg = SimConfig::new(mode, FaultClass::Single);
    cfg.steps = 0;
    cfg.disk_faults = false;
    let mut w = World::new(seed, cfg);
    if !w.script_run_until(1_000_000, connected) {
        return Err("the nodes never connected".into());
    }
    for block in [0, 24, 40, 72] {
        w.script_write(0, block, 8);
    }
    if !w.script_run_until(1_000_000, |w| w.script_host_pending(0) == 0) {
        return Err("writes were not acknowledged".into());
    }
    // Destage scans clear the records of what both sides hardened.
    let records_clear = |w: &World| {
        [0, 1].iter().all(|&id| w.script_node(id).is_some_and(|n| n.status().peers[0].out_of_sync_tracks == 0))
    };
    if !w.script_run_until(5_000_000, records_clear) {
        let states: Vec<String> =
            [0, 1].iter().map(|&id| format!("{:?}", w.script_node(id).map(|n| n.status()))).collect();
        return Err(format!("the records never cleared: {}", states.join(" | ")));
    }
    let track_blocks = u64::from(w.script_node(0).expect("up").config().geometry.track_size()) / BLOCK;
    let rotten_track = 5;
    w.script_corrupt(1, rotten_track * track_blocks + 3);

    let meanwhile = [8, 16, 96, 120];
    let first = run_verify(&mut w, &meanwhile)?;
    if first.state != VerifyState::Finished || first.differing != [rotten_track] {
        return Err(format!("the first verify should find track {rotten_track} alone: {first:?}"));
    }
    if !w.script_run_until(5_000_000, connected) {
        return Err("the nodes did not reconnect after the verify".into());
    }
    // The rotten track, and at most the tracks written during the verify that the
    // records still held.
    let shipped = w.script_resync_shipped();
    if shipped < 1 || shipped > 1 + meanwhile.len() as u64 {
        return Err(format!("the resync shipped {shipped} tracks: 1 differed, {} more were written", meanwhile.len()));
    }
    let second = run_verify(&mut w, &[32, 64])?;
    if second.state != VerifyState::Finished || !second.differing.is_empty() {
        return Err(format!("the second verify should find nothing: {second:?}"));
    }
    if !w.script_run_until(5_000_000, connected) {
        return Err("the nodes did not settle".into());
    }
    let image = w.script_image(0);
    if image != w.script_image(1) {
        return Err("the replicas differ after the repair".into());
    }
    let lost = w.script_lost(&image);
    if !lost.is_empty() {
        return Err(format!("acknowledged writes lost: {lost:?}"));
    }
    match w.script_violation() {
        Some(v) => Err(v),
        None => Ok(()),
    }
}
