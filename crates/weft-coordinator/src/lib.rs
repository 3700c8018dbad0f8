//! The weft coordinator: it checks every contribution, measures it on the consortium's held-out
//! text itself, applies the policy, and folds the accepted deltas into the next shared base
//! tensor by tensor from a content-addressed store.

mod aggregation;
mod audit;
mod canary;
mod coordinator;
mod governance;
mod head;
mod journal;
mod measure;
mod privacy;
mod proposals;
mod record;
mod store;

pub use aggregation::MoveError;
pub use audit::{verify, verify_with, AuditError, AuditReport};
pub use canary::{CanaryError, CanaryRegistry, CanarySet, CanarySpec, Visibility};
pub use coordinator::{
    gauntlet_seed, roll_back, Announcement, ConfigDifference, Coordinator, CoordinatorError, DurableCoordinator,
    Member, ProposalSubmitError, Receipt, SubmitError,
};
pub use governance::{
    reputation_table, CanaryScore, CanaryUse, Governance, GovernanceError, GovernanceRecord, GovernanceSettings,
    GovernanceState, ReputationRow,
};
pub use head::{ModelHead, ModelPoint, ModelRefs};
pub use journal::{BreakerWatch, Head, Journal, JournalError, Rows, SqliteJournal};
pub use measure::{HeldoutSet, Measure, MeasureError, SampledDistance};
pub use privacy::{community_id, community_seed, draw_communities, PrivacyCharge, PrivacyRules};
pub use proposals::{equal_electorate, OpenProposal, ProposalBook, ProposalError};
pub use record::{
    unix_ms, ContributionRecord, ContributionTiming, CountedProposal, Judgment, ManifestEntry, NodeManifest,
    RoundRecord, RoundTiming,
};
pub use store::{Blob, BlobReader, BlobStore, FsBlobStore, MemoryBlobStore, StoreError};
