//! The job driver: persists jobs in the store, hands due ones to workers,
//! publishes every change to watchers. The rules live in `job.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bitclone_storage::{CpuPool, RocksStore};
use rand::Rng;
use tokio::sync::{watch, Notify};

use bitclone_raft::job::{Backoff, Failure, Job, JobState};

const KEY_PREFIX: &str = "job/";

struct Slot {
    job: Job,
    tx: watch::Sender<Job>,
    stop: Arc<AtomicBool>,
}

pub struct Jobs {
    slots: Mutex<HashMap<String, Slot>>,
    store: Arc<RocksStore>,
    pool: CpuPool,
    wake: Notify,
    shutting_down: AtomicBool,
    pub backoff: Backoff,
    pub default_max_attempts: u32,
    /// The last fencing token granted to an attempt on this node; sinks
    /// order commits by it (the cluster has its own, in the state machine).
    fence_seq: std::sync::atomic::AtomicU64,
}

/// What a worker got from [`Jobs::claim`].
pub struct Claimed {
    pub job: Job,
    /// Set when the job must stop: a cancel request or node shutdown.
    pub stop: Arc<AtomicBool>,
}

pub use bitclone_raft::cluster::now_ms;

impl Jobs {
    /// Loads persisted jobs; those that were running when the node stopped
    /// go back to Pending and resume from their checkpoint.
    pub fn load(
        store: Arc<RocksStore>,
        pool: CpuPool,
        backoff: Backoff,
        default_max_attempts: u32,
    ) -> anyhow::Result<Jobs> {
        let now = now_ms();
        let mut slots = HashMap::new();
        for (key, value) in store.scan_records(KEY_PREFIX)? {
            let mut job: Job = match serde_json::from_slice(&value) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(key, error = %e, "skipping unreadable job record");
                    continue;
                }
            };
            if job.state == JobState::Running {
                job.interrupted(now);
                store.put_record(&key, &serde_json::to_vec(&job)?, false)?;
                tracing::info!(job = job.id, "resuming job interrupted by a restart");
            }
            let (tx, _) = watch::channel(job.clone());
            slots.insert(
                job.id.clone(),
                Slot {
                    job,
                    tx,
                    stop: Arc::new(AtomicBool::new(false)),
                },
            );
        }
        let fence_seq = slots
            .values()
            .map(|s: &Slot| s.job.fencing_token)
            .max()
            .unwrap_or(0);
        Ok(Jobs {
            fence_seq: fence_seq.into(),
            slots: Mutex::new(slots),
            store,
            pool,
            wake: Notify::new(),
            shutting_down: AtomicBool::new(false),
            backoff,
            default_max_attempts,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn persist(&self, job: &Job, sync: bool) -> anyhow::Result<()> {
        let store = self.store.clone();
        let key = format!("{KEY_PREFIX}{}", job.id);
        let value = serde_json::to_vec(job)?;
        self.pool
            .run(move || store.put_record(&key, &value, sync))
            .await?;
        Ok(())
    }

    /// Records a new job durably and wakes a worker.
    pub async fn submit(&self, job: Job) -> anyhow::Result<Job> {
        self.persist(&job, true).await?;
        let (tx, _) = watch::channel(job.clone());
        self.lock().insert(
            job.id.clone(),
            Slot {
                job: job.clone(),
                tx,
                stop: Arc::new(AtomicBool::new(false)),
            },
        );
        self.wake.notify_one();
        Ok(job)
    }

    pub fn get(&self, id: &str) -> Option<Job> {
        self.lock().get(id).map(|s| s.job.clone())
    }

    pub fn list(&self, tenant: &str) -> Vec<Job> {
        let mut jobs: Vec<Job> = self
            .lock()
            .values()
            .filter(|s| s.job.tenant == tenant)
            .map(|s| s.job.clone())
            .collect();
        jobs.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        jobs
    }

    pub fn counts(&self) -> (u64, u64) {
        let slots = self.lock();
        let count = |st| slots.values().filter(|s| s.job.state == st).count() as u64;
        (count(JobState::Pending), count(JobState::Running))
    }

    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<Job>> {
        self.lock().get(id).map(|s| s.tx.subscribe())
    }

    /// Applies `f` to a job, publishes the change and persists it (durably if `sync`).
    pub async fn update(
        &self,
        id: &str,
        sync: bool,
        f: impl FnOnce(&mut Job),
    ) -> anyhow::Result<Option<Job>> {
        let job = {
            let mut slots = self.lock();
            let Some(slot) = slots.get_mut(id) else {
                return Ok(None);
            };
            f(&mut slot.job);
            slot.tx.send_replace(slot.job.clone());
            slot.job.clone()
        };
        self.persist(&job, sync).await?;
        Ok(Some(job))
    }

    /// Publishes progress without persisting (checkpoints go through `update`).
    pub fn report(&self, id: &str, f: impl FnOnce(&mut Job)) {
        if let Some(slot) = self.lock().get_mut(id) {
            f(&mut slot.job);
            slot.tx.send_replace(slot.job.clone());
        }
    }

    pub async fn cancel(&self, id: &str) -> anyhow::Result<Option<Job>> {
        let stop = self.lock().get(id).map(|s| s.stop.clone());
        let job = self.update(id, true, |j| {
            j.request_cancel(now_ms());
        });
        let job = job.await?;
        if let (Some(stop), Some(j)) = (stop, &job) {
            if j.cancel_requested {
                stop.store(true, Ordering::Release);
            }
        }
        Ok(job)
    }

    /// Takes the oldest due job and marks it Running, or says how long to
    /// wait before one can be due.
    pub async fn claim(&self) -> anyhow::Result<Result<Claimed, Duration>> {
        let now = now_ms();
        let claimed = {
            let mut slots = self.lock();
            // Two jobs never write one prefix at once: a due job whose sink
            // a running one writes waits for it.
            let running: Vec<&Job> = slots
                .values()
                .filter(|s| s.job.state == JobState::Running)
                .map(|s| &s.job)
                .collect();
            let next = slots
                .values()
                .filter(|s| s.job.is_due(now))
                .filter(|s| !running.iter().any(|r| r.shares_a_sink(&s.job)))
                .min_by_key(|s| (s.job.next_attempt_unix_ms, s.job.created_unix_ms))
                .map(|s| s.job.id.clone());
            match next {
                Some(id) => {
                    let Some(slot) = slots.get_mut(&id) else {
                        return Ok(Err(Duration::ZERO));
                    };
                    slot.job.start(now);
                    slot.job.fencing_token = self.fence_seq.fetch_add(1, Ordering::AcqRel) + 1;
                    slot.stop.store(false, Ordering::Release);
                    slot.tx.send_replace(slot.job.clone());
                    Ok(Claimed {
                        job: slot.job.clone(),
                        stop: slot.stop.clone(),
                    })
                }
                None => {
                    // Jobs waiting for a sink wake up when a job finishes.
                    let soonest = slots
                        .values()
                        .filter(|s| s.job.state == JobState::Pending)
                        .filter(|s| !running.iter().any(|r| r.shares_a_sink(&s.job)))
                        .map(|s| s.job.next_attempt_unix_ms)
                        .min();
                    Err(match soonest {
                        Some(t) => Duration::from_millis((t - now).clamp(1, 1000) as u64),
                        None => Duration::from_secs(1),
                    })
                }
            }
        };
        if let Ok(c) = &claimed {
            self.persist(&c.job, true).await?;
        }
        Ok(claimed)
    }

    /// Records how an attempt ended.
    pub async fn finish(
        &self,
        id: &str,
        outcome: Result<(), (String, Failure)>,
    ) -> anyhow::Result<()> {
        let shutting_down = self.shutting_down.load(Ordering::Acquire);
        let backoff = self.backoff;
        let jitter: f64 = rand::rng().random();
        let job = self
            .update(id, true, |j| {
                let now = now_ms();
                match outcome {
                    Ok(()) => j.succeed(now),
                    Err(_) if j.cancel_requested => j.cancelled(now),
                    Err(_) if shutting_down => j.interrupted(now),
                    Err((msg, kind)) => j.fail(msg, kind, backoff, jitter, now),
                }
            })
            .await?;
        if let Some(j) = job {
            match j.state {
                JobState::Failed => tracing::warn!(
                    job = j.id,
                    attempts = j.attempts,
                    error = j.last_error,
                    "job failed"
                ),
                JobState::Pending => tracing::info!(
                    job = j.id,
                    attempts = j.attempts,
                    error = j.last_error,
                    retry_at_ms = j.next_attempt_unix_ms,
                    "job will retry"
                ),
                state => tracing::info!(job = j.id, ?state, "job ended"),
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Waits until woken by a submit or finish, or until `d` passes.
    pub async fn wait(&self, d: Duration) {
        let _ = tokio::time::timeout(d, self.wake.notified()).await;
    }

    /// Stops running jobs at their next check; they go back to Pending.
    pub fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
        for slot in self.lock().values() {
            if slot.job.state == JobState::Running {
                slot.stop.store(true, Ordering::Release);
            }
        }
        self.wake.notify_waiters();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}
