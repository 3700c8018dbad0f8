//! The pages, rendered on the server from a [`Snapshot`]: plain HTML tables and inline SVG. The
//! same sections make the self-contained report; only the links differ.

use std::fmt::Write;

use weft_coordinator::{ContributionRecord, RoundRecord};
use weft_ledger::{Entry, Event};

use crate::chart::loss_chart;
use crate::format::{bytes, esc, millis, num, pct, utc};
use crate::snapshot::{ClosedRound, Snapshot};
use crate::Verification;

/// Where links point: the live dashboard's pages, or anchors inside the one-page report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    Live,
    Report,
}

impl Links {
    pub fn round(self, round: u64) -> String {
        match self {
            Links::Live => format!("/rounds/{round}"),
            Links::Report => format!("#round-{round}"),
        }
    }

    pub fn node(self, node: &str) -> String {
        match self {
            Links::Live => format!("/nodes/{}", esc(node)),
            Links::Report => format!("#node-{}", esc(node)),
        }
    }

    /// A ledger entry's page (the report carries no ledger pages).
    pub fn entry(self, seq: u64) -> Option<String> {
        match self {
            Links::Live => Some(format!("/ledger/{seq}")),
            Links::Report => None,
        }
    }

    fn entry_link(self, seq: u64) -> String {
        match self.entry(seq) {
            Some(href) => format!(r#"<a href="{href}">#{seq}</a>"#),
            None => format!("#{seq}"),
        }
    }
}

/// The consortium at a glance: the numbers an operator checks first.
pub fn overview(s: &Snapshot, verification: &Verification, links: Links) -> String {
    let mut h = String::new();
    let head_entry = s.entries.last();
    let open = match &s.open {
        Some(o) => format!("round {} open · {} contribution(s) so far", o.round, o.contributions.len()),
        None => "no round open".into(),
    };
    let _ = write!(
        h,
        r#"<section id="overview"><h2>Consortium</h2><div class="cards">
<div class="card"><span class="k">rounds closed</span><span class="v" id="rounds-closed">{}</span></div>
<div class="card"><span class="k">now</span><span class="v" id="round-state">{}</span></div>
<div class="card"><span class="k">ledger</span><span class="v" id="ledger-length">{} entries</span></div>
<div class="card"><span class="k">ledger head</span><span class="v mono" id="ledger-head">{}</span></div>
<div class="card"><span class="k">base in force</span><span class="v mono" title="{base}">{}</span></div>
<div class="card"><span class="k">ledger verify</span><span class="v" id="verify">{}</span></div>
</div>"#,
        s.head.round,
        esc(&open),
        s.entries.len(),
        head_entry.map_or("—".into(), |e| format!("{} {}", links.entry_link(e.seq), esc(&e.hash.short()))),
        esc(&s.head.model.base_hash.short()),
        verification.html(),
        base = s.head.model.base_hash,
    );
    if let Some(error) = &s.ledger_error {
        let _ = write!(
            h,
            r#"<p class="bad" id="ledger-broken">The ledger stops checking after entry {}: {}. Run <code>weft ledger verify</code> for details.</p>"#,
            s.entries.len(),
            esc(error)
        );
    }
    if let Some(key) = &s.coordinator_key {
        let _ = write!(h, r#"<p class="muted">coordinator key <span class="mono">{key}</span></p>"#);
    }
    h.push_str("</section>");
    h.push_str(&roster(s, links));
    h.push_str(&policy(s));
    h
}

fn roster(s: &Snapshot, links: Links) -> String {
    let mut h = String::from(
        r#"<section id="roster"><h2>Roster</h2><table><thead><tr><th>node</th><th>language</th><th class="n">contributions</th><th class="n">accepted</th><th class="n">last quality</th><th>last decision</th></tr></thead><tbody>"#,
    );
    for node in s.nodes() {
        let mine = s.contributions_of(&node);
        let accepted = mine.iter().filter(|(_, c)| c.accepted).count();
        let last = mine.last();
        let language = s.roster.get(&node).cloned().unwrap_or_else(|| "not a member".into());
        let _ = write!(
            h,
            r#"<tr><td><a href="{}">{}</a></td><td>{}</td><td class="n">{}</td><td class="n">{accepted}</td><td class="n">{}</td><td>{}</td></tr>"#,
            links.node(&node),
            esc(&node),
            esc(&language),
            mine.len(),
            last.map_or("—".into(), |(_, c)| pct(c.quality)),
            last.map_or("—".into(), |(r, c)| format!("round {r}: {}", decision_badge(c))),
        );
    }
    h.push_str("</tbody></table></section>");
    h
}

/// The consortium's rules as stored with it (the roster and the model's settings aside).
fn policy(s: &Snapshot) -> String {
    let mut rows = Vec::new();
    if let serde_json::Value::Object(map) = &s.config {
        for (key, value) in map {
            if matches!(key.as_str(), "roster" | "settings" | "format" | "initial_base_hash") {
                continue;
            }
            flatten(key, value, &mut rows);
        }
    }
    let mut h = String::from(
        r#"<section id="policy"><h2>Rules</h2><table class="kv"><thead><tr><th>rule</th><th>value</th></tr></thead><tbody>"#,
    );
    for (key, value) in rows {
        let _ = write!(h, "<tr><td>{}</td><td class=\"mono\">{}</td></tr>", esc(&key), esc(&value));
    }
    h.push_str("</tbody></table></section>");
    h
}

fn flatten(prefix: &str, value: &serde_json::Value, rows: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                flatten(&format!("{prefix}.{k}"), v, rows);
            }
        }
        serde_json::Value::Null => rows.push((prefix.into(), "off".into())),
        serde_json::Value::String(text) => rows.push((prefix.into(), text.clone())),
        other => rows.push((prefix.into(), other.to_string())),
    }
}

/// The held-out loss chart with its caption.
pub fn chart_section(s: &Snapshot) -> String {
    format!(
        r#"<section id="loss"><h2>Held-out loss per language</h2>{}<p class="muted">Loss of the base in force after each round on the coordinator's held-out text, nats per byte (round 0: the initial base). Lower is better.</p></section>"#,
        loss_chart(&s.loss_series())
    )
}

/// Every round, oldest first, with the open one last.
pub fn timeline(s: &Snapshot, links: Links) -> String {
    let languages = s.languages();
    let mut h = String::from(
        r#"<section id="rounds"><h2>Rounds</h2><table id="rounds-table"><thead><tr><th>round</th><th>closed</th><th class="n">took</th><th class="n">received</th><th class="n">accepted</th><th class="n">refused</th><th>outcome</th><th>base</th>"#,
    );
    for l in &languages {
        let _ = write!(h, r#"<th class="n">{}</th>"#, esc(l));
    }
    h.push_str("</tr></thead><tbody>");
    for r in &s.rounds {
        let rec = &r.record;
        let refused = rec.contributions.iter().filter(|c| !c.accepted).count();
        // Wall-clock times: a clock set back during the round leaves no duration, not a panic.
        let took = rec.timing.and_then(|t| Some(t.closed_unix_ms.checked_sub(t.opened_unix_ms?)? as f64));
        let _ = write!(
            h,
            r#"<tr class="round" data-round="{n}"><td><a href="{}">{n}</a></td><td>{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{refused}</td><td>{}</td><td class="mono">{}</td>"#,
            links.round(rec.round),
            utc(rec.timing.map(|t| t.closed_unix_ms)),
            millis(took),
            rec.contributions.len(),
            rec.accepted,
            outcome(r),
            esc(&r.base_in_force().short()),
            n = rec.round,
        );
        for l in &languages {
            let _ = write!(h, r#"<td class="n">{}</td>"#, num(r.head.base_loss.get(l).copied(), 4));
        }
        h.push_str("</tr>");
    }
    if let Some(open) = &s.open {
        let _ = write!(
            h,
            r#"<tr class="round open" data-round="{n}"><td><a href="{}">{n}</a></td><td>open</td><td></td><td class="n">{}</td><td colspan="{}"></td></tr>"#,
            links.round(open.round),
            open.contributions.len(),
            4 + languages.len(),
            n = open.round,
        );
    }
    h.push_str("</tbody></table></section>");
    h
}

/// What became of a round's step, in words.
fn outcome(r: &ClosedRound) -> String {
    let rec = &r.record;
    let mut parts = Vec::new();
    if let Some(j) = &rec.gauntlet {
        parts.push(format!("gauntlet: {}", j.verdict.outcome));
    }
    if rec.breaker.is_some() {
        parts.push("circuit breaker tripped: rolled back".into());
    }
    if parts.is_empty() {
        parts.push(if rec.base_changed { "base moved".into() } else { "base unchanged".into() });
    }
    esc(&parts.join(" · "))
}

fn decision_badge(c: &ContributionRecord) -> String {
    if c.accepted {
        r#"<span class="badge ok">accepted</span>"#.into()
    } else {
        match &c.reason {
            Some(code) => format!(r#"<span class="badge bad">refused: {}</span>"#, esc(code.as_str())),
            None => r#"<span class="badge">pending</span>"#.into(),
        }
    }
}

/// One round: its step, every contribution with what the coordinator measured and decided.
pub fn round_page(s: &Snapshot, round: u64, links: Links) -> Option<String> {
    if let Some(r) = s.round(round) {
        return Some(closed_round(s, r, links));
    }
    let open = s.open.as_ref().filter(|o| o.round == round)?;
    let mut h = format!(r#"<section id="round-{round}" class="round-detail"><h2>Round {round} (open)</h2>"#);
    h.push_str(&contributions_table(s, round, &open.contributions, None, links));
    h.push_str("</section>");
    Some(h)
}

fn closed_round(s: &Snapshot, r: &ClosedRound, links: Links) -> String {
    let rec = &r.record;
    let mut h = format!(r#"<section id="round-{n}" class="round-detail"><h2>Round {n}</h2>"#, n = rec.round);
    let timing = rec.timing;
    let _ = write!(
        h,
        r#"<table class="kv"><tbody>
<tr><td>outcome</td><td>{}</td></tr>
<tr><td>base</td><td class="mono">{} → {}</td></tr>
<tr><td>aggregator</td><td class="mono">{}</td></tr>
<tr><td>accepted</td><td>{} of {} (quorum {})</td></tr>
<tr><td>unassigned share</td><td>{}</td></tr>
<tr><td>probe scale</td><td>{}</td></tr>
<tr><td>opened · closed</td><td>{} · {}</td></tr>
<tr><td>aggregation took</td><td>{}</td></tr>
</tbody></table>"#,
        outcome(r),
        esc(&rec.previous_base_hash.short()),
        esc(&r.base_in_force().short()),
        esc(&rec.aggregator),
        rec.accepted,
        rec.contributions.len(),
        rec.quorum_required,
        num(Some(rec.unassigned_share), 4),
        rec.probe_scale,
        utc(timing.and_then(|t| t.opened_unix_ms)),
        utc(timing.map(|t| t.closed_unix_ms)),
        millis(timing.map(|t| t.aggregation_ms)),
    );
    h.push_str(&contributions_table(s, rec.round, &rec.contributions, timing.and_then(|t| t.opened_unix_ms), links));
    h.push_str(&language_losses(s, r));
    h.push_str(&gauntlet(rec));
    h.push_str(&governance_scores(rec, links));
    h.push_str(&proposals(rec));
    h.push_str("</section>");
    h
}

fn contributions_table(
    s: &Snapshot,
    round: u64,
    contributions: &[ContributionRecord],
    opened: Option<u64>,
    links: Links,
) -> String {
    let mut h = String::from(
        r#"<h3>Contributions</h3><table class="contributions"><thead><tr><th>node</th><th>language</th><th class="n">quality</th><th>decision</th><th>reason</th><th class="n">weight</th><th>cap hit</th><th class="n">influence</th><th class="n">update</th><th class="n">on the wire</th><th class="n">arrived</th><th class="n">intake</th><th>ledger</th></tr></thead><tbody>"#,
    );
    if contributions.is_empty() {
        h.push_str(r#"<tr><td colspan="13" class="muted">none yet</td></tr>"#);
    }
    for c in contributions {
        let arrived = c.timing.map(|t| match opened {
            Some(o) => format!("+{}", millis(Some(t.received_unix_ms.saturating_sub(o) as f64))),
            None => utc(Some(t.received_unix_ms)),
        });
        let ledger: Vec<String> = s
            .entries_of(c.node.as_str(), round)
            .iter()
            .map(|e| match links.entry(e.seq) {
                Some(href) => format!(r#"<a href="{href}" title="{}">#{}</a>"#, e.event.kind(), e.seq),
                None => format!("#{}", e.seq),
            })
            .collect();
        let _ = write!(
            h,
            r#"<tr class="contribution {}" data-node="{node}" data-decision="{}"><td><a href="{}">{node}</a></td><td>{}</td><td class="n">{}</td><td>{}</td><td class="reason">{}</td><td class="n">{}</td><td>{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td>{}</td></tr>"#,
            if c.accepted { "accepted" } else { "refused" },
            if c.accepted {
                "accepted".into()
            } else {
                c.reason.as_ref().map_or("pending".into(), |r| esc(r.as_str()))
            },
            links.node(c.node.as_str()),
            esc(c.language.as_deref().unwrap_or("—")),
            pct(c.quality),
            decision_badge(c),
            esc(c.detail.as_deref().unwrap_or("")),
            num(Some(c.weight), 4),
            if c.capped { "yes" } else { "" },
            num(Some(c.influence), 4),
            bytes(c.update_bytes),
            bytes(c.wire_bytes),
            arrived.unwrap_or_else(|| "—".into()),
            millis(c.timing.map(|t| t.intake_ms)),
            ledger.join(" "),
            node = esc(c.node.as_str()),
        );
    }
    h.push_str("</tbody></table>");
    h
}

/// Each language's loss before and after the round, and the per-language check's attempts.
fn language_losses(s: &Snapshot, r: &ClosedRound) -> String {
    let rec = &r.record;
    let before =
        s.rounds.iter().rev().find(|p| p.record.round < rec.round).map_or(&s.genesis_loss, |p| &p.head.base_loss);
    let mut h = String::from(
        r#"<h3>Held-out loss of the base</h3><table><thead><tr><th>language</th><th class="n">before</th><th class="n">after</th><th class="n">change</th></tr></thead><tbody>"#,
    );
    for (language, after) in &r.head.base_loss {
        let b = before.get(language).copied();
        let change = b.map(|b| (after - b) / b);
        let _ = write!(
            h,
            r#"<tr><td>{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td></tr>"#,
            esc(language),
            num(b, 4),
            num(Some(*after), 4),
            pct(change)
        );
    }
    h.push_str("</tbody></table>");
    if let Some(check) = &rec.language_check {
        let _ = write!(
            h,
            r#"<h3>Per-language check</h3><p class="muted">A round may raise no language's held-out loss by more than {}.</p><table><thead><tr><th>candidate</th><th class="n">step</th><th>outcome</th></tr></thead><tbody>"#,
            pct(Some(check.tolerance))
        );
        for (i, attempt) in check.attempts.iter().enumerate() {
            let outcome = match &attempt.outcome {
                weft_ledger::CheckOutcome::Passed => "no language up".to_string(),
                weft_ledger::CheckOutcome::Risen { risen } => {
                    let list: Vec<String> = risen.iter().map(|(l, v)| format!("{l} {}", pct(Some(*v)))).collect();
                    format!("risen: {}", list.join(", "))
                }
            };
            let published = if check.published == Some(i) { " (published)" } else { "" };
            let _ = write!(
                h,
                r#"<tr><td>{}{published}</td><td class="n">{}</td><td>{}</td></tr>"#,
                i + 1,
                attempt.scale,
                esc(&outcome)
            );
        }
        h.push_str("</tbody></table>");
    }
    h
}

fn gauntlet(rec: &RoundRecord) -> String {
    let Some(j) = &rec.gauntlet else { return String::new() };
    let mut h = format!(
        r#"<h3>Gauntlet: {}</h3><table><thead><tr><th>language</th><th class="n">items</th><th class="n">champion</th><th class="n">challenger</th><th class="n">gain</th><th class="n">interval</th><th class="n">Holm p</th><th>verdict</th></tr></thead><tbody>"#,
        esc(&j.verdict.outcome.to_string())
    );
    for (language, t) in &j.verdict.tests {
        let verdict = match (t.improved, t.non_inferior) {
            (true, _) => "better",
            (false, true) => "non-inferior",
            (false, false) => "may be worse",
        };
        let _ = write!(
            h,
            r#"<tr><td>{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{} … {}</td><td class="n">{}</td><td>{verdict}</td></tr>"#,
            esc(language),
            t.items,
            num(Some(t.champion_loss), 4),
            num(Some(t.challenger_loss), 4),
            pct(Some(t.gain)),
            pct(Some(t.lower)),
            pct(Some(t.upper)),
            num(Some(t.p_holm), 3),
        );
    }
    h.push_str("</tbody></table>");
    h
}

fn governance_scores(rec: &RoundRecord, links: Links) -> String {
    let Some(g) = &rec.governance else { return String::new() };
    let mut h = String::from(
        r#"<h3>Canary audit</h3><table><thead><tr><th>node</th><th class="n">quality (public canaries)</th><th class="n">Goodhart gap</th><th>flagged</th></tr></thead><tbody>"#,
    );
    for score in &g.scores {
        let _ = write!(
            h,
            r#"<tr><td><a href="{}">{}</a></td><td class="n">{}</td><td class="n">{}</td><td>{}</td></tr>"#,
            links.node(score.node.as_str()),
            esc(score.node.as_str()),
            pct(Some(score.quality)),
            num(Some(score.goodhart_gap), 4),
            if score.flagged { "yes" } else { "" }
        );
    }
    h.push_str("</tbody></table>");
    h
}

fn proposals(rec: &RoundRecord) -> String {
    if rec.proposals_counted.is_empty() {
        return String::new();
    }
    let mut h = String::from(
        r#"<h3>Votes counted</h3><table><thead><tr><th>proposal</th><th>change</th><th class="n">approval</th><th class="n">turnout</th><th>result</th></tr></thead><tbody>"#,
    );
    for p in &rec.proposals_counted {
        let result = match p.effective_round {
            Some(r) => format!("passed: applies from round {r}"),
            None => "did not pass".into(),
        };
        let _ = write!(
            h,
            r#"<tr><td class="mono">{}</td><td class="mono">{}</td><td class="n">{}</td><td class="n">{}</td><td>{}</td></tr>"#,
            esc(&p.proposal.short()),
            esc(&serde_json::to_string(&p.change).unwrap_or_default()),
            pct(Some(p.tally.approval)),
            pct(Some(p.tally.turnout)),
            esc(&result)
        );
    }
    h.push_str("</tbody></table>");
    h
}

/// The reputation table after the last audited round.
pub fn reputation(s: &Snapshot, links: Links) -> String {
    let mut h = String::from(r#"<section id="reputation"><h2>Reputation</h2>"#);
    let Some((round, rows)) = s.reputation() else {
        h.push_str(r#"<p class="muted">This consortium runs without governance: no canary audits, no reputation.</p></section>"#);
        return h;
    };
    let _ = write!(
        h,
        r#"<p class="muted">After round {round}'s audits. N: evidence; Ĉ: shrunk competence; S: slashing; R: reputation; w: vote weight (capped).</p><table><thead><tr><th>node</th><th>topic</th><th class="n">N</th><th class="n">Ĉ</th><th class="n">S</th><th class="n">R</th><th class="n">w</th></tr></thead><tbody>"#
    );
    for row in rows {
        let _ = write!(
            h,
            r#"<tr><td><a href="{}">{}</a></td><td>{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td></tr>"#,
            links.node(row.node.as_str()),
            esc(row.node.as_str()),
            esc(&row.topic),
            num(Some(row.n), 2),
            num(Some(row.competence), 4),
            num(Some(row.slashing), 4),
            num(Some(row.reputation), 4),
            num(Some(row.vote_weight), 4),
        );
    }
    h.push_str("</tbody></table></section>");
    h
}

/// Each node's privacy budget as its latest charge left it.
pub fn privacy(s: &Snapshot, links: Links) -> String {
    let mut h = String::from(r#"<section id="privacy"><h2>Privacy budgets</h2>"#);
    let budgets = s.budgets();
    if budgets.is_empty() {
        h.push_str(r#"<p class="muted">No privacy loss charged: this consortium runs without differential privacy.</p></section>"#);
        return h;
    }
    h.push_str(r#"<table><thead><tr><th>node</th><th class="n">ε spent</th><th class="n">budget</th><th>used</th><th class="n">δ</th><th class="n">rounds</th><th>latest charge</th></tr></thead><tbody>"#);
    for b in budgets {
        let used = if b.budget > 0.0 { (b.epsilon_total / b.budget).clamp(0.0, 1.0) } else { 1.0 };
        let _ = write!(
            h,
            r#"<tr><td><a href="{}">{}</a></td><td class="n">{}</td><td class="n">{}</td><td><span class="bar"><span style="width:{:.0}%"></span></span> {}</td><td class="n">{:e}</td><td class="n">{}</td><td>{}</td></tr>"#,
            links.node(&b.node),
            esc(&b.node),
            num(Some(b.epsilon_total), 3),
            num(Some(b.budget), 3),
            100.0 * used,
            pct(Some(used)).trim_start_matches('+'),
            b.delta,
            b.rounds_charged,
            links.entry_link(b.seq),
        );
    }
    h.push_str("</tbody></table></section>");
    h
}

/// A node: its language, standing, budget and every contribution with a link to its proof.
pub fn node_page(s: &Snapshot, node: &str, links: Links) -> Option<String> {
    let mine = s.contributions_of(node);
    let language = s.roster.get(node);
    if language.is_none() && mine.is_empty() {
        return None;
    }
    let mut h = format!(
        r#"<section id="node-{id}" class="node"><h2>{id}</h2><p>{}</p>"#,
        match language {
            Some(l) => format!("member for language <b>{}</b>", esc(l)),
            None => "not a member of the roster".into(),
        },
        id = esc(node)
    );
    if let Some((round, rows)) = s.reputation() {
        let mine: Vec<String> = rows
            .iter()
            .filter(|r| r.node.as_str() == node)
            .map(|r| format!("{}: R {} · w {}", esc(&r.topic), num(Some(r.reputation), 4), num(Some(r.vote_weight), 4)))
            .collect();
        if !mine.is_empty() {
            let _ = write!(h, "<p>reputation after round {round}: {}</p>", mine.join("; "));
        }
    }
    if let Some(b) = s.budgets().into_iter().find(|b| b.node == node) {
        let _ = write!(
            h,
            "<p>privacy: ε {} of {} spent over {} round(s)</p>",
            num(Some(b.epsilon_total), 3),
            num(Some(b.budget), 3),
            b.rounds_charged
        );
    }
    h.push_str(r#"<table class="contributions"><thead><tr><th>round</th><th class="n">quality</th><th>decision</th><th>reason</th><th class="n">weight</th><th class="n">influence</th><th class="n">tokens</th><th>delta</th><th>proof</th></tr></thead><tbody>"#);
    for (round, c) in &mine {
        let closed = s.round(*round).is_some();
        let proof = match (links, c.delta_hash.is_some() || c.reason.is_some(), closed) {
            (Links::Live, true, true) => format!(r#"<a href="/nodes/{}/proof?round={round}">proof</a>"#, esc(node)),
            _ => String::new(),
        };
        let _ = write!(
            h,
            r#"<tr><td><a href="{}">{round}</a></td><td class="n">{}</td><td>{}</td><td class="reason">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="mono">{}</td><td>{proof}</td></tr>"#,
            links.round(*round),
            pct(c.quality),
            decision_badge(c),
            esc(c.detail.as_deref().unwrap_or("")),
            num(Some(c.weight), 4),
            num(Some(c.influence), 4),
            c.token_count,
            c.delta_hash.map_or("—".into(), |d| esc(&d.short())),
        );
    }
    h.push_str("</tbody></table>");
    if links == Links::Live {
        let key = s.coordinator_key.map(|k| k.to_string()).unwrap_or_default();
        let _ = write!(
            h,
            r#"<p class="muted">A proof shows the contribution's ledger entry is under the round's signed contributions root; anyone can check it without the ledger: <code>weft ledger check-proof proof.json --key {key}</code>.</p>"#
        );
    }
    h.push_str("</section>");
    Some(h)
}

/// What a ledger page shows: which entries, and which filters the page takes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LedgerFilter {
    pub from: u64,
    pub limit: u64,
    pub kind: Option<String>,
    pub round: Option<u64>,
    pub node: Option<String>,
}

impl LedgerFilter {
    pub const DEFAULT_LIMIT: u64 = 200;
    pub const MAX_LIMIT: u64 = 2000;

    fn matches(&self, e: &Entry) -> bool {
        e.seq >= self.from
            && self.kind.as_deref().is_none_or(|k| e.event.kind() == k)
            && self.round.is_none_or(|r| e.event.round() == r)
            && self.node.as_deref().is_none_or(|n| event_node(&e.event) == Some(n))
    }

    fn query(&self, from: u64) -> String {
        let mut q = format!("?from={from}&limit={}", self.limit);
        if let Some(k) = &self.kind {
            q.push_str(&format!("&kind={k}"));
        }
        if let Some(r) = self.round {
            q.push_str(&format!("&round={r}"));
        }
        if let Some(n) = &self.node {
            q.push_str(&format!("&node={n}"));
        }
        esc(&q)
    }
}

/// The node an event concerns, if one.
fn event_node(event: &Event) -> Option<&str> {
    match event {
        Event::ContributionReceived { node, .. }
        | Event::Evaluation { node, .. }
        | Event::PrivacyCharged { node, .. } => Some(node),
        Event::ProposalMade { proposer, .. } => Some(proposer),
        Event::VoteCast { voter, .. } => Some(voter),
        _ => None,
    }
}

/// Every event kind the ledger knows (the `kind` filter's values).
pub const EVENT_KINDS: [&str; 15] = [
    "consortium_created",
    "round_opened",
    "contribution_received",
    "privacy_charged",
    "communities_drawn",
    "evaluation",
    "decision",
    "challenger_judged",
    "breaker_tripped",
    "proposal_made",
    "vote_cast",
    "proposal_tallied",
    "rules_changed",
    "base_published",
    "rolled_back",
];

/// The ledger, entry by entry.
pub fn ledger(s: &Snapshot, filter: &LedgerFilter) -> String {
    let mut h = String::from(r#"<section id="ledger"><h2>Ledger</h2>"#);
    let matching: Vec<&Entry> =
        s.entries.iter().filter(|e| filter.matches(e)).take(filter.limit as usize + 1).collect();
    let more = matching.len() as u64 > filter.limit;
    let _ = write!(
        h,
        r#"<p class="muted">{} entries, each chained to the one before by its hash and signed by the coordinator. Filters: <code>?kind=</code>, <code>?round=</code>, <code>?node=</code>, <code>?from=</code>, <code>?limit=</code>.</p><table id="ledger-table"><thead><tr><th>#</th><th>event</th><th class="n">round</th><th>what</th><th>hash</th></tr></thead><tbody>"#,
        s.entries.len()
    );
    let mut last = None;
    for e in matching.iter().take(filter.limit as usize) {
        last = Some(e.seq);
        let _ = write!(
            h,
            r#"<tr class="entry" data-kind="{kind}"><td><a href="/ledger/{seq}">{seq}</a></td><td>{kind}</td><td class="n">{}</td><td>{}</td><td class="mono">{}</td></tr>"#,
            e.event.round(),
            summary(&e.event, Links::Live),
            esc(&e.hash.short()),
            seq = e.seq,
            kind = e.event.kind(),
        );
    }
    h.push_str("</tbody></table>");
    if let (true, Some(last)) = (more, last) {
        let _ = write!(h, r#"<p><a rel="next" href="/ledger{}">next entries →</a></p>"#, filter.query(last + 1));
    }
    h.push_str("</section>");
    h
}

/// One line saying what an entry records (HTML, links included).
pub fn summary(event: &Event, links: Links) -> String {
    let node_link = |n: &str| format!(r#"<a href="{}">{}</a>"#, links.node(n), esc(n));
    match event {
        Event::ConsortiumCreated { roster, base_hash, .. } => {
            format!("consortium created: {} members, base {}", roster.len(), esc(&base_hash.short()))
        }
        Event::RoundOpened { round, base_hash, .. } => {
            format!(r#"<a href="{}">round {round}</a> opened on base {}"#, links.round(*round), esc(&base_hash.short()))
        }
        Event::ContributionReceived { node, delta_hash, refused, .. } => match refused {
            Some(r) => format!("{} refused at the door: <b>{}</b> — {}", node_link(node), esc(&r.code), esc(&r.detail)),
            None => {
                format!("{} delta received {}", node_link(node), delta_hash.map_or(String::new(), |h| esc(&h.short())))
            }
        },
        Event::PrivacyCharged { node, epsilon_round, epsilon_total, budget, .. } => format!(
            "{} charged ε {} (total {} of {})",
            node_link(node),
            num(Some(*epsilon_round), 3),
            num(Some(*epsilon_total), 3),
            num(Some(*budget), 3)
        ),
        Event::CommunitiesDrawn { communities, .. } => format!("{} communities drawn", communities.len()),
        Event::Evaluation { node, quality, .. } => {
            format!("{} measured: quality {}", node_link(node), pct(*quality))
        }
        Event::Decision { accepted, rejected, aggregator, .. } => {
            let refused: Vec<String> =
                rejected.iter().map(|r| format!("{} ({})", node_link(&r.node), esc(&r.code))).collect();
            format!(
                "decision ({}): {} accepted{}",
                esc(aggregator),
                accepted.len(),
                if refused.is_empty() { String::new() } else { format!("; refused {}", refused.join(", ")) }
            )
        }
        Event::ChallengerJudged { verdict, .. } => format!("gauntlet: {}", esc(&verdict.outcome.to_string())),
        Event::BreakerTripped { anchor_round, risen, .. } => {
            let list: Vec<String> = risen.iter().map(|(l, v)| format!("{} {}", esc(l), pct(Some(*v)))).collect();
            format!("circuit breaker tripped over round {anchor_round}'s base: {}", list.join(", "))
        }
        Event::ProposalMade { proposer, change, .. } => {
            format!("{} proposed {}", node_link(proposer), esc(&serde_json::to_string(change).unwrap_or_default()))
        }
        Event::VoteCast { voter, approve, .. } => {
            format!("{} voted {}", node_link(voter), if *approve { "yes" } else { "no" })
        }
        Event::ProposalTallied { tally, effective_round, .. } => format!(
            "vote counted: approval {} — {}",
            pct(Some(tally.approval)),
            effective_round.map_or("did not pass".into(), |r| format!("passed, applies from round {r}"))
        ),
        Event::RulesChanged { round, .. } => format!("rules changed from round {round}"),
        Event::BasePublished { round, base_hash, .. } => {
            format!(r#"<a href="{}">round {round}</a> published base {}"#, links.round(*round), esc(&base_hash.short()))
        }
        Event::RolledBack { to_round, base_hash, .. } => {
            format!("rolled back to round {to_round}'s base {}", esc(&base_hash.short()))
        }
    }
}

/// One ledger entry: what it records, its place in the chain, and the entries it relates to.
pub fn entry_page(s: &Snapshot, seq: u64) -> Option<String> {
    let e = s.entries.iter().find(|e| e.seq == seq)?;
    let mut h = format!(
        r#"<section id="entry-{seq}"><h2>Ledger entry #{seq}: {}</h2><p>{}</p><table class="kv"><tbody><tr><td>round</td><td>{}</td></tr><tr><td>hash</td><td class="mono">{}</td></tr><tr><td>previous</td><td class="mono">{}</td></tr><tr><td>signature</td><td class="mono wrap">{}</td></tr></tbody></table>"#,
        e.event.kind(),
        summary(&e.event, Links::Live),
        e.event.round(),
        e.hash,
        match seq {
            0 => "— (the first entry)".to_string(),
            _ => format!(r#"<a href="/ledger/{}">#{}</a> {}"#, seq - 1, seq - 1, e.prev),
        },
        esc(&e.signature.to_string()),
    );
    let related = related(s, e);
    if !related.is_empty() {
        h.push_str(r#"<h3>Related entries</h3><ul class="related">"#);
        for (r, why) in related {
            let _ = write!(
                h,
                r#"<li><a href="/ledger/{seq}">#{seq} {kind}</a> — {why}</li>"#,
                seq = r.seq,
                kind = r.event.kind()
            );
        }
        h.push_str("</ul>");
    }
    let _ = write!(
        h,
        r#"<h3>Event</h3><pre class="json">{}</pre>"#,
        esc(&serde_json::to_string_pretty(&e.event).unwrap_or_default())
    );
    let next = s.entries.iter().any(|n| n.seq == seq + 1);
    h.push_str("<p>");
    if seq > 0 {
        let _ = write!(h, r#"<a href="/ledger/{}">← #{}</a> "#, seq - 1, seq - 1);
    }
    if next {
        let _ = write!(h, r#"<a href="/ledger/{}">#{} →</a>"#, seq + 1, seq + 1);
    }
    h.push_str("</p></section>");
    Some(h)
}

/// The entries that explain `e`: a contribution's evaluation and its round's decision, a
/// decision's contributions, a round's opening and publication.
fn related<'a>(s: &'a Snapshot, e: &Entry) -> Vec<(&'a Entry, &'static str)> {
    let round = e.event.round();
    let node = event_node(&e.event);
    s.entries
        .iter()
        .filter(|r| r.seq != e.seq && r.event.round() == round)
        .filter_map(|r| {
            let why = match (&e.event, &r.event) {
                (Event::ConsortiumCreated { .. }, _) => return None,
                (_, Event::Decision { .. }) => "the round's decision",
                (Event::Decision { .. }, Event::ContributionReceived { .. }) => "a contribution it decided on",
                (Event::Decision { .. }, Event::Evaluation { .. }) => "the measurement it weighed",
                (_, Event::ContributionReceived { node: n, .. }) if Some(n.as_str()) == node => "the contribution",
                (_, Event::Evaluation { node: n, .. }) if Some(n.as_str()) == node => "its measurement",
                (_, Event::PrivacyCharged { node: n, .. }) if Some(n.as_str()) == node => "its privacy charge",
                (_, Event::RoundOpened { .. }) => "the round's opening",
                (_, Event::ChallengerJudged { .. }) => "the gauntlet's judgment",
                (_, Event::BasePublished { .. }) => "the base it published",
                _ => return None,
            };
            Some((r, why))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_links_are_anchors_and_live_links_are_pages() {
        assert_eq!(Links::Live.round(3), "/rounds/3");
        assert_eq!(Links::Report.round(3), "#round-3");
        assert_eq!(Links::Report.entry(4), None);
        assert_eq!(Links::Live.node("node-de"), "/nodes/node-de");
    }

    #[test]
    fn configuration_flattens_to_dotted_rules() {
        let mut rows = Vec::new();
        flatten(
            "policy",
            &serde_json::json!({"cap": 0.5, "fairness": {"rule": "every-language"}, "x": null}),
            &mut rows,
        );
        assert_eq!(
            rows,
            vec![
                ("policy.cap".to_string(), "0.5".to_string()),
                ("policy.fairness.rule".into(), "every-language".into()),
                ("policy.x".into(), "off".into())
            ]
        );
    }
}
