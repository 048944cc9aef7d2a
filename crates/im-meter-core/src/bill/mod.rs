//! Bill: subscriptions and monthly usage → charges in exact decimal money.
