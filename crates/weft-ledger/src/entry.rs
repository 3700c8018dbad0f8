//! Ledger entries and their canonical bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use weft_core::{
    AdapterRound, BreakerRules, ContentHash, GauntletRules, GauntletVerdict, ItemLosses, OuterOptimizer, Policy,
    RuleChange, Tally, VotingRules,
};

use crate::signing::{PublicKey, Signature};

/// Why a contribution was refused at the door (checks) or at the decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    /// Stable rejection code, e.g. `stale_base`.
    pub code: String,
    pub detail: String,
}

/// A delta that entered the step, with what replay needs to recompute it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accepted {
    pub node: String,
    pub delta_hash: ContentHash,
    pub weight: f64,
    /// The coefficient the delta actually carried after the aggregator.
    pub influence: f64,
    /// The delta's L2 norm (adaptive norm bounds read it).
    pub norm: f64,
    pub capped: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rejected {
    pub node: String,
    pub code: String,
    pub detail: String,
}

/// The per-language check of a round's base (every-language fairness): every candidate base
/// tried, in order, with what the check concluded. Losses are `null` where not finite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanguageCheck {
    /// The largest relative rise of any language's held-out loss a round may cause.
    pub tolerance: f64,
    /// The held-out loss per language of the base the round started from.
    pub base_loss: BTreeMap<String, Option<f64>>,
    /// The held-out loss per language of the consortium's genesis base (the languages' standing
    /// is measured against it).
    pub reference_loss: BTreeMap<String, Option<f64>>,
    pub attempts: Vec<CheckAttempt>,
    /// The candidate published (index into `attempts`): of those that passed, the one whose
    /// worst language gained most. `null` when none passed and the base stayed.
    pub published: Option<usize>,
}

/// One candidate base of the per-language check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckAttempt {
    /// The priority multiplier α of the search (0 for the first candidate).
    pub alpha: f64,
    /// Each language's priority `1 + α·z`: its share of the step is `priority / Σ priorities`.
    pub priorities: BTreeMap<String, f64>,
    /// The factor the aggregated step was multiplied by (1, ½, ¼, …).
    pub scale: f64,
    /// The candidate's held-out loss per language.
    pub heldout_loss: BTreeMap<String, Option<f64>>,
    pub outcome: CheckOutcome,
}

/// What the check concluded about a candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CheckOutcome {
    /// No language rose beyond the tolerance.
    Passed,
    /// These languages rose beyond the tolerance (relative rise each).
    Risen { risen: BTreeMap<String, f64> },
}

/// A member of a proposal's electorate: the key its vote must be signed with, and its weight.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Voter {
    pub key: PublicKey,
    pub weight: f64,
}

/// What happened. Externally tagged (`{"round_opened": {...}}`) so that parsing never buffers
/// numbers through an intermediate form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The first entry: the key that signs everything after, and what the consortium started from.
    ConsortiumCreated {
        coordinator_key: PublicKey,
        config_hash: ContentHash,
        roster_hash: ContentHash,
        /// node id → language (jurisdiction).
        roster: BTreeMap<String, String>,
        base_hash: ContentHash,
    },
    RoundOpened {
        round: u64,
        base_hash: ContentHash,
        config_hash: ContentHash,
        roster_hash: ContentHash,
        /// The round's adapter (its frozen factors' seed and shape) when contributions are
        /// low-rank adapters; absent for full-weight rounds (and so absent from their bytes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        adapter: Option<AdapterRound>,
    },
    /// Secure aggregation: the round's one partition of the nodes into communities, drawn from
    /// `seed` (BLAKE3 of what the round's opening fixed: round, base, configuration and roster,
    /// so the coordinator cannot choose it). Contributions of the round come from these
    /// communities, each the unmasked mean of its members' updates; the coordinator never sees
    /// one node's update. `weft ledger verify` redraws the partition from the seed.
    CommunitiesDrawn {
        round: u64,
        seed: ContentHash,
        community_size: u64,
        /// community id → its member nodes.
        communities: BTreeMap<String, Vec<String>>,
    },
    /// A contribution reached the coordinator. `refused` is set when it failed the checks; its
    /// delta is then not stored.
    ContributionReceived {
        round: u64,
        node: String,
        /// BLAKE3 of the canonical JSON of what the node sent about its delta.
        manifest_hash: ContentHash,
        /// The node's ed25519 signature over its manifest (networked mode; none in-process).
        node_signature: Option<Signature>,
        delta_hash: Option<ContentHash>,
        refused: Option<Refusal>,
    },
    /// The privacy loss the coordinator charged a node for a contribution it admitted
    /// (consortia with differential privacy): the consortium's DP-SGD mechanism, the ε of the
    /// round alone and of all the node's charged rounds composed, both at `delta`. `weft ledger
    /// verify` recomputes both with the accountant.
    PrivacyCharged {
        round: u64,
        node: String,
        noise_multiplier: f64,
        sample_rate: f64,
        clip_norm: f64,
        /// DP-SGD steps of the round.
        steps: u64,
        delta: f64,
        epsilon_round: f64,
        epsilon_total: f64,
        /// Rounds the node has been charged for, this one included.
        rounds_charged: u64,
        budget: f64,
    },
    /// The coordinator's own measurement of one contribution.
    Evaluation {
        round: u64,
        node: String,
        /// `null` when unmeasurable.
        quality: Option<f64>,
        heldout_loss: BTreeMap<String, Option<f64>>,
        delta_norm: f64,
        /// The relative gain per language the policy weighs (absent when unmeasurable).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gains: Option<BTreeMap<String, f64>>,
    },
    Decision {
        round: u64,
        accepted: Vec<Accepted>,
        rejected: Vec<Rejected>,
        unassigned: f64,
        aggregator: String,
        cap: f64,
        outer: OuterOptimizer,
        /// Outer optimizer state (momentum) before and after; `null` when it has none.
        outer_state_in: Option<ContentHash>,
        outer_state_out: Option<ContentHash>,
        /// Centered clipping's center before and after; `null` when it has none.
        center_in: Option<ContentHash>,
        center_out: Option<ContentHash>,
        /// Merkle root over this round's `contribution_received` entries, in ledger order.
        contributions_root: ContentHash,
        contributions: usize,
        /// BLAKE3 of governance's part of the round record (canary scores, reputation).
        governance_hash: Option<ContentHash>,
        /// The per-language check (every-language fairness); absent under other rules.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        language_check: Option<LanguageCheck>,
    },
    /// The champion–challenger gauntlet's judgment of a round's aggregate (consortia with a
    /// `[gauntlet]`): both scored on the same held-out items, the paired bootstrap drawn from
    /// `seed` (BLAKE3 of round, champion and challenger, so the coordinator cannot choose it).
    /// Promoted: a `base_published` follows. Refused: the champion stays the base, and nodes
    /// train from it. `weft ledger verify` recomputes the seed and the whole verdict.
    ChallengerJudged {
        round: u64,
        champion_hash: ContentHash,
        challenger_hash: ContentHash,
        /// BLAKE3 of the items both models were scored on.
        items_hash: ContentHash,
        seed: u64,
        rules: GauntletRules,
        /// Loss per item, by language, in the items' order.
        champion_loss: ItemLosses,
        challenger_loss: ItemLosses,
        verdict: GauntletVerdict,
    },
    /// The circuit breaker tripped at the close of `round`: a language's held-out loss rose more
    /// than `threshold` over the base of `anchor_round` (the last base before the watched
    /// publications). A `rolled_back` to `anchor_round` follows in the same step.
    BreakerTripped {
        round: u64,
        anchor_round: u64,
        rules: BreakerRules,
        anchor_loss: BTreeMap<String, Option<f64>>,
        heldout_loss: BTreeMap<String, Option<f64>>,
        /// language → relative rise, for every language beyond the threshold.
        risen: BTreeMap<String, f64>,
    },
    /// A member proposed a class-3 change of the consortium's rules. `proposal` is
    /// `weft_core::proposal::proposal_id` of (after_round, proposer, rationale, change), signed
    /// by the proposer; the electorate (members, their keys and vote weights) is fixed here.
    ProposalMade {
        proposal: ContentHash,
        /// The last closed round when it was made.
        after_round: u64,
        proposer: String,
        rationale: String,
        change: RuleChange,
        signature: Signature,
        voting: VotingRules,
        electorate: BTreeMap<String, Voter>,
        /// Votes are counted when this round closes.
        tally_after_round: u64,
    },
    /// A member's signed vote on an open proposal.
    VoteCast {
        proposal: ContentHash,
        /// The last closed round when it was cast.
        after_round: u64,
        voter: String,
        approve: bool,
        signature: Signature,
    },
    /// The count when the proposal's vote closed; a passed change takes effect when
    /// `effective_round` opens (after the time-lock).
    ProposalTallied { proposal: ContentHash, round: u64, tally: Tally, effective_round: Option<u64> },
    /// A passed change took effect: `round` is the first round run under `policy`.
    RulesChanged { proposal: ContentHash, round: u64, change: RuleChange, policy: Policy },
    BasePublished {
        round: u64,
        previous_base_hash: ContentHash,
        base_hash: ContentHash,
        heldout_loss: BTreeMap<String, Option<f64>>,
    },
    /// An operator made the base of `to_round` current again. Nothing is deleted.
    RolledBack {
        to_round: u64,
        /// The round last closed when the rollback happened.
        after_round: u64,
        previous_base_hash: ContentHash,
        base_hash: ContentHash,
        outer_state: Option<ContentHash>,
        center: Option<ContentHash>,
    },
}

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::ConsortiumCreated { .. } => "consortium_created",
            Event::RoundOpened { .. } => "round_opened",
            Event::ContributionReceived { .. } => "contribution_received",
            Event::PrivacyCharged { .. } => "privacy_charged",
            Event::CommunitiesDrawn { .. } => "communities_drawn",
            Event::Evaluation { .. } => "evaluation",
            Event::Decision { .. } => "decision",
            Event::ChallengerJudged { .. } => "challenger_judged",
            Event::BreakerTripped { .. } => "breaker_tripped",
            Event::ProposalMade { .. } => "proposal_made",
            Event::VoteCast { .. } => "vote_cast",
            Event::ProposalTallied { .. } => "proposal_tallied",
            Event::RulesChanged { .. } => "rules_changed",
            Event::BasePublished { .. } => "base_published",
            Event::RolledBack { .. } => "rolled_back",
        }
    }

    /// The round the event belongs to (the genesis is round 0; a rollback, the round it follows).
    pub fn round(&self) -> u64 {
        match self {
            Event::ConsortiumCreated { .. } => 0,
            Event::RoundOpened { round, .. }
            | Event::ContributionReceived { round, .. }
            | Event::PrivacyCharged { round, .. }
            | Event::CommunitiesDrawn { round, .. }
            | Event::Evaluation { round, .. }
            | Event::Decision { round, .. }
            | Event::ChallengerJudged { round, .. }
            | Event::ProposalTallied { round, .. }
            | Event::BreakerTripped { round, .. }
            | Event::RulesChanged { round, .. }
            | Event::BasePublished { round, .. } => *round,
            Event::RolledBack { after_round, .. }
            | Event::ProposalMade { after_round, .. }
            | Event::VoteCast { after_round, .. } => *after_round,
        }
    }
}

/// One line of the ledger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    /// Hash of the previous entry (zeros for the first).
    pub prev: ContentHash,
    pub event: Event,
    /// BLAKE3 over a domain tag and the canonical JSON of `seq`, `prev` and `event`.
    pub hash: ContentHash,
    /// The coordinator's signature over `hash`.
    pub signature: Signature,
}

#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    prev: &'a ContentHash,
    event: &'a Event,
}

const DOMAIN: &[u8] = b"weft-ledger/1\n";

impl Entry {
    /// The hash an entry with these contents must carry.
    pub fn compute_hash(seq: u64, prev: &ContentHash, event: &Event) -> ContentHash {
        // Serialising plain structs, string-keyed maps and finite numbers cannot fail.
        let body = serde_json::to_vec(&Body { seq, prev, event }).unwrap_or_default();
        let mut hasher = blake3::Hasher::new();
        hasher.update(DOMAIN);
        hasher.update(&body);
        ContentHash(*hasher.finalize().as_bytes())
    }

    /// The canonical line (no trailing newline).
    pub fn to_line(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Hash of the entry as a Merkle leaf.
    pub fn leaf(&self) -> ContentHash {
        crate::merkle::leaf_hash(&self.hash.0)
    }
}
