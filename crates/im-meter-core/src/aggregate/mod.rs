//! Aggregate: validated usage events → per app and billing month usage.
//!
//! - [`unique`]: unique-user counts (MAU, DAU): exact sets up to a limit, HLL++ beyond.
//! - [`user_set`]: the exact sets.
//! - [`user_days`]: an app-month's exact MAU and DAU as one table of users and their days.
//! - [`pcc`]: sample instants and the PCC timeline of an app-month.
//! - [`connections`]: each connection's lifecycle (duplicates, reordering, idle close).
//! - [`app_month`]: the mergeable, serializable aggregate of one app-month.
//! - [`meter`]: applies events, closes months.
//! - [`checkpoint`]: the meter's state as changelog records, and back.
//! - [`segments`]: growing key sets checkpointed as size-tiered segments.
//! - [`parts`]: values larger than one record, written as parts.
//! - [`usage`]: the figures reported and priced.

pub mod app_month;
pub mod checkpoint;
pub mod connections;
pub mod meter;
pub mod parts;
pub mod pcc;
pub mod segments;
pub mod unique;
mod usage;
mod user_days;
pub mod user_set;

pub use app_month::{
    merge_shares, AppMonthAggregate, CodecError, ExactCounts, SegmentUsers, UserCount, UserSegment,
};
pub use checkpoint::{billing_partition, ChangelogKey, ClosedMark, StateKey, StateRecord, SubscriptionsRead};
pub use meter::{ClosedMonth, Meter, MeterSettings, MonthsClosed, Outcome};
pub use pcc::{SampleGrid, SampleIntervalError};
pub use unique::{
    Counted, Counting, ExactLimit, ExactLimitError, MergeError, Precision, PrecisionError, UniqueUsers,
};
pub use usage::MonthlyUsage;
