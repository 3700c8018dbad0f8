//! See the consortium: a read-only web dashboard over a coordinator's committed state (live
//! beside a running coordinator, or over a finished run's storage), its Prometheus metrics,
//! and the self-contained HTML report a demo leaves.
//!
//! Everything here reads the journal and the ledger through [`Snapshot`]; nothing touches the
//! round engine, so a round that aggregates never waits for a page, nor a page for it.

mod chart;
mod format;
mod metrics;
mod pages;
mod report;
mod server;
mod snapshot;

use std::path::Path;
use std::sync::Arc;

pub use chart::loss_chart;
pub use pages::{LedgerFilter, Links};
pub use report::report_html;
pub use server::{bind, serve, DashboardError, DashboardOptions, MIN_TOKEN_LEN};
pub use snapshot::{Budget, ClosedRound, OpenRound, Snapshot, SnapshotError};

use format::{esc, utc};

/// Checks a storage directory's whole ledger (replay included): what `weft ledger verify`
/// does. Given by the caller, which knows the model families a replay may need.
pub type Verifier = Arc<dyn Fn(&Path) -> Result<Verified, String> + Send + Sync>;

/// What a passed verification established.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified {
    pub entries: u64,
    pub rounds: u64,
    pub replayed: u64,
}

/// The last `ledger verify` the dashboard ran, and whether one runs now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verification {
    pub last: Option<VerifyOutcome>,
    /// The ledger length being verified now.
    pub running: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VerifyOutcome {
    /// Ledger entries there were when it started.
    pub ledger_rows: u64,
    /// The last closed round when it started.
    pub round: u64,
    pub result: Result<Verified, String>,
    pub finished_unix_ms: u64,
    pub seconds: f64,
}

impl Verification {
    /// `Some(true)` when the last verification passed, `Some(false)` when it failed.
    pub fn passed(&self) -> Option<bool> {
        self.last.as_ref().map(|o| o.result.is_ok())
    }

    fn html(&self) -> String {
        let last = match &self.last {
            None => r#"<span class="muted">not run yet</span>"#.to_string(),
            Some(VerifyOutcome { result: Ok(v), finished_unix_ms, seconds, .. }) => format!(
                r#"<span class="badge ok" title="{} entries, {} rounds ({} replayed bit for bit) at {} in {seconds:.2} s">passed</span> <span class="muted">{} entries</span>"#,
                v.entries,
                v.rounds,
                v.replayed,
                utc(Some(*finished_unix_ms)),
                v.entries
            ),
            Some(VerifyOutcome { result: Err(e), ledger_rows, .. }) => format!(
                r#"<span class="badge bad">FAILED</span> <span class="muted">({ledger_rows} entries)</span> <span class="reason">{}</span>"#,
                esc(e)
            ),
        };
        match self.running {
            Some(n) => format!(r#"{last} <span class="muted">· checking {n} entries…</span>"#),
            None => last,
        }
    }
}
