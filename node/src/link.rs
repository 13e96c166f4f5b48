//! Where a running job attempt reports progress and saves checkpoints: the
//! Raft state machine, under the attempt's lease. Every save carries the
//! fencing token.

use std::sync::{Arc, Mutex};

use bitclone_raft::job::{Checkpoint, Progress};
use bitclone_raft::state::{Command, CommandError, Fence, Response};
use bitclone_raft::Cluster;
use bitclone_storage::Error as StoreError;

/// What the holder knows of its running job; the heartbeat publishes it.
#[derive(Debug, Default)]
pub struct Live {
    pub progress: Progress,
    pub checkpoint: Checkpoint,
    pub dirty: bool,
}

#[derive(Clone)]
pub struct JobLink {
    pub cluster: Arc<Cluster>,
    pub fence: Fence,
    pub live: Arc<Mutex<Live>>,
}

fn lock(live: &Mutex<Live>) -> std::sync::MutexGuard<'_, Live> {
    live.lock().unwrap_or_else(|e| e.into_inner())
}

impl JobLink {
    /// Updates progress (cheap; no IO: the heartbeat publishes it).
    pub fn report(&self, f: impl FnOnce(&mut Progress)) {
        let mut l = lock(&self.live);
        f(&mut l.progress);
        l.dirty = true;
    }

    /// Saves a checkpoint durably; a stale lease is refused.
    pub async fn save(&self, id: &str, cp: Checkpoint) -> Result<(), StoreError> {
        let progress = {
            let mut l = lock(&self.live);
            l.checkpoint = cp.clone();
            Some(l.progress.clone())
        };
        let r = self
            .cluster
            .write(Command::SaveCheckpoint {
                job: id.to_string(),
                fence: self.fence,
                checkpoint: cp,
                progress,
            })
            .await
            .map_err(crate::node::raft_error)?;
        fenced_error(id, r)
    }

    /// The last checkpoint saved.
    pub fn checkpoint(&self) -> Checkpoint {
        lock(&self.live).checkpoint.clone()
    }

    /// Who writes a job's sink effects: the job and its lease's token.
    pub fn writer(&self, job: &bitclone_raft::job::Job) -> bitclone_storage::sink::Writer {
        bitclone_storage::sink::Writer {
            job: job.id.clone(),
            token: self.fence.token,
        }
    }

    /// The job and lease a fenced effect comes from.
    pub fn fenced_by(&self, id: &str) -> Option<(String, Fence)> {
        Some((id.to_string(), self.fence))
    }
}

/// Turns a refused fenced write into an error (and says so in the log).
pub fn fenced_error(id: &str, r: Response) -> Result<(), StoreError> {
    match r {
        Response::Err(e @ CommandError::Fenced { .. }) => {
            tracing::warn!(job = id, error = %e, "commit rejected: this node's lease on the job was superseded");
            Err(crate::node::refused(e))
        }
        Response::Err(e) => Err(crate::node::refused(e)),
        _ => Ok(()),
    }
}
