//! A weft node: it holds a corpus that never leaves it, trains the shared base on it, keeps the
//! result as its sovereign artifact on its own disk, and emits only a [`Contribution`].
//!
//! [`Contribution`]: weft_core::Contribution

mod adapter;
mod artifact;
mod corpus;
mod external;
mod node;

pub use adapter::{private_adapter, private_stream, AdapterManifest, AdapterNode, PrivateAdapterManifest};
pub use artifact::{ArtifactManifest, LocalMetrics, SovereignArtifact};
pub use corpus::LocalCorpus;
pub use external::{
    ExternalAdapterTrainer, ExternalCommand, ExternalSettings, ExternalTrainer, Job, JobAdapter, JobBase, JobCorpus,
    JobKind, JobMetrics, JobOutput, JobTraining, JOB_VERSION,
};
pub use node::{
    declared_privacy, node_secret, Cycle, Node, NodeError, NodeSettings, DP_CLIP_NORM, DP_DELTA, DP_EPSILON,
    DP_NOISE_MULTIPLIER, DP_SAMPLE_RATE, DP_STEPS,
};
