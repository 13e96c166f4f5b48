//! A scrubbed environment for the processes a test starts, the `bitclone`
//! binary under test, and seeds of randomised tests.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The `bitclone` binary under test: `BITCLONE_BIN` when set, else the one
/// cargo built next to the running test or bench (`target/<profile>/`).
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(b) = std::env::var_os("BITCLONE_BIN") {
            return PathBuf::from(b);
        }
        let exe = std::env::current_exe().expect("the path of the running test");
        let mut dir = exe.parent().expect("the test's directory").to_path_buf();
        // Tests run from target/<profile>/deps, benches from target/<profile>.
        if dir.ends_with("deps") {
            dir.pop();
        }
        let b = dir.join("bitclone");
        assert!(
            b.is_file(),
            "{} not found: build it (cargo build --workspace) or set BITCLONE_BIN",
            b.display()
        );
        b
    })
}

/// A command with none of the ambient variables a test must not inherit.
pub fn clean_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("BITCLONE_")
            || k.starts_with("AWS_")
            || k.starts_with("PG")
            || k == "RUST_LOG"
            || k == "XDG_CACHE_HOME"
        {
            cmd.env_remove(&k);
        }
    }
    cmd.env("RUST_LOG", "info");
    cmd
}

/// The seed of a randomised test: `BITCLONE_TEST_SEED` to replay, else random.
pub fn seed() -> u64 {
    let seed = std::env::var("BITCLONE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (replay with BITCLONE_TEST_SEED={seed})");
    seed
}

/// Makes (or extends) a dev CA and certificates for nodes 1..=`nodes` in
/// `dir` with `bitclone certs dev`.
pub fn dev_certs(bin: &Path, dir: &Path, nodes: u64) {
    dev_certs_with(bin, dir, nodes, &[])
}

/// [`dev_certs`] with more names on every node certificate (`--san`).
pub fn dev_certs_with(bin: &Path, dir: &Path, nodes: u64, sans: &[String]) {
    let mut cmd = clean_command(bin);
    cmd.args(["certs", "dev", "--out"])
        .arg(dir)
        .args(["--nodes", &nodes.to_string()]);
    for s in sans {
        cmd.args(["--san", s]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "bitclone certs dev: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
