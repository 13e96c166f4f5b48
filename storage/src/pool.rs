//! A fixed pool of CPU worker threads, off the async runtime.

use std::future::Future;
use std::thread;

use crossbeam_channel::{Receiver, Sender};

use crate::error::{Error, Result};

type Task = Box<dyn FnOnce() + Send + 'static>;

/// Runs CPU-heavy and blocking work (chunking, hashing, RocksDB calls) on
/// dedicated threads so that async tasks never block on it.
///
/// Two queues: bulk work ([`CpuPool::run`]) and short steps that other work
/// waits on ([`CpuPool::run_first`]), which a free worker takes first.
/// Threads exit when the last handle to the pool is dropped.
#[derive(Clone)]
pub struct CpuPool {
    tx: Sender<Task>,
    first: Sender<Task>,
}

impl CpuPool {
    /// Starts `threads` workers (at least one) named `name-N`.
    pub fn new(threads: usize, name: &str) -> Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<Task>();
        let (first, first_rx) = crossbeam_channel::unbounded::<Task>();
        for i in 0..threads.max(1) {
            let (rx, first_rx): (Receiver<Task>, Receiver<Task>) = (rx.clone(), first_rx.clone());
            thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || loop {
                    // A queue found closed (the pool dropped) still leaves
                    // the other one to drain: queued work always runs.
                    let task = match first_rx.try_recv() {
                        Ok(task) => Ok(task),
                        Err(_) => crossbeam_channel::select! {
                            recv(first_rx) -> t => t.or_else(|_| rx.recv()),
                            recv(rx) -> t => t.or_else(|_| first_rx.recv()),
                        },
                    };
                    match task {
                        Ok(task) => task(),
                        Err(_) => break,
                    }
                })
                .map_err(|e| Error::io("spawn worker thread", name, e))?;
        }
        Ok(CpuPool { tx, first })
    }

    /// Runs `f` on a worker and resolves to its result. Dropping the future
    /// does not stop `f`; pass a cancellation flag into `f` for that.
    pub fn run<F, T>(&self, f: F) -> impl Future<Output = Result<T>> + Send + 'static
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        submit(&self.tx, f)
    }

    /// As [`CpuPool::run`], ahead of the bulk work already queued: for short
    /// steps a pipeline waits on (adding ingested files to a snapshot), which
    /// would otherwise queue behind the batches the same pipeline submitted.
    pub fn run_first<F, T>(&self, f: F) -> impl Future<Output = Result<T>> + Send + 'static
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        submit(&self.first, f)
    }
}

fn submit<F, T>(queue: &Sender<Task>, f: F) -> impl Future<Output = Result<T>> + Send + 'static
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let sent = queue
        .send(Box::new(move || {
            // A panicking task must not take its worker thread down with it.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|_| Err(Error::Panicked));
            let _ = done_tx.send(result);
        }))
        .is_ok();
    async move {
        if !sent {
            return Err(Error::PoolClosed);
        }
        done_rx.await.unwrap_or(Err(Error::PoolClosed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_tasks_and_returns_results() {
        let pool = CpuPool::new(2, "test").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let results: Vec<u64> = rt.block_on(async {
            let futs: Vec<_> = (0..8u64).map(|i| pool.run(move || Ok(i * i))).collect();
            let mut out = Vec::new();
            for f in futs {
                out.push(f.await.unwrap());
            }
            out
        });
        assert_eq!(results, vec![0, 1, 4, 9, 16, 25, 36, 49]);
    }

    #[test]
    fn a_first_task_overtakes_queued_bulk_work() {
        let pool = CpuPool::new(1, "test").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let note = |what: &'static str| {
            let order = order.clone();
            move || {
                order.lock().unwrap().push(what);
                Ok(())
            }
        };
        // The one worker is busy until `hold` is sent; then bulk work and a
        // first task queue up behind it.
        let busy = pool.run(move || {
            held.recv().ok();
            Ok(())
        });
        let bulk = pool.run(note("bulk"));
        let first = pool.run_first(note("first"));
        hold.send(()).unwrap();
        rt.block_on(async {
            busy.await.unwrap();
            bulk.await.unwrap();
            first.await.unwrap();
        });
        assert_eq!(*order.lock().unwrap(), vec!["first", "bulk"]);
    }
}
