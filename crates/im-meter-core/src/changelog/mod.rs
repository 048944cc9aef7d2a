//! The changelogs' records: what each stage's transaction writes, in which order — the
//! protocol between the stages, as plain records, without Kafka.
//!
//! The worker's stages talk only through two compacted topics: metering writes its state
//! to the metering changelog (one partition per events partition) and hands each closed
//! month's usage, its closed-through marks and quota crossings to the billing changelog
//! (one partition per group of apps), where billing reads them. What a transaction writes,
//! and why in that order, is decided here ([`MeterCommit`]); the Kafka shell
//! (`im-meter`'s `kafka/meter.rs`) only gathers the commits of its partitions, adds the
//! offsets and dead letters, and writes them in one transaction. So a test can commit,
//! crash and restore between any two transactions without a broker.
//!
//! # The records
//!
//! Every key is a [`ChangelogKey`] ([`keys`]); a value over the topic's record limit is
//! written as parts followed by a header, whatever its key ([`parts`]).
//!
//! | Key | Topic, partition | Written by | Read by |
//! |---|---|---|---|
//! | `p`, `m/…`, `d/…`, `e/…`, `c/…`, `k/…` ([`ChangelogKey::State`]: the meter's [`StateKey`](crate::aggregate::StateKey)) | metering changelog, the source's partition | metering ([`MeterCommit::state`]) | metering, on restore; the usage API's view (app-months) |
//! | `g` ([`ChangelogKey::Owner`]) | both changelogs, every partition used | metering, billing | the same stage, on restore: another deployment's state is refused |
//! | `u/{app}/{month}/{source}` ([`ChangelogKey::Usage`]) | billing changelog, [`billing_partition`] of the app | metering, when it closes a month; billing, for the month after one it billed (source [`CARRIED`](crate::bill::CARRIED): connections handed over, still open) | billing, which deletes it once billed |
//! | `w/{source}` ([`ChangelogKey::ClosedThrough`], a [`ClosedMark`]) | billing changelog, every partition | metering, after the usage it covers | billing: a month is billable once every source is closed through it |
//! | `x/{app}/{month}/{source}` ([`ChangelogKey::QuotaCrossed`]) | billing changelog, the app's partition | metering | billing (quota alerts) |
//! | `a/{app}/{month}` ([`ChangelogKey::Alerted`]) | billing changelog, the app's partition | billing | billing: the alert is not published twice |
//! | `s/{month}` ([`ChangelogKey::SubscriptionsRead`], a [`SubscriptionsRead`]) | billing changelog, the billing partition | billing, first part of a bill ([`crate::bill::BillPart`]) | billing and the usage API's ledger: which subscription records are late |
//! | `h/{month}` ([`ChangelogKey::BilledApps`]) | billing changelog, the billing partition | billing, a bill in several parts | billing, to resume the bill |
//! | `b` ([`ChangelogKey::Billed`]) | billing changelog, the billing partition | billing, last part of a bill | billing; `im-meter report` |
//! | `o/{partition}` ([`ChangelogKey::PlanCopied`]) | billing changelog, the billing partition | billing, with its copy of that subscriptions partition into the plan book | billing: where the copy goes on from |
//!
//! # Which module depends on which
//!
//! This module depends on [`crate::aggregate`], never the other way round. The metering
//! state's keys ([`StateKey`](crate::aggregate::StateKey)) and records
//! ([`StateRecord`](crate::aggregate::StateRecord)), and the progress record `p`, stay with
//! the meter: they are how the meter lays out and encodes its own state,
//! [`Meter::checkpoint`](crate::aggregate::Meter::checkpoint) produces them and
//! [`Meter::restore`](crate::aggregate::Meter::restore) reads them, so moving them here
//! would make `aggregate` import `changelog` while `changelog` imports the meter. What the
//! stages say to each other — the changelog keys around the state keys, the typed marks,
//! the billing partition of an app, values in parts — is here, and `aggregate` does not
//! know of it. The decoders' error is [`crate::aggregate::CodecError`].
//!
//! - [`keys`]: every changelog key ([`ChangelogKey`]) and its bytes, and
//!   [`billing_partition`].
//! - [`marks`]: the typed values of the progress marks ([`ClosedMark`],
//!   [`SubscriptionsRead`]).
//! - [`parts`]: values larger than one record, written as parts.
//! - [`meter`]: what one metering commit writes ([`MeterCommit`]) and what it must know of
//!   what the changelog holds already ([`WrittenState`]).

pub mod keys;
pub mod marks;
pub mod meter;
pub mod parts;

pub use keys::{billing_partition, ChangelogKey};
pub use marks::{ClosedMark, SubscriptionsRead};
pub use meter::{ChangelogRecord, Changelogs, MeterCommit, Source, WrittenState};

#[cfg(test)]
mod tests;
