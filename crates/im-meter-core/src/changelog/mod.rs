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
//! The keys, typed marks and parts the records use are still
//! [`crate::aggregate::checkpoint`] and [`crate::aggregate::parts`].
//!
//! - [`meter`]: what one metering commit writes ([`MeterCommit`]) and what it must know of
//!   what the changelog holds already ([`WrittenState`]).

pub mod meter;

pub use meter::{ChangelogRecord, Changelogs, MeterCommit, Source, WrittenState};

#[cfg(test)]
mod tests;
