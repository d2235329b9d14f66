//! Tandem's local store: the backing device or file of one volume, driven through io_uring,
//! with the page cache as the volatile cache and hardening on request; and the external
//! metadata file that keeps the node's persisted [`Meta`](tandem_core::node::Meta).
//!
//! The node state machine (`tandem-core`) emits `WriteLocal`, `ReadLocal`, `Harden` and
//! `PersistMeta`; the daemon hands them to [`Store::submit`] (or [`Store::submit_action`])
//! and feeds each [`Completion`] back as `Event::IoDone`. What each completion guarantees
//! is in the [`store`] module's documentation.

mod codec;
mod error;
mod meta_file;
mod ops;
mod ring;
pub mod store;
mod sys;

pub use codec::{DecodeError, MetaHeader};
pub use error::StoreError;
pub use meta_file::{create_md, create_md_with, inspect_md, load_md, LoadedMeta, MetaFile};
pub use ring::MAX_IN_FLIGHT;
pub use store::{Completion, Store, StoreOp, INLINE_WRITE_MAX, MAX_READ};
