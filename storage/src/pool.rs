//! A fixed pool of CPU worker threads, off the async runtime.

use std::future::Future;
use std::thread;

use crossbeam_channel::{Receiver, Sender};

use crate::error::{Error, Result};

type Task = Box<dyn FnOnce() + Send + 'static>;

/// Runs CPU-heavy and blocking work (chunking, hashing, RocksDB calls) on
/// dedicated threads so that async tasks never block on it.
///
/// Threads exit when the last handle to the pool is dropped.
#[derive(Clone)]
pub struct CpuPool {
    tx: Sender<Task>,
}

impl CpuPool {
    /// Starts `threads` workers (at least one) named `name-N`.
    pub fn new(threads: usize, name: &str) -> Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<Task>();
        for i in 0..threads.max(1) {
            let rx: Receiver<Task> = rx.clone();
            thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    while let Ok(task) = rx.recv() {
                        task();
                    }
                })
                .map_err(|e| Error::io("spawn worker thread", name, e))?;
        }
        Ok(CpuPool { tx })
    }

    /// Runs `f` on a worker and resolves to its result. Dropping the future
    /// does not stop `f`; pass a cancellation flag into `f` for that.
    pub fn run<F, T>(&self, f: F) -> impl Future<Output = Result<T>> + Send + 'static
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let sent = self
            .tx
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
}
