//! `cargo xtask demo` until the daemon exists: a narrated failover and failback of one volume
//! on two nodes, driven through the real replication core on the simulator's disks (volatile
//! caches, power loss) and links. Every claim it prints is checked, and a failed check fails it.

use crate::world::World;
use crate::{FaultClass, SimConfig};
use tandem_core::node::Status;
use tandem_core::{ConnState, DiskState, Mode, NodeId};

fn describe(s: &Status) -> String {
    let peers: Vec<String> = s
        .peers
        .iter()
        .map(|p| format!("peer {}: {:?}, {} tracks recorded out of sync", p.peer, p.conn, p.out_of_sync_tracks))
        .collect();
    format!(
        "node {}: {:?}, disk {:?}, generation {:#x}; {}",
        s.node,
        s.role,
        s.disk,
        s.generations.current,
        peers.join("; ")
    )
}

fn show(w: &World, ids: &[NodeId]) {
    for &id in ids {
        match w.script_node(id) {
            Some(n) => println!("      {}", describe(&n.status())),
            None => println!("      node {id}: down"),
        }
    }
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok {
        println!("   ✓ {what}");
        Ok(())
    } else {
        Err(format!("demo check failed: {what}"))
    }
}

fn writes(w: &mut World, node: NodeId, at: &[u64]) -> Result<(), String> {
    for &block in at {
        w.script_write(node, block, 8);
    }
    let acked = w.script_run_until(1_000_000, |w| w.script_host_pending(node) == 0);
    check(acked, &format!("{} writes of 4 KiB acknowledged by node {node}", at.len()))
}

fn connected(w: &World) -> bool {
    w.script_settled()
        && [0, 1].iter().all(|&id| {
            w.script_node(id)
                .is_some_and(|n| n.conn(1 - id) == Some(ConnState::Connected) && n.disk() == DiskState::UpToDate)
        })
}

/// Runs the narrated scenario in `mode`.
pub fn run(mode: Mode) -> Result<(), String> {
    let mut cfg = SimConfig::new(mode, FaultClass::Single);
    cfg.steps = 0;
    cfg.disk_faults = false;
    let mut w = World::new(7, cfg);
    println!("== Tandem demo ({mode:?} mode): one 64 KiB volume, two nodes, simulated disks and link");
    println!("   (the daemon, real devices and TCP arrive with the next issue; this drives the same core)\n");

    println!("1. The nodes connect; node 0 is primary.");
    check(w.script_run_until(1_000_000, connected), "both nodes connected and UpToDate")?;
    show(&w, &[0, 1]);

    println!("\n2. The host writes on node 0. Each write is recorded by node 1 before node 0 writes it locally.");
    writes(&mut w, 0, &[0, 16, 40, 64, 96])?;
    show(&w, &[0, 1]);

    println!("\n3. Node 0 loses power: its volatile cache is gone.");
    w.script_crash(0);
    w.script_run_until(100_000, |w| w.script_node(1).is_some_and(|n| n.conn(0) == Some(ConnState::Connecting)));
    show(&w, &[0, 1]);

    println!("\n4. Failover: the operator promotes node 1, which keeps serving and recording.");
    check(w.script_admin(1, |n| n.promote(false)).is_ok(), "node 1 promoted")?;
    writes(&mut w, 1, &[8, 40, 120])?;
    show(&w, &[0, 1]);
    let image = w.script_image(1);
    check(w.script_lost(&image).is_empty(), "node 1 holds every acknowledged write")?;

    println!("\n5. Node 0 comes back (as secondary) and resyncs only the recorded tracks.");
    let recorded = w.script_node(1).map(|n| n.status().peers[0].out_of_sync_tracks).unwrap_or(0);
    w.script_boot(0);
    check(w.script_run_until(5_000_000, connected), "node 0 resynced and UpToDate")?;
    let shipped = w.script_resync_shipped();
    check(
        shipped >= recorded && shipped < 16,
        &format!("the resync shipped {shipped} of 16 tracks: the {recorded} node 1 recorded, plus what node 0's metadata kept"),
    )?;
    show(&w, &[0, 1]);
    check(w.script_image(0) == w.script_image(1), "both replicas are identical")?;

    println!("\n6. Failback: node 1 steps down, node 0 is primary again.");
    check(w.script_admin(1, |n| n.demote()).is_ok(), "node 1 demoted")?;
    let sees_secondary = |w: &World| {
        w.script_node(0).and_then(|n| n.peer_state(1)).is_some_and(|s| s.role == tandem_core::Role::Secondary)
    };
    check(w.script_run_until(1_000_000, sees_secondary), "node 0 heard that node 1 stepped down")?;
    check(w.script_admin(0, |n| n.promote(false)).is_ok(), "node 0 promoted")?;
    writes(&mut w, 0, &[24])?;
    check(w.script_run_until(2_000_000, connected), "in sync")?;
    show(&w, &[0, 1]);
    let image = w.script_image(0);
    check(image == w.script_image(1), "both replicas are identical")?;
    check(w.script_lost(&image).is_empty(), "no acknowledged write was lost")?;
    println!("\n{} messages exchanged. Done.", w.script_messages());
    Ok(())
}
