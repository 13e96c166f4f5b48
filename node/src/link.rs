//! Where a running job attempt reports progress and saves checkpoints: the
//! local job table (standalone) or the Raft state machine under its lease
//! (cluster), where every save carries the fencing token.

use std::sync::{Arc, Mutex};

use bitclone_raft::job::{Checkpoint, Progress};
use bitclone_raft::state::{Command, CommandError, Fence, Response};
use bitclone_raft::Cluster;
use bitclone_storage::Error as StoreError;

use crate::jobs::Jobs;

/// What the holder knows of its running job; the heartbeat publishes it.
#[derive(Debug, Default)]
pub struct Live {
    pub progress: Progress,
    pub checkpoint: Checkpoint,
    pub dirty: bool,
}

#[derive(Clone)]
pub enum JobLink {
    Local(Arc<Jobs>),
    Cluster {
        cluster: Arc<Cluster>,
        fence: Fence,
        live: Arc<Mutex<Live>>,
    },
}

fn lock(live: &Mutex<Live>) -> std::sync::MutexGuard<'_, Live> {
    live.lock().unwrap_or_else(|e| e.into_inner())
}

impl JobLink {
    /// Updates progress (cheap; no IO).
    pub fn report(&self, id: &str, f: impl FnOnce(&mut Progress)) {
        match self {
            JobLink::Local(jobs) => jobs.report(id, |j| f(&mut j.progress)),
            JobLink::Cluster { live, .. } => {
                let mut l = lock(live);
                f(&mut l.progress);
                l.dirty = true;
            }
        }
    }

    /// Saves a checkpoint durably; in a cluster a stale lease is refused.
    pub async fn save(&self, id: &str, cp: Checkpoint) -> Result<(), StoreError> {
        match self {
            JobLink::Local(jobs) => {
                jobs.update(id, false, |j| j.checkpoint = cp)
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("saving checkpoint: {e:#}")))?;
                Ok(())
            }
            JobLink::Cluster {
                cluster,
                fence,
                live,
            } => {
                let progress = {
                    let mut l = lock(live);
                    l.checkpoint = cp.clone();
                    Some(l.progress.clone())
                };
                let r = cluster
                    .write(Command::SaveCheckpoint {
                        job: id.to_string(),
                        fence: *fence,
                        checkpoint: cp,
                        progress,
                    })
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                fenced_error(id, r)
            }
        }
    }

    /// Who writes a job's sink effects: the job and its attempt's fencing
    /// token (the lease's in a cluster, this node's sequence standalone).
    pub fn writer(&self, job: &bitclone_raft::job::Job) -> bitclone_storage::export::Writer {
        let token = match self {
            JobLink::Local(_) => job.fencing_token,
            JobLink::Cluster { fence, .. } => fence.token,
        };
        bitclone_storage::export::Writer {
            job: job.id.clone(),
            token,
        }
    }

    /// The job and lease a fenced effect comes from (cluster only).
    pub fn fenced_by(&self, id: &str) -> Option<(String, Fence)> {
        match self {
            JobLink::Local(_) => None,
            JobLink::Cluster { fence, .. } => Some((id.to_string(), *fence)),
        }
    }
}

/// Turns a refused fenced write into an error (and says so in the log).
pub fn fenced_error(id: &str, r: Response) -> Result<(), StoreError> {
    match r {
        Response::Err(e @ CommandError::Fenced { .. }) => {
            tracing::warn!(job = id, error = %e, "commit rejected: this node's lease on the job was superseded");
            Err(StoreError::Conflict(e.to_string()))
        }
        Response::Err(e) => Err(StoreError::InvalidArgument(e.to_string())),
        _ => Ok(()),
    }
}
