//! Backing device/file through io_uring, volatile cache and hardening, on-disk metadata.
//!
//! Filled by the daemon issue; the protocol it serves lives in `tandem-core`.
