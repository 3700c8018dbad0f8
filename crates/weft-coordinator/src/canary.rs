//! The canary registry: versioned evaluation sets per topic, public or in the secret reserve.
//!
//! On disk, a registry is a JSON manifest beside its text files:
//!
//! ```json
//! {"sets": [
//!   {"id": "en-public-1", "topic": "en", "visibility": "public", "difficulty": 1.0,
//!    "retire_after": 3, "file": "en/public-1.txt"},
//!   {"id": "en-secret-1", "topic": "en", "visibility": "secret", "difficulty": 1.0,
//!    "retire_after": 3, "file": "en/secret-1.txt"}
//! ]}
//! ```
//!
//! * `topic`: what the set measures (a language is a topic).
//! * `visibility`: `public` sets may be shown to nodes and are used to score contributions;
//!   `secret` sets are never sent anywhere and serve only blind audits (the Goodhart detector).
//! * `difficulty` d ∈ (0, 1]: the weight of an audit on this set in the reputation math.
//! * `retire_after`: a public set retires after this many scored reveals (rounds it scored);
//!   the next set of the same topic and visibility, in manifest order, takes its place.
//! * `file`: UTF-8 text, relative to the manifest.
//!
//! Each set is identified by the BLAKE3 hash of its text, recorded in every round: a secret set
//! is committed now and provable later.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weft_core::ContentHash;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    Public,
    Secret,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CanarySpec {
    pub id: String,
    pub topic: String,
    pub visibility: Visibility,
    pub difficulty: f64,
    pub retire_after: u64,
    pub file: String,
}

#[derive(Clone, Debug)]
pub struct CanarySet {
    pub spec: CanarySpec,
    pub text: Vec<u8>,
    pub hash: ContentHash,
}

#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    #[error("canary manifest {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("canary manifest {path}: {why}")]
    Manifest { path: PathBuf, why: String },
    #[error("canary set '{id}': {why}")]
    Set { id: String, why: String },
    #[error("topic '{topic}' has no {visibility:?} canary set left (all retired or none defined)")]
    Exhausted { topic: String, visibility: Visibility },
}

#[derive(Deserialize)]
struct Manifest {
    sets: Vec<CanarySpec>,
}

pub struct CanaryRegistry {
    sets: Vec<CanarySet>,
    /// Scored reveals per set id.
    reveals: BTreeMap<String, u64>,
}

impl CanaryRegistry {
    /// Reads and validates a manifest and every file it names.
    pub fn load(manifest: &Path) -> Result<Self, CanaryError> {
        let io = |source| CanaryError::Io { path: manifest.to_owned(), source };
        let bytes = std::fs::read(manifest).map_err(io)?;
        let parsed: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| CanaryError::Manifest { path: manifest.to_owned(), why: e.to_string() })?;
        let dir = manifest.parent().unwrap_or(Path::new("."));
        let mut sets = Vec::new();
        for spec in parsed.sets {
            if spec.file.contains("..") || Path::new(&spec.file).is_absolute() {
                return Err(CanaryError::Set {
                    id: spec.id,
                    why: "file must be a relative path inside the registry".into(),
                });
            }
            let path = dir.join(&spec.file);
            let text = std::fs::read(&path)
                .map_err(|e| CanaryError::Set { id: spec.id.clone(), why: format!("{}: {e}", path.display()) })?;
            sets.push((spec, text));
        }
        Self::from_sets(sets)
    }

    /// A registry from specs and texts (the `file` field is informative only).
    pub fn from_sets(sets: Vec<(CanarySpec, Vec<u8>)>) -> Result<Self, CanaryError> {
        let mut ids = BTreeSet::new();
        let mut out = Vec::new();
        for (spec, text) in sets {
            let bad = |why: &str| CanaryError::Set { id: spec.id.clone(), why: why.to_owned() };
            if spec.id.is_empty() || !ids.insert(spec.id.clone()) {
                return Err(bad("ids must be non-empty and unique"));
            }
            if spec.topic.is_empty() {
                return Err(bad("topic is empty"));
            }
            if !(spec.difficulty > 0.0 && spec.difficulty <= 1.0) {
                return Err(bad("difficulty must be in (0, 1]"));
            }
            if spec.retire_after == 0 {
                return Err(bad("retire_after must be at least 1"));
            }
            if text.len() < 2 {
                return Err(bad("text is empty"));
            }
            let hash = ContentHash(*blake3::hash(&text).as_bytes());
            out.push(CanarySet { spec, text, hash });
        }
        let registry = CanaryRegistry { sets: out, reveals: BTreeMap::new() };
        for topic in registry.topics() {
            registry.active(&topic, Visibility::Public)?;
        }
        Ok(registry)
    }

    /// Keeps only the sets of these topics (a consortium scores the languages it has).
    pub fn retain_topics(&mut self, topics: &[String]) {
        self.sets.retain(|s| topics.contains(&s.spec.topic));
    }

    /// Every topic with a public set, sorted.
    pub fn topics(&self) -> Vec<String> {
        let topics: BTreeSet<String> = self
            .sets
            .iter()
            .filter(|s| s.spec.visibility == Visibility::Public)
            .map(|s| s.spec.topic.clone())
            .collect();
        topics.into_iter().collect()
    }

    /// The set now in use for a topic and visibility: the first not retired, in manifest order.
    pub fn active(&self, topic: &str, visibility: Visibility) -> Result<&CanarySet, CanaryError> {
        self.sets
            .iter()
            .find(|s| s.spec.topic == topic && s.spec.visibility == visibility && !self.is_retired(&s.spec))
            .ok_or_else(|| CanaryError::Exhausted { topic: topic.to_owned(), visibility })
    }

    fn is_retired(&self, spec: &CanarySpec) -> bool {
        // Secret sets are never revealed in scoring, so they never wear out that way.
        spec.visibility == Visibility::Public && self.reveals(&spec.id) >= spec.retire_after
    }

    pub fn reveals(&self, id: &str) -> u64 {
        self.reveals.get(id).copied().unwrap_or(0)
    }

    /// Counts one scored reveal of a public set.
    pub fn reveal(&mut self, id: &str) {
        *self.reveals.entry(id.to_owned()).or_default() += 1;
    }

    pub fn reveal_counts(&self) -> &BTreeMap<String, u64> {
        &self.reveals
    }

    /// Restores reveal counts saved from an earlier run.
    pub fn restore_reveals(&mut self, reveals: BTreeMap<String, u64>) {
        self.reveals = reveals;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, visibility: Visibility, retire_after: u64) -> CanarySpec {
        CanarySpec { id: id.into(), topic: "en".into(), visibility, difficulty: 1.0, retire_after, file: String::new() }
    }

    #[test]
    fn public_sets_rotate_after_their_reveals_and_secret_sets_stay() {
        let mut r = CanaryRegistry::from_sets(vec![
            (spec("p1", Visibility::Public, 2), b"one two".to_vec()),
            (spec("p2", Visibility::Public, 2), b"three four".to_vec()),
            (spec("s1", Visibility::Secret, 1), b"secret".to_vec()),
        ])
        .unwrap();
        assert_eq!(r.active("en", Visibility::Public).unwrap().spec.id, "p1");
        r.reveal("p1");
        r.reveal("p1");
        assert_eq!(r.active("en", Visibility::Public).unwrap().spec.id, "p2");
        r.reveal("s1");
        assert_eq!(r.active("en", Visibility::Secret).unwrap().spec.id, "s1");
        r.reveal("p2");
        r.reveal("p2");
        assert!(matches!(r.active("en", Visibility::Public), Err(CanaryError::Exhausted { .. })));
    }

    #[test]
    fn bad_specs_are_named() {
        let mut bad = spec("x", Visibility::Public, 1);
        bad.difficulty = 0.0;
        let err = CanaryRegistry::from_sets(vec![(bad, b"text".to_vec())]).err().unwrap();
        assert!(err.to_string().contains("'x': difficulty"), "{err}");
        let dup = vec![
            (spec("a", Visibility::Public, 1), b"t1".to_vec()),
            (spec("a", Visibility::Public, 1), b"t2".to_vec()),
        ];
        assert!(CanaryRegistry::from_sets(dup).is_err());
    }

    #[test]
    fn loads_the_documented_format_and_refuses_escaping_paths() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("en")).unwrap();
        std::fs::write(tmp.path().join("en/p.txt"), "public text").unwrap();
        let manifest = tmp.path().join("canaries.json");
        std::fs::write(&manifest, r#"{"sets": [{"id": "en-p", "topic": "en", "visibility": "public", "difficulty": 0.5, "retire_after": 3, "file": "en/p.txt"}]}"#).unwrap();
        let r = CanaryRegistry::load(&manifest).unwrap();
        assert_eq!(
            r.active("en", Visibility::Public).unwrap().hash,
            ContentHash(*blake3::hash(b"public text").as_bytes())
        );
        std::fs::write(&manifest, r#"{"sets": [{"id": "x", "topic": "en", "visibility": "public", "difficulty": 0.5, "retire_after": 3, "file": "../etc/passwd"}]}"#).unwrap();
        assert!(CanaryRegistry::load(&manifest).err().unwrap().to_string().contains("relative path"));
        std::fs::write(&manifest, "{not json").unwrap();
        assert!(matches!(CanaryRegistry::load(&manifest), Err(CanaryError::Manifest { .. })));
    }
}
