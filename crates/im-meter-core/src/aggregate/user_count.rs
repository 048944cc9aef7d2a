//! Which unique-user count of an app-month a record or a segment belongs to: shared by the
//! aggregate, its table of users and days, and the changelog keys.

/// Which unique-user count of an app-month.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UserCount {
    /// The month's (MAU).
    Mau,
    /// One day's (DAU), by day of the month.
    Dau(u8),
}

impl std::fmt::Display for UserCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserCount::Mau => write!(f, "MAU"),
            UserCount::Dau(day) => write!(f, "DAU of day {day}"),
        }
    }
}
