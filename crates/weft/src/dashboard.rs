//! `weft dashboard DIR`: the read-only web dashboard over any coordinator's storage, and the
//! pieces `coordinator serve --dashboard` and the demo's `report.html` share with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use weft_dashboard::{DashboardOptions, Snapshot, Verification, Verified, Verifier, VerifyOutcome};

use crate::say;

/// The address a dashboard listens on unless told otherwise: this machine only.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:8750";
/// Where the access token is read from when no flag gives it (so it stays out of `ps`).
const TOKEN_ENV: &str = "WEFT_DASHBOARD_TOKEN";

#[derive(Args)]
pub struct DashboardArgs {
    /// Coordinator storage directory, e.g. OUT/coordinator of `weft demo --out OUT` (it may be
    /// running: the dashboard follows it live).
    dir: PathBuf,
    /// Address to listen on. Anything but a loopback address needs an access token.
    #[arg(long, default_value = DEFAULT_ADDRESS)]
    addr: String,
    /// Access token every request must carry (at least 16 characters); default: $WEFT_DASHBOARD_TOKEN.
    #[arg(long)]
    token: Option<String>,
    /// Do not run `weft ledger verify` each time the ledger grows.
    #[arg(long)]
    no_verify: bool,
}

/// The token from the flag, else from the environment.
pub fn token(flag: Option<String>) -> Option<String> {
    flag.or_else(|| std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()))
}

/// `weft ledger verify`, replaying adapter rounds of a pretrained base too.
pub fn verifier() -> Verifier {
    Arc::new(|dir: &Path| {
        let adapters = crate::ledger::adapter_family(dir).map_err(|e| format!("{e:#}"))?;
        weft_coordinator::verify_with(dir, None, adapters.as_ref().map(|a| a as _))
            .map(|r| Verified { entries: r.entries, rounds: r.rounds, replayed: r.replayed })
            .map_err(|e| e.to_string())
    })
}

pub fn options(dir: &Path, token: Option<String>, verify: bool) -> DashboardOptions {
    DashboardOptions {
        dir: dir.to_path_buf(),
        token,
        verifier: verify.then(verifier),
        poll: Duration::from_millis(250),
    }
}

/// The coordinator storage inside a demo's output directory, when `dir` is one (`weft demo --out
/// OUT` keeps it in OUT/coordinator, with `--processes` in OUT/consortium/coordinator).
fn storage_inside(dir: &Path) -> Option<PathBuf> {
    ["coordinator", "consortium/coordinator"]
        .iter()
        .map(|inner| dir.join(inner))
        .find(|storage| storage.join(weft_coordinator::SqliteJournal::DATABASE).is_file())
}

pub fn run(args: DashboardArgs) -> anyhow::Result<()> {
    if !args.dir.exists() {
        anyhow::bail!("{}: no such directory", args.dir.display());
    }
    if !args.dir.join(weft_coordinator::SqliteJournal::DATABASE).exists() {
        if let Some(storage) = storage_inside(&args.dir) {
            anyhow::bail!(
                "{} is a run's output directory, not a coordinator's storage: show it with `weft dashboard {}`",
                args.dir.display(),
                storage.display()
            );
        }
    }
    // Read once before listening: a wrong directory is an error now, not a page later.
    let snapshot = Snapshot::read(&args.dir).with_context(|| format!("{}: cannot show it", args.dir.display()))?;
    let token = token(args.token);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = weft_dashboard::bind(&args.addr, token.as_deref()).await?;
        let address = listener.local_addr().context("the dashboard's address")?;
        say!(
            "dashboard on http://{address}/ — read-only view of {} ({} ledger entries, {} rounds closed){}",
            args.dir.display(),
            snapshot.entries.len(),
            snapshot.head.round,
            if token.is_some() { "; open it once as /?token=… with your token" } else { "" }
        );
        weft_dashboard::serve(listener, options(&args.dir, token, !args.no_verify)).await?;
        Ok(())
    })
}

/// Writes `report.html` into `out` from the coordinator storage `storage`, after verifying its
/// ledger (the report shows the result).
pub fn write_report(storage: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let started = std::time::Instant::now();
    let snapshot =
        Snapshot::read(storage).with_context(|| format!("{}: reading the run for its report", storage.display()))?;
    let result = verifier()(storage);
    let verification = Verification {
        last: Some(VerifyOutcome {
            ledger_rows: snapshot.ledger_rows,
            round: snapshot.head.round,
            result,
            finished_unix_ms: weft_coordinator::unix_ms(std::time::SystemTime::now()),
            seconds: started.elapsed().as_secs_f64(),
        }),
        running: None,
    };
    let path = out.join("report.html");
    weft_durable::write_atomic(&path, weft_dashboard::report_html(&snapshot, &verification).as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
