//! A data dir of the previous release: a standalone node kept its dataset
//! heads, snapshot records and jobs in its own RocksDB. On first start they
//! move into the cluster state (one Raft command, applied idempotently),
//! then leave the store.

use anyhow::Context;
use bitclone_raft::job::{Destination, Job};
use bitclone_raft::state::{Command, DatasetHead, Response, SnapshotEntry};
use bitclone_raft::NodeId;
use bitclone_storage::LegacyMetadata;

use crate::node::Node;

/// Moves the previous release's records into the cluster state, if any.
pub async fn legacy(node: &Node) -> anyhow::Result<()> {
    let store = node.store.clone();
    let legacy = node.pool.run(move || store.legacy_metadata()).await?;
    let plan = plan(&legacy, node.cluster.id);
    if plan.datasets.is_empty() && plan.jobs.is_empty() {
        // Nothing left but records kept because they could not be read.
        return Ok(());
    }
    for (key, why) in &plan.unreadable {
        tracing::error!(key, error = %why, "a record of the previous release is unreadable; it stays in the store and is not migrated");
    }
    // The cluster's own datasets and jobs win over the old node's.
    let clashes: Vec<String> = node
        .read(|s| {
            plan.datasets
                .iter()
                .filter(|(t, d, _)| s.datasets.get(t).is_some_and(|m| m.contains_key(d)))
                .map(|(t, d, _)| format!("{t}/{d}"))
                .collect()
        })
        .await?;
    if !clashes.is_empty() {
        tracing::warn!(
            datasets = clashes.join(", "),
            "the cluster already has datasets of these names; the previous release's are not imported over them"
        );
    }
    let (datasets, jobs) = (plan.datasets.len(), plan.jobs.len());
    for cmd in batches(plan.datasets, plan.jobs) {
        let r = node
            .cluster
            .write(cmd)
            .await
            .context("writing the import to the cluster")?;
        if let Response::Err(e) = r {
            anyhow::bail!("the cluster refused the import: {e}");
        }
    }
    // Only once the cluster holds them: a crash before this imports again,
    // which changes nothing already imported.
    let store = node.store.clone();
    let keep: Vec<String> = plan.unreadable.iter().map(|(k, _)| k.clone()).collect();
    node.pool
        .run(move || store.drop_legacy_metadata(&keep))
        .await?;
    tracing::info!(
        datasets,
        jobs,
        unreadable = plan.unreadable.len(),
        "moved the previous release's datasets and jobs into the cluster state"
    );
    Ok(())
}

/// Snapshot entries one import command carries at most: a Raft entry
/// (and the AppendEntries message that sends it to a new member) stays a
/// few MiB however long the old node's history was.
const ENTRIES_PER_IMPORT: usize = 10_000;

/// Splits the import into commands of at most [`ENTRIES_PER_IMPORT`]
/// snapshot entries and jobs (a dataset with a longer history goes alone).
/// Each applies on its own; together they make the whole import.
pub fn batches(datasets: Vec<(String, String, DatasetHead)>, jobs: Vec<Job>) -> Vec<Command> {
    let mut out = Vec::new();
    let mut batch = Vec::new();
    let mut size = 0;
    for d in datasets {
        let n = d.2.history.len().max(1);
        if size + n > ENTRIES_PER_IMPORT && !batch.is_empty() {
            out.push(Command::ImportLegacy {
                datasets: std::mem::take(&mut batch),
                jobs: Vec::new(),
            });
            size = 0;
        }
        size += n;
        batch.push(d);
    }
    if !batch.is_empty() {
        out.push(Command::ImportLegacy {
            datasets: batch,
            jobs: Vec::new(),
        });
    }
    let mut jobs = jobs.into_iter().peekable();
    while jobs.peek().is_some() {
        out.push(Command::ImportLegacy {
            datasets: Vec::new(),
            jobs: jobs.by_ref().take(ENTRIES_PER_IMPORT).collect(),
        });
    }
    out
}

/// What the import writes.
#[derive(Debug, Default)]
pub struct Plan {
    /// (tenant, dataset, head with its history).
    pub datasets: Vec<(String, String, DatasetHead)>,
    pub jobs: Vec<Job>,
    /// Records that do not decode: (key, reason).
    pub unreadable: Vec<(String, String)>,
}

/// Turns the previous release's records into the import. `me` wrote every
/// snapshot (the store was this node's alone).
pub fn plan(legacy: &LegacyMetadata, me: NodeId) -> Plan {
    let mut plan = Plan::default();
    for h in &legacy.heads {
        // The records come in key order: by time within a dataset.
        let history: Vec<SnapshotEntry> = legacy
            .snapshots
            .iter()
            .filter(|(t, r)| *t == h.tenant && r.dataset == h.dataset)
            .map(|(_, r)| SnapshotEntry {
                id: r.id.clone(),
                parent: r.parent.clone(),
                files: r.files,
                bytes: r.bytes,
                created_unix_ms: r.created_unix_ms,
                written_by: me,
            })
            .collect();
        let head = h.head.to_hex();
        let updated = history
            .iter()
            .find(|e| e.id == head)
            .map(|e| e.created_unix_ms)
            .unwrap_or_default();
        plan.datasets.push((
            h.tenant.clone(),
            h.dataset.clone(),
            DatasetHead {
                snapshot: head,
                updated_unix_ms: updated,
                history,
            },
        ));
    }
    for (key, value) in &legacy.records {
        if !key.starts_with("job/") {
            plan.unreadable
                .push((key.clone(), "not a job record".into()));
            continue;
        }
        match serde_json::from_slice::<Job>(value) {
            Ok(mut j) => {
                // A catalog URL of that release may hold a password: none
                // goes into the Raft log. Such a job no longer runs (sinks
                // are declared now); its listing keeps hosts and database.
                for d in &mut j.destinations {
                    if let Destination::Catalog { url } = d {
                        *url = bitclone_storage::sink::catalog::public_url(url);
                    }
                }
                plan.jobs.push(j)
            }
            Err(e) => plan.unreadable.push((key.clone(), e.to_string())),
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitclone_storage::{LegacyHead, SnapshotId, SnapshotRecord};

    fn record(dataset: &str, id: &SnapshotId, parent: &str, ms: i64) -> SnapshotRecord {
        SnapshotRecord {
            id: id.to_hex(),
            dataset: dataset.into(),
            parent: parent.into(),
            files: 2,
            bytes: 20,
            created_unix_ms: ms,
        }
    }

    /// A job as the previous release stored it (source and destinations as
    /// URLs).
    fn old_job(job: &Job) -> serde_json::Value {
        let mut v = serde_json::to_value(job).unwrap();
        v["id"] = "j2".into();
        v["source"] = job.source.display().into();
        v["destinations"] = job
            .destinations
            .iter()
            .map(|d| d.display())
            .collect::<Vec<_>>()
            .into();
        v
    }

    #[test]
    fn a_long_history_is_imported_in_bounded_commands() {
        let head = |n: usize| DatasetHead {
            snapshot: String::new(),
            updated_unix_ms: 0,
            history: (0..n)
                .map(|i| SnapshotEntry {
                    id: i.to_string(),
                    parent: String::new(),
                    files: 0,
                    bytes: 0,
                    created_unix_ms: 0,
                    written_by: 1,
                })
                .collect(),
        };
        let ds = |name: &str, n| ("t".to_string(), name.to_string(), head(n));
        let job = Job::new(
            "j".into(),
            "t".into(),
            "d".into(),
            bitclone_storage::sink::Source::parse("snapshot://d").unwrap(),
            vec![],
            5,
            1,
        );
        let cmds = batches(
            vec![ds("a", 6_000), ds("b", 6_000), ds("c", 20_000), ds("d", 1)],
            vec![job; ENTRIES_PER_IMPORT + 1],
        );
        let shape: Vec<(usize, usize)> = cmds
            .iter()
            .map(|c| match c {
                Command::ImportLegacy { datasets, jobs } => (datasets.len(), jobs.len()),
                other => panic!("{other:?}"),
            })
            .collect();
        // a | b | c alone (longer than a batch) | d | jobs in two.
        assert_eq!(
            shape,
            [
                (1, 0),
                (1, 0),
                (1, 0),
                (1, 0),
                (0, ENTRIES_PER_IMPORT),
                (0, 1)
            ]
        );
        assert!(batches(Vec::new(), Vec::new()).is_empty());
    }

    #[test]
    fn heads_get_their_history_and_jobs_decode() {
        let (a, b, c) = (
            SnapshotId::of(b"a"),
            SnapshotId::of(b"b"),
            SnapshotId::of(b"c"),
        );
        let job = Job::new(
            "j1".into(),
            "t".into(),
            "d".into(),
            bitclone_storage::sink::Source::parse("snapshot://d").unwrap(),
            vec![bitclone_storage::sink::Destination::parse("file:///o").unwrap()],
            5,
            1,
        );
        let legacy = LegacyMetadata {
            heads: vec![
                LegacyHead {
                    tenant: "t".into(),
                    dataset: "d".into(),
                    head: b,
                },
                LegacyHead {
                    tenant: "u".into(),
                    dataset: "d".into(),
                    head: c,
                },
            ],
            snapshots: vec![
                ("t".into(), record("d", &a, "", 1)),
                ("t".into(), record("d", &b, &a.to_hex(), 2)),
                ("u".into(), record("d", &c, "", 3)),
            ],
            records: vec![
                ("job/j1".into(), serde_json::to_vec(&job).unwrap()),
                // As the previous release wrote it: URLs, not typed values.
                ("job/j2".into(), serde_json::to_vec(&old_job(&job)).unwrap()),
                ("job/bad".into(), b"{".to_vec()),
            ],
        };
        let p = plan(&legacy, 1);
        assert_eq!(p.datasets.len(), 2);
        let (t, d, head) = &p.datasets[0];
        assert_eq!((t.as_str(), d.as_str()), ("t", "d"));
        assert_eq!(head.snapshot, b.to_hex());
        assert_eq!(head.updated_unix_ms, 2);
        let ids: Vec<&str> = head.history.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, [a.to_hex(), b.to_hex()]);
        assert!(head.history.iter().all(|e| e.written_by == 1));
        // Another tenant's dataset of the same name keeps its own history.
        assert_eq!(p.datasets[1].2.history.len(), 1);
        let mut j2 = job.clone();
        j2.id = "j2".into();
        assert_eq!(p.jobs, vec![job.clone(), j2]);
        assert_eq!(p.unreadable.len(), 1);
        assert_eq!(p.unreadable[0].0, "job/bad");

        // A catalog URL's password does not reach the Raft log.
        let mut j3 = job;
        j3.destinations = vec![Destination::parse("postgres://u:hunter2@h:5/db").unwrap()];
        let legacy = LegacyMetadata {
            records: vec![("job/j3".into(), serde_json::to_vec(&j3).unwrap())],
            ..legacy
        };
        let p = plan(&legacy, 1);
        assert_eq!(
            p.jobs[0].destinations,
            vec![Destination::Catalog {
                url: "postgres://h:5/db".into()
            }]
        );
    }
}
