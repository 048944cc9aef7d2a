//! Aggregate: validated usage events → per app and billing month usage.

mod usage;

pub use usage::MonthlyUsage;
