//! The pure domain of `im-meter`, the usage-metering and billing pipeline of an IM cloud
//! service: no I/O, no clocks, no async. Everything here is a function of its inputs, so
//! it is tested directly, property-tested against exact models and benchmarked.
//!
//! # Layout (in data-flow order)
//!
//! - [`time`]: event time, the billing time zone, months and days.
//! - [`plan`]: the product catalog: billing modes, plans, fees and quotas.
//! - [`ingest`]: bytes → validated [`ingest::UsageEvent`]s and
//!   [`ingest::SubscriptionEvent`]s, or a [`ingest::Rejection`] with a bounded reason.
//! - [`aggregate`]: events → per app and month usage (MAU, DAU, PCC, group count) held in
//!   mergeable, serializable aggregates.
//! - [`changelog`]: what each stage's transaction writes to the changelogs, and in which
//!   order: the protocol between metering and billing, as plain records.
//! - [`bill`]: subscriptions (plans, migrations, trials) and usage → [`bill::Charge`]s in
//!   exact decimal money.
//!
//! The binary crate (`im-meter`) reads files or Kafka at the edges and writes what this
//! crate returns.

pub mod aggregate;
pub mod bill;
pub mod changelog;
pub mod ingest;
pub mod plan;
pub mod time;
