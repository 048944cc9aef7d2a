//! The error of every decoder of the meter's state (aggregates, segments, changelog keys and
//! records): owned here, apart from any one format, so that each module that reads bytes can
//! use it without importing the others (the `changelog` module's decoders use it from here).

/// Why bytes could not be decoded into an aggregate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The bytes do not start like an encoded aggregate.
    #[error("not an encoded app-month aggregate")]
    NotAnAggregate,
    /// Written by a newer (or unknown) format version.
    #[error("unknown aggregate format version {0}")]
    UnknownVersion(u8),
    /// The payload is damaged.
    #[error("corrupt aggregate: {0}")]
    Corrupt(String),
}
