//! A fixed budget of seeds that must pass, plus every seed that once found a bug.
//! (`cargo xtask test` also runs 2,000 two-node and 500 three-node seeds through the
//! release binary; these overlap the first 200.)

use tandem_sim::{config_for_seed, run};

fn check(seed: u64) {
    if let Err(failure) = run(seed, &config_for_seed(seed, 2, 300)) {
        panic!("{failure}");
    }
}

/// Seeds that exposed bugs while the protocol was built (see the closing notes): the
/// primary's scan finishing before a receipt it waited on (26), resync copies cleared by a
/// target's scan (210), a resync that was not full after both nodes crashed (11), two
/// promotions racing (299), a promoted sync target (401), a failed disk that never came
/// back (653), blank replicas deadlocking (911), and the disk model's own stale harden (92).
#[test]
fn regression_seeds() {
    for seed in [11, 26, 44, 92, 210, 299, 401, 653, 821, 911, 1739, 1852, 2404] {
        check(seed);
    }
}

#[test]
fn first_two_hundred_seeds() {
    for seed in 1..=200 {
        check(seed);
    }
}

fn check_three(seed: u64) {
    let mut cfg = config_for_seed(seed, 3, 300);
    cfg.faults = tandem_sim::FaultClass::Single;
    if let Err(failure) = run(seed, &cfg) {
        panic!("{failure}");
    }
}

/// Three nodes, one failure at a time; 18, 30, 102 and 126 found bugs in the 3-node rules
/// (a write issued after the link dropped, an operator forcing a stale replica, a
/// generation not started when a second peer left).
#[test]
fn three_nodes_through_single_failures() {
    for seed in (1..=60).chain([18, 30, 102, 126]) {
        check_three(seed);
    }
}
