//! Generated trees and their comparison by BLAKE3 and mode.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rand::{Rng, RngCore, SeedableRng};

pub fn random_bytes(rng: &mut impl RngCore, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Writes a tree of `files` files, sizes from 0 bytes to tens of MiB, in
/// nested directories, with assorted modes (and one empty directory).
/// Returns the total bytes.
pub fn generate_tree(root: &Path, seed: u64, files: usize, big_files: usize) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut total = 0u64;
    std::fs::create_dir_all(root.join("empty/dir")).unwrap();
    for i in 0..files {
        let dir = root.join(format!("d{}/s{}", i % 7, i % 3));
        std::fs::create_dir_all(&dir).unwrap();
        let size = if i < big_files {
            rng.random_range(20 << 20..30 << 20)
        } else if i % 50 == 0 {
            0
        } else if i % 10 == 0 {
            rng.random_range(1 << 20..5 << 20)
        } else {
            rng.random_range(1..64 << 10)
        };
        let path = dir.join(format!("f{i}.bin"));
        std::fs::write(&path, random_bytes(&mut rng, size)).unwrap();
        let mode = [0o644, 0o600, 0o755, 0o640][i % 4];
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        total += size as u64;
    }
    total
}

/// path → (BLAKE3 hex, mode) of every regular file, skipping `skip` prefixes.
pub fn tree_digest(root: &Path, skip: &[&str]) -> BTreeMap<String, (String, u32)> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root) {
        let e = e.unwrap();
        if !e.file_type().is_file() {
            continue;
        }
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .to_string();
        if skip.iter().any(|s| rel.starts_with(s)) {
            continue;
        }
        let data = std::fs::read(e.path()).unwrap();
        let mode = e.metadata().unwrap().permissions().mode() & 0o7777;
        out.insert(rel, (blake3::hash(&data).to_hex().to_string(), mode));
    }
    out
}

/// Asserts two trees hold the same files with the same bytes (and modes if asked).
pub fn assert_same_tree(a: &Path, b: &Path, modes: bool, skip: &[&str]) {
    let da = tree_digest(a, skip);
    let db = tree_digest(b, skip);
    assert_eq!(
        da.keys().collect::<Vec<_>>(),
        db.keys().collect::<Vec<_>>(),
        "different file sets"
    );
    for (path, (hash, mode)) in &da {
        let (h2, m2) = &db[path];
        assert_eq!(hash, h2, "{path}: contents differ");
        if modes {
            assert_eq!(mode, m2, "{path}: mode differs");
        }
    }
}

pub fn file_url(p: &Path) -> String {
    format!("file://{}", p.display())
}
