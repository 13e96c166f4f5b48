//! Uploads a directory as a new snapshot of a dataset and prints the
//! snapshot id.
//!
//! ```text
//! BITCLONE_ENDPOINT=https://127.0.0.1:7443 BITCLONE_CA=certs/ca.pem BITCLONE_TOKEN_FILE=admin.token \
//!     cargo run -p bitclone-client --example upload -- ./some/dir my-dataset
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context};
use bitclone_client::{Client, ConnectOptions, Progress};

/// Prints a line per 64 MiB sent.
#[derive(Default)]
struct Lines {
    total: AtomicU64,
    done: AtomicU64,
}

impl Progress for Lines {
    fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
        eprintln!("{bytes} bytes to send");
    }

    fn advance(&self, bytes: u64) {
        const STEP: u64 = 64 << 20;
        let before = self.done.fetch_add(bytes, Ordering::Relaxed);
        let after = before + bytes;
        if before / STEP != after / STEP {
            eprintln!(
                "{} / {} MiB",
                after >> 20,
                self.total.load(Ordering::Relaxed) >> 20
            );
        }
    }

    fn message(&self, msg: &str) {
        eprintln!("{msg}");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), Some(dataset)) = (args.next(), args.next()) else {
        bail!("usage: upload DIR DATASET   (node from BITCLONE_ENDPOINT, default https://127.0.0.1:7443; BITCLONE_CA, BITCLONE_TOKEN_FILE)");
    };
    let dir = PathBuf::from(dir);
    let Ok(dataset) = dataset.into_string() else {
        bail!("the dataset name must be valid UTF-8");
    };
    let endpoint =
        std::env::var("BITCLONE_ENDPOINT").unwrap_or_else(|_| "https://127.0.0.1:7443".to_owned());
    let mut options = ConnectOptions::new();
    if let Ok(ca) = std::env::var("BITCLONE_CA") {
        options = options.ca_pem(std::fs::read(&ca).with_context(|| format!("reading {ca}"))?);
    }
    if let Ok(file) = std::env::var("BITCLONE_TOKEN_FILE") {
        options = options
            .token(std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?);
    }

    let client = Client::connect_with([endpoint.as_str()], options)
        .await
        .with_context(|| format!("connecting to {endpoint}"))?;
    let summary = client
        .upload_dir(&dataset, &dir, &Lines::default())
        .await
        .with_context(|| format!("uploading {}", dir.display()))?;

    eprintln!(
        "{} files, {} bytes ({} unchanged files), {} new chunks / {} new bytes, {:.2}s",
        summary.files,
        summary.bytes,
        summary.unchanged_files,
        summary.new_chunks,
        summary.new_bytes,
        summary.seconds
    );
    for skipped in &summary.skipped {
        eprintln!("skipped (not a regular file or directory): {skipped}");
    }
    println!("{}", summary.snapshot);
    Ok(())
}
