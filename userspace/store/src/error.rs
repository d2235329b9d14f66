//! The store's errors. Every variant names the file or device it is about, because an
//! operator reads these on a console where several volumes and devices are in play.

use crate::codec::DecodeError;
use std::io;
use std::path::PathBuf;
use tandem_core::node::IoId;
use tandem_core::types::NodeId;
use tandem_core::GeometryError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("io_uring is unavailable: {reason} ({source})")]
    IoUringUnavailable {
        reason: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("this kernel's io_uring lacks the {op} operation the store needs (Linux 5.6 or later has it)")]
    IoUringOpcode { op: &'static str },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is a {kind}, not a regular file or a block device")]
    NotFileOrBlockDevice { path: PathBuf, kind: &'static str },
    #[error(
        "backing {kind} {path} holds {size} bytes, less than the volume's {volume_size} bytes \
         ({missing} bytes short); the store never grows or shrinks it: give it the volume's size \
         or configure a smaller volume"
    )]
    BackingTooSmall { path: PathBuf, kind: &'static str, size: u64, volume_size: u64, missing: u64 },
    #[error("{path} is in use: {why}")]
    InUse { path: PathBuf, why: &'static str },
    #[error(
        "{path} already holds valid metadata of volume {volume_uuid:032x} (node {node}, {volume_size} \
         bytes); refusing to overwrite it without force"
    )]
    MetaExists { path: PathBuf, volume_uuid: u128, node: NodeId, volume_size: u64 },
    #[error("{path} holds {what}; refusing to overwrite it without force")]
    ExistingContent { path: PathBuf, what: String },
    #[error("metadata device {path} holds {size} bytes, the metadata needs {need}")]
    MetaDeviceTooSmall { path: PathBuf, size: u64, need: u64 },
    #[error("metadata {path}: {source}")]
    Meta {
        path: PathBuf,
        #[source]
        source: DecodeError,
    },
    #[error("metadata {path}: neither slot holds valid metadata (slot 0: {slot0}; slot 1: {slot1})")]
    NoValidSlot { path: PathBuf, slot0: DecodeError, slot1: DecodeError },
    #[error("metadata {path} belongs to {what} {stored}, but this volume has {expected}")]
    Mismatch { path: PathBuf, what: &'static str, stored: String, expected: String },
    #[error("metadata of {need} bytes does not fit the {slot_size}-byte slots of {path}")]
    MetaTooLarge { path: PathBuf, need: u64, slot_size: u64 },
    #[error("I/O {io}: invalid {op}: {source}")]
    InvalidExtent {
        io: IoId,
        op: &'static str,
        #[source]
        source: GeometryError,
    },
    #[error("I/O {io}: a read of {len} bytes is larger than the store buffers at once ({max} bytes)")]
    ReadTooLarge { io: IoId, len: u64, max: u64 },
    #[error("I/O {io}: metadata records {stored} tracks, the volume has {expected}")]
    MetaTracks { io: IoId, stored: u64, expected: u64 },
    #[error("I/O {io}: this store has no metadata file (open it with Store::open_with_meta)")]
    NoMetadata { io: IoId },
    #[error("not a store operation: {0}")]
    NotAStoreAction(&'static str),
    #[error("the store is closed: its ring thread has exited")]
    Closed,
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io { op, path: path.into(), source }
    }
}
