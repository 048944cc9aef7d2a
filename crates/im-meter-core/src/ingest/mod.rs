//! Ingest: raw records → validated events, or a [`Rejection`] saying why not.

mod decode;
mod event;
mod rejection;

pub use decode::{decode_subscription_event, decode_usage_event, MAX_ID_BYTES};
pub use event::{stable_hash, Action, ConnKey, SubscriptionChange, SubscriptionEvent, UsageEvent, UserKey};
pub use rejection::{RejectReason, Rejection};
