//! The README's first command must keep working: the narrated demo checks every claim it
//! prints, in both modes.

use tandem_core::Mode;

#[test]
fn the_demo_passes_in_memory_mode() {
    tandem_sim::demo::run(Mode::Memory).unwrap();
}

#[test]
fn the_demo_passes_in_disk_mode() {
    tandem_sim::demo::run(Mode::Disk).unwrap();
}
