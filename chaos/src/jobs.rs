//! Clone jobs in a chaos run: a throwaway Garage (S3) and Postgres the
//! nodes write clones to, and what those sinks hold for each job after
//! healing, read the way an operator would (`bitclone restore --list`, a
//! restore drill checked against the catalog, the catalog's rows).

use std::path::{Path, PathBuf};

use crate::env::{bin, clean_command};
use crate::oracle::SinkState;
use crate::run::digest_of;
use crate::servers::{Garage, PgServer};

/// The sinks every job writes to: `sink://s3/<job dataset>` and
/// `sink://pg`.
pub struct JobSinks {
    garage: Garage,
    pg: PgServer,
    /// The node config file declaring both sinks (`BITCLONE_CONFIG`).
    pub config: PathBuf,
    catalog: String,
}

const BUCKET: &str = "chaos";

/// A node config declaring, for every tenant, S3 sinks (`name`,
/// `bucket/prefix`, secret key) on Garage with their keys in the config
/// itself (nodes get no `AWS_*` variables; each tenant under
/// `<prefix>/<tenant>` as by default) and Postgres catalogs (`name`, URL),
/// written to `dir/sinks.toml`; returns its path.
pub fn sinks_config(
    dir: &Path,
    g: &Garage,
    s3: &[(&str, &str, &str)],
    catalogs: &[(&str, &str)],
) -> String {
    let mut toml = String::new();
    for (name, place, secret) in s3 {
        let (bucket, prefix) = place.split_once('/').unwrap_or((place, ""));
        toml += &format!(
            "[sinks.{name}]\ntenants = [\"*\"]\n[sinks.{name}.s3]\nbucket = \"{bucket}\"\n\
             prefix = \"{prefix}\"\nendpoint = \"{}\"\nregion = \"{}\"\n\
             access_key_id = \"{}\"\nsecret_access_key = \"{secret}\"\n",
            g.endpoint(),
            g.region(),
            g.access_key()
        );
    }
    for (name, url) in catalogs {
        toml += &format!(
            "[sinks.{name}]\ntenants = [\"*\"]\n[sinks.{name}.postgres]\nurl = \"{url}\"\n"
        );
    }
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("sinks.toml");
    std::fs::write(&path, toml).unwrap();
    path.to_str().unwrap().to_string()
}

impl JobSinks {
    /// Starts both servers, or says why it cannot (a Garage that is
    /// installed but does not come up panics, with its log).
    pub fn start(dir: &Path) -> Result<JobSinks, String> {
        if !Garage::available() {
            return Err("no garage binary (scripts/install-garage.sh installs it)".into());
        }
        if !PgServer::available() {
            return Err("no Postgres binaries (scripts/install-deps.sh installs them)".into());
        }
        let garage = Garage::start();
        garage.create_bucket(BUCKET);
        let pg = PgServer::try_start()?;
        pg.create_database("catalog");
        let catalog = pg.url("catalog");
        let config = sinks_config(
            dir,
            &garage,
            &[("s3", BUCKET, garage.secret_key())],
            &[("pg", &catalog)],
        )
        .into();
        Ok(JobSinks {
            garage,
            pg,
            config,
            catalog,
        })
    }

    /// Where a job into `dataset` writes.
    pub fn destinations(dataset: &str) -> Vec<String> {
        vec![format!("sink://s3/{dataset}"), "sink://pg".to_string()]
    }

    fn s3_url(dataset: &str) -> String {
        format!("s3://{BUCKET}/default/{dataset}")
    }

    fn restore_cli(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = restore_cli(&self.garage, args);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("restore's JSON: {e}"))
    }

    /// What both sinks hold for job `job`, which succeeded into `dataset`,
    /// committing `snapshot` with content `digest` (a [`digest_of`] of its
    /// source tree).
    pub fn check(
        &self,
        job: &str,
        dataset: &str,
        snapshot: &str,
        digest: &str,
        scratch: &Path,
    ) -> Vec<SinkState> {
        let url = Self::s3_url(dataset);
        // The object store: every commit record under the job's prefix,
        // and its data objects.
        let listed = self.restore_cli(&["--from", &url, "--list"]);
        let records: Vec<serde_json::Value> = listed
            .as_ref()
            .ok()
            .and_then(|v| v["commits"].as_array().cloned())
            .unwrap_or_default();
        let data_objects = listed
            .as_ref()
            .ok()
            .and_then(|v| v["data_objects"].as_u64());
        // The catalog: every snapshot row of the job's dataset.
        let rows: Vec<String> = if is_name(dataset) {
            self.pg
                .try_psql(
                    "catalog",
                    &format!(
                        "SELECT id || ' ' || job FROM bitclone_snapshots \
                         WHERE tenant = 'default' AND dataset = '{dataset}'"
                    ),
                )
                .unwrap_or_default()
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()
        } else {
            Vec::new()
        };
        // A restore drill from both, checked against the catalog, byte for
        // byte against what was put.
        let out = scratch.join(format!("restore-{job}"));
        let restored = self.restore_cli(&[
            "--from",
            &url,
            "--catalog",
            &self.catalog,
            "--snapshot",
            snapshot,
            out.to_str().unwrap_or_default(),
        ]);
        let restored_ok = match &restored {
            Ok(v) => v["job"] == job && digest_of(&out) == digest,
            Err(_) => false,
        };
        let files = restored.as_ref().ok().and_then(|v| v["files"].as_u64());
        let _ = std::fs::remove_dir_all(&out);
        let record_ok =
            records.len() == 1 && records[0]["job"] == job && records[0]["snapshot"] == snapshot;
        let s3_matches =
            record_ok && restored_ok && data_objects.is_some() && data_objects == files;
        let pg_matches = restored_ok && rows == [format!("{snapshot} {job}")];
        vec![
            SinkState {
                job: job.to_string(),
                sink: "s3".into(),
                commits: records.len() as u32,
                matches: listed.is_ok() && s3_matches,
            },
            SinkState {
                job: job.to_string(),
                sink: "pg".into(),
                commits: rows.len() as u32,
                matches: pg_matches,
            },
        ]
    }
}

/// `bitclone --json restore ARGS` as an operator runs it: no node, only
/// the sinks (Garage's keys in the environment), at most 2 minutes.
pub fn restore_cli(g: &Garage, args: &[&str]) -> std::process::Output {
    clean_command("timeout")
        .arg("120")
        .arg(bin())
        .envs(g.env_vars())
        .arg("--json")
        .arg("restore")
        .args(args)
        .output()
        .expect("run bitclone restore")
}

/// A name the harness made (letters, digits, `-`): safe inside SQL quotes.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
