//! The consortium's files: `consortium.toml` (what the consortium does), `roster.toml` (who is
//! in it, with their public keys) and each node's `node.toml` (how it reaches the coordinator).

use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use weft_ledger::PublicKey;
use weft_model::GptConfig;

use crate::encoding::Encoding;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

/// `consortium.toml`. Every field is documented in the README; unknown keys are refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsortiumConfig {
    pub name: String,
    /// Where the coordinator listens and nodes dial, `host:port`.
    pub address: String,
    /// The name in the coordinator's TLS certificate that nodes check.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    pub rounds: u64,
    pub seed: u64,
    /// A round closes when every roster node has contributed or this many seconds after it
    /// opened, whichever comes first; a node that is late joins the next round.
    pub round_deadline_secs: u64,
    /// How deltas travel: f32 (lossless), f16, bf16, int8.
    pub encoding: Encoding,
    /// The coordinator's storage directory, relative to this file.
    #[serde(default = "default_storage")]
    pub storage: PathBuf,
    pub model: GptConfig,
    pub training: Training,
    pub policy: PolicySettings,
    /// Canary scoring with a secret reserve and reputation-driven weights (as `weft demo
    /// --governance`); absent: the policy alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub governance: Option<GovernanceConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GovernanceConfig {
    /// Canary registry manifest (default: the data directory's `canaries/canaries.json`).
    pub canaries: Option<PathBuf>,
    /// Every governance parameter (defaults as documented).
    #[serde(default)]
    pub settings: weft_coordinator::GovernanceSettings,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Training {
    pub local_steps: u64,
    pub batch: usize,
    pub lr: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    pub floor: f64,
    pub cap: f64,
    pub quorum: f64,
    /// `quality`, `equal` or `declared`.
    pub weighting: String,
    /// As `weft demo --aggregator`.
    pub aggregator: String,
    /// `plain` or `nesterov`.
    pub outer: String,
    pub outer_lr: Option<f32>,
    #[serde(default = "default_momentum")]
    pub momentum: f32,
    pub probe_scale: Option<f32>,
}

fn default_server_name() -> String {
    "weft-coordinator".into()
}

fn default_storage() -> PathBuf {
    "coordinator".into()
}

fn default_momentum() -> f32 {
    0.9
}

/// `roster.toml`: one `[[node]]` per member.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roster {
    #[serde(default)]
    pub node: Vec<Member>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: String,
    pub language: String,
    /// BLAKE3 of the node's TLS certificate (DER), hex: how the coordinator knows who dialled.
    pub certificate: String,
    /// The node's ed25519 key: it signs every contribution manifest.
    pub signing_key: PublicKey,
}

impl Roster {
    pub fn by_certificate(&self, fingerprint: &str) -> Option<&Member> {
        self.node.iter().find(|m| m.certificate == fingerprint)
    }

    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |detail: String| ConfigError::Invalid { path: path.to_owned(), detail };
        if self.node.is_empty() {
            return Err(invalid("the roster lists no node".into()));
        }
        for (i, m) in self.node.iter().enumerate() {
            if self.node[..i].iter().any(|o| o.id == m.id) {
                return Err(invalid(format!("node {} is listed twice", m.id)));
            }
            if self.node[..i].iter().any(|o| o.certificate == m.certificate) {
                return Err(invalid(format!("node {} has the certificate of another node", m.id)));
            }
        }
        Ok(())
    }
}

/// `node.toml` in a node's startup kit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeKit {
    pub id: String,
    pub language: String,
    pub consortium: String,
    /// The coordinator's `host:port`.
    pub address: String,
    pub server_name: String,
}

/// The files of a node's startup kit.
pub struct KitFiles;

impl KitFiles {
    pub const CONFIG: &'static str = "node.toml";
    pub const CA: &'static str = "ca.pem";
    pub const CERTIFICATE: &'static str = "tls.pem";
    pub const TLS_KEY: &'static str = "tls.key";
    pub const SIGNING_KEY: &'static str = "signing.key";
}

pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_owned(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Invalid { path: path.to_owned(), detail: e.to_string() })
}

pub fn write_toml<T: Serialize>(path: &Path, value: &T) -> Result<(), ConfigError> {
    let text = toml::to_string_pretty(value)
        .map_err(|e| ConfigError::Invalid { path: path.to_owned(), detail: e.to_string() })?;
    std::fs::write(path, text).map_err(|source| ConfigError::Io { path: path.to_owned(), source })
}

pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_owned(), source })
}

/// BLAKE3 of a certificate's DER bytes, hex.
pub fn fingerprint(der: &[u8]) -> String {
    blake3::hash(der).to_hex().to_string()
}
