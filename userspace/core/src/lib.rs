//! Sans-IO core of Tandem.
//!
//! Geometry, dirty-track bitmaps and their toggling, the wire codec and the replication
//! state machines. Nothing here does I/O: the state machines take events (host I/O,
//! messages, I/O completions, timers) and return actions for the edges to carry out, which
//! is what lets the simulator in `tandem-sim` drive them through thousands of seeded
//! crash and partition schedules.

pub mod bitmap;
pub mod geometry;
pub mod layout;
pub mod node;
pub mod toggle;
pub mod types;
pub mod wire;

pub use geometry::{Extent, Geometry, GeometryError, RangeId, TrackId, TrackSpan};
pub use types::*;
