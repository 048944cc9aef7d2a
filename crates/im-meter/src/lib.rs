//! The edges of `im-meter`: configuration, file input, output. The domain is in
//! `im-meter-core`; this crate reads input, hands it to the core and writes what comes back.
//!
//! # Layout
//!
//! - [`config`]: the TOML file and `IM_METER__*` overrides, validated into core settings.
//! - [`workload`]: synthetic SDK and subscription events, for samples, tests and load.
//! - [`replay`]: the pipeline over NDJSON files (ingest → aggregate → bill).
//! - [`report`]: a replay's result as JSON or tables.
//! - [`kafka`]: Kafka clients, topics, and `produce`.

pub mod config;
pub mod kafka;
pub mod replay;
pub mod report;
pub mod workload;
