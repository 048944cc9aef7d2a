//! Aggregate: validated usage events → per app and billing month usage.
//!
//! - [`unique`]: unique-user counts (MAU, DAU): exact sets up to a limit, HLL++ beyond.
//! - [`user_set`]: the exact sets.
//! - [`user_days`]: an app-month's exact MAU and DAU as one table of users and their days.
//! - [`pcc`]: sample instants and the PCC timeline of an app-month.
//! - [`connections`]: each connection's lifecycle (duplicates, reordering, idle close).
//! - [`handover`]: connections that pair across the shares of an app-month.
//! - [`app_month`]: the mergeable, serializable aggregate of one app-month.
//! - [`meter`]: applies events, closes months.
//! - [`checkpoint`]: the meter's state as changelog records keyed by [`StateKey`], and back.
//! - [`segments`]: growing key sets checkpointed as size-tiered segments.
//! - [`totals`]: how many segments each such set has, so that a restore can tell it read them all.
//! - [`usage`]: the figures reported and priced.
//!
//! Shared by several of them, so that none imports another for it: [`codec`] (the decoders'
//! error), [`user_count`] (which count of an app-month), [`pass_through`] (the hasher of
//! already-hashed keys) and [`sorted`] (the search of sorted keys).

pub mod app_month;
pub mod checkpoint;
mod codec;
pub mod connections;
pub mod handover;
pub mod meter;
mod pass_through;
pub mod pcc;
pub mod segments;
mod sorted;
pub mod totals;
pub mod unique;
mod usage;
mod user_count;
mod user_days;
pub mod user_set;

pub use app_month::{merge_shares, AppMonthAggregate, ExactCounts, SegmentUsers, UserSegment};
pub use checkpoint::{StateKey, StateRecord};
pub use codec::CodecError;
pub use meter::{ClosedMonth, Meter, MeterSettings, MonthsClosed, Outcome, RestoreError};
pub use pcc::{SampleGrid, SampleIntervalError};
pub use unique::{
    Counted, Counting, ExactLimit, ExactLimitError, MergeError, Precision, PrecisionError, UniqueUsers,
};
pub use usage::MonthlyUsage;
pub use user_count::UserCount;
