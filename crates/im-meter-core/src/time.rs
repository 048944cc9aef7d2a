//! Event time and the billing calendar.
//!
//! Owns [`Timestamp`] (epoch milliseconds, the only instant type in the core), RFC 3339
//! parsing, and [`BillingTz`], which maps instants to calendar [`Month`]s and [`Day`]s in
//! the billing time zone. The core never reads a clock: every instant comes from an event.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, Offset, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// An instant in event time: milliseconds since the Unix epoch (UTC).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub i64);

/// Why a timestamp was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    /// The text is not an RFC 3339 date-time.
    #[error("not an RFC 3339 date-time: {0:?}")]
    Unparsable(String),
    /// The instant lies outside [2000-01-01, 2100-01-01) UTC.
    #[error("timestamp {0} ms is outside [2000-01-01, 2100-01-01)")]
    OutOfRange(i64),
}

impl Timestamp {
    /// 2000-01-01T00:00:00Z, the earliest accepted event time.
    pub const MIN: Timestamp = Timestamp(946_684_800_000);
    /// 2100-01-01T00:00:00Z, the first refused event time.
    pub const END: Timestamp = Timestamp(4_102_444_800_000);

    /// Milliseconds since the epoch.
    pub const fn millis(self) -> i64 {
        self.0
    }

    /// Accepts epoch milliseconds inside the supported range.
    pub fn from_millis(ms: i64) -> Result<Self, TimestampError> {
        let ts = Timestamp(ms);
        if (Self::MIN..Self::END).contains(&ts) {
            Ok(ts)
        } else {
            Err(TimestampError::OutOfRange(ms))
        }
    }

    /// Parses an RFC 3339 date-time (`2026-11-03T08:15:00Z`, `...+08:00`, fractional
    /// seconds allowed, `T` or a space as separator) and checks the supported range.
    ///
    /// Hand-written because it sits on the hot path of every event; it validates as
    /// strictly as chrono does for the fields it reads.
    pub fn parse_rfc3339(text: &str) -> Result<Self, TimestampError> {
        let ms = parse_rfc3339_millis(text.as_bytes())
            .ok_or_else(|| TimestampError::Unparsable(text.chars().take(64).collect()))?;
        Self::from_millis(ms)
    }

    /// Formats the instant as RFC 3339 in the given zone, second precision when exact.
    pub fn to_rfc3339(self, tz: &BillingTz) -> String {
        let utc = self.to_utc();
        let offset = tz.offset_at(self);
        let local = utc.with_timezone(&offset);
        if self.0 % 1000 == 0 {
            local.format("%Y-%m-%dT%H:%M:%S%:z").to_string()
        } else {
            local.format("%Y-%m-%dT%H:%M:%S%.3f%:z").to_string()
        }
    }

    fn to_utc(self) -> DateTime<Utc> {
        // In range by construction (parse/from_millis); fall back to the epoch otherwise.
        DateTime::<Utc>::from_timestamp_millis(self.0).unwrap_or_default()
    }
}

fn digits(b: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u32::from(c - b'0');
    }
    Some(v)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn parse_rfc3339_millis(b: &[u8]) -> Option<i64> {
    // YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    let hour = digits(&b[11..13])?;
    let minute = digits(&b[14..16])?;
    let second = digits(&b[17..19])?;
    let date = NaiveDate::from_ymd_opt(year as i32, month, day)?;
    // Leap seconds (:60) are refused like any other out-of-range field.
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut rest = &b[19..];
    let mut millis = 0i64;
    if let Some((&b'.', frac)) = rest.split_first() {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        // Truncate to milliseconds: event time has millisecond resolution.
        let mut scale = 100;
        for &c in &frac[..n.min(3)] {
            millis += i64::from(c - b'0') * scale;
            scale /= 10;
        }
        rest = &frac[n..];
    }
    let offset_secs: i64 = match rest {
        [b'Z'] | [b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let oh = digits(&[*h1, *h2])?;
            let om = digits(&[*m1, *m2])?;
            if oh > 23 || om > 59 {
                return None;
            }
            let secs = i64::from(oh * 3600 + om * 60);
            if *sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };
    let days = days_from_civil(i64::from(date.year()), date.month(), date.day());
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset_secs;
    Some(secs * 1000 + millis)
}

/// A calendar month in the billing time zone, shown (and serialized) as `YYYY-MM`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    year: i32,
    month: u8,
}

/// Why a `YYYY-MM` string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a month in YYYY-MM form: {0:?}")]
pub struct MonthParseError(String);

impl Month {
    /// The month of `year` numbered `month` (1–12).
    pub fn new(year: i32, month: u32) -> Option<Self> {
        (1..=12).contains(&month).then_some(Month { year, month: month as u8 })
    }

    /// Calendar year.
    pub fn year(self) -> i32 {
        self.year
    }

    /// Month number, 1–12.
    pub fn number(self) -> u32 {
        u32::from(self.month)
    }

    /// The following month.
    pub fn next(self) -> Self {
        if self.month == 12 {
            Month { year: self.year + 1, month: 1 }
        } else {
            Month { year: self.year, month: self.month + 1 }
        }
    }

    /// The month before.
    pub fn prev(self) -> Self {
        if self.month == 1 {
            Month { year: self.year - 1, month: 12 }
        } else {
            Month { year: self.year, month: self.month - 1 }
        }
    }

    /// Number of calendar days in the month.
    pub fn days(self) -> u32 {
        let first = self.first_date();
        let next = self.next().first_date();
        (next - first).num_days() as u32
    }

    /// The first calendar day of the month.
    pub fn first_date(self) -> NaiveDate {
        NaiveDate::from_ymd_opt(self.year, u32::from(self.month), 1).unwrap_or_default()
    }

    /// The month holding a calendar date.
    pub fn of_date(date: NaiveDate) -> Self {
        Month { year: date.year(), month: date.month() as u8 }
    }

    /// The `day`-th day of the month (1-based), if it exists.
    pub fn day(self, day: u32) -> Option<Day> {
        (1..=self.days()).contains(&day).then_some(Day { month: self, day: day as u8 })
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl Serialize for Month {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Month {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Month {
    type Err = MonthParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MonthParseError(s.to_string());
        let b = s.as_bytes();
        if b.len() != 7 || b[4] != b'-' {
            return Err(err());
        }
        let year = digits(&b[..4]).ok_or_else(err)?;
        let month = digits(&b[5..]).ok_or_else(err)?;
        Month::new(year as i32, month).ok_or_else(err)
    }
}

/// A calendar day in the billing time zone.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Day {
    month: Month,
    day: u8,
}

impl Day {
    /// The month holding this day.
    pub fn month(self) -> Month {
        self.month
    }

    /// Day of the month, 1-based.
    pub fn number(self) -> u32 {
        u32::from(self.day)
    }

    /// The calendar date.
    pub fn date(self) -> NaiveDate {
        NaiveDate::from_ymd_opt(self.month.year, u32::from(self.month.month), u32::from(self.day))
            .unwrap_or_default()
    }

    /// The day holding a calendar date.
    pub fn of_date(date: NaiveDate) -> Self {
        Day { month: Month::of_date(date), day: date.day() as u8 }
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{:02}", self.month, self.day)
    }
}

/// The billing time zone: a fixed UTC offset (`+08:00`) or an IANA zone (`Asia/Shanghai`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BillingTz {
    /// A fixed offset from UTC.
    Fixed(FixedOffset),
    /// An IANA time zone, with its daylight-saving rules.
    Named(chrono_tz::Tz),
}

impl Default for BillingTz {
    /// `+08:00`, the product's default billing zone.
    fn default() -> Self {
        BillingTz::Fixed(FixedOffset::east_opt(8 * 3600).expect("+08:00 is a valid offset"))
    }
}

/// Why a time zone name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a UTC offset (+08:00) or IANA time zone name (Asia/Shanghai): {0:?}")]
pub struct TzParseError(String);

impl FromStr for BillingTz {
    type Err = TzParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        if s == "Z" || s.eq_ignore_ascii_case("utc") {
            return Ok(BillingTz::Fixed(FixedOffset::east_opt(0).expect("UTC is a valid offset")));
        }
        if let [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] = b {
            let secs = digits(&[*h1, *h2])
                .zip(digits(&[*m1, *m2]))
                .filter(|(h, m)| *h <= 23 && *m <= 59)
                .map(|(h, m)| (h * 3600 + m * 60) as i32)
                .ok_or_else(|| TzParseError(s.into()))?;
            let secs = if *sign == b'-' { -secs } else { secs };
            return FixedOffset::east_opt(secs).map(BillingTz::Fixed).ok_or_else(|| TzParseError(s.into()));
        }
        s.parse::<chrono_tz::Tz>().map(BillingTz::Named).map_err(|_| TzParseError(s.into()))
    }
}

impl fmt::Display for BillingTz {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BillingTz::Fixed(o) => write!(f, "{o}"),
            BillingTz::Named(tz) => write!(f, "{}", tz.name()),
        }
    }
}

impl BillingTz {
    /// The UTC offset in force at an instant.
    pub fn offset_at(&self, ts: Timestamp) -> FixedOffset {
        match self {
            BillingTz::Fixed(o) => *o,
            BillingTz::Named(tz) => tz.offset_from_utc_datetime(&ts.to_utc().naive_utc()).fix(),
        }
    }

    /// The calendar date of an instant in this zone.
    pub fn date_of(&self, ts: Timestamp) -> NaiveDate {
        ts.to_utc().with_timezone(&self.offset_at(ts)).date_naive()
    }

    /// The calendar day of an instant.
    pub fn day_of(&self, ts: Timestamp) -> Day {
        Day::of_date(self.date_of(ts))
    }

    /// The calendar month of an instant.
    pub fn month_of(&self, ts: Timestamp) -> Month {
        Month::of_date(self.date_of(ts))
    }

    /// The first instant of a calendar date (local midnight; after a DST gap, the first
    /// instant that exists).
    pub fn start_of_date(&self, date: NaiveDate) -> Timestamp {
        let midnight = date.and_hms_opt(0, 0, 0).unwrap_or_default();
        let utc = match self {
            BillingTz::Fixed(o) => o.from_local_datetime(&midnight).earliest().map(|d| d.timestamp_millis()),
            BillingTz::Named(tz) => (0..=24)
                .find_map(|quarter| {
                    tz.from_local_datetime(&(midnight + chrono::Duration::minutes(quarter * 15))).earliest()
                })
                .map(|d| d.timestamp_millis()),
        };
        Timestamp(utc.unwrap_or_else(|| midnight.and_utc().timestamp_millis()))
    }

    /// The first instant of a day.
    pub fn start_of_day(&self, day: Day) -> Timestamp {
        self.start_of_date(day.date())
    }

    /// The first instant of a month.
    pub fn start_of_month(&self, month: Month) -> Timestamp {
        self.start_of_date(month.first_date())
    }

    /// The first instant after a month (the start of the next one).
    pub fn end_of_month(&self, month: Month) -> Timestamp {
        self.start_of_month(month.next())
    }
}

/// A one-entry cache of the day holding recent instants.
///
/// Events arrive roughly in time order, so most lookups hit the day of the previous one;
/// this keeps time-zone arithmetic off the per-event hot path.
#[derive(Debug, Clone)]
pub struct DayCache {
    tz: BillingTz,
    start: i64,
    end: i64,
    day: Option<Day>,
}

impl DayCache {
    /// An empty cache for a zone.
    pub fn new(tz: BillingTz) -> Self {
        DayCache { tz, start: 0, end: 0, day: None }
    }

    /// The zone the cache computes in.
    pub fn tz(&self) -> &BillingTz {
        &self.tz
    }

    /// The calendar day of an instant.
    #[inline]
    pub fn day_of(&mut self, ts: Timestamp) -> Day {
        match self.day {
            Some(day) if (self.start..self.end).contains(&ts.0) => day,
            _ => {
                let day = self.tz.day_of(ts);
                self.start = self.tz.start_of_day(day).0;
                self.end = self.tz.start_of_date(day.date().succ_opt().unwrap_or(day.date())).0;
                self.day = Some(day);
                day
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chrono_ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn rfc3339_matches_chrono() {
        for s in [
            "2026-11-03T08:15:00Z",
            "2026-11-03T17:00:00+08:00",
            "2026-11-03T17:00:00.123-05:30",
            "2000-01-01T00:00:00Z",
            "2099-12-31T23:59:59.999999Z",
            "2024-02-29T12:00:00z",
        ] {
            assert_eq!(Timestamp::parse_rfc3339(s).unwrap().0, chrono_ms(s), "{s}");
        }
    }

    #[test]
    fn rfc3339_rejects_bad_text_and_range() {
        for s in [
            "2026-11-03",
            "2026-13-03T08:15:00Z",
            "2026-02-30T08:15:00Z",
            "2026-11-03T24:00:00Z",
            "2026-11-03T08:15:00",
            "2026-11-03T08:15:00.Z",
            "2026-11-03T08:15:00+0800",
            "２026-11-03T08:15:00Z",
        ] {
            assert!(matches!(Timestamp::parse_rfc3339(s), Err(TimestampError::Unparsable(_))), "{s}");
        }
        assert!(matches!(
            Timestamp::parse_rfc3339("1999-12-31T23:59:59Z"),
            Err(TimestampError::OutOfRange(_))
        ));
        assert!(matches!(
            Timestamp::parse_rfc3339("2100-01-01T00:00:00Z"),
            Err(TimestampError::OutOfRange(_))
        ));
        assert!(Timestamp::from_millis(Timestamp::END.0 - 1).is_ok());
    }

    #[test]
    fn months_and_days_follow_the_billing_zone() {
        let tz = BillingTz::default();
        // 16:00Z on Oct 31 is midnight Nov 1 at +08:00.
        let ts = Timestamp::parse_rfc3339("2026-10-31T16:00:00Z").unwrap();
        assert_eq!(tz.month_of(ts).to_string(), "2026-11");
        assert_eq!(tz.month_of(Timestamp(ts.0 - 1)).to_string(), "2026-10");
        let nov: Month = "2026-11".parse().unwrap();
        assert_eq!(tz.start_of_month(nov), ts);
        assert_eq!(nov.days(), 30);
        assert_eq!("2024-02".parse::<Month>().unwrap().days(), 29);
        assert!("2024-13".parse::<Month>().is_err());
        let jan: Month = "2027-01".parse().unwrap();
        assert_eq!((jan.prev().to_string(), jan.prev().next()), ("2026-12".to_string(), jan));
    }

    #[test]
    fn named_zones_and_day_cache() {
        let tz: BillingTz = "America/New_York".parse().unwrap();
        let mut cache = DayCache::new(tz);
        // 2026-11-01 is the DST fall-back day in New York: 25 hours long.
        let day = "2026-11".parse::<Month>().unwrap().day(1).unwrap();
        let start = tz.start_of_day(day);
        assert_eq!(start, Timestamp::parse_rfc3339("2026-11-01T00:00:00-04:00").unwrap());
        let late = Timestamp(start.0 + 24 * 3_600_000 + 1);
        assert_eq!(cache.day_of(late), day);
        assert_eq!(cache.day_of(start), day);
        assert_eq!(cache.day_of(Timestamp(start.0 + 25 * 3_600_000)).number(), 2);
        assert!("Mars/Olympus".parse::<BillingTz>().is_err());
        assert_eq!("-03:30".parse::<BillingTz>().unwrap().to_string(), "-03:30");
    }
}
