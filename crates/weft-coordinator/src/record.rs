//! What the coordinator records: one [`RoundRecord`] per round, one [`NodeManifest`] per node.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use weft_core::quality::{Gains, LossTable};
use weft_core::{ContentHash, Contribution, NodeId, RejectionCode};

use crate::governance::GovernanceRecord;
use crate::privacy::PrivacyCharge;

/// The decision about one contribution, with everything needed to see why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContributionRecord {
    pub node: NodeId,
    /// The node's language per the roster (`null` for a node outside it).
    pub language: Option<String>,
    pub accepted: bool,
    /// Stable code of the rejection (`null` when accepted).
    pub reason: Option<RejectionCode>,
    /// Human-readable explanation of the rejection.
    pub detail: Option<String>,
    /// Measured quality: the mean over languages of the relative gain (`null` if never measured).
    pub quality: Option<f64>,
    /// Share of the step given to this delta (0 when rejected).
    pub weight: f64,
    /// True when the cap limited this node's weight.
    pub capped: bool,
    /// The coefficient the delta actually carried in the step after the aggregator (a norm
    /// bound's clipping, Multi-Krum's selection, centered clipping's last iteration; for median
    /// and trimmed mean the nominal share W/n). 0 when rejected.
    pub influence: f64,
    /// What the node said about itself; recorded, never used.
    pub declared: BTreeMap<String, f64>,
    pub token_count: u64,
    pub delta_hash: Option<ContentHash>,
    pub delta_norm: Option<f64>,
    /// Held-out loss of the probe `base + s·Δ` (s: the round's probe scale), per language.
    pub heldout_loss: Option<LossTable>,
    /// The probe's relative gain per language: the fraction of each language's held-out loss it
    /// removed (negative: it raised it). What the policy reads.
    #[serde(default)]
    pub gains: Option<Gains>,
    /// The privacy loss charged for it (consortia with differential privacy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyCharge>,
    /// Size of the update as f32 values (4 bytes each), whatever its encoding on the wire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_bytes: Option<u64>,
    /// Bytes of the update as they crossed the network (networked mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire_bytes: Option<u64>,
    /// When it arrived and how long taking it in took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<ContributionTiming>,
}

/// When a contribution arrived and what taking it in cost. Facts of one coordinator's run, kept
/// in the journal for operators (the dashboard, `/metrics`) and never in the ledger: replay and
/// verification must not depend on clocks.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContributionTiming {
    /// Wall clock at arrival, milliseconds since the Unix epoch.
    pub received_unix_ms: u64,
    /// From arrival to its committed outcome: checks, measurement, storing the delta.
    pub intake_ms: f64,
}

/// When a round opened and closed and how long its step took (journal only, like
/// [`ContributionTiming`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundTiming {
    /// `None` when the coordinator restarted during the round (the opening time is not kept).
    pub opened_unix_ms: Option<u64>,
    pub closed_unix_ms: u64,
    /// Closing the round: deciding, aggregating, the per-language check and the gauntlet.
    pub aggregation_ms: f64,
}

/// Milliseconds since the Unix epoch (0 on a clock set before it).
pub fn unix_ms(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl ContributionRecord {
    /// The record of a contribution as it arrives: not yet checked, measured or decided.
    pub fn arrived(contribution: &Contribution, language: Option<String>) -> Self {
        ContributionRecord {
            node: contribution.node.clone(),
            language,
            accepted: false,
            reason: None,
            detail: None,
            quality: None,
            weight: 0.0,
            capped: false,
            influence: 0.0,
            // Recorded as sent, less what JSON (and so the journal and ledger) cannot carry.
            declared: contribution
                .declared
                .iter()
                .filter(|(_, v)| v.is_finite())
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            token_count: contribution.token_count,
            delta_hash: None,
            delta_norm: None,
            heldout_loss: None,
            gains: None,
            privacy: None,
            update_bytes: Some(4 * contribution.delta.state().num_values() as u64),
            wire_bytes: None,
            timing: None,
        }
    }

    /// Marks the record rejected with `reason`.
    pub fn reject(&mut self, reason: &weft_core::Rejection) {
        self.reason = Some(reason.code());
        self.detail = Some(reason.to_string());
    }

    /// What the node declared as its quality (`quality`, else `validation_gain`); NaN if neither.
    /// Used only by the `declared` weighting baseline.
    pub fn declared_quality(&self) -> f64 {
        self.declared.get("quality").or(self.declared.get("validation_gain")).copied().unwrap_or(f64::NAN)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    pub previous_base_hash: ContentHash,
    pub base_hash: ContentHash,
    /// True when the base moved this round.
    pub base_changed: bool,
    /// What stayed with the previous base: `1 − Σ influenceᵢ`, the share the cap left unassigned
    /// plus whatever the aggregator held back (a norm bound's clipping, Multi-Krum's dropped
    /// deltas). 1 when the base did not move.
    pub unassigned_share: f64,
    pub quorum_required: usize,
    /// Each delta's quality was measured on `base + probe_scale · Δ`.
    pub probe_scale: f32,
    /// The aggregation rule, e.g. `mean`, `median`, `multi-krum:1:3`.
    pub aggregator: String,
    /// Canary sets used (with their hashes), canary scores and the reputation table, when the
    /// consortium runs with governance.
    pub governance: Option<GovernanceRecord>,
    pub accepted: usize,
    pub contributions: Vec<ContributionRecord>,
    /// Held-out loss per language of the new base.
    pub heldout_loss: LossTable,
    /// The per-language check of the round's base (every-language fairness): each candidate
    /// tried, and why it was published, or a node left out, or the step halved.
    #[serde(default)]
    pub language_check: Option<weft_ledger::LanguageCheck>,
    /// The gauntlet's judgment of the round's aggregate (consortia with a `[gauntlet]`): when it
    /// refused, `base_hash` is still the champion's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gauntlet: Option<Judgment>,
    /// Class-3 proposals whose vote closed with this round, and their counts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proposals_counted: Vec<CountedProposal>,
    /// The circuit breaker tripped at this round's close (its `breaker_tripped` entry): the base
    /// in force after the round is the anchor's, not `base_hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<weft_ledger::Event>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<RoundTiming>,
}

/// A proposal counted when its vote closed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CountedProposal {
    pub proposal: ContentHash,
    pub change: weft_core::RuleChange,
    pub tally: weft_core::Tally,
    /// The round the change applies from (`None`: it did not pass).
    pub effective_round: Option<u64>,
}

/// The champion–challenger gauntlet on one round's aggregate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Judgment {
    pub champion_hash: ContentHash,
    pub challenger_hash: ContentHash,
    /// The challenger's held-out loss per language (the champion's is the round's base loss when
    /// refused, the previous round's when promoted).
    pub challenger_loss: LossTable,
    pub seed: u64,
    pub rules: weft_core::GauntletRules,
    pub verdict: weft_core::GauntletVerdict,
}

/// The coordinator's record of one node: hashes and metrics, never its sovereign weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeManifest {
    pub node: NodeId,
    pub language: String,
    pub contributions: Vec<ManifestEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub round: u64,
    pub base_hash: ContentHash,
    pub delta_hash: Option<ContentHash>,
    pub token_count: u64,
    pub quality: Option<f64>,
    pub accepted: bool,
    pub reason: Option<RejectionCode>,
    pub weight: f64,
    pub declared: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyCharge>,
}
