//! What a node states about the delta it sends, and signs in networked mode.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use weft_core::ContentHash;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContributionManifest {
    pub node: String,
    pub round: u64,
    pub base_hash: ContentHash,
    pub delta_hash: ContentHash,
    pub token_count: u64,
    /// The node's own metrics, recorded and never used for weights. Non-finite values are
    /// dropped (JSON cannot carry them).
    pub declared: BTreeMap<String, f64>,
}

impl ContributionManifest {
    /// BLAKE3 of the canonical JSON.
    pub fn hash(&self) -> ContentHash {
        let mut finite = self.clone();
        finite.declared.retain(|_, v| v.is_finite());
        let bytes = serde_json::to_vec(&finite).unwrap_or_default();
        ContentHash(*blake3::hash(&bytes).as_bytes())
    }
}
