//! A Merkle tree over a round's contributions, RFC 6962 style (BLAKE3 instead of SHA-256):
//! leaves and inner nodes carry distinct prefixes so that no inner node can pose as a leaf.

use serde::{Deserialize, Serialize};
use weft_core::ContentHash;

fn hash_parts(parts: &[&[u8]]) -> ContentHash {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    ContentHash(*hasher.finalize().as_bytes())
}

/// `H(0x00 ‖ data)`.
pub fn leaf_hash(data: &[u8]) -> ContentHash {
    hash_parts(&[&[0x00], data])
}

fn node_hash(left: &ContentHash, right: &ContentHash) -> ContentHash {
    hash_parts(&[&[0x01], &left.0, &right.0])
}

/// Largest power of two strictly below `n` (n ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// The root over leaves already hashed with [`leaf_hash`]. The empty tree's root is `H("")`.
pub fn merkle_root(leaves: &[ContentHash]) -> ContentHash {
    match leaves.len() {
        0 => hash_parts(&[]),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&merkle_root(&leaves[..k]), &merkle_root(&leaves[k..]))
        }
    }
}

/// Proof that one leaf is at `index` of a tree of `size` leaves with a given root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionProof {
    pub index: usize,
    pub size: usize,
    /// Sibling hashes from the leaf up to the root.
    pub path: Vec<ContentHash>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProofError {
    #[error("leaf index {index} is outside a tree of {size} leaves")]
    OutOfRange { index: usize, size: usize },
    #[error("the audit path has the wrong length for leaf {index} of {size}")]
    PathLength { index: usize, size: usize },
    #[error("the proof leads to root {computed}, not the recorded root {expected}")]
    RootMismatch { computed: ContentHash, expected: ContentHash },
}

impl InclusionProof {
    /// The audit path of leaf `index`.
    pub fn new(leaves: &[ContentHash], index: usize) -> Result<Self, ProofError> {
        if index >= leaves.len() {
            return Err(ProofError::OutOfRange { index, size: leaves.len() });
        }
        let mut path = Vec::new();
        collect_path(leaves, index, &mut path);
        Ok(InclusionProof { index, size: leaves.len(), path })
    }

    /// Checks that `leaf` (already leaf-hashed) sits at `index` under `root` (RFC 9162 §2.1.3.2).
    pub fn verify(&self, leaf: ContentHash, root: ContentHash) -> Result<(), ProofError> {
        let (index, size) = (self.index, self.size);
        if index >= size {
            return Err(ProofError::OutOfRange { index, size });
        }
        let (mut fnode, mut snode) = (index, size - 1);
        let mut r = leaf;
        for p in &self.path {
            if snode == 0 {
                return Err(ProofError::PathLength { index, size });
            }
            if fnode & 1 == 1 || fnode == snode {
                r = node_hash(p, &r);
                if fnode & 1 == 0 {
                    while fnode & 1 == 0 && fnode != 0 {
                        fnode >>= 1;
                        snode >>= 1;
                    }
                }
            } else {
                r = node_hash(&r, p);
            }
            fnode >>= 1;
            snode >>= 1;
        }
        if snode != 0 {
            return Err(ProofError::PathLength { index, size });
        }
        if r != root {
            return Err(ProofError::RootMismatch { computed: r, expected: root });
        }
        Ok(())
    }
}

fn collect_path(leaves: &[ContentHash], index: usize, path: &mut Vec<ContentHash>) {
    if leaves.len() <= 1 {
        return;
    }
    let k = split(leaves.len());
    if index < k {
        collect_path(&leaves[..k], index, path);
        path.push(merkle_root(&leaves[k..]));
    } else {
        collect_path(&leaves[k..], index - k, path);
        path.push(merkle_root(&leaves[..k]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leaves(n: usize) -> Vec<ContentHash> {
        (0..n).map(|i| leaf_hash(&(i as u64).to_le_bytes())).collect()
    }

    #[test]
    fn small_trees_have_the_rfc_shape() {
        let l = leaves(3);
        assert_eq!(merkle_root(&l[..1]), l[0]);
        assert_eq!(merkle_root(&l), node_hash(&node_hash(&l[0], &l[1]), &l[2]));
        assert_eq!(merkle_root(&[]), ContentHash(*blake3::hash(b"").as_bytes()));
        // A leaf can never equal an inner node built from the same bytes.
        let inner = node_hash(&l[0], &l[1]);
        let mut bytes = l[0].0.to_vec();
        bytes.extend_from_slice(&l[1].0);
        assert_ne!(leaf_hash(&bytes), inner);
    }

    proptest! {
        #[test]
        fn every_leaf_proves_and_no_other_leaf_or_position_does(n in 1usize..40, pick in any::<prop::sample::Index>()) {
            let l = leaves(n);
            let root = merkle_root(&l);
            let index = pick.index(n);
            let proof = InclusionProof::new(&l, index).unwrap();
            prop_assert!(proof.verify(l[index], root).is_ok());
            let other = leaf_hash(b"not in the tree");
            prop_assert!(proof.verify(other, root).is_err());
            if n > 1 {
                let moved = InclusionProof { index: (index + 1) % n, ..proof.clone() };
                prop_assert!(moved.verify(l[index], root).is_err());
                let mut bent = proof.clone();
                bent.path[0].0[0] ^= 1;
                prop_assert!(bent.verify(l[index], root).is_err());
            }
        }
    }
}
