//! The simulator must be able to fail: each test breaks one rule of the protocol on purpose
//! and asserts that a bounded number of seeds finds it, naming the right invariant.

use tandem_core::node::PlantedBugs;
use tandem_sim::{config_for_seed, run, Failure};

/// Seeds tried before giving up; each bug below is caught well inside this.
const BUDGET: u64 = 300;

/// What an observer of the data sees: lost acknowledged writes (1), replicas that differ
/// after resync (2/3) or that an online verify finds differing while connected (3), and
/// writes apart that survive a reconnection undetected (5).
const BLACK_BOX: &[&str] = &["1", "2/3", "3", "5"];

fn first_failure(bugs: PlantedBugs, live_record_check: bool) -> Option<Failure> {
    (1..=BUDGET).find_map(|seed| {
        let mut cfg = config_for_seed(seed, 2, 300);
        cfg.bugs = bugs;
        cfg.live_record_check = live_record_check;
        run(seed, &cfg).err()
    })
}

fn assert_caught(bugs: PlantedBugs, invariants: &[&str]) {
    assert_caught_with(bugs, true, invariants)
}

fn assert_caught_with(bugs: PlantedBugs, live_record_check: bool, invariants: &[&str]) {
    let failure =
        first_failure(bugs, live_record_check).unwrap_or_else(|| panic!("{bugs:?} went unnoticed for {BUDGET} seeds"));
    assert!(
        invariants.iter().any(|i| failure.invariant.starts_with(i)),
        "{bugs:?} was caught, but as invariant {}:\n{failure}",
        failure.invariant
    );
    eprintln!("{bugs:?} caught by seed {}: invariant {}", failure.seed, failure.invariant);
}

#[test]
fn writing_locally_before_the_peer_records_is_caught() {
    assert_caught(PlantedBugs { write_before_record: true, ..Default::default() }, &["2"]);
}

#[test]
fn clearing_old_on_destage_start_is_caught() {
    assert_caught(PlantedBugs { clear_old_on_start: true, ..Default::default() }, &["1", "2"]);
}

#[test]
fn hardening_without_draining_is_caught() {
    // A record cleared too early also hides writes made apart, which a later reconnection
    // then fails to refuse (5).
    assert_caught(PlantedBugs { skip_destage_drain: true, ..Default::default() }, &["1", "2", "5"]);
}

#[test]
fn verifying_without_holding_racing_writes_is_caught() {
    assert_caught(PlantedBugs { verify_without_hold: true, ..Default::default() }, &["3"]);
}

/// Without the white-box probe, the same bugs still show up from outside: an acknowledged
/// write lost (1), replicas that differ after resync (2/3), or writes the other node never
/// saw surviving a failover undetected (5).
#[test]
fn black_box_checks_alone_catch_early_clearing() {
    assert_caught_with(PlantedBugs { clear_old_on_start: true, ..Default::default() }, false, BLACK_BOX);
}

#[test]
fn black_box_checks_alone_catch_writing_before_recording() {
    assert_caught_with(PlantedBugs { write_before_record: true, ..Default::default() }, false, BLACK_BOX);
}

#[test]
fn black_box_checks_alone_catch_hardening_without_draining() {
    assert_caught_with(PlantedBugs { skip_destage_drain: true, ..Default::default() }, false, BLACK_BOX);
}
