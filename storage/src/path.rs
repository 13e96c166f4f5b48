//! Validation of the relative paths stored in manifests and of resource names.

use crate::error::{Error, Result};

/// Longest path accepted in a manifest, in bytes (Linux's PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;

/// Checks that `path` is a safe relative path: `/`-separated, non-empty
/// components, no `.` or `..`, no leading `/`, no NUL, no backslash (which
/// other systems treat as a separator). Joining such a path under a directory
/// can never leave that directory.
pub fn validate_path(path: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidPath {
            path: path.to_string(),
            reason,
        })
    };
    if path.is_empty() {
        return bad("empty path");
    }
    if path.len() > MAX_PATH_BYTES {
        return bad("longer than 4096 bytes");
    }
    if path.contains('\0') {
        return bad("contains NUL");
    }
    if path.contains('\\') {
        return bad("contains a backslash");
    }
    if path.starts_with('/') {
        return bad("absolute path");
    }
    for component in path.split('/') {
        match component {
            "" => return bad("empty component (`//` or trailing `/`)"),
            "." => return bad("`.` component"),
            ".." => return bad("`..` component"),
            _ => {}
        }
    }
    Ok(())
}

/// Checks the target of the symbolic link at `path` (a path already checked
/// by [`validate_path`]): relative, no NUL, at most 4096 bytes, and never
/// leading out of the snapshot's root when resolved from the link's
/// directory. A restore can then create the link without it pointing
/// anywhere outside the directory restored into.
pub fn validate_symlink(path: &str, target: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidPath {
            path: format!("{path} -> {target}"),
            reason,
        })
    };
    if target.is_empty() {
        return bad("symbolic link with an empty target");
    }
    if target.len() > MAX_PATH_BYTES {
        return bad("symbolic link target longer than 4096 bytes");
    }
    if target.contains('\0') {
        return bad("symbolic link target contains NUL");
    }
    if target.starts_with('/') {
        return bad("symbolic link to an absolute path (it would point outside the restored tree)");
    }
    // `..` only as a prefix, and no more of them than the link's own depth:
    // the target climbs to a real directory of the tree (a restore makes
    // every parent a directory), then only descends. A `..` after a name
    // could climb out through another link (`x/d -> ..`, `l -> x/d/..`).
    let depth = path.split('/').count() - 1;
    let mut ups = 0;
    let mut descended = false;
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." if descended => {
                return bad("`..` after a name in a symbolic link target (it could climb out through another link)");
            }
            ".." => {
                ups += 1;
                if ups > depth {
                    return bad("symbolic link target leads outside the snapshot's root");
                }
            }
            _ => descended = true,
        }
    }
    Ok(())
}

/// Checks a tenant or dataset name: 1–128 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn validate_name(kind: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{kind} name {name:?} must be 1-128 characters of A-Z a-z 0-9 . _ - and not start with '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_relative_paths() {
        for p in ["a", "a/b.txt", "dir/sub dir/ü.bin", "..a/b..", ".hidden/x"] {
            assert!(validate_path(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn refuses_traversal_and_odd_paths() {
        for p in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../b",
            "a/..",
            "./a",
            "a//b",
            "a/",
            "a\0b",
            "a\\..\\b",
        ] {
            assert!(
                matches!(validate_path(p), Err(Error::InvalidPath { .. })),
                "{p:?} should be refused"
            );
        }
        assert!(validate_path(&"a".repeat(5000)).is_err());
    }

    #[test]
    fn symlink_targets_stay_inside_the_root() {
        for (p, t) in [
            ("a", "b"),
            ("d/link", "../b"),
            ("d/e/link", "../../b/c"),
            ("models/m/snap/f", "../../blobs/abc"),
            ("x/d", ".."),
        ] {
            assert!(validate_symlink(p, t).is_ok(), "{p} -> {t}");
        }
        for (p, t) in [
            ("a", "../b"),
            ("d/link", "../../b"),
            ("d/link", "/etc/passwd"),
            ("d/link", ""),
            ("d/link", "x/../../.."),
            ("d/link", "a\0b"),
            ("d/link", "./x/../y"),
            // Out through another link: `x/d -> ..` is the root, so this
            // would be the root's parent.
            ("l", "x/d/.."),
        ] {
            assert!(
                matches!(validate_symlink(p, t), Err(Error::InvalidPath { .. })),
                "{p} -> {t} should be refused"
            );
        }
    }

    #[test]
    fn names() {
        assert!(validate_name("dataset", "my-data_1.v2").is_ok());
        for n in ["", ".x", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_name("dataset", n).is_err(), "{n:?}");
        }
    }
}
