//! The secondary killed (`kill -9`) and restarted: the resync ships exactly the tracks the
//! primary recorded while it was away (the byte count is asserted), and `tandem verify`
//! then finds the replicas identical. Damage made behind the daemons' backs is found,
//! named, resynced, and a second verify finds nothing. Needs root; elsewhere it says why it
//! skips.

mod common;

use common::*;
use serde_json::{json, Value};
use std::os::unix::fs::FileExt;
use std::process::Command;

/// `tandem verify --json` on `n`: its exit status and report.
fn verify(n: &Node, args: &[&str]) -> (i32, Value) {
    let out =
        Command::new(TANDEM).args(["-c", n.config.to_str().unwrap(), "verify", "--json"]).args(args).output().unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verify printed no report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), report)
}

fn records_clear(n0: &Node, n1: &Node) -> bool {
    n0.peer()["out_of_sync_tracks"] == 0 && n1.peer()["out_of_sync_tracks"] == 0
}

#[test]
fn secondary_killed_and_restarted_resyncs_only_recorded_tracks_and_verify_finds_no_difference() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut n0, mut n1) = connected_pair(dir.path(), "memory");
    n0.tandem(&["primary"]);
    let device = open_direct(&n0.device());
    let mut buf = Aligned::new();
    let mut write = |track: u64, within: u64, tag: u8| {
        buf.bytes().fill(tag);
        device.write_all_at(buf.bytes(), track * TRACK + within).unwrap();
    };
    for track in 0..64 {
        write(track, 0, track as u8);
    }
    wait("the records to clear", || records_clear(&n0, &n1));

    n1.kill();
    wait("node 0 to lose node 1", || n0.peer()["connection"] != "Connected");
    // Six writes apart on five tracks: two of them land in track 17.
    let apart = [3u64, 17, 18, 200, 777];
    for (i, &track) in apart.iter().enumerate() {
        write(track, 8192, 0xA0 + i as u8);
    }
    write(17, 40960, 0xEE);
    assert_eq!(n0.peer()["out_of_sync_tracks"], apart.len(), "{:#}", n0.status().unwrap());

    n1.start();
    wait("node 1 to resync", || connected(&n0) && connected(&n1));
    let shipped = apart.len() as u64 * TRACK;
    assert_eq!(n0.peer()["last_resync_bytes"], shipped, "node 0 shipped only the recorded tracks");
    assert_eq!(n1.peer()["last_resync_bytes"], shipped, "node 1 received only the recorded tracks");

    let (code, report) = verify(&n0, &[]);
    assert_eq!((code, &report["state"]), (0, &json!("finished")), "{report:#}");
    assert_eq!((&report["compared"], &report["differing_tracks"]), (&json!(1024), &json!(0)), "{report:#}");
    let (code, report) = verify(&n0, &["--first", "10", "--count", "5"]);
    assert_eq!((code, &report["compared"]), (0, &json!(5)), "{report:#}");

    // Rot in node 1's backing file, behind both daemons' backs.
    wait("the records to clear", || records_clear(&n0, &n1));
    let image = std::fs::OpenOptions::new().write(true).open(n1.image()).unwrap();
    image.write_all_at(b"bit rot", 500 * TRACK + 123).unwrap();
    let (code, report) = verify(&n0, &[]);
    assert_eq!(code, 2, "differences exit with 2: {report:#}");
    assert_eq!(report["differing"], json!([{ "first_track": 500, "tracks": 1 }]), "{report:#}");
    wait("the reconnection to resync the rotten track", || {
        connected(&n0) && connected(&n1) && n0.peer()["last_resync_bytes"] == TRACK
    });
    let (code, report) = verify(&n0, &[]);
    assert_eq!((code, &report["differing_tracks"]), (0, &json!(0)), "{report:#}");

    // A secondary refuses to verify against its primary, with the reason.
    let out = Command::new(TANDEM).args(["-c", n1.config.to_str().unwrap(), "verify"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node 0 is primary: run verify there"), "{out:?}");

    drop(device);
    down_and_compare(&mut n0, &mut n1);
}
