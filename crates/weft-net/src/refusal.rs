//! Why the coordinator refuses an upload: what the network layer checks (identity, signature,
//! encoding, size, stream, round) before the round engine sees a contribution, and the engine's
//! own [`Rejection`]s. Each has a stable code, sent to the node in its receipt and written to
//! the coordinator's log; [`RefusalCode`] reads it back, so a node (or a test) can act on the
//! reason without parsing prose.

use std::fmt;
use std::str::FromStr;

use weft_core::{ContentHash, NodeId, Rejection, RejectionCode};

use crate::encoding::{Encoding, EncodingError};

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the stream failed before its header arrived: {0}")]
    Transport(#[source] tonic::Status),
    #[error("an upload starts with its header")]
    MissingHeader,
    #[error("the manifest is not readable: {0}")]
    BadManifest(#[source] serde_json::Error),
    #[error("the manifest names {manifest}, the certificate is {certificate}")]
    IdentityMismatch { manifest: String, certificate: NodeId },
    #[error("a signature is 64 bytes, got {0}")]
    SignatureLength(usize),
    #[error("the manifest's signature does not verify with the node's roster key")]
    BadSignature,
    #[error("unknown encoding {0}")]
    UnknownEncoding(i32),
    #[error("the consortium sends {expected:?}, not {got:?}")]
    WrongEncoding { expected: Encoding, got: Encoding },
    #[error("{announced} bytes announced, at most {max} for this model")]
    Oversize { announced: u64, max: u64 },
    #[error("more than the {announced} bytes announced")]
    OverAnnounced { announced: u64 },
    #[error("no round is open (round {round} is closed); join the next round")]
    NoRoundOpen { round: u64 },
    #[error("round {round} closed before the upload finished; join the next round")]
    ClosedMeanwhile { round: u64 },
    #[error("the manifest is for round {manifest}, round {open} is open")]
    ReplayedManifest { manifest: u64, open: u64 },
    #[error("a second header in one upload")]
    SecondHeader,
    #[error("the stream broke after {received} bytes: {status}")]
    StreamBroke { received: u64, status: tonic::Status },
    #[error("{received} bytes received of the {announced} announced")]
    Truncated { received: u64, announced: u64 },
    #[error("the delta hashes to {actual}, the signed manifest says {signed}")]
    DeltaHashMismatch { actual: ContentHash, signed: ContentHash },
    #[error("{0}")]
    MalformedDelta(#[source] EncodingError),
    /// The round engine's own checks and policy.
    #[error("{0}")]
    Rejected(Rejection),
    #[error("this consortium aggregates securely: a node's update goes masked to its community (UploadMasked), never in the clear")]
    SecureAggregationOnly,
    #[error("the coordinator failed: {0}")]
    Internal(String),
}

impl Refusal {
    pub fn code(&self) -> RefusalCode {
        use RefusalCode as C;
        match self {
            Refusal::Transport(_) => C::Transport,
            Refusal::MissingHeader => C::MissingHeader,
            Refusal::BadManifest(_) => C::BadManifest,
            Refusal::IdentityMismatch { .. } => C::IdentityMismatch,
            Refusal::SignatureLength(_) | Refusal::BadSignature => C::BadSignature,
            Refusal::UnknownEncoding(_) | Refusal::WrongEncoding { .. } => C::BadEncoding,
            Refusal::Oversize { .. } | Refusal::OverAnnounced { .. } => C::Oversize,
            Refusal::NoRoundOpen { .. } | Refusal::ClosedMeanwhile { .. } => C::Late,
            Refusal::ReplayedManifest { .. } => C::ReplayedManifest,
            Refusal::SecondHeader => C::BadStream,
            Refusal::StreamBroke { .. } | Refusal::Truncated { .. } => C::Truncated,
            Refusal::DeltaHashMismatch { .. } => C::DeltaHashMismatch,
            Refusal::MalformedDelta(_) => C::Rejected(RejectionCode::MalformedDelta),
            Refusal::Rejected(reason) => C::Rejected(reason.code()),
            Refusal::SecureAggregationOnly => C::SecureAggregationOnly,
            Refusal::Internal(_) => C::Internal,
        }
    }
}

/// The stable name of a [`Refusal`], as a receipt carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalCode {
    Transport,
    MissingHeader,
    BadManifest,
    IdentityMismatch,
    BadSignature,
    BadEncoding,
    Oversize,
    Late,
    ReplayedManifest,
    BadStream,
    Truncated,
    DeltaHashMismatch,
    SecureAggregationOnly,
    Internal,
    /// The engine's code (`malformed_delta` is the engine's too: a delta that decodes to the
    /// wrong layout and one that does not decode at all are the same fault to the node).
    Rejected(RejectionCode),
}

impl RefusalCode {
    /// Codes of the network layer (the engine's are [`RejectionCode::ALL`]).
    const NETWORK: [(RefusalCode, &'static str); 14] = [
        (RefusalCode::Transport, "transport"),
        (RefusalCode::MissingHeader, "missing_header"),
        (RefusalCode::BadManifest, "bad_manifest"),
        (RefusalCode::IdentityMismatch, "identity_mismatch"),
        (RefusalCode::BadSignature, "bad_signature"),
        (RefusalCode::BadEncoding, "bad_encoding"),
        (RefusalCode::Oversize, "oversize"),
        (RefusalCode::Late, "late"),
        (RefusalCode::ReplayedManifest, "replayed_manifest"),
        (RefusalCode::BadStream, "bad_stream"),
        (RefusalCode::Truncated, "truncated"),
        (RefusalCode::DeltaHashMismatch, "delta_hash_mismatch"),
        (RefusalCode::SecureAggregationOnly, "secure_aggregation_only"),
        (RefusalCode::Internal, "internal"),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::Rejected(code) => code.as_str(),
            other => RefusalCode::NETWORK.iter().find(|(c, _)| *c == other).map_or("internal", |(_, name)| name),
        }
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RefusalCode {
    type Err = weft_core::contribution::UnknownCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match RefusalCode::NETWORK.iter().find(|(_, name)| *name == s) {
            Some((code, _)) => Ok(*code),
            None => s.parse().map(RefusalCode::Rejected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_reads_back_as_itself() {
        let all = RefusalCode::NETWORK.iter().map(|(c, _)| *c).chain(RejectionCode::ALL.map(RefusalCode::Rejected));
        for code in all {
            assert_eq!(code.to_string().parse::<RefusalCode>(), Ok(code));
        }
        assert!("no_such_code".parse::<RefusalCode>().is_err());
    }

    #[test]
    fn engine_rejections_keep_their_codes_on_the_wire() {
        let stale =
            Refusal::Rejected(Rejection::StaleBase { expected: ContentHash([1; 32]), got: ContentHash([2; 32]) });
        assert_eq!(stale.code(), RefusalCode::Rejected(RejectionCode::StaleBase));
        assert_eq!(stale.code().as_str(), "stale_base");
        let broken = Refusal::MalformedDelta(EncodingError::Unknown("x".into()));
        assert_eq!(broken.code(), RefusalCode::Rejected(RejectionCode::MalformedDelta));
    }
}
