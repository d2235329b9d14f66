//! Online verify against damage the protocol cannot see: found exactly, repaired by the
//! resync that follows, under write load, for many seeds (different timings).

use tandem_core::Mode;
use tandem_sim::scenarios::verify_finds_and_repairs_rot;

#[test]
fn verify_finds_exactly_the_rotten_track_and_the_resync_repairs_it() {
    for mode in [Mode::Memory, Mode::Disk] {
        for seed in 1..=40 {
            if let Err(e) = verify_finds_and_repairs_rot(seed, mode) {
                panic!("seed {seed}, {mode:?} mode: {e}");
            }
        }
    }
}
