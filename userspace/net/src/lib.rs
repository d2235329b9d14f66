//! TCP links between nodes (several per peer), framing on top of `tandem_core::wire`, auth.
//!
//! Filled by the daemon issue.
