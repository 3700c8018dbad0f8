//! Crash points for the crash-safety tests: with the `crash-points` feature, `WEFT_CRASH_AT=name`
//! (or `name:n` for the n-th time the point is reached) aborts the process there, as `kill -9`
//! would. Without the feature (every build a user runs) a point compiles to nothing, so no
//! environment variable can abort a production binary.

#[cfg(feature = "crash-points")]
mod armed {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

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
}

/// Aborts the process if `name` is the configured crash point and this is its n-th hit (only
/// with the `crash-points` feature; otherwise a no-op).
#[inline(always)]
pub fn point(name: &str) {
    #[cfg(feature = "crash-points")]
    armed::point(name);
    #[cfg(not(feature = "crash-points"))]
    let _ = name;
}

/// Whether this build can be aborted at crash points (the tests check it before relying on it).
pub const ARMED: bool = cfg!(feature = "crash-points");
