//! The kernel record (issue 4, parts 4 and 5) end to end: the daemon records the writes to
//! its loop device in pinned BPF maps, `tandem status` says so, `tandem dirty` and `bpftool`
//! show exactly the written tracks, clearing cycles empty the map once the peer has the
//! writes; after `kill -9` the maps still hold them (read with `tandem dirty` while the daemon
//! is dead), the restarted node resyncs them (the byte count is asserted, including a track
//! only the map knew), `verify` finds no difference, and `down` leaves nothing pinned.
//! Needs root (FUSE, loop devices, namespaces, BPF); elsewhere it says why it skips. As
//! root, BPF must work: a failure to load is a failure, not a skip.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

/// Root, FUSE, loop devices, namespaces: and then BPF must load.
fn can_run_bpf() -> bool {
    if !can_run() {
        return false;
    }
    let probe = tandem_bpf::probe();
    assert!(probe.is_available(), "as root, BPF write recording must load here: {}", probe.summary());
    true
}

fn expected_flavor() -> String {
    tandem_bpf::probe().flavor.expect("probed above").to_string()
}

/// `tandem dirty --json` (works with the daemon dead).
fn dirty(n: &Node) -> Value {
    let out = Command::new(TANDEM).args(["-c", n.config.to_str().unwrap(), "dirty", "--json"]).output().unwrap();
    assert!(out.status.success(), "tandem dirty: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The tracks of the runs of a `tandem dirty` view.
fn tracks_of(runs: &Value) -> BTreeSet<u64> {
    runs.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            let first = r["first_track"].as_u64().unwrap();
            first..first + r["tracks"].as_u64().unwrap()
        })
        .collect()
}

fn bpftool_dump(dir: &Path, map: &str) -> Vec<Value> {
    let path = dir.join(map);
    let out = sh("bpftool", &["-j", "map", "dump", "pinned", path.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("bpftool printed no JSON ({e}): {out}"));
    v.as_array().unwrap().iter().map(|e| e["formatted"].clone()).collect()
}

/// The marked tracks as `bpftool` shows them: every bit of both sides of every range.
fn bpftool_tracks(dir: &Path) -> BTreeSet<u64> {
    let params = &bpftool_dump(dir, "params")[0]["value"];
    let (tpr, wpr, tracks) = (
        params["tracks_per_range"].as_u64().unwrap(),
        params["words_per_range"].as_u64().unwrap(),
        params["tracks"].as_u64().unwrap(),
    );
    let mut out = BTreeSet::new();
    for e in bpftool_dump(dir, "bitmap") {
        let key = e["key"].as_u64().unwrap();
        // serde_json keeps u64 exact (no double in between).
        let value = e["value"].as_u64().unwrap();
        let (range, word) = (key / (2 * wpr), key % wpr);
        for b in 0..64 {
            let t = range * tpr + word * 64 + b;
            if value >> b & 1 == 1 && word * 64 + b < tpr && t < tracks {
                out.insert(t);
            }
        }
    }
    out
}

fn write_tracks(device: &str, tracks: &[u64], tag: u8) {
    let file = open_direct(device);
    let mut buf = Aligned::new();
    for (i, &t) in tracks.iter().enumerate() {
        buf.bytes().fill(tag.wrapping_add(i as u8));
        file.write_all_at(buf.bytes(), t * TRACK + 4096).unwrap();
    }
}

/// `tandem verify --json` on `n`: its exit status and report.
fn verify(n: &Node) -> (i32, Value) {
    let out = Command::new(TANDEM).args(["-c", n.config.to_str().unwrap(), "verify", "--json"]).output().unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verify printed no report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), report)
}

fn set(tracks: &[u64]) -> BTreeSet<u64> {
    tracks.iter().copied().collect()
}

#[test]
fn written_tracks_are_in_the_kernel_map_until_the_peer_has_them_and_down_unpins() {
    if !can_run_bpf() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut n0, mut n1) = connected_pair(dir.path(), "memory");
    let net = n0.net().clone();

    // `tandem status` shows the kernel record, its flavour and where it is pinned.
    for n in [&n0, &n1] {
        let record = n.status().unwrap()["record"].clone();
        assert_eq!(record["source"], "bpf", "{record:#}");
        assert_eq!(record["flavor"], json!(expected_flavor()), "{record:#}");
        assert_eq!(record["pin_dir"], json!(n.pin_dir().to_str().unwrap()), "{record:#}");
        assert!(n.pin_dir().join("bitmap").exists());
    }
    let text = n0.tandem(&["status"]);
    assert!(text.contains(&format!("record:bpf flavor:{}", expected_flavor())), "{text}");

    n0.tandem(&["primary"]);
    let device = n0.device();
    // Apart from the peer, so that the core holds the tracks (out of sync) until it is back.
    net.link(0, false).unwrap();
    wait("node 0 to lose node 1", || n0.peer()["connection"] != "Connected");
    let written = [3u64, 17, 18, 200, 777];
    write_tracks(&device, &written, 0x5A);
    assert_eq!(n0.peer()["out_of_sync_tracks"], written.len(), "{:#}", n0.status().unwrap());

    // Exactly those tracks, through `tandem dirty` and through bpftool; and they stay while
    // the core holds them, whatever the clearing cycles do meanwhile.
    let view = dirty(&n0);
    assert_eq!(view["source"], "kernel-map", "{view:#}");
    assert_eq!(tracks_of(&view["map"]["runs"]), set(&written), "{view:#}");
    assert_eq!(view["map"]["flavor"], json!(expected_flavor()));
    assert_eq!(view["map"]["attached"], true);
    assert_eq!(bpftool_tracks(&n0.pin_dir()), set(&written));
    // A mark the core does not hold (as a write the peer has long hardened would leave):
    // a clearing cycle runs for it, clears it, and keeps every held track.
    let stray = 600u64;
    tandem_bpf::Volume::open(&record_pin(dir.path(), 0)).unwrap().mark(stray).unwrap();
    assert!(tracks_of(&dirty(&n0)["map"]["runs"]).contains(&stray));
    wait("a clearing cycle to drop the stray mark", || !tracks_of(&dirty(&n0)["map"]["runs"]).contains(&stray));
    assert_eq!(tracks_of(&dirty(&n0)["map"]["runs"]), set(&written), "held tracks survive the clearing cycles");
    assert!(n0.status().unwrap()["record"]["cycles"].as_u64().unwrap() > 0);
    let text = n0.tandem(&["dirty"]);
    assert!(text.contains("source kernel map") && text.contains("range 0: current"), "{text}");
    assert!(text.contains("tracks 17..19"), "{text}");

    // The peer back: the resync ships them, the core's records clear, and a few cycles
    // later the map is empty too.
    net.link(0, true).unwrap();
    wait("the link to heal", || connected(&n0) && connected(&n1));
    wait("the records to clear", || n0.peer()["out_of_sync_tracks"] == 0 && n1.peer()["out_of_sync_tracks"] == 0);
    wait("the kernel map to clear", || dirty(&n0)["map"]["marked_tracks"] == 0);
    assert!(bpftool_tracks(&n0.pin_dir()).is_empty());
    let record = n0.status().unwrap()["record"].clone();
    assert!(record["cycles"].as_u64().unwrap() > 0, "{record:#}");
    assert!(record["cleared_tracks"].as_u64().unwrap() >= written.len() as u64, "{record:#}");

    // Written while connected: marked, then cleared once the peer hardened it.
    write_tracks(&device, &[500], 0x11);
    assert!(tracks_of(&dirty(&n0)["map"]["runs"]).contains(&500), "a write is in the map when it returns");
    wait("the kernel map to clear again", || dirty(&n0)["map"]["marked_tracks"] == 0);

    // `down` leaves nothing pinned, on both nodes.
    down_and_compare(&mut n0, &mut n1);
    for n in [&n0, &n1] {
        assert!(!n.pin_dir().exists(), "{} is still there after down", n.pin_dir().display());
    }
}

#[test]
fn after_kill_9_the_pinned_map_shows_the_tracks_and_the_restarted_node_resyncs_them() {
    if !can_run_bpf() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut n0, mut n1) = connected_pair(dir.path(), "memory");
    let net = n0.net().clone();
    n0.tandem(&["primary"]);
    let old_device = n0.device();
    net.link(0, false).unwrap();
    wait("node 0 to lose node 1", || n0.peer()["connection"] != "Connected");
    let written = [5u64, 6, 7, 300, 1000];
    write_tracks(&old_device, &written, 0xC3);

    n0.kill();
    // The daemon is dead: `tandem dirty` reads the pinned maps.
    let view = dirty(&n0);
    assert_eq!(view["source"], "kernel-map", "{view:#}");
    assert_eq!(view["daemon"], Value::Null, "the daemon is dead: {view:#}");
    assert_eq!(tracks_of(&view["map"]["runs"]), set(&written), "{view:#}");
    let text = n0.tandem(&["dirty"]);
    assert!(text.contains("the daemon does not answer") && text.contains("tracks 5..8"), "{text}");
    assert_eq!(bpftool_tracks(&n0.pin_dir()), set(&written));

    // A write the dead daemon never saw (queued when it died): only the kernel map knows it.
    let unseen = 900u64;
    tandem_bpf::Volume::open(&record_pin(dir.path(), 0)).unwrap().mark(unseen).unwrap();

    net.link(0, true).unwrap();
    n0.start();
    wait("node 0 to resync node 1", || connected(&n0) && connected(&n1));
    let mut expected = set(&written);
    expected.insert(unseen);
    let shipped = expected.len() as u64 * TRACK;
    assert_eq!(n0.peer()["last_resync_bytes"], shipped, "node 0 shipped the map's tracks: {:#}", n0.status().unwrap());
    assert_eq!(n1.peer()["last_resync_bytes"], shipped, "node 1 received them");
    let log = std::fs::read_to_string(n0.log()).unwrap();
    assert!(log.contains("left its kernel record pinned"), "the restart says what it took: {log}");

    // The restarted daemon records its new loop device.
    let record = n0.status().unwrap()["record"].clone();
    assert_eq!(record["source"], "bpf", "{record:#}");
    let new_device = n0.device();
    let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&new_device).unwrap());
    let expected_dev = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
    assert_eq!(dirty(&n0)["map"]["device"], json!(expected_dev), "the map watches {new_device}");

    n0.tandem_retry(&["primary"]);
    write_tracks(&new_device, &[42], 0x77);
    assert!(tracks_of(&dirty(&n0)["map"]["runs"]).contains(&42), "the new device's writes are recorded");
    let (code, report) = verify(&n0);
    assert_eq!((code, &report["differing_tracks"]), (0, &json!(0)), "{report:#}");
    n0.tandem(&["secondary"]);
    down_and_compare(&mut n0, &mut n1);
    for n in [&n0, &n1] {
        assert!(!n.pin_dir().exists(), "{} is still there after down", n.pin_dir().display());
    }
}

/// `record = "memory"`: no programs, `status` and `dirty` say where the record is.
#[test]
fn the_in_process_record_is_announced_and_dirty_falls_back_to_the_daemon() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let net = network();
    let mut n0 = Node::new(dir.path(), 0, &net);
    let text = std::fs::read_to_string(&n0.config).unwrap().replace("[node]\n", "[node]\nrecord = \"memory\"\n");
    std::fs::write(&n0.config, text).unwrap();
    n0.start();
    let record = n0.status().unwrap()["record"].clone();
    assert_eq!(record["source"], "memory", "{record:#}");
    assert!(record["reason"].as_str().unwrap().contains("record = \"memory\""), "{record:#}");
    assert!(!n0.pin_dir().exists());
    let text = n0.tandem(&["status"]);
    assert!(text.contains("record:memory"), "{text}");
    let view = dirty(&n0);
    assert_eq!(view["source"], "daemon", "{view:#}");
    assert_eq!(view["daemon"], json!([]), "{view:#}");
    assert!(view["no_map"].as_str().unwrap().contains("nothing is pinned"), "{view:#}");
}

/// `record = "bpf"` where BPF cannot load (an unprivileged user): `up` refuses with the reason.
#[test]
fn record_bpf_fails_up_with_the_reason_when_bpf_cannot_load() {
    if !tandem_testnet::is_root() {
        eprintln!("skipped: needs root to run `tandem up` as an unprivileged user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = d.join("bpf.toml");
    std::fs::write(
        &config,
        format!(
            "[volume]\nname = \"nobpf\"\nid = 3\nsize = \"8MiB\"\nsecret = \"{SECRET}\"\n\n[node]\nid = 0\n\
             data = \"{d}/x.img\"\nmeta = \"{d}/x.meta\"\nlisten = \"127.0.0.1:1\"\ncontrol = \"{d}/x.sock\"\n\
             record = \"bpf\"\n",
            d = d.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", TANDEM, "-c", config.to_str().unwrap(), "up"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("record = \"bpf\"") && err.contains("BPF is not permitted"), "{err}");
    assert!(!d.join("x.sock").exists(), "no daemon was started");
}

/// Maps pinned under the node's name with another geometry (not this volume's record, or a
/// record from before a reconfiguration) are never trusted: every track counts as written.
#[test]
fn pinned_maps_of_another_geometry_count_as_every_track_written() {
    if !can_run_bpf() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let net = network();
    let mut n0 = Node::new(dir.path(), 0, &net);
    // A record of 4 KiB tracks on a 1 MiB device, pinned under node 0's name.
    let image = dir.path().join("other.img");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let device = sh("losetup", &["--show", "-f", image.to_str().unwrap()]).trim().to_owned();
    let config = tandem_bpf::VolumeConfig::new(record_pin(dir.path(), 0), Path::new(&device), 4096, 64, 256);
    let other = tandem_bpf::Volume::load(&config);
    sh("losetup", &["-d", &device]);
    let other = other.unwrap();
    other.mark(1).unwrap();
    drop(other);

    n0.start();
    let status = n0.status().unwrap();
    assert_eq!(status["peers"][0]["out_of_sync_tracks"], 1024, "every track is out of sync: {status:#}");
    let log = std::fs::read_to_string(n0.log()).unwrap();
    assert!(log.contains("untrusted kernel record") && log.contains("tracks 256, the configuration 1024"), "{log}");
    // The old pins were replaced by this volume's record, which holds `out_of_sync`.
    let view = dirty(&n0);
    assert_eq!(view["map"]["tracks"], 1024, "{view:#}");
    assert_eq!(view["map"]["marked_tracks"], 1024, "{view:#}");
    assert_eq!(status["record"]["source"], "bpf");
}
