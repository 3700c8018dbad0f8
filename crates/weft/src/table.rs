//! Plain-text tables for the demo's output.

use std::collections::BTreeMap;

use weft_coordinator::RoundRecord;
use weft_core::quality::LossTable;
use weft_core::NodeId;

use crate::say;

pub fn losses(table: &LossTable) -> String {
    table.iter().map(|(lang, loss)| format!("{lang} {loss:.4}")).collect::<Vec<_>>().join("  ")
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

/// One round: every contribution with its decision, then the new base.
/// Attackers are marked with `!`.
pub fn round(
    record: &RoundRecord,
    local_losses: &BTreeMap<NodeId, Option<f64>>,
    attackers: &[NodeId],
) -> anyhow::Result<()> {
    say!();
    say!("round {}", record.round);
    say!(
        "  {:<15} {:<6} {:>10} {:>10}  {:<34} {:>7} {:>8}",
        "node",
        "lang",
        "local loss",
        "quality",
        "decision",
        "weight",
        "applied"
    );
    for c in &record.contributions {
        let decision = if c.accepted {
            if c.capped {
                "accepted (capped)".to_owned()
            } else {
                "accepted".to_owned()
            }
        } else {
            format!("rejected: {}", c.reason.map_or("?", |r| r.as_str()))
        };
        let mark = if attackers.contains(&c.node) { "!" } else { "" };
        say!(
            "  {:<15} {:<6} {:>10} {:>10}  {:<34} {:>7.4} {:>8.4}",
            format!("{}{mark}", c.node),
            c.language.as_deref().unwrap_or("-"),
            opt(local_losses.get(&c.node).copied().flatten(), 4),
            c.quality.map_or_else(|| "-".to_owned(), |q| format!("{:+.2}%", 100.0 * q)),
            decision,
            c.weight,
            c.influence
        );
    }
    let moved = if record.base_changed { "→" } else { "= (unchanged)" };
    say!(
        "  unassigned share {:.4} · accepted {} (quorum {}) · base {} {} {}",
        record.unassigned_share,
        record.accepted,
        record.quorum_required,
        record.previous_base_hash.short(),
        moved,
        record.base_hash.short()
    );
    say!("  held-out loss of the base (nats/byte): {}", losses(&record.heldout_loss));
    let charged: Vec<String> = record
        .contributions
        .iter()
        .filter_map(|c| c.privacy.map(|p| format!("{} {:.3}", c.node, p.epsilon_total)))
        .collect();
    if let Some(p) = record.contributions.iter().find_map(|c| c.privacy) {
        say!(
            "  privacy: ε {:.3} charged per contribution this round; spent (composed) {} of {} (δ {:e})",
            p.epsilon_round,
            charged.join(", "),
            p.budget,
            p.delta
        );
    }
    if let Some(check) = &record.language_check {
        for line in language_check(check) {
            say!("  {line}");
        }
    }
    for counted in &record.proposals_counted {
        let t = &counted.tally;
        let outcome = match counted.effective_round {
            Some(at) => format!("PASSED: takes effect when round {at} opens"),
            None if !t.quorum_met => "FAILED: no quorum".to_owned(),
            None => "FAILED: short of the supermajority".to_owned(),
        };
        say!(
            "  proposal {} ({}) counted: yes {} · no {} · turnout {:.0}% · approval {:.0}% → {outcome}",
            counted.proposal.short(),
            serde_json::to_string(&counted.change)?,
            t.yes,
            t.no,
            100.0 * t.turnout,
            100.0 * t.approval
        );
    }
    if let Some(weft_ledger::Event::BreakerTripped { anchor_round, risen, rules, .. }) = &record.breaker {
        let rises: Vec<String> = risen.iter().map(|(l, r)| format!("{l} +{:.2}%", 100.0 * r)).collect();
        say!(
            "  CIRCUIT BREAKER: {} over round {anchor_round}'s base (threshold {:.1}%) → rolled back to it",
            rises.join(", "),
            100.0 * rules.threshold
        );
    }
    if let Some(judgment) = &record.gauntlet {
        let word = if judgment.verdict.outcome.promoted() { "PROMOTED" } else { "REFUSED: the champion stays" };
        say!(
            "  challenger {} against champion {} → {word}",
            judgment.challenger_hash.short(),
            judgment.champion_hash.short()
        );
        for line in gauntlet(&judgment.rules, &judgment.verdict) {
            say!("  {line}");
        }
    }
    Ok(())
}

/// The per-language check, one line per candidate tried: its priorities and step, and what the
/// check concluded.
pub fn language_check(check: &weft_ledger::LanguageCheck) -> Vec<String> {
    use weft_ledger::CheckOutcome;
    let percent = |r: &f64| format!("{:+.1}%", 100.0 * r);
    let mut lines = vec![format!(
        "per-language check (a round may raise no language's held-out loss by more than {:.1}%):",
        100.0 * check.tolerance
    )];
    for (k, attempt) in check.attempts.iter().enumerate() {
        let raised: Vec<String> =
            attempt.priorities.iter().filter(|(_, p)| **p != 1.0).map(|(l, p)| format!("{l} ×{p:.2}")).collect();
        let priorities =
            if raised.is_empty() { "equal priorities".to_owned() } else { format!("priority {}", raised.join(", ")) };
        let mut outcome = match &attempt.outcome {
            CheckOutcome::Passed => "no language up".to_owned(),
            CheckOutcome::Risen { risen } => {
                let up: Vec<String> = risen.iter().map(|(l, r)| format!("{l} {}", percent(r))).collect();
                format!("up: {}", up.join(", "))
            }
        };
        if check.published == Some(k) {
            outcome.push_str(": published");
        }
        lines.push(format!("  candidate {}: {priorities}, step {} → {outcome}", k + 1, attempt.scale));
    }
    if check.published.is_none() && !check.attempts.is_empty() {
        lines.push("  no candidate passed: the base stays".to_owned());
    }
    lines
}

/// The gauntlet's verdict on a challenger: one line per language with the paired test's figures.
pub fn gauntlet(rules: &weft_core::GauntletRules, verdict: &weft_core::GauntletVerdict) -> Vec<String> {
    let mut lines = vec![
        format!(
            "gauntlet (paired bootstrap, {} resamples; Holm α {}; margin {:.1}%; no language below −{:.1}%):",
            rules.resamples,
            rules.alpha,
            100.0 * rules.margin,
            100.0 * rules.non_inferiority
        ),
        format!(
            "  {:<8} {:>5} {:>9} {:>10} {:>8} {:>19} {:>8} {:>8}  verdict",
            "language", "items", "champion", "challenger", "gain", "CI (1−2α)", "p", "p Holm"
        ),
    ];
    for (language, t) in &verdict.tests {
        let verdict = match (t.improved, t.non_inferior) {
            (_, false) => "MAY REGRESS",
            (true, true) => "better",
            (false, true) => "not worse",
        };
        lines.push(format!(
            "  {language:<8} {:>5} {:>9.4} {:>10.4} {:>+7.2}% {:>+8.2}% … {:>+6.2}% {:>8.4} {:>8.4}  {verdict}",
            t.items,
            t.champion_loss,
            t.challenger_loss,
            100.0 * t.gain,
            100.0 * t.lower,
            100.0 * t.upper,
            t.p_value,
            t.p_holm
        ));
    }
    lines.push(format!("  → {}", verdict.outcome));
    lines
}

/// Held-out loss per language: the base at round 0 and at the end, beside each sovereign model.
pub fn summary(
    initial: &LossTable,
    last: &LossTable,
    sovereign: &BTreeMap<NodeId, LossTable>,
    languages: &[String],
) -> anyhow::Result<()> {
    say!();
    say!("held-out loss per language (nats/byte, UDHR; lower is better)");
    let mut header = format!("  {:<8} {:>9} {:>9} {:>8}", "language", "round 0", "final", "change");
    for node in sovereign.keys() {
        header.push_str(&format!(" {node:>14}"));
    }
    say!("{header}");
    for lang in languages {
        let (Some(a), Some(b)) = (initial.get(lang), last.get(lang)) else { continue };
        let mut line = format!("  {lang:<8} {a:>9.4} {b:>9.4} {:>+7.1}%", 100.0 * (b - a) / a);
        for table in sovereign.values() {
            line.push_str(&format!(" {:>14}", opt(table.get(lang).copied(), 4)));
        }
        say!("{line}");
    }
    say!("  (the node columns are each node's own sovereign model after the last round)");
    Ok(())
}

/// Each node's standing after the round: mean over topics of reputation R, its home-topic
/// competence Ĉ and slashing S, and its weight this round.
pub fn reputation(record: &RoundRecord, languages: &[String]) -> anyhow::Result<()> {
    let Some(g) = &record.governance else { return Ok(()) };
    let nodes: std::collections::BTreeSet<&NodeId> = g.reputation.iter().map(|r| &r.node).collect();
    say!("  reputation after the round ({} topics):", languages.len());
    say!("    {:<15} {:>9} {:>8} {:>6} {:>8} {:>8}", "node", "mean R", "home Ĉ", "S", "weight", "gap");
    for node in nodes {
        let rows: Vec<_> = g.reputation.iter().filter(|r| &r.node == node).collect();
        let mean_r = rows.iter().map(|r| r.reputation).sum::<f64>() / rows.len().max(1) as f64;
        let language = record.contributions.iter().find(|c| &c.node == node).and_then(|c| c.language.as_deref());
        let home_row = rows.iter().find(|r| Some(r.topic.as_str()) == language).or(rows.first());
        let weight = record.contributions.iter().find(|c| &c.node == node).map_or(0.0, |c| c.weight);
        let gap = g.scores.iter().find(|s| &s.node == node).map(|s| s.goodhart_gap);
        let flag = if g.scores.iter().any(|s| &s.node == node && s.flagged) { " flagged" } else { "" };
        say!(
            "    {:<15} {:>9.4} {:>8.4} {:>6.3} {:>8.4} {:>8}{flag}",
            node.as_str(),
            mean_r,
            home_row.map_or(0.0, |r| r.competence),
            home_row.map_or(1.0, |r| r.slashing),
            weight,
            opt(gap, 4)
        );
    }
    Ok(())
}
