//! Where the workspace is.

use std::path::{Path, PathBuf};

/// The workspace root: the parent of this crate's directory.
/// Where cargo puts what it builds: `CARGO_TARGET_DIR` (relative to the workspace root when
/// relative), else `target/` in the workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
