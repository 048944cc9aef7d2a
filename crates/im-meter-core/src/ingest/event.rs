//! Decoded input events: SDK usage events and subscription events.
//!
//! Identifiers that are only compared, never shown (`user_id`, `conn_id`), are hashed once
//! at decode time with xxh3-64 (seed 0) into [`UserKey`] and [`ConnKey`]. The hash is fixed
//! and documented because sketches built from it are merged across processes and restarts;
//! a per-process hasher (`RandomState`) would corrupt every merge.

use crate::plan::{AppId, Plan};
use crate::time::Timestamp;

/// The fixed 64-bit hash of an identifier: xxh3-64 with seed 0 over its UTF-8 bytes.
#[inline]
pub fn stable_hash(id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id.as_bytes())
}

/// A user, as the stable hash of its `user_id`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserKey(pub u64);

impl UserKey {
    /// The key of a `user_id`.
    pub fn of(user_id: &str) -> Self {
        UserKey(stable_hash(user_id))
    }
}

/// A connection, as the stable hash of its `conn_id`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey(pub u64);

impl ConnKey {
    /// The key of a `conn_id`.
    pub fn of(conn_id: &str) -> Self {
        ConnKey(stable_hash(conn_id))
    }
}

/// One SDK action, validated.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct UsageEvent {
    /// The app it belongs to.
    pub app_id: AppId,
    /// When it happened.
    pub ts: Timestamp,
    /// What happened.
    pub action: Action,
}

/// What an SDK event reports.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A login attempt; only successful ones (`ok`) count as activity.
    Login {
        /// The user logging in.
        user: UserKey,
        /// Whether the login succeeded.
        ok: bool,
    },
    /// A logout (informational: it ends no connection and counts nowhere).
    Logout {
        /// The user logging out.
        user: UserKey,
    },
    /// A persistent connection opened.
    Connect {
        /// The connection.
        conn: ConnKey,
        /// Its user.
        user: UserKey,
    },
    /// A persistent connection closed.
    Disconnect {
        /// The connection.
        conn: ConnKey,
    },
    /// A connection is still alive.
    Heartbeat {
        /// The connection.
        conn: ConnKey,
    },
    /// A sample of the app's current group count.
    GroupStats {
        /// The number of groups.
        group_count: u64,
    },
}

impl Action {
    /// The event `type` this action was decoded from.
    pub const fn type_name(&self) -> &'static str {
        match self {
            Action::Login { .. } => "login",
            Action::Logout { .. } => "logout",
            Action::Connect { .. } => "connect",
            Action::Disconnect { .. } => "disconnect",
            Action::Heartbeat { .. } => "heartbeat",
            Action::GroupStats { .. } => "group_stats",
        }
    }
}

/// A change to an app's subscription, validated as a record (rules are checked when it is
/// applied, see `bill::subscription`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubscriptionEvent {
    /// The app it belongs to.
    pub app_id: AppId,
    /// When it takes place.
    pub ts: Timestamp,
    /// What changes.
    pub change: SubscriptionChange,
}

/// The kinds of subscription change.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SubscriptionChange {
    /// The app was created (its billing mode follows from the date).
    AppCreated {
        /// The owning account, where known.
        account_id: Option<String>,
    },
    /// The app moves to another plan of its billing mode.
    PlanChanged {
        /// The new plan.
        plan: Plan,
    },
    /// An original-mode app moves, from the next month on, to a current-mode plan.
    BillingModeMigrated {
        /// The current-mode plan it moves to.
        plan: Plan,
    },
    /// A 60-day free trial of audio/video calls starts.
    AvCallTrialStarted {
        /// The account starting it, where known.
        account_id: Option<String>,
    },
}

impl SubscriptionChange {
    /// The event `type` this change was decoded from.
    pub const fn type_name(&self) -> &'static str {
        match self {
            SubscriptionChange::AppCreated { .. } => "app_created",
            SubscriptionChange::PlanChanged { .. } => "plan_changed",
            SubscriptionChange::BillingModeMigrated { .. } => "billing_mode_migrated",
            SubscriptionChange::AvCallTrialStarted { .. } => "av_call_trial_started",
        }
    }
}
