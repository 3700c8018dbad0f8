//! Crash points for the crash-safety tests: `WEFT_CRASH_AT=name` (or `name:n` for the n-th time
//! the point is reached) aborts the process there, as `kill -9` would. Unset, a point costs one
//! relaxed atomic load after the first call. This is the only place weft-core reads the
//! environment; it does nothing else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

/// Aborts the process if `name` is the configured crash point and this is its n-th hit.
pub fn point(name: &str) {
    let target = TARGET.get_or_init(|| {
        let spec = std::env::var("WEFT_CRASH_AT").ok()?;
        let (point, nth) = match spec.rsplit_once(':') {
            Some((point, n)) => (point.to_owned(), n.parse().ok()?),
            None => (spec, 1),
        };
        Some((point, nth))
    });
    if let Some((point, nth)) = target {
        if point == name && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *nth {
            eprintln!("weft: crash point {name} reached (WEFT_CRASH_AT): aborting");
            std::process::abort();
        }
    }
}
