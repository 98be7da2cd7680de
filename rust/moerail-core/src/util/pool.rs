//! moerail's own rayon pool.
//!
//! Why not rayon's global pool: its size is fixed at first use, and its worker threads do not
//! exist in a child after `fork()` (DataLoader workers), so the first parallel call in the child
//! would wait forever. This pool remembers the process id that built it; a call from a forked
//! child, or after `set_num_threads`, builds a fresh pool. A pool inherited through `fork()` is
//! leaked, never dropped: its threads and locks belong to the parent.

use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{invalid, Result};

struct PoolState {
    pid: u32,
    threads: usize,
    pool: Arc<ThreadPool>,
}

static POOL: Mutex<Option<PoolState>> = Mutex::new(None);
static REQUESTED: Mutex<Option<usize>> = Mutex::new(None);

fn default_threads() -> usize {
    std::env::var("MOERAIL_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// Sets the number of threads moerail's ops use (takes effect at the next op).
pub fn set_num_threads(n: usize) -> Result<()> {
    if n == 0 || n > 4096 {
        return Err(invalid(
            "num_threads",
            format!("must be in [1, 4096], got {n}"),
        ));
    }
    *REQUESTED.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
    Ok(())
}

/// The number of threads the next op will use.
pub fn num_threads() -> usize {
    REQUESTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or_else(default_threads)
}

fn current_pool() -> Arc<ThreadPool> {
    let want = num_threads();
    let pid = std::process::id();
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(state) = guard.as_ref() {
        if state.pid == pid && state.threads == want {
            return state.pool.clone();
        }
    }
    if let Some(old) = guard.take() {
        if old.pid != pid {
            // Inherited through fork(): its threads do not exist here.
            std::mem::forget(old);
        }
    }
    let pool = Arc::new(
        ThreadPoolBuilder::new()
            .num_threads(want)
            .thread_name(|i| format!("moerail-{i}"))
            .build()
            .expect("building a rayon pool only fails when threads cannot be spawned"),
    );
    *guard = Some(PoolState {
        pid,
        threads: want,
        pool: pool.clone(),
    });
    pool
}

/// Runs `f` inside moerail's pool, so rayon iterators in `f` use its threads.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    current_pool().install(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn pool_size_follows_request() {
        set_num_threads(3).unwrap();
        assert_eq!(install(rayon::current_num_threads), 3);
        set_num_threads(1).unwrap();
        assert_eq!(install(rayon::current_num_threads), 1);
        let s: u64 = install(|| (0..1000u64).into_par_iter().sum());
        assert_eq!(s, 499500);
        assert!(set_num_threads(0).is_err());
    }
}
