//! The `tandem` daemon and CLI. Filled by the daemon issue; the protocol it runs is
//! `tandem-core`.
