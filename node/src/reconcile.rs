//! Reconcile jobs: a destination compared with the snapshot it should
//! hold, drift reported, and with repair cleared so that the job's export
//! writes it again.

use bitclone_raft::job::Reconcile;
use bitclone_storage::manifest::Stored;
use bitclone_storage::sink::objects::reconcile as objects;
use bitclone_storage::sink::Sink;
use bitclone_storage::{EntryPages, Error as StoreError, SnapshotId};

use crate::node::Node;

/// What a destination holds compared with the snapshot.
pub enum Verdict {
    /// Exactly the snapshot.
    Clean,
    /// Something else: what, in a sentence (with repair, what drifted was
    /// cleared for the export to write again).
    Drift(String),
}

/// Compares `sink` with `snapshot` (`stored`, read from this node's chunk
/// store); with `r.repair`, clears what drifted.
pub async fn check(
    node: &Node,
    tenant: &str,
    dataset: &str,
    sink: &Sink,
    stored: &Stored,
    snapshot: &SnapshotId,
    r: Reconcile,
) -> Result<Verdict, StoreError> {
    let entries = || EntryPages::from_store(&node.pool, node.chunk_store(), tenant, stored.clone());
    match sink {
        Sink::Objects(target) => {
            let found = objects::reconcile(target, &node.pool, entries(), r.deep, r.repair).await?;
            let mut why = Vec::new();
            if found.committed != Some(*snapshot) {
                why.push(match found.committed {
                    Some(c) => format!("its newest commit is snapshot {c}"),
                    None => "it has no commit record".to_string(),
                });
            }
            if found.drifted > 0 {
                let shown: Vec<String> = found
                    .drift
                    .iter()
                    .take(5)
                    .map(|d| format!("{} ({})", d.path, d.problem))
                    .collect();
                why.push(format!(
                    "{} of {} files drifted: {}{}",
                    found.drifted,
                    found.files,
                    shown.join(", "),
                    if found.drifted > 5 { ", …" } else { "" }
                ));
            }
            node.scrub
                .drifted
                .fetch_add(found.drifted, std::sync::atomic::Ordering::Relaxed);
            if why.is_empty() {
                return Ok(Verdict::Clean);
            }
            if r.repair {
                objects::delete_drifted(target, &found.to_delete).await?;
            }
            Ok(Verdict::Drift(format!(
                "{}: {}",
                target.url,
                why.join("; ")
            )))
        }
        Sink::Catalog(cat) => {
            let head = cat.latest(tenant, dataset).await?.map(|s| s.id);
            let mut why = Vec::new();
            if head != Some(*snapshot) {
                why.push(match head {
                    Some(h) => format!("its head for {dataset} is snapshot {h}"),
                    None => format!("it has no head for {dataset}"),
                });
            }
            let found = cat.find_snapshot(snapshot).await?;
            let rows_drift = match &found {
                None => Some(format!("it has no rows of snapshot {snapshot}")),
                Some(f) => crate::restore::catalog_drift(entries(), cat, f).await?,
            };
            if let Some(d) = &rows_drift {
                why.push(d.clone());
                node.scrub
                    .drifted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if why.is_empty() {
                return Ok(Verdict::Clean);
            }
            if r.repair && found.is_some() && rows_drift.is_some() {
                cat.drop_snapshot(tenant, dataset, snapshot).await?;
            }
            Ok(Verdict::Drift(format!(
                "{}: {}",
                cat.redacted_url(),
                why.join("; ")
            )))
        }
    }
}

/// On the leader, every `reconcile.interval`: a reconcile job for each
/// dataset whose latest clone job succeeded and wrote its current head, to
/// the destinations that job wrote (none while one runs for the dataset).
pub async fn schedule_loop(node: std::sync::Arc<Node>) {
    let every = node.config.reconcile.interval;
    crate::gc::periodically(node, every, true, |n| async move {
        if let Err(e) = schedule_once(&n).await {
            tracing::warn!(error = %e, "scheduling reconcile jobs failed");
        }
    })
    .await;
}

/// The reconcile jobs due now, submitted; returns how many.
pub async fn schedule_once(node: &std::sync::Arc<Node>) -> Result<u64, StoreError> {
    use bitclone_raft::job::{Job, JobState, Source};
    let options = bitclone_raft::job::Reconcile {
        deep: node.config.reconcile.deep,
        repair: node.config.reconcile.repair,
    };
    let due: Vec<Job> = node
        .read(|s| {
            let mut latest: std::collections::BTreeMap<(&str, &str), &Job> = Default::default();
            for j in s.jobs.values().filter(|j| j.reconcile.is_none()) {
                let key = (j.tenant.as_str(), j.dataset.as_str());
                if latest
                    .get(&key)
                    .is_none_or(|l| l.created_unix_ms < j.created_unix_ms)
                {
                    latest.insert(key, j);
                }
            }
            // Datasets a reconcile job runs for already: one at a time.
            let busy: std::collections::BTreeSet<(&str, &str)> = s
                .jobs
                .values()
                .filter(|j| j.reconcile.is_some() && !j.state.is_final())
                .map(|j| (j.tenant.as_str(), j.dataset.as_str()))
                .collect();
            latest
                .into_values()
                .filter(|j| j.state == JobState::Succeeded && !j.destinations.is_empty())
                .filter(|j| {
                    let head = s
                        .datasets
                        .get(&j.tenant)
                        .and_then(|d| d.get(&j.dataset))
                        .map(|h| h.snapshot.as_str());
                    head.is_some() && j.checkpoint.snapshot.as_deref() == head
                })
                .filter(|j| !busy.contains(&(j.tenant.as_str(), j.dataset.as_str())))
                .map(|j| (*j).clone())
                .collect()
        })
        .await?;
    let mut n = 0;
    for done in due {
        // The latest when it runs: a clone that moved the sinks on since
        // is not undone by a repair of an older snapshot.
        let mut job = Job::new(
            format!("{:016x}", rand::random::<u64>()),
            done.tenant.clone(),
            done.dataset.clone(),
            Source::Snapshot {
                dataset: done.dataset.clone(),
                snapshot: None,
            },
            done.destinations.clone(),
            node.config.max_attempts,
            bitclone_raft::cluster::now_ms(),
        );
        job.reconcile = Some(options);
        let job = node.submit_job(job).await?;
        tracing::info!(job = job.id, tenant = %done.tenant, dataset = %done.dataset, "reconcile job scheduled");
        n += 1;
    }
    Ok(n)
}
