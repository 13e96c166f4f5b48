//! Where `file://` sources and sinks may be: only under directories the
//! operator allows, and never overlapping the node's own data dir,
//! certificates, config or key files. Paths are compared after symbolic
//! links are resolved, so a link inside a root cannot lead out of it.

use std::path::{Component, Path, PathBuf};

use bitclone_storage::sink::{Destination, Location, Source};

/// The operator's `file://` policy.
#[derive(Debug, Clone, Default)]
pub struct FileRoots {
    /// Directories `file://` sources and sinks may be in (none: refused).
    pub roots: Vec<PathBuf>,
    /// What no source or sink may be in or contain.
    pub protected: Vec<PathBuf>,
    /// Each tenant only under `<root>/<tenant>` of each root, so tenants
    /// cannot read or mirror over each other's directories.
    pub per_tenant: bool,
}

/// A refused `file://` path, with the reason for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// `path` with symbolic links resolved; a path that does not exist yet (a
/// sink directory to be made) through its nearest existing ancestor.
fn resolved(path: &Path) -> std::io::Result<PathBuf> {
    let mut rest = Vec::new();
    let mut cur = path;
    loop {
        match cur.canonicalize() {
            Ok(mut c) => {
                for part in rest.iter().rev() {
                    c.push(part);
                }
                return Ok(c);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (cur.parent(), cur.file_name()) else {
                    return Err(e);
                };
                rest.push(name.to_os_string());
                cur = parent;
            }
            Err(e) => return Err(e),
        }
    }
}

fn overlap(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

impl FileRoots {
    /// Checks one `file://` path of `tenant` (`what` names it in the
    /// refusal).
    pub fn check(&self, tenant: &str, path: &Path, what: &str) -> Result<(), Refused> {
        let shown = path.display();
        if !path.is_absolute()
            || path
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(Refused(format!(
                "{what} file://{shown} is not a plain absolute path"
            )));
        }
        if self.roots.is_empty() {
            return Err(Refused(format!(
                "{what} file://{shown}: this node allows no file:// sources or sinks \
                 (the operator lists the directories they may use in files.roots)"
            )));
        }
        let real = resolved(path).map_err(|e| Refused(format!("{what} file://{shown}: {e}")))?;
        let inside = self
            .roots
            .iter()
            .map(|r| {
                if self.per_tenant {
                    r.join(tenant)
                } else {
                    r.clone()
                }
            })
            .filter_map(|r| resolved(&r).ok())
            .any(|r| real.starts_with(&r));
        if !inside {
            let mine = if self.per_tenant {
                format!(" for tenant {tenant} (files.roots, each root's {tenant}/)")
            } else {
                " (files.roots)".to_string()
            };
            return Err(Refused(format!(
                "{what} file://{shown} is outside the directories this node allows{mine}{}",
                if real.as_path() != path {
                    format!("; it leads to {}", real.display())
                } else {
                    String::new()
                }
            )));
        }
        for p in &self.protected {
            let p = resolved(p).unwrap_or_else(|_| p.clone());
            if overlap(&real, &p) {
                return Err(Refused(format!(
                    "{what} file://{shown} overlaps the node's own files ({})",
                    p.display()
                )));
            }
        }
        Ok(())
    }

    /// Checks every `file://` path of a job.
    pub fn check_job(
        &self,
        tenant: &str,
        source: &Source,
        destinations: &[Destination],
    ) -> Result<(), Refused> {
        if let Source::Dir { path } = source {
            self.check(tenant, path, "source")?;
        }
        destinations
            .iter()
            .try_for_each(|d| self.check_destination(tenant, d))
    }

    /// Checks a destination's path, if it is a `file://` one.
    pub fn check_destination(&self, tenant: &str, d: &Destination) -> Result<(), Refused> {
        match d {
            Destination::Objects {
                location: Location::Dir { path },
                ..
            } => self.check(tenant, path, "destination"),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_under_roots_never_over_the_nodes_own_files_and_not_through_links() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().canonicalize().unwrap();
        let root = t.join("root");
        let data = root.join("node");
        std::fs::create_dir_all(data.join("certs")).unwrap();
        std::fs::create_dir_all(root.join("src")).unwrap();
        std::fs::create_dir_all(t.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(t.join("elsewhere"), root.join("exit")).unwrap();
        std::os::unix::fs::symlink(data.join("certs"), root.join("keys")).unwrap();
        let f = FileRoots {
            roots: vec![root.clone()],
            protected: vec![data.clone()],
            per_tenant: false,
        };
        assert_eq!(f.check("t", &root.join("src"), "source"), Ok(()));
        // A sink directory not made yet.
        assert_eq!(f.check("t", &root.join("out/a/b"), "destination"), Ok(()));
        let refused = |p: &Path| f.check("t", p, "source").unwrap_err().0;
        assert!(refused(&t.join("elsewhere")).contains("outside"));
        assert!(refused(&data.join("certs")).contains("overlaps"));
        // A directory holding the data dir: a mirror there would delete it.
        assert!(refused(&root).contains("overlaps"));
        assert!(refused(&root.join("exit")).contains("leads to"));
        assert!(refused(&root.join("exit/new")).contains("outside"));
        assert!(refused(&root.join("keys")).contains("overlaps"));
        assert!(refused(Path::new("relative")).contains("absolute"));
        let none = FileRoots::default();
        assert!(none
            .check("t", &root.join("src"), "source")
            .unwrap_err()
            .0
            .contains("files.roots"));
        // Per tenant: a's paths under root/a only; b cannot reach them.
        let each = FileRoots {
            per_tenant: true,
            ..f.clone()
        };
        assert_eq!(each.check("a", &root.join("a/out"), "destination"), Ok(()));
        let e = each
            .check("b", &root.join("a/out"), "destination")
            .unwrap_err()
            .0;
        assert!(e.contains("for tenant b"), "{e}");
        assert!(each.check("a", &root.join("src"), "source").is_err());
        // A link inside a's directory leading to b's is resolved first.
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(root.join("b/secret")).unwrap();
        std::os::unix::fs::symlink(root.join("b/secret"), root.join("a/peek")).unwrap();
        assert!(each.check("a", &root.join("a/peek"), "source").is_err());
    }
}
