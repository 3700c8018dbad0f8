//! Contributions: what a node sends after a round of local training, and the checks every one
//! must pass before it can touch the shared base.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::delta::Delta;
use crate::hash::ContentHash;
use crate::state::{ModelState, StateError};

/// A node's identity in the roster: 1–64 characters of `[A-Za-z0-9._-]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid node id {0:?}: use 1-64 characters of letters, digits, '.', '_' or '-'")]
pub struct NodeIdError(pub String);

impl NodeId {
    pub fn new(id: impl Into<String>) -> Result<Self, NodeIdError> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= 64
            && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(NodeId(id))
        } else {
            Err(NodeIdError(id))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for NodeId {
    type Err = NodeIdError;
    fn from_str(id: &str) -> Result<Self, Self::Err> {
        NodeId::new(id)
    }
}

impl TryFrom<String> for NodeId {
    type Error = NodeIdError;
    fn try_from(id: String) -> Result<Self, Self::Error> {
        NodeId::new(id)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> Self {
        id.0
    }
}

// A node id is its string: the same order, equality and hash, so it can be looked up by `&str`.
impl std::borrow::Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for NodeId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for NodeId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, not `write_str`: tables align ids with `{:<14}`.
        f.pad(&self.0)
    }
}

/// What a node sends to the coordinator. It carries a delta and counts, never text: the corpus
/// type of `weft-node` cannot be put in here.
#[derive(Clone, Debug)]
pub struct Contribution {
    pub node: NodeId,
    pub round: u64,
    /// The base the node trained from; must be the coordinator's current base.
    pub base_hash: ContentHash,
    pub delta: Delta,
    /// Number of training tokens (bytes) the node reports having consumed.
    pub token_count: u64,
    /// Metrics the node reports about itself. Recorded, never used for weights.
    pub declared: BTreeMap<String, f64>,
}

/// Why a contribution did not enter the base. Every variant has a stable [`code`](Rejection::code).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("no round is open")]
    NoOpenRound,
    #[error("node is not in the roster")]
    UnknownNode,
    #[error("node already contributed in this round")]
    DuplicateNode,
    #[error("contribution is for round {got}, the open round is {expected}")]
    WrongRound { expected: u64, got: u64 },
    #[error("trained from base {got}, the current base is {expected}")]
    StaleBase { expected: ContentHash, got: ContentHash },
    #[error("delta does not match the base: {0}")]
    Layout(StateError),
    #[error("delta tensor '{name}' holds a non-finite value at index {index}")]
    NonFinite { name: String, index: usize },
    #[error("measured quality could not be computed (held-out loss is not finite)")]
    Unmeasurable,
    #[error("measured quality {quality:.5} is below the floor {floor:.5}")]
    BelowFloor { quality: f64, floor: f64 },
    #[error(
        "gains at most {:.3} % on any language (its best: {language}), the floor is {:.3} %: it helps no language",
        100.0 * best, 100.0 * floor
    )]
    NoLanguageGains { language: String, best: f64, floor: f64 },
    #[error("measured quality {quality:.5} is not positive: it cannot carry a quality-proportional weight")]
    NonPositiveQuality { quality: f64 },
    #[error("only {accepted} contributions passed, the quorum needs {required}: the base stays unchanged")]
    QuorumNotMet { accepted: usize, required: usize },
    #[error("gains {gap:.4} nats/byte more on the public canaries than on the secret reserve (margin {margin}): overfit to the test")]
    CanaryOverfit { gap: f64, margin: f64 },
    #[error("only {accepted} contributions passed, the aggregator {rule} needs {needed}: the base stays unchanged")]
    TooFewForAggregator { rule: String, accepted: usize, needed: usize },
    #[error(
        "every candidate down to a step of 1/{} raised the held-out loss of {language} by more than {:.2} % (by {:.2} % at the smallest): the base stays unchanged",
        (1.0 / smallest_scale).round(), 100.0 * tolerance, 100.0 * rise
    )]
    LanguageRegression { language: String, rise: f64, tolerance: f64, smallest_scale: f64 },
    #[error(
        "this round would bring the node's privacy loss to epsilon {would_be:.3} (delta {delta:e}), over its budget {budget:.3} (spent so far: {spent:.3})"
    )]
    PrivacyBudgetExhausted { spent: f64, would_be: f64, budget: f64, delta: f64 },
    #[error("the consortium trains with differential privacy, but {detail}")]
    PrivacyMismatch { detail: String },
}

impl Rejection {
    /// Its stable machine-readable name, for reports, the ledger and the wire.
    pub fn code(&self) -> RejectionCode {
        use RejectionCode as C;
        match self {
            Rejection::NoOpenRound => C::NoOpenRound,
            Rejection::UnknownNode => C::UnknownNode,
            Rejection::DuplicateNode => C::DuplicateNode,
            Rejection::WrongRound { .. } => C::WrongRound,
            Rejection::StaleBase { .. } => C::StaleBase,
            Rejection::Layout(StateError::MissingTensor { .. }) => C::MissingTensor,
            Rejection::Layout(StateError::UnexpectedTensor { .. }) => C::UnexpectedTensor,
            Rejection::Layout(StateError::Shape { .. }) => C::WrongShape,
            Rejection::Layout(StateError::Dtype { .. }) => C::WrongDtype,
            Rejection::Layout(_) => C::MalformedDelta,
            Rejection::NonFinite { .. } => C::NonFinite,
            Rejection::Unmeasurable => C::Unmeasurable,
            Rejection::BelowFloor { .. } | Rejection::NoLanguageGains { .. } => C::BelowFloor,
            Rejection::NonPositiveQuality { .. } => C::NonPositiveQuality,
            Rejection::QuorumNotMet { .. } => C::QuorumNotMet,
            Rejection::TooFewForAggregator { .. } => C::TooFewForAggregator,
            Rejection::CanaryOverfit { .. } => C::CanaryOverfit,
            Rejection::LanguageRegression { .. } => C::LanguageRegression,
            Rejection::PrivacyBudgetExhausted { .. } => C::PrivacyBudgetExhausted,
            Rejection::PrivacyMismatch { .. } => C::PrivacyMismatch,
        }
    }
}

/// The stable name of a [`Rejection`] (`stale_base`, `below_floor`, …): what records, the ledger
/// and the network carry, so that a program can act on the reason without parsing prose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionCode {
    NoOpenRound,
    UnknownNode,
    DuplicateNode,
    WrongRound,
    StaleBase,
    MissingTensor,
    UnexpectedTensor,
    WrongShape,
    WrongDtype,
    MalformedDelta,
    NonFinite,
    Unmeasurable,
    BelowFloor,
    NonPositiveQuality,
    QuorumNotMet,
    CanaryOverfit,
    TooFewForAggregator,
    LanguageRegression,
    PrivacyBudgetExhausted,
    PrivacyMismatch,
}

impl RejectionCode {
    pub const ALL: [RejectionCode; 20] = [
        RejectionCode::NoOpenRound,
        RejectionCode::UnknownNode,
        RejectionCode::DuplicateNode,
        RejectionCode::WrongRound,
        RejectionCode::StaleBase,
        RejectionCode::MissingTensor,
        RejectionCode::UnexpectedTensor,
        RejectionCode::WrongShape,
        RejectionCode::WrongDtype,
        RejectionCode::MalformedDelta,
        RejectionCode::NonFinite,
        RejectionCode::Unmeasurable,
        RejectionCode::BelowFloor,
        RejectionCode::NonPositiveQuality,
        RejectionCode::QuorumNotMet,
        RejectionCode::CanaryOverfit,
        RejectionCode::TooFewForAggregator,
        RejectionCode::LanguageRegression,
        RejectionCode::PrivacyBudgetExhausted,
        RejectionCode::PrivacyMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectionCode::NoOpenRound => "no_open_round",
            RejectionCode::UnknownNode => "unknown_node",
            RejectionCode::DuplicateNode => "duplicate_node",
            RejectionCode::WrongRound => "wrong_round",
            RejectionCode::StaleBase => "stale_base",
            RejectionCode::MissingTensor => "missing_tensor",
            RejectionCode::UnexpectedTensor => "unexpected_tensor",
            RejectionCode::WrongShape => "wrong_shape",
            RejectionCode::WrongDtype => "wrong_dtype",
            RejectionCode::MalformedDelta => "malformed_delta",
            RejectionCode::NonFinite => "non_finite",
            RejectionCode::Unmeasurable => "unmeasurable",
            RejectionCode::BelowFloor => "below_floor",
            RejectionCode::NonPositiveQuality => "non_positive_quality",
            RejectionCode::QuorumNotMet => "quorum_not_met",
            RejectionCode::CanaryOverfit => "canary_overfit",
            RejectionCode::TooFewForAggregator => "too_few_for_aggregator",
            RejectionCode::LanguageRegression => "language_regression",
            RejectionCode::PrivacyBudgetExhausted => "privacy_budget_exhausted",
            RejectionCode::PrivacyMismatch => "privacy_mismatch",
        }
    }
}

impl fmt::Display for RejectionCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown rejection code {0:?}")]
pub struct UnknownCode(pub String);

impl std::str::FromStr for RejectionCode {
    type Err = UnknownCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RejectionCode::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| UnknownCode(s.to_owned()))
    }
}

/// What a contribution is checked against: the open round of one coordinator.
pub struct OpenRound<'a> {
    pub round: u64,
    /// The layout every update of the round must have (the base's, or the round's adapter's).
    pub layout: &'a ModelState,
    pub base_hash: ContentHash,
    pub roster: &'a BTreeSet<NodeId>,
    /// Nodes whose contribution for this round was already received (accepted or not).
    pub received: &'a BTreeSet<NodeId>,
}

/// Every structural check, cheapest first. A contribution that passes has the base's exact
/// names and shapes, finite values, and was trained from the current base in the current round.
pub fn check(contribution: &Contribution, open: &OpenRound<'_>) -> Result<(), Rejection> {
    if !open.roster.contains(&contribution.node) {
        return Err(Rejection::UnknownNode);
    }
    if open.received.contains(&contribution.node) {
        return Err(Rejection::DuplicateNode);
    }
    if contribution.round != open.round {
        return Err(Rejection::WrongRound { expected: open.round, got: contribution.round });
    }
    if contribution.base_hash != open.base_hash {
        return Err(Rejection::StaleBase { expected: open.base_hash, got: contribution.base_hash });
    }
    let delta = contribution.delta.state();
    delta.check_layout(open.layout).map_err(Rejection::Layout)?;
    delta.check_finite().map_err(|e| match e {
        StateError::NonFinite { name, index } => Rejection::NonFinite { name, index },
        other => Rejection::Layout(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    fn base() -> ModelState {
        let mut s = ModelState::new();
        s.insert("w", Tensor::new(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap());
        s.insert("b", Tensor::new(vec![2], vec![0.0, 0.0]).unwrap());
        s
    }

    fn contribution(node: &str, delta: ModelState, base_hash: ContentHash) -> Contribution {
        Contribution {
            node: NodeId::new(node).unwrap(),
            round: 1,
            base_hash,
            delta: Delta::from_state(delta),
            token_count: 10,
            declared: BTreeMap::new(),
        }
    }

    fn verdict(c: &Contribution, received: &[&str]) -> Result<(), Rejection> {
        let base = base();
        let roster: BTreeSet<NodeId> = ["a", "b"].iter().map(|n| NodeId::new(*n).unwrap()).collect();
        let received: BTreeSet<NodeId> = received.iter().map(|n| NodeId::new(*n).unwrap()).collect();
        let open =
            OpenRound { round: 1, layout: &base, base_hash: base.content_hash(), roster: &roster, received: &received };
        check(c, &open)
    }

    #[test]
    fn every_defect_has_its_named_reason() {
        let good_hash = base().content_hash();
        let zeros = base().zeros_like();
        assert_eq!(verdict(&contribution("a", zeros.clone(), good_hash), &[]), Ok(()));
        use RejectionCode as C;
        let cases: Vec<(Contribution, &[&str], RejectionCode)> = vec![
            (contribution("mallory", zeros.clone(), good_hash), &[], C::UnknownNode),
            (contribution("a", zeros.clone(), good_hash), &["a"], C::DuplicateNode),
            (Contribution { round: 0, ..contribution("a", zeros.clone(), good_hash) }, &[], C::WrongRound),
            (contribution("a", zeros.clone(), ContentHash([7; 32])), &[], C::StaleBase),
            (
                {
                    let mut d = zeros.clone();
                    d.remove("b");
                    contribution("a", d, good_hash)
                },
                &[],
                C::MissingTensor,
            ),
            (
                {
                    let mut d = zeros.clone();
                    d.insert("extra", Tensor::zeros(vec![1]));
                    contribution("a", d, good_hash)
                },
                &[],
                C::UnexpectedTensor,
            ),
            (
                {
                    let mut d = zeros.clone();
                    d.insert("w", Tensor::zeros(vec![4]));
                    contribution("a", d, good_hash)
                },
                &[],
                C::WrongShape,
            ),
            (
                {
                    let mut d = zeros.clone();
                    d.get_mut("w").unwrap().data_mut()[2] = f32::INFINITY;
                    contribution("a", d, good_hash)
                },
                &[],
                C::NonFinite,
            ),
            (
                {
                    let mut d = zeros.clone();
                    d.get_mut("b").unwrap().data_mut()[0] = f32::NAN;
                    contribution("a", d, good_hash)
                },
                &[],
                C::NonFinite,
            ),
        ];
        for (c, received, code) in cases {
            assert_eq!(verdict(&c, received).unwrap_err().code(), code);
        }
    }

    #[test]
    fn codes_read_back_as_themselves_and_match_their_serde_names() {
        for code in RejectionCode::ALL {
            assert_eq!(code.as_str().parse::<RejectionCode>(), Ok(code));
            assert_eq!(serde_json::to_value(code).unwrap(), serde_json::json!(code.as_str()));
        }
        assert!("no_such_code".parse::<RejectionCode>().is_err());
    }

    #[test]
    fn node_ids_are_validated() {
        assert!(NodeId::new("node-1.de_x").is_ok());
        for bad in ["", "a b", "../etc", &"x".repeat(65), "é"] {
            assert!(NodeId::new(bad).is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<NodeId>("\"a/b\"").is_err());
    }
}
