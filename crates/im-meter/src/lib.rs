//! The edges of `im-meter`: configuration, file input, output. The domain is in
//! `im-meter-core`; this crate reads input, hands it to the core and writes what comes back.
//!
//! # Layout
//!
//! - [`config`]: the TOML file and `IM_METER__*` overrides, validated into core settings.
//! - [`workload`]: synthetic SDK and subscription events, for samples, tests and load.
//! - [`input`]: NDJSON input (a file or stdin), line by line.
//! - [`replay`]: the pipeline over NDJSON files (ingest → aggregate → bill).
//! - [`report`]: the published shapes — usage items, billed months' usage, charges and
//!   alerts — and their printing as JSON or tables; `replay` and the worker both use it.
//! - [`kafka`]: Kafka clients, topics, `produce`, and the worker's stages.
//! - [`metrics`]: every Prometheus metric, in one place.
//! - [`clock`]: whether the worker's clock agrees with the broker's, and the time events are
//!   judged by.
//! - [`status`]: what the stages report about themselves, for the operator endpoints.
//! - [`http`]: the operator endpoints: metrics, health, the usage API.
//! - [`failpoints`]: faults the tests switch on (only with the `failpoints` feature).

pub mod clock;
pub mod config;
pub mod failpoints;
pub mod http;
pub mod input;
pub mod kafka;
pub mod metrics;
pub mod replay;
pub mod report;
pub mod status;
pub mod view;
pub mod workload;
