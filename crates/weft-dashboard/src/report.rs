//! The report a demo leaves beside its artifacts: one HTML file with the dashboard's sections
//! and charts, its stylesheet inline, no script and nothing fetched, so it opens anywhere.

use crate::format::esc;
use crate::pages::{self, Links};
use crate::snapshot::Snapshot;
use crate::Verification;

pub(crate) const STYLESHEET: &str = include_str!("assets/weft.css");

/// The whole run as one self-contained page.
pub fn report_html(s: &Snapshot, verification: &Verification) -> String {
    let mut body = String::new();
    body.push_str(&pages::overview(s, verification, Links::Report));
    body.push_str(&pages::chart_section(s));
    body.push_str(&pages::timeline(s, Links::Report));
    for r in &s.rounds {
        if let Some(round) = pages::round_page(s, r.record.round, Links::Report) {
            body.push_str(&round);
        }
    }
    body.push_str(&pages::reputation(s, Links::Report));
    body.push_str(&pages::privacy(s, Links::Report));
    for node in s.nodes() {
        if let Some(page) = pages::node_page(s, &node, Links::Report) {
            body.push_str(&page);
        }
    }
    let name = esc(&s.name());
    format!(
        r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{name} · weft report</title><style>{STYLESHEET}</style></head>
<body><header><span class="brand">weft</span><span class="name">{name}: report</span><nav><a href="#overview">overview</a><a href="#loss">loss</a><a href="#rounds">rounds</a><a href="#reputation">reputation</a><a href="#privacy">privacy</a></nav></header>
<main id="main">{body}</main>
<footer>Written from the coordinator's committed state ({entries} ledger entries). Browse it live with <code>weft dashboard {dir}</code>.</footer></body></html>
"##,
        entries = s.entries.len(),
        dir = esc(&s.dir.display().to_string()),
    )
}
