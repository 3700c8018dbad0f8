//! The weft coordinator: it checks every contribution, measures it on the consortium's held-out
//! text itself, applies the policy, and folds the accepted deltas into the next shared base
//! tensor by tensor from a content-addressed store.

mod aggregation;
mod coordinator;
mod measure;
mod record;
mod store;

pub use coordinator::{Announcement, Coordinator, CoordinatorError, Member, Receipt, SubmitError};
pub use measure::{HeldoutSet, Measure, MeasureError};
pub use record::{ContributionRecord, ManifestEntry, NodeManifest, RoundRecord};
pub use store::{DeltaStore, StoreError};
