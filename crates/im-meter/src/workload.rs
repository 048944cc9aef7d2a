//! Synthetic workloads: a month of SDK events for a set of apps, deterministic for a seed.
//!
//! Used for the bundled sample (`deploy/sample/`), the replay benchmark and tests. Every
//! user of an app logs in at least once in the month (so an app's MAU is known by
//! construction, less users whose every login failed); some logins open a persistent
//! connection with a heartbeat and, usually, a disconnect; apps report their group count
//! every six hours. Producer retries (exact duplicate lines) and malformed lines can be
//! mixed in; malformed lines are *extra* lines, so they never change a figure.

use std::io::{self, Write};

use im_meter_core::plan::AppId;
use im_meter_core::time::{BillingTz, Month, Timestamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The load of one app over the month.
#[derive(Debug, Clone)]
pub struct AppLoad {
    /// The SDKAppID.
    pub app_id: AppId,
    /// Distinct users; each logs in at least once.
    pub users: u64,
    /// Average logins per user over the month (at least 1).
    pub logins_per_user: f64,
    /// Share of logins that open a persistent connection.
    pub connection_share: f64,
    /// Mean connection length, minutes.
    pub mean_session_minutes: f64,
    /// Group count reached at the month's end (0: the app sends no `group_stats`).
    pub groups: u64,
}

/// A month of events for several apps.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The month generated.
    pub month: Month,
    /// The apps.
    pub apps: Vec<AppLoad>,
    /// Share of extra malformed lines.
    pub malformed_share: f64,
    /// Share of lines written twice (producer retries).
    pub duplicate_share: f64,
    /// Share of logins that fail.
    pub failed_login_share: f64,
    /// The random seed: the same seed writes the same bytes.
    pub seed: u64,
}

/// Broken lines mixed in by `malformed_share`, one of each reason class.
const MALFORMED: [&str; 6] = [
    r#"{"type":"login","app_id":1400000001,"user_id":"u-1","ts":"2026-11-0"#,
    r#"{"type":"login","app_id":0,"user_id":"u-1","ts":1793693700000}"#,
    r#"{"type":"login","app_id":1400000001,"ts":1793693700000}"#,
    r#"{"type":"login","app_id":1400000001,"user_id":"u-1","ts":"yesterday"}"#,
    r#"{"type":"purchase","app_id":1400000001,"ts":1793693700000}"#,
    r#"["login",1400000001]"#,
];

impl Workload {
    /// The bundled sample: November 2026 for six apps on different plans (see
    /// `deploy/sample/subscriptions.ndjson` for their plans).
    pub fn sample() -> Self {
        let app = |app_id, users, logins_per_user, groups| AppLoad {
            app_id,
            users,
            logins_per_user,
            connection_share: 0.3,
            mean_session_minutes: 45.0,
            groups,
        };
        Workload {
            month: Month::new(2026, 11).expect("valid month"),
            apps: vec![
                app(1_400_000_001, 60, 4.0, 20),
                app(1_400_000_002, 140, 3.0, 0),
                app(1_400_000_003, 10_400, 1.3, 800),
                app(1_400_000_004, 2_000, 3.0, 150),
                app(1_400_000_005, 900, 6.0, 240_000),
                app(1_400_000_006, 300, 2.0, 5_000),
            ],
            malformed_share: 0.001,
            duplicate_share: 0.01,
            failed_login_share: 0.02,
            seed: 20_261_101,
        }
    }

    /// A large synthetic load: `apps` apps sharing `users` users in all, for benchmarks.
    pub fn synthetic(month: Month, apps: u64, users: u64, seed: u64) -> Self {
        let per_app = (users / apps.max(1)).max(1);
        Workload {
            month,
            apps: (0..apps)
                .map(|i| AppLoad {
                    app_id: 1_400_000_000 + i + 1,
                    users: per_app,
                    logins_per_user: 2.0,
                    connection_share: 0.5,
                    mean_session_minutes: 30.0,
                    groups: 1_000,
                })
                .collect(),
            malformed_share: 0.0,
            duplicate_share: 0.0,
            failed_login_share: 0.02,
            seed,
        }
    }

    /// The month's event lines in time order, retries and malformed lines mixed in.
    pub fn lines(&self, tz: &BillingTz) -> Vec<String> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let start = tz.start_of_month(self.month).millis();
        let end = tz.end_of_month(self.month).millis();
        let mut events: Vec<(i64, String)> = Vec::new();
        for app in &self.apps {
            self.app_events(app, start, end, &mut rng, &mut events);
        }
        events.sort();
        let mut lines = Vec::with_capacity(events.len());
        for (_, line) in events {
            if rng.gen_bool(self.duplicate_share) {
                lines.push(line.clone());
            }
            lines.push(line);
            if rng.gen_bool(self.malformed_share) {
                lines.push(MALFORMED[rng.gen_range(0..MALFORMED.len())].to_string());
            }
        }
        lines
    }

    /// Writes [`Workload::lines`] as NDJSON; returns the number of lines.
    pub fn write_events(&self, tz: &BillingTz, out: &mut impl Write) -> io::Result<u64> {
        let lines = self.lines(tz);
        for line in &lines {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
        }
        Ok(lines.len() as u64)
    }

    fn app_events(
        &self,
        app: &AppLoad,
        start: i64,
        end: i64,
        rng: &mut StdRng,
        lines: &mut Vec<(i64, String)>,
    ) {
        let id = app.app_id;
        let extra = (app.logins_per_user - 1.0).max(0.0);
        let mut conn_seq = 0u64;
        for user in 0..app.users {
            // 1 + a uniform number of extra logins averaging `extra`.
            let logins = 1 + rng.gen_range(0..=(2.0 * extra).round() as u64);
            for _ in 0..logins {
                let ts = rng.gen_range(start..end - 3_600_000);
                let ok = !rng.gen_bool(self.failed_login_share);
                let ok_field = if ok { "" } else { r#","ok":false"# };
                lines.push((ts, format!(r#"{{"type":"login","app_id":{id},"user_id":"u-{user}","ts":{}{ok_field},"platform":"android"}}"#, ts_text(ts, rng))));
                if !ok || !rng.gen_bool(app.connection_share) {
                    continue;
                }
                conn_seq += 1;
                let t0 = ts + 1_000;
                let minutes = -app.mean_session_minutes * (1.0 - rng.gen::<f64>()).ln();
                let t1 = t0 + (minutes * 60_000.0) as i64 + 1_000;
                lines.push((t0, format!(r#"{{"type":"connect","app_id":{id},"user_id":"u-{user}","conn_id":"c-{conn_seq}","ts":{}}}"#, ts_text(t0, rng))));
                let beat = t0 + (t1 - t0) / 2;
                lines.push((
                    beat,
                    format!(
                        r#"{{"type":"heartbeat","app_id":{id},"conn_id":"c-{conn_seq}","ts":{}}}"#,
                        ts_text(beat, rng)
                    ),
                ));
                // A few gateways die: their disconnects never arrive.
                if !rng.gen_bool(0.01) && t1 < end {
                    lines.push((
                        t1,
                        format!(
                            r#"{{"type":"disconnect","app_id":{id},"conn_id":"c-{conn_seq}","ts":{}}}"#,
                            ts_text(t1, rng)
                        ),
                    ));
                }
            }
        }
        if app.groups > 0 {
            let step = 6 * 3_600_000;
            let mut ts = start;
            while ts < end {
                // Grows through the month to `groups` in its last sample.
                let share = 0.7 + 0.3 * (ts - start + step) as f64 / (end - start) as f64;
                let count = ((app.groups as f64) * share.min(1.0)).round() as u64;
                lines.push((
                    ts,
                    format!(r#"{{"type":"group_stats","app_id":{id},"group_count":{count},"ts":{ts}}}"#),
                ));
                ts += step;
            }
        }
    }
}

/// Timestamps come both ways producers send them: epoch milliseconds or RFC 3339.
fn ts_text(ms: i64, rng: &mut StdRng) -> String {
    if rng.gen_bool(0.5) {
        ms.to_string()
    } else {
        format!("\"{}\"", Timestamp(ms).to_rfc3339(&BillingTz::default()))
    }
}
