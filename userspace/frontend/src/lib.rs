//! Block-device frontends: ublk on kernels that have it, a FUSE file + loop device elsewhere.
//!
//! Filled by the daemon and ublk issues.
