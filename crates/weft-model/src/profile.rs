//! Wall time per kernel of the trainer, for `train_bench --profile` (bench/run's profile table).
//!
//! Off unless [`enable`] is called: then every kernel call in a forward, backward and update is
//! timed on the calling thread (a kernel's own threads are inside its span). Off, a span costs one
//! relaxed atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TIMES: Mutex<Vec<(&'static str, Duration, u64)>> = Mutex::new(Vec::new());

/// Time spent in one kernel since the last [`take`].
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    pub kernel: &'static str,
    pub seconds: f64,
    pub calls: u64,
}

/// Starts timing kernels (for the whole process).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// The times gathered so far, in the order the kernels first ran, and starts again from zero.
pub fn take() -> Vec<KernelTime> {
    let mut times = TIMES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    std::mem::take(&mut *times)
        .into_iter()
        .map(|(kernel, spent, calls)| KernelTime { kernel, seconds: spent.as_secs_f64(), calls })
        .collect()
}

#[inline(always)]
pub(crate) fn span<R>(kernel: &'static str, f: impl FnOnce() -> R) -> R {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let started = Instant::now();
    let result = f();
    let spent = started.elapsed();
    let mut times = TIMES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match times.iter_mut().find(|(name, _, _)| *name == kernel) {
        Some((_, total, calls)) => {
            *total += spent;
            *calls += 1;
        }
        None => times.push((kernel, spent, 1)),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_count_only_once_enabled() {
        // Other tests may run kernels meanwhile: look only at this test's names.
        let mine = |times: Vec<KernelTime>| -> Vec<KernelTime> {
            times.into_iter().filter(|t| t.kernel.starts_with("test.")).collect()
        };
        span("test.before", || ());
        assert!(mine(take()).is_empty());
        enable();
        span("test.a", || std::thread::sleep(Duration::from_millis(2)));
        span("test.b", || ());
        span("test.a", || ());
        let times = mine(take());
        assert_eq!(times.iter().map(|t| (t.kernel, t.calls)).collect::<Vec<_>>(), [("test.a", 2), ("test.b", 1)]);
        assert!(times[0].seconds >= 0.002);
        assert!(mine(take()).is_empty());
    }
}
