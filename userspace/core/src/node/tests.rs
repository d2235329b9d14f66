//! Step-by-step checks of single rules; the simulator covers their interleavings.

use super::connect::{decide, Plan};
use super::*;
use crate::types::{GenId, Generations};
use bytes::Bytes;
use proptest::prelude::*;

fn geometry() -> Geometry {
    Geometry::new(16 * 4096, 512, 4096, 4).unwrap()
}

fn report(node: NodeId, role: Role, disk: DiskState, gens: Generations, crashed: bool) -> StateReport {
    StateReport {
        node,
        role,
        disk,
        mode: Mode::Memory,
        generations: gens,
        crashed,
        volume_size: 16 * 4096,
        track_size: 4096,
        primary: None,
        replicating: 0,
    }
}

fn drain(n: &mut Node) -> Vec<Action> {
    std::iter::from_fn(|| n.poll()).collect()
}

fn persist_all(n: &mut Node, actions: &[Action]) {
    for a in actions {
        if let Action::PersistMeta { io, .. } = a {
            n.handle(0, Event::IoDone { io: *io, result: Ok(None) });
        }
    }
}

/// A primary connected to peer 1, both in sync.
fn connected_primary(mode: Mode) -> Node {
    let g = geometry();
    let mut n = Node::new(NodeConfig::new(0, vec![1], g, mode), Meta::fresh(&g, 7), 1).unwrap();
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    n.promote(false).unwrap();
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    n.handle(0, Event::PeerConnected { peer: 1 });
    let mut peer = report(1, Role::Secondary, DiskState::UpToDate, Generations::new(7), false);
    peer.mode = mode;
    n.handle(0, Event::Received { peer: 1, msg: Message::State(peer) });
    n.handle(0, Event::Received { peer: 1, msg: Message::RecordEnd { tracks: 0 } });
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    assert!(a.contains(&Action::Send { peer: 1, msg: Message::ResyncEnd { tracks: 0 } }), "{a:?}");
    assert_eq!(n.conn(1), Some(ConnState::Connected));
    n
}

#[test]
fn local_write_waits_for_the_peers_record() {
    let mut n = connected_primary(Mode::Memory);
    n.handle(0, Event::HostWrite { id: 9, offset: 4096, data: Bytes::from(vec![1u8; 1024]), fua: false });
    let a = drain(&mut n);
    assert!(matches!(&a[..], [Action::Send { peer: 1, msg: Message::Data { id: 1, offset: 4096, .. } }]), "{a:?}");
    assert!(n.record(1).unwrap().is_marked(1), "the peer's tracks are recorded before sending");
    n.handle(0, Event::Received { peer: 1, msg: Message::ReceiptAck { id: 1 } });
    let a = drain(&mut n);
    let [Action::WriteLocal { io, offset: 4096, fua: false, .. }] = a[..] else { panic!("{a:?}") };
    n.handle(0, Event::IoDone { io, result: Ok(None) });
    assert_eq!(drain(&mut n), vec![Action::CompleteHost { id: 9, result: Ok(()) }]);
}

#[test]
fn disk_mode_waits_for_both_hardenings() {
    let mut n = connected_primary(Mode::Disk);
    n.handle(0, Event::HostWrite { id: 9, offset: 0, data: Bytes::from(vec![1u8; 512]), fua: false });
    drain(&mut n);
    n.handle(0, Event::Received { peer: 1, msg: Message::ReceiptAck { id: 1 } });
    let a = drain(&mut n);
    let [Action::WriteLocal { io, fua: true, .. }] = a[..] else { panic!("{a:?}") };
    n.handle(0, Event::IoDone { io, result: Ok(None) });
    assert!(drain(&mut n).is_empty(), "the peer has not hardened yet");
    n.handle(0, Event::Received { peer: 1, msg: Message::HardenedAck { id: 1 } });
    assert_eq!(drain(&mut n), vec![Action::CompleteHost { id: 9, result: Ok(()) }]);
}

#[test]
fn writing_apart_persists_a_new_generation_first() {
    let mut n = connected_primary(Mode::Memory);
    let before = n.generations().current;
    n.handle(0, Event::PeerLost { peer: 1 });
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    n.handle(0, Event::HostWrite { id: 3, offset: 8192, data: Bytes::from(vec![2u8; 512]), fua: false });
    let a = drain(&mut n);
    let [Action::PersistMeta { io, ref meta }] = a[..] else { panic!("metadata first: {a:?}") };
    assert_ne!(meta.generations.current, before);
    assert_eq!(meta.generations.history[0], before);
    assert!(meta.out_of_sync[2]);
    n.handle(0, Event::IoDone { io, result: Ok(None) });
    let a = drain(&mut n);
    assert!(matches!(a[..], [Action::WriteLocal { fua: true, .. }]), "alone in memory mode, writes harden: {a:?}");
}

#[test]
fn bad_extents_fail_the_host_request_and_change_nothing() {
    let mut n = connected_primary(Mode::Memory);
    n.handle(0, Event::HostWrite { id: 4, offset: 100, data: Bytes::from(vec![0u8; 512]), fua: false });
    let a = drain(&mut n);
    assert!(matches!(&a[..], [Action::CompleteHost { id: 4, result: Err(HostError::Geometry(_)) }]), "{a:?}");
    assert!(n.record(1).unwrap().is_clean());
}

#[test]
fn a_peer_speaking_nonsense_is_dropped_not_obeyed() {
    let mut n = connected_primary(Mode::Memory);
    n.handle(0, Event::Received { peer: 1, msg: Message::ResyncAck { track: 3 } });
    let a = drain(&mut n);
    assert!(matches!(&a[0], Action::Disconnect { peer: 1, reason: Refusal::Protocol(_), stand_alone: false }), "{a:?}");
    // Alone in memory mode, it hardens what only it holds now.
    assert!(a[1..].iter().all(|x| matches!(x, Action::Harden { scope: HardenScope::All, .. })), "{a:?}");
    assert_eq!(n.conn(1), Some(ConnState::Connecting));
}

fn gens(current: GenId, history: &[GenId]) -> Generations {
    Generations { current, history: history.to_vec() }
}

#[test]
fn diverged_generations_are_refused_as_split_brain() {
    let a = report(0, Role::Primary, DiskState::UpToDate, gens(5, &[1]), false);
    let b = report(1, Role::Secondary, DiskState::UpToDate, gens(6, &[1]), false);
    assert_eq!(decide(&a, &b), Err(Refusal::SplitBrain { ours: 5, theirs: 6 }));
}

#[test]
fn the_node_ahead_is_the_source() {
    let a = report(0, Role::Secondary, DiskState::UpToDate, gens(1, &[]), false);
    let b = report(1, Role::Primary, DiskState::UpToDate, gens(2, &[1]), false);
    assert_eq!(decide(&a, &b), Ok(Some(Plan { source: 1, target: 0, full: false })));
}

#[test]
fn the_crashed_node_is_the_target_and_two_crashed_nodes_resync_fully() {
    let a = report(0, Role::Secondary, DiskState::Consistent, gens(1, &[]), true);
    let b = report(1, Role::Secondary, DiskState::UpToDate, gens(1, &[]), false);
    assert_eq!(decide(&a, &b), Ok(Some(Plan { source: 1, target: 0, full: false })));
    let b = report(1, Role::Secondary, DiskState::Consistent, gens(2, &[1]), true);
    assert_eq!(decide(&a, &b), Ok(Some(Plan { source: 1, target: 0, full: true })));
}

#[test]
fn a_primary_never_becomes_the_target() {
    let a = report(0, Role::Primary, DiskState::UpToDate, gens(1, &[]), false);
    let b = report(1, Role::Secondary, DiskState::UpToDate, gens(2, &[1]), false);
    assert_eq!(decide(&a, &b), Err(Refusal::PrimaryWouldBeTarget));
}

fn arb_report(node: NodeId) -> impl Strategy<Value = StateReport> {
    let disk = prop_oneof![
        Just(DiskState::UpToDate),
        Just(DiskState::Consistent),
        Just(DiskState::Outdated),
        Just(DiskState::Inconsistent)
    ];
    let role = prop_oneof![Just(Role::Primary), Just(Role::Secondary)];
    (role, disk, 0u64..4, proptest::collection::vec(1u64..4, 0..3), any::<bool>()).prop_map(
        move |(role, disk, current, history, crashed)| report(node, role, disk, gens(current, &history), crashed),
    )
}

proptest! {
    /// Both ends run `decide` on the same two reports and must reach the same verdict.
    #[test]
    fn decide_is_symmetric(a in arb_report(0), b in arb_report(1)) {
        prop_assert_eq!(decide(&a, &b), decide(&b, &a));
    }

    /// A plan never names an invalid source or a primary target.
    #[test]
    fn plans_are_sane(a in arb_report(0), b in arb_report(1)) {
        if let Ok(Some(plan)) = decide(&a, &b) {
            let (src, dst) = if plan.source == 0 { (&a, &b) } else { (&b, &a) };
            prop_assert_ne!(plan.source, plan.target);
            prop_assert!(!matches!(src.disk, DiskState::Inconsistent | DiskState::Failed));
            prop_assert_ne!(dst.role, Role::Primary);
        }
    }
}

#[test]
fn modes_not_built_are_refused() {
    let g = geometry();
    let err = Node::new(NodeConfig::new(0, vec![1], g, Mode::Async), Meta::fresh(&g, 1), 1).err();
    assert_eq!(err, Some(ConfigError::ModeNotBuilt(Mode::Async)));
    let err = Node::new(NodeConfig::new(0, vec![0], g, Mode::Memory), Meta::fresh(&g, 1), 1).err();
    assert!(matches!(err, Some(ConfigError::NodeIds { .. })));
}

#[test]
fn secondaries_of_a_primary_elsewhere_idle() {
    let mut a = report(1, Role::Secondary, DiskState::UpToDate, gens(1, &[]), false);
    let b = report(2, Role::Secondary, DiskState::UpToDate, gens(1, &[]), false);
    a.primary = Some(0);
    assert_eq!(decide(&a, &b), Ok(None));
    assert_eq!(decide(&b, &a), Ok(None));
}

#[test]
fn a_secondary_records_for_peers_its_primary_misses() {
    let g = geometry();
    let mut n = Node::new(NodeConfig::new(1, vec![0, 2], g, Mode::Memory), Meta::fresh(&g, 7), 1).unwrap();
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    n.handle(0, Event::PeerConnected { peer: 0 });
    let mut primary = report(0, Role::Primary, DiskState::UpToDate, gens(7, &[]), false);
    primary.primary = Some(0);
    primary.replicating = 0b110;
    n.handle(0, Event::Received { peer: 0, msg: Message::State(primary.clone()) });
    n.handle(0, Event::Received { peer: 0, msg: Message::RecordEnd { tracks: 0 } });
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    n.handle(0, Event::Received { peer: 0, msg: Message::ResyncEnd { tracks: 0 } });
    let a = drain(&mut n);
    let Some(Action::Harden { io, .. }) = a.iter().find(|x| matches!(x, Action::Harden { .. })).cloned() else {
        panic!("{a:?}")
    };
    n.handle(0, Event::IoDone { io, result: Ok(None) });
    assert_eq!(n.conn(0), Some(ConnState::Connected));
    let data =
        |id, track: u64| Message::Data { id, offset: track * 4096, fua: false, payload: Bytes::from(vec![0u8; 512]) };
    n.handle(0, Event::Received { peer: 0, msg: data(1, 3) });
    assert!(n.record(0).unwrap().is_marked(3));
    assert!(!n.record(2).unwrap().is_marked(3), "node 2 receives the primary's writes itself");
    primary.replicating = 0b010;
    n.handle(0, Event::Received { peer: 0, msg: Message::State(primary) });
    assert!(n.record(2).unwrap().is_marked(3), "what the primary may not have hardened is copied over");
    n.handle(0, Event::Received { peer: 0, msg: data(2, 5) });
    assert!(n.record(2).unwrap().is_marked(5), "and new writes are recorded for node 2");
}

#[test]
fn a_destage_done_without_its_start_is_refused() {
    let mut n = connected_primary(Mode::Memory);
    n.handle(0, Event::Received { peer: 1, msg: Message::DestageDone { range: 0 } });
    let a = drain(&mut n);
    assert!(matches!(&a[0], Action::Disconnect { peer: 1, reason: Refusal::Protocol(_), .. }), "{a:?}");
}

#[test]
fn a_peer_scan_toggles_then_clears_our_record() {
    let mut n = connected_primary(Mode::Memory);
    n.handle(0, Event::HostWrite { id: 1, offset: 0, data: Bytes::from(vec![1u8; 512]), fua: false });
    drain(&mut n);
    n.handle(0, Event::Received { peer: 1, msg: Message::DestageStart { range: 0 } });
    assert_eq!(drain(&mut n), vec![Action::Send { peer: 1, msg: Message::DestageAck { range: 0 } }]);
    assert!(n.record(1).unwrap().is_marked_old(0));
    n.handle(0, Event::Received { peer: 1, msg: Message::DestageDone { range: 0 } });
    assert!(n.record(1).unwrap().is_clean());
}

#[test]
fn shutdown_hardens_then_persists_records_and_the_clean_flag() {
    let mut n = connected_primary(Mode::Memory);
    n.handle(0, Event::HostWrite { id: 1, offset: 3 * 4096, data: Bytes::from(vec![1u8; 512]), fua: false });
    let a = drain(&mut n);
    assert_eq!(n.shutdown(), Err(AdminError::IsPrimary));
    n.handle(0, Event::Received { peer: 1, msg: Message::ReceiptAck { id: 1 } });
    let a2 = drain(&mut n);
    let [Action::WriteLocal { io, .. }] = a2[..] else { panic!("{a:?} {a2:?}") };
    n.handle(0, Event::IoDone { io, result: Ok(None) });
    drain(&mut n);
    n.demote().unwrap();
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    n.shutdown().unwrap();
    assert_eq!(n.promote(false), Err(AdminError::ShuttingDown));
    let a = drain(&mut n);
    let [Action::Disconnect { peer: 1, reason: Refusal::Down, stand_alone: true }, Action::Harden { io, scope: HardenScope::All }] =
        a[..]
    else {
        panic!("disconnect, then harden: {a:?}")
    };
    assert_eq!(n.conn(1), Some(ConnState::StandAlone));
    assert!(!n.is_down());
    n.handle(0, Event::IoDone { io, result: Ok(None) });
    let a = drain(&mut n);
    let [Action::PersistMeta { io, ref meta }] = a[..] else { panic!("{a:?}") };
    assert!(meta.clean && meta.out_of_sync[3], "{meta:?}");
    n.handle(0, Event::IoDone { io, result: Ok(None) });
    assert!(n.is_down());
}

#[test]
fn after_a_handshake_the_recorded_ranges_get_scanned_even_without_new_writes() {
    let g = geometry();
    let mut n = Node::new(NodeConfig::new(1, vec![0], g, Mode::Memory), Meta::fresh(&g, 7), 1).unwrap();
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    n.handle(0, Event::PeerConnected { peer: 0 });
    let mut primary = report(0, Role::Primary, DiskState::UpToDate, gens(7, &[]), false);
    primary.primary = Some(0);
    n.handle(0, Event::Received { peer: 0, msg: Message::State(primary) });
    n.handle(
        0,
        Event::Received { peer: 0, msg: Message::RecordPage { range: 1, bits: Bytes::from_static(&[0b0101]) } },
    );
    n.handle(0, Event::Received { peer: 0, msg: Message::RecordEnd { tracks: 2 } });
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    assert_eq!(n.conn(0), Some(ConnState::SyncTarget));
    n.handle(1, Event::Timer(Timer::Destage));
    let a = drain(&mut n);
    assert!(a.contains(&Action::Send { peer: 0, msg: Message::DestageStart { range: 1 } }), "{a:?}");
}

#[test]
fn verify_reads_a_busy_track_only_after_its_write_and_reports_a_difference() {
    let mut n = connected_primary(Mode::Memory);
    // A write to track 1 is in flight: the verify reads track 0, then waits.
    n.handle(0, Event::HostWrite { id: 9, offset: 4096, data: Bytes::from(vec![1u8; 512]), fua: false });
    drain(&mut n);
    assert_eq!(n.verify(None, Some((0, 2))), Ok(1));
    let a = drain(&mut n);
    let reads: Vec<(IoId, u64)> = a
        .iter()
        .filter_map(|x| match x {
            Action::ReadLocal { io, offset, .. } => Some((*io, *offset)),
            _ => None,
        })
        .collect();
    assert_eq!(reads.iter().map(|r| r.1).collect::<Vec<_>>(), vec![0], "{a:?}");
    n.handle(0, Event::IoDone { io: reads[0].0, result: Ok(Some(Bytes::from(vec![0u8; 4096]))) });
    let a = drain(&mut n);
    let digest = track_digest(&[0u8; 4096]);
    assert!(a.contains(&Action::Send { peer: 1, msg: Message::VerifyRequest { track: 0, digest } }), "{a:?}");
    n.handle(0, Event::Received { peer: 1, msg: Message::VerifyReply { track: 0, same: false } });
    // The write completes; only then is track 1 read.
    n.handle(0, Event::Received { peer: 1, msg: Message::ReceiptAck { id: 1 } });
    let a = drain(&mut n);
    let Some(Action::WriteLocal { io, .. }) = a.iter().find(|x| matches!(x, Action::WriteLocal { .. })) else {
        panic!("{a:?}")
    };
    assert!(!a.iter().any(|x| matches!(x, Action::ReadLocal { .. })), "track 1 is still being written: {a:?}");
    n.handle(0, Event::IoDone { io: *io, result: Ok(None) });
    let a = drain(&mut n);
    let Some(&Action::ReadLocal { io, offset: 4096, .. }) = a.iter().find(|x| matches!(x, Action::ReadLocal { .. }))
    else {
        panic!("{a:?}")
    };
    n.handle(0, Event::IoDone { io, result: Ok(Some(Bytes::from(vec![1u8; 4096]))) });
    n.handle(0, Event::Received { peer: 1, msg: Message::VerifyReply { track: 1, same: true } });
    let a = drain(&mut n);
    let report = n.status().verify.expect("a verify ran");
    assert_eq!((report.state, report.compared, report.differing), (VerifyState::Finished, 2, vec![0]));
    assert!(n.meta().out_of_sync[0], "the difference survives a crash");
    assert!(
        a.iter().any(|x| matches!(x, Action::Disconnect { peer: 1, reason: Refusal::VerifyDiffers { tracks: 1 }, .. })),
        "the reconnection resyncs it: {a:?}"
    );
    assert!(n.record(1).unwrap().is_marked(0));
}

#[test]
fn verify_is_refused_with_a_reason() {
    let mut n = connected_primary(Mode::Memory);
    assert_eq!(n.verify(Some(2), None), Err(AdminError::NotConnected(2)));
    assert_eq!(n.verify(None, Some((10, 7))), Err(AdminError::TrackRange { first: 10, count: 7, tracks: 16 }));
    assert_eq!(n.verify(None, Some((0, 0))), Err(AdminError::TrackRange { first: 0, count: 0, tracks: 16 }));
    assert_eq!(n.verify(None, None), Ok(1));
    assert_eq!(n.verify(None, None), Err(AdminError::Verifying(1)));
    assert!(n.stop_verify());
    let g = geometry();
    let mut alone = Node::new(NodeConfig::new(0, vec![1], g, Mode::Memory), Meta::fresh(&g, 7), 1).unwrap();
    assert_eq!(alone.verify(None, None), Err(AdminError::NoVerifyPeer));
}

/// A primary in attach mode, connected to peer 1, both in sync.
fn attached_primary(mode: Mode) -> Node {
    let g = geometry();
    let mut cfg = NodeConfig::new(0, vec![1], g, mode);
    cfg.attached = true;
    let mut n = Node::new(cfg, Meta::fresh(&g, 7), 1).unwrap();
    n.start_attached().unwrap();
    assert_eq!(n.role(), Role::Primary);
    assert_eq!(n.generations().history[0], 7, "a new generation descending from the one it had");
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    n.handle(0, Event::PeerConnected { peer: 1 });
    let mut peer = report(1, Role::Secondary, DiskState::UpToDate, Generations::new(7), false);
    peer.mode = mode;
    n.handle(0, Event::Received { peer: 1, msg: Message::State(peer) });
    n.handle(0, Event::Received { peer: 1, msg: Message::RecordEnd { tracks: 0 } });
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    assert!(a.contains(&Action::Send { peer: 1, msg: Message::ResyncEnd { tracks: 0 } }), "{a:?}");
    assert_eq!(n.conn(1), Some(ConnState::Connected));
    n
}

fn no_local_write(a: &[Action]) {
    assert!(!a.iter().any(|x| matches!(x, Action::WriteLocal { .. })), "never written back: {a:?}");
}

#[test]
fn a_write_already_on_the_device_is_shipped_recorded_and_never_written_back() {
    let mut n = attached_primary(Mode::Memory);
    n.handle(0, Event::HostWritten { id: 9, offset: 4096, data: Bytes::from(vec![1u8; 4096]) });
    let a = drain(&mut n);
    assert!(
        matches!(&a[..], [Action::Send { peer: 1, msg: Message::Data { id: 1, offset: 4096, fua: false, .. } }]),
        "{a:?}"
    );
    assert!(n.record(1).unwrap().is_marked(1), "the peer's record holds the track");
    n.handle(0, Event::Received { peer: 1, msg: Message::ReceiptAck { id: 1 } });
    let a = drain(&mut n);
    no_local_write(&a);
    assert_eq!(a, vec![Action::CompleteHost { id: 9, result: Ok(()) }], "memory mode: the peer's receipt is enough");
    assert!(n.record(1).unwrap().is_marked(1), "still recorded until the peer's scan clears it");
    // The range is scanned like any written range, so that the peer can forget the tracks.
    n.handle(1, Event::Timer(Timer::Destage));
    let a = drain(&mut n);
    assert!(a.contains(&Action::Send { peer: 1, msg: Message::DestageStart { range: 0 } }), "{a:?}");
}

#[test]
fn in_disk_mode_a_write_on_the_device_completes_once_the_peer_hardened_it() {
    let mut n = attached_primary(Mode::Disk);
    n.handle(0, Event::HostWritten { id: 9, offset: 0, data: Bytes::from(vec![1u8; 512]) });
    drain(&mut n);
    n.handle(0, Event::Received { peer: 1, msg: Message::ReceiptAck { id: 1 } });
    let a = drain(&mut n);
    no_local_write(&a);
    assert!(a.is_empty(), "the peer has not hardened it yet: {a:?}");
    n.handle(0, Event::Received { peer: 1, msg: Message::HardenedAck { id: 1 } });
    assert_eq!(drain(&mut n), vec![Action::CompleteHost { id: 9, result: Ok(()) }]);
}

#[test]
fn a_write_on_the_device_with_the_peer_absent_goes_into_out_of_sync_first() {
    let mut n = attached_primary(Mode::Memory);
    let before = n.generations().current;
    n.handle(0, Event::PeerLost { peer: 1 });
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    n.handle(0, Event::HostWritten { id: 3, offset: 8192, data: Bytes::from(vec![2u8; 512]) });
    let a = drain(&mut n);
    no_local_write(&a);
    let [Action::PersistMeta { io, ref meta }] = a[..] else { panic!("metadata first: {a:?}") };
    assert_ne!(meta.generations.current, before);
    assert!(meta.out_of_sync[2]);
    n.handle(0, Event::IoDone { io, result: Ok(None) });
    let a = drain(&mut n);
    no_local_write(&a);
    assert_eq!(a, vec![Action::CompleteHost { id: 3, result: Ok(()) }]);
    assert!(n.record(1).unwrap().is_marked(2) && n.meta().out_of_sync[2], "the track stays recorded for the peer");
}

#[test]
fn a_write_on_the_device_held_during_a_handshake_is_replayed_without_a_local_write() {
    let mut n = attached_primary(Mode::Memory);
    n.handle(0, Event::PeerLost { peer: 1 });
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    n.handle(0, Event::PeerConnected { peer: 1 });
    drain(&mut n);
    n.handle(0, Event::HostWritten { id: 5, offset: 0, data: Bytes::from(vec![3u8; 512]) });
    assert!(drain(&mut n).is_empty(), "held while the peer handshakes");
    let mut peer = report(1, Role::Secondary, DiskState::UpToDate, n.generations().clone(), false);
    peer.generations = Generations { current: 7, history: vec![] };
    n.handle(0, Event::Received { peer: 1, msg: Message::State(peer) });
    n.handle(0, Event::Received { peer: 1, msg: Message::RecordEnd { tracks: 0 } });
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    no_local_write(&a);
    assert!(a.iter().any(|x| matches!(x, Action::Send { peer: 1, msg: Message::Data { offset: 0, .. } })), "{a:?}");
}

#[test]
fn an_attached_node_refuses_what_would_write_under_the_application() {
    let mut n = attached_primary(Mode::Memory);
    assert_eq!(n.demote(), Err(AdminError::Attached));
    assert_eq!(n.role(), Role::Primary);
    // Replicated writes from a peer: refused (a primary takes none).
    let data = Message::Data { id: 1, offset: 0, fua: false, payload: Bytes::from(vec![0u8; 512]) };
    n.handle(0, Event::Received { peer: 1, msg: data });
    let a = drain(&mut n);
    no_local_write(&a);
    assert!(matches!(&a[0], Action::Disconnect { peer: 1, reason: Refusal::BothPrimary, stand_alone: true }), "{a:?}");
    // A peer ahead of it would make it a resync target: refused.
    let g = geometry();
    let mut cfg = NodeConfig::new(0, vec![1], g, Mode::Memory);
    cfg.attached = true;
    let mut n = Node::new(cfg, Meta::fresh(&g, 7), 1).unwrap();
    n.start_attached().unwrap();
    let ours = n.generations().clone();
    let a = drain(&mut n);
    persist_all(&mut n, &a);
    n.handle(0, Event::PeerConnected { peer: 1 });
    let mut ahead = report(
        1,
        Role::Secondary,
        DiskState::UpToDate,
        Generations { current: 99, history: vec![ours.current] },
        false,
    );
    ahead.primary = None;
    n.handle(0, Event::Received { peer: 1, msg: Message::State(ahead) });
    n.handle(0, Event::Received { peer: 1, msg: Message::RecordEnd { tracks: 0 } });
    let a = drain(&mut n);
    no_local_write(&a);
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Disconnect { reason: Refusal::PrimaryWouldBeTarget, stand_alone: true, .. })),
        "{a:?}"
    );
    // And a node that is not attached cannot start as one.
    let mut plain = Node::new(NodeConfig::new(0, vec![1], g, Mode::Memory), Meta::fresh(&g, 7), 1).unwrap();
    assert_eq!(plain.start_attached(), Err(AdminError::NotAttached));
}

#[test]
fn an_attached_primary_shuts_down_and_refuses_later_writes() {
    let mut n = attached_primary(Mode::Memory);
    n.handle(0, Event::HostWritten { id: 1, offset: 3 * 4096, data: Bytes::from(vec![1u8; 4096]) });
    drain(&mut n);
    n.shutdown().unwrap();
    n.handle(0, Event::HostWritten { id: 2, offset: 0, data: Bytes::from(vec![1u8; 4096]) });
    let a = drain(&mut n);
    no_local_write(&a);
    assert!(a.contains(&Action::CompleteHost { id: 2, result: Err(HostError::ShuttingDown) }), "{a:?}");
    let mut pending: Vec<Action> = a;
    // Complete every local I/O until the clean flag is durable.
    for _ in 0..10 {
        for x in std::mem::take(&mut pending) {
            match x {
                Action::PersistMeta { io, .. } | Action::Harden { io, .. } => {
                    n.handle(0, Event::IoDone { io, result: Ok(None) })
                }
                _ => {}
            }
        }
        pending = drain(&mut n);
    }
    assert!(n.is_down());
    assert!(n.meta().clean && n.meta().out_of_sync[3], "the unacknowledged track is persisted: {:?}", n.meta());
}
