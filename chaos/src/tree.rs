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

/// A temporary directory on a tmpfs (`/dev/shm`) where the machine has
/// one, else in the default place: trees of hundreds of thousands of files
/// are written and read several times by one test, and a disk's metadata
/// journal would make that minutes of waiting on something not under test.
pub fn tempdir_for_many_files() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("bitclone-test")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}

/// A tree shaped like a training set or a source tree: `files` files of
/// 10 B to 3 KiB in directories of 1000, with a relative symbolic link per
/// 1000 files (one into a sibling directory). Returns the total bytes.
pub fn generate_small_files(root: &Path, seed: u64, files: usize) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut total = 0u64;
    let mut buf = vec![0u8; 3 << 10];
    for i in 0..files {
        let dir = root.join(format!("class{:03}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&dir).unwrap();
            if i > 0 {
                let link = dir.join("previous");
                let target = format!("../class{:03}/img{:07}.bin", i / 1000 - 1, i - 1);
                std::os::unix::fs::symlink(target, link).unwrap();
            }
        }
        let size = rng.random_range(10..3 << 10);
        rng.fill_bytes(&mut buf[..size]);
        std::fs::write(dir.join(format!("img{i:07}.bin")), &buf[..size]).unwrap();
        if i % 1000 == 999 {
            std::os::unix::fs::symlink(format!("img{i:07}.bin"), dir.join("latest")).unwrap();
        }
        total += size as u64;
    }
    total
}

/// Rewrites `edits` of the files `generate_small_files` made (spread over
/// the tree, never a link's target), adds `added` new ones and deletes
/// `deleted`.
pub fn edit_small_files(
    root: &Path,
    seed: u64,
    files: usize,
    edits: usize,
    added: usize,
    deleted: usize,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xed17);
    let path = |i: usize| root.join(format!("class{:03}/img{i:07}.bin", i / 1000));
    // The last file of each 1000 is a link's target.
    let pick = |k: usize, n: usize, offset: usize| {
        let i = (k * files / n.max(1) + offset) % files;
        if i % 1000 == 999 {
            i - 1
        } else {
            i
        }
    };
    for k in 0..edits {
        std::fs::write(path(pick(k, edits, 0)), random_bytes(&mut rng, 100 + k)).unwrap();
    }
    for k in 0..deleted {
        let _ = std::fs::remove_file(path(pick(k, deleted, 500)));
    }
    for k in 0..added {
        let dir = root.join(format!("class{:03}", (k * 7) % files.div_ceil(1000)));
        let name = format!("new{:07}.bin", files + k);
        std::fs::write(dir.join(name), random_bytes(&mut rng, 500)).unwrap();
    }
}

/// path → (BLAKE3 hex, mode) of every regular file, and → ("-> target", 0)
/// of every symbolic link, skipping `skip` prefixes.
pub fn tree_digest(root: &Path, skip: &[&str]) -> BTreeMap<String, (String, u32)> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root) {
        let e = e.unwrap();
        let (link, file) = (e.path_is_symlink(), e.file_type().is_file());
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .to_string();
        if !(link || file) || skip.iter().any(|s| rel.starts_with(s)) {
            continue;
        }
        if link {
            let target = std::fs::read_link(e.path()).unwrap();
            out.insert(rel, (format!("-> {}", target.display()), 0));
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

/// Damages a stored value in place: in every file under `dir` holding
/// `needle`, XORs the byte `offset` into it with `mask`. Returns how many
/// files were changed (run it on a stopped node, whose store is flushed).
pub fn flip_in_files(dir: &Path, needle: &[u8], offset: usize, mask: u8) -> usize {
    let mut flipped = 0;
    for e in walkdir::WalkDir::new(dir) {
        let e = e.unwrap();
        if !e.file_type().is_file() {
            continue;
        }
        let mut bytes = std::fs::read(e.path()).unwrap();
        if let Some(pos) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[pos + offset] ^= mask;
            std::fs::write(e.path(), &bytes).unwrap();
            flipped += 1;
        }
    }
    flipped
}

pub fn file_url(p: &Path) -> String {
    format!("file://{}", p.display())
}
