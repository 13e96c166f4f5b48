//! The free-space reserve on the node's disks: below it, writes of data
//! (puts, job ingests, chunks replicated here) are refused before anything
//! is written, while reads go on and Raft keeps the headroom it needs to
//! apply and to step down. Checked on every write request, so a node takes
//! writes again as soon as space comes back, without a restart.

use std::path::PathBuf;

/// Where the node writes and how much must stay free there.
#[derive(Debug, Clone)]
pub struct Space {
    /// The data dir and the directories under it that may be mounts of
    /// their own (the store, the Raft log).
    pub dirs: Vec<PathBuf>,
    pub reserve: u64,
}

impl Space {
    pub fn new(data_dir: &std::path::Path, reserve: u64) -> Space {
        Space {
            dirs: vec![
                data_dir.to_path_buf(),
                data_dir.join("db"),
                data_dir.join("raft"),
            ],
            reserve,
        }
    }

    /// The least free space among the node's directories that exist.
    pub fn free(&self) -> Option<u64> {
        self.dirs.iter().filter_map(|d| free_bytes(d)).min()
    }

    /// Refuses a data write when free space is below the reserve.
    pub fn check(&self, node: u64) -> Result<(), String> {
        match self.free() {
            Some(free) if free < self.reserve => Err(below_reserve(node, free, self.reserve)),
            _ => Ok(()),
        }
    }
}

/// The refusal's words, also what `/readyz` says.
pub fn below_reserve(node: u64, free: u64, reserve: u64) -> String {
    format!(
        "node {node}: its disk is below the free-space reserve ({} MiB free, {} MiB kept free); \
         writes resume once space is freed",
        free >> 20,
        reserve >> 20
    )
}

/// Free bytes for unprivileged writers on the file system holding `path`.
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_the_reserve_writes_are_refused_with_the_figures() {
        let tmp = tempfile::tempdir().unwrap();
        let open = Space::new(tmp.path(), 0);
        assert!(open.free().unwrap() > 0);
        assert_eq!(open.check(1), Ok(()));
        let full = Space::new(tmp.path(), u64::MAX);
        let e = full.check(3).unwrap_err();
        assert!(e.contains("node 3") && e.contains("reserve"), "{e}");
        // Missing directories (no separate store mount) are skipped.
        let none = Space::new(&tmp.path().join("nope"), u64::MAX);
        assert_eq!(none.free(), None);
        assert_eq!(none.check(1), Ok(()));
    }
}
