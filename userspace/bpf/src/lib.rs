//! Loader for the eBPF write-recording programs in `ebpf/` and the pinned map layout.
//!
//! Filled by the eBPF issue.
