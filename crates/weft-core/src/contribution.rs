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

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
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
    #[error("measured quality {quality:.5} is not positive: it cannot carry a quality-proportional weight")]
    NonPositiveQuality { quality: f64 },
    #[error("only {accepted} contributions passed, the quorum needs {required}: the base stays unchanged")]
    QuorumNotMet { accepted: usize, required: usize },
    #[error("gains {gap:.4} nats/byte more on the public canaries than on the secret reserve (margin {margin}): overfit to the test")]
    CanaryOverfit { gap: f64, margin: f64 },
    #[error("only {accepted} contributions passed, the aggregator {rule} needs {needed}: the base stays unchanged")]
    TooFewForAggregator { rule: String, accepted: usize, needed: usize },
}

impl Rejection {
    /// A stable machine-readable name for reports and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::NoOpenRound => "no_open_round",
            Rejection::UnknownNode => "unknown_node",
            Rejection::DuplicateNode => "duplicate_node",
            Rejection::WrongRound { .. } => "wrong_round",
            Rejection::StaleBase { .. } => "stale_base",
            Rejection::Layout(StateError::MissingTensor { .. }) => "missing_tensor",
            Rejection::Layout(StateError::UnexpectedTensor { .. }) => "unexpected_tensor",
            Rejection::Layout(StateError::Shape { .. }) => "wrong_shape",
            Rejection::Layout(StateError::Dtype { .. }) => "wrong_dtype",
            Rejection::Layout(_) => "malformed_delta",
            Rejection::NonFinite { .. } => "non_finite",
            Rejection::Unmeasurable => "unmeasurable",
            Rejection::BelowFloor { .. } => "below_floor",
            Rejection::NonPositiveQuality { .. } => "non_positive_quality",
            Rejection::QuorumNotMet { .. } => "quorum_not_met",
            Rejection::TooFewForAggregator { .. } => "too_few_for_aggregator",
            Rejection::CanaryOverfit { .. } => "canary_overfit",
        }
    }
}

/// What a contribution is checked against: the open round of one coordinator.
pub struct OpenRound<'a> {
    pub round: u64,
    pub base: &'a ModelState,
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
    delta.check_layout(open.base).map_err(Rejection::Layout)?;
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
            OpenRound { round: 1, base: &base, base_hash: base.content_hash(), roster: &roster, received: &received };
        check(c, &open)
    }

    #[test]
    fn every_defect_has_its_named_reason() {
        let good_hash = base().content_hash();
        let zeros = base().zeros_like();
        assert_eq!(verdict(&contribution("a", zeros.clone(), good_hash), &[]), Ok(()));
        let cases: Vec<(Contribution, &[&str], &str)> = vec![
            (contribution("mallory", zeros.clone(), good_hash), &[], "unknown_node"),
            (contribution("a", zeros.clone(), good_hash), &["a"], "duplicate_node"),
            (Contribution { round: 0, ..contribution("a", zeros.clone(), good_hash) }, &[], "wrong_round"),
            (contribution("a", zeros.clone(), ContentHash([7; 32])), &[], "stale_base"),
            (
                {
                    let mut d = zeros.clone();
                    d.remove("b");
                    contribution("a", d, good_hash)
                },
                &[],
                "missing_tensor",
            ),
            (
                {
                    let mut d = zeros.clone();
                    d.insert("extra", Tensor::zeros(vec![1]));
                    contribution("a", d, good_hash)
                },
                &[],
                "unexpected_tensor",
            ),
            (
                {
                    let mut d = zeros.clone();
                    d.insert("w", Tensor::zeros(vec![4]));
                    contribution("a", d, good_hash)
                },
                &[],
                "wrong_shape",
            ),
            (
                {
                    let mut d = zeros.clone();
                    d.get_mut("w").unwrap().data_mut()[2] = f32::INFINITY;
                    contribution("a", d, good_hash)
                },
                &[],
                "non_finite",
            ),
            (
                {
                    let mut d = zeros.clone();
                    d.get_mut("b").unwrap().data_mut()[0] = f32::NAN;
                    contribution("a", d, good_hash)
                },
                &[],
                "non_finite",
            ),
        ];
        for (c, received, code) in cases {
            assert_eq!(verdict(&c, received).unwrap_err().code(), code);
        }
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
