//! The operator endpoints of a running worker, against the real broker
//! (`scripts/kafka.sh start`) and a real Prometheus server (`scripts/prometheus.sh`
//! installs Debian's `prometheus` and `promtool`):
//! Prometheus scrapes the worker and finds its series, promtool accepts the exposition;
//! `/readyz` turns unready when the consumer stalls with records waiting and ready again
//! after; the usage API answers billed and open months and errors in JSON; secrets never
//! reach the logs or the printed configuration.
//!
//! Each test has its own topics and worker (HTTP on an ephemeral port); they run one at a
//! time, sharing the broker.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use im_meter_core::time::{BillingTz, Timestamp};
use serde_json::Value;
use support::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn json_worker(d: &Deployment, env: &[(&str, &str)]) -> Worker {
    d.worker_with("a", env, &["--log-format", "json"])
}

/// A Prometheus server on a free loopback port, scraping `target` every 2 s; stopped
/// when dropped.
struct Prometheus {
    child: Child,
    address: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = TempDir::new("prometheus");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 2s\n  scrape_timeout: 2s\n  evaluation_interval: 2s\nscrape_configs:\n  - job_name: im-meter\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let address = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus is installed (scripts/prometheus.sh)");
        let server = Prometheus { child, address, _dir: dir };
        eventually(Duration::from_secs(120), "Prometheus to be ready", || {
            std::net::TcpStream::connect(address)
                .ok()
                .and_then(|_| (http_get(address, "/-/ready").0 == 200).then_some(()))
        });
        server
    }

    /// The instant vector of `query`, from Prometheus' HTTP API.
    fn query(&self, query: &str) -> Vec<Value> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = http_json(self.address, &format!("/api/v1/query?query={encoded}"));
        assert_eq!(status, 200, "{body}");
        body["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("im-meter-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[test]
fn prometheus_scrapes_the_worker_and_promtool_accepts_its_metrics() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Deployment::new("prom");
    d.produce();
    let mut worker = json_worker(&d, &[]);
    let address = worker.http_address();
    // Billed October: every family has its series by then (charges, alerts, commits...).
    eventually(Duration::from_secs(120), "October to be billed", || {
        (http_get(address, "/v1/months/2026-10/charges").0 == 200).then_some(())
    });
    let prometheus = Prometheus::start(address);
    let up = eventually(Duration::from_secs(120), "a scrape of the worker", || {
        let up = prometheus.query(r#"up{job="im-meter"}"#);
        (up.first().map(|s| s["value"][1] == "1") == Some(true)).then_some(up)
    });
    assert_eq!(up.len(), 1);
    // Prometheus holds the worker's series: events by outcome, charges, the lag of each
    // partition, readiness.
    let accepted = prometheus.query(r#"sum(im_meter_events_total{outcome="accepted"})"#);
    let accepted: f64 = accepted[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(accepted > 50_000.0, "{accepted}");
    // October's lines at least (November, over by the clock, is billed its plan fees too).
    let charges = prometheus.query("sum(im_meter_charges_total)");
    let charges: usize = charges[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(charges >= expected().charges.len(), "{charges}");
    assert_eq!(prometheus.query("im_meter_consumer_lag_records").len(), 6, "3 meter + 3 bill partitions");
    assert_eq!(prometheus.query("im_meter_ready")[0]["value"][1], "1");
    let names = prometheus.query(r#"count by (__name__) ({__name__=~"im_meter_.+"})"#);
    assert!(names.len() >= 25, "{} im_meter_ series names", names.len());
    for name in [
        "im_meter_commit_duration_seconds_bucket",
        "im_meter_last_poll_timestamp_seconds",
        "process_resident_memory_bytes",
    ] {
        assert!(!prometheus.query(name).is_empty(), "{name}");
    }

    // promtool's linter accepts the exposition as scraped.
    let (status, payload) = http_get(address, "/metrics");
    assert_eq!(status, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/prometheus.sh)");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), payload.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    worker.stop();
}

#[test]
fn readyz_fails_while_the_consumer_is_stalled_with_records_waiting() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Deployment::new("stall");
    let pause = TempDir::new("pause");
    let pause_file = pause.0.join("pause");
    let pause_env = pause_file.to_string_lossy().into_owned();
    d.produce();
    let mut worker = json_worker(
        &d,
        &[("IM_METER__HTTP__STALL_TIMEOUT", "2s"), ("IM_METER_TEST_PAUSE_FILE", pause_env.as_str())],
    );
    let address = worker.http_address();
    eventually(Duration::from_secs(120), "the worker to be ready", || {
        (http_get(address, "/readyz").0 == 200).then_some(())
    });

    // The consumer stops polling (as one stuck in a blocking call would) while events
    // keep coming: not ready, and /metrics says so; the process itself is alive.
    std::fs::write(&pause_file, b"").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let now = Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64);
    let lines: Vec<String> = (0..50)
        .map(|i| {
            format!(r#"{{"type":"login","app_id":1400000003,"user_id":"stall-{i}","ts":{}}}"#, now.millis())
        })
        .collect();
    d.produce_lines(&lines);
    // (Other reasons to be unready may come and go, e.g. a late rebalance: wait for this one.)
    let problems = eventually(Duration::from_secs(60), "/readyz to report the stall", || {
        let (status, body) = http_json(address, "/readyz");
        let text = body["problems"].to_string();
        (status == 503 && text.contains("has not polled for") && text.contains("records waiting"))
            .then_some(text)
    });
    assert!(problems.contains("meter-"), "{problems}");
    assert_eq!(http_get(address, "/healthz").0, 200, "alive all along");
    assert!(http_get(address, "/metrics").1.contains("im_meter_ready 0"));

    // Polling again: ready again.
    std::fs::remove_file(&pause_file).unwrap();
    eventually(Duration::from_secs(60), "/readyz to recover", || {
        (http_get(address, "/readyz").0 == 200).then_some(())
    });
    assert!(http_get(address, "/metrics").1.contains("im_meter_ready 1"));
    worker.stop();
}

#[test]
fn the_usage_api_answers_billed_and_open_months_and_errors_in_json() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Deployment::new("api");
    d.produce();
    // This month's activity of a Standard app: three users, one connection of two minutes.
    let tz = BillingTz::default();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    let month = tz.month_of(Timestamp(now));
    let t0 = (now - 180_000).max(tz.start_of_month(month).millis());
    let app = 1_400_000_003u64;
    let mut lines: Vec<String> = (0..3)
        .map(|i| format!(r#"{{"type":"login","app_id":{app},"user_id":"open-{i}","ts":{now}}}"#))
        .collect();
    lines.push(format!(
        r#"{{"type":"connect","app_id":{app},"user_id":"open-0","conn_id":"oc-1","ts":{t0}}}"#
    ));
    lines.push(format!(r#"{{"type":"disconnect","app_id":{app},"conn_id":"oc-1","ts":{now}}}"#));
    d.produce_lines(&lines);
    let mut worker = json_worker(&d, &[]);
    let address = worker.http_address();

    // A billed month: every charge line replay computes, once, with the total.
    // (The API reads what billing published; it is complete once the ledger has read it.)
    let want = expected();
    let want_charges: Vec<(String, Value)> = want.charges.clone().into_iter().collect();
    let mut last = Vec::new();
    let billed = eventually(Duration::from_secs(120), "October's charges", || {
        let (status, body) = http_json(address, "/v1/months/2026-10/charges");
        let mut got: Vec<(String, Value)> = body["charges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| (c["charge_id"].as_str().unwrap_or_default().to_string(), c.clone()))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let done = status == 200 && got.len() >= want_charges.len();
        last = got;
        done.then_some(body)
    });
    assert_eq!(last, want_charges);
    let total: rust_decimal::Decimal = want
        .charges
        .values()
        .map(|c| c["amount"].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap())
        .sum();
    assert_eq!(billed["total"], format!("{total:.2}"));

    // One app in that month: its usage as replay reports it, and its lines.
    let (status, usage) = http_json(address, &format!("/v1/apps/{app}/usage?month=2026-10"));
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["status"], "billed");
    assert_eq!(usage["usage"], want.usage[&format!("{app}/2026-10")]);
    assert_eq!(usage["charges"].as_array().unwrap().len(), 3, "plan fee, MAU overage, PCC");

    // The open month: what was metered so far, the charges so far, and a projection.
    let open = eventually(Duration::from_secs(60), "this month's usage", || {
        let (status, body) = http_json(address, &format!("/v1/apps/{app}/usage?month={month}"));
        (status == 200 && body["usage"]["mau"] == 3).then_some(body)
    });
    assert_eq!(open["status"], "open");
    assert_eq!(open["usage"]["pcc"], 1, "{open}");
    assert!(open["charges"].as_array().unwrap().iter().any(|c| c["item"] == "plan_fee"));
    let projected = open["projection"]["usage"]["mau"].as_u64().unwrap();
    assert!(projected >= 3, "{open}");
    assert_eq!(open["projection"]["days_in_month"], month.days());
    // Without ?month, the current month.
    // (Right after start a rebalance may still move partitions: 503 while they restore.)
    let current = eventually(Duration::from_secs(60), "the current month", || {
        let (status, body) = http_json(address, &format!("/v1/apps/{app}/usage"));
        (status == 200).then_some(body)
    });
    assert_eq!(current["month"], month.to_string());

    // Errors, each JSON with a message. Months neither billed nor open are not answered
    // "open": January 2026 (billing has gone past it), year 0, year 9999, and a month
    // before the app existed (app 1400000001 was created in March 2025).
    let long_path = format!("/v1/apps/{app}/usage?month={}", "9".repeat(9000));
    let big_header = format!("X-Filler: {}\r\n", "x".repeat(20_000));
    for (method, path, headers, status, words) in [
        ("GET", "/v1/apps/42/usage?month=2026-10", "", 404, "unknown app 42"),
        ("GET", "/v1/apps/abc/usage", "", 400, "positive integer"),
        ("GET", "/v1/apps/0/usage", "", 400, "positive integer"),
        ("GET", "/v1/apps/+1400000003/usage", "", 400, "positive integer"),
        ("GET", "/v1/apps/001400000003/usage", "", 400, "leading zeros"),
        ("GET", "/v1/apps/9223372036854775808/usage", "", 400, "positive integer"),
        ("GET", "/v1/apps/1400000003/usage?month=2026-13", "", 400, "YYYY-MM"),
        ("GET", "/v1/apps/1400000003/usage?month=2026-10&month=2026-11", "", 400, "more than once"),
        ("GET", "/v1/apps/1400000003/usage?mnth=2026-10", "", 400, "unknown query parameter"),
        ("GET", "/v1/apps/%FF/usage", "", 400, "unreadable path"),
        ("GET", "/v1/apps/1400000003/usage?month=2026-01", "", 404, "neither billed nor open"),
        ("GET", "/v1/apps/1400000003/usage?month=0000-01", "", 404, "neither billed nor open"),
        ("GET", "/v1/apps/1400000003/usage?month=9999-12", "", 404, "has not begun"),
        ("GET", "/v1/apps/1400000001/usage?month=2025-02", "", 404, "neither billed nor open"),
        ("GET", "/v1/months/October/charges", "", 400, "YYYY-MM"),
        ("GET", "/v1/months/2026-09/charges", "", 404, "not billed"),
        ("GET", "/v2/nothing", "", 404, "no such endpoint"),
        ("POST", "/v1/apps/1400000003/usage", "Content-Length: 0\r\n", 405, "only GET"),
        ("DELETE", "/v1/months/2026-10/charges", "", 405, "only GET"),
        ("GET", &long_path, "", 414, "request target"),
        ("GET", "/v1/months/2026-10/charges", &big_header, 431, "headers"),
    ] {
        let (got, head, body) = http_request(address, method, path, headers);
        let shown = &path[..path.len().min(80)];
        assert_eq!(got, status, "{method} {shown}: {body}");
        assert!(head.contains("content-type: application/json"), "{method} {shown}: {head}");
        let body: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{shown}: not JSON ({e}): {body}"));
        assert!(body["error"].as_str().unwrap().contains(words), "{method} {shown}: {body}");
    }
    worker.stop();
}

/// Any worker answers for any app, with the same body: two workers share the partitions;
/// every app of the sample is asked from both for its billed month and for the open one.
#[test]
fn every_worker_answers_for_every_app_with_the_same_body() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Deployment::new("any-worker");
    d.produce();
    // This month's logins of every sample app, so that the open month has figures.
    let tz = BillingTz::default();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    let month = tz.month_of(Timestamp(now));
    let apps: Vec<u64> = expected().usage.keys().filter_map(|k| k.split('/').next()?.parse().ok()).collect();
    let lines: Vec<String> = apps
        .iter()
        .flat_map(|app| {
            (0..(app % 7 + 1))
                .map(move |i| format!(r#"{{"type":"login","app_id":{app},"user_id":"now-{i}","ts":{now}}}"#))
        })
        .collect();
    d.produce_lines(&lines);
    let mut workers = [json_worker(&d, &[]), d.worker_with("b", &[], &["--log-format", "json"])];
    let addresses = [workers[0].http_address(), workers[1].http_address()];
    // The premise: each worker holds some of the events partitions, not all.
    eventually(Duration::from_secs(120), "the partitions shared by both workers", || {
        let held = |a| {
            let (_, text) = http_get(a, "/metrics");
            let meter = text
                .lines()
                .filter(|l| l.starts_with("im_meter_assigned_partitions{") && l.contains(r#"stage="meter""#));
            meter.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum::<f64>()
        };
        let (a, b) = (held(addresses[0]), held(addresses[1]));
        (a > 0.0 && b > 0.0 && a + b == 3.0).then_some(())
    });
    // Billed October: read from the ledger every worker keeps.
    eventually(Duration::from_secs(120), "October billed, as both workers read it", || {
        addresses.iter().all(|a| http_json(*a, "/v1/months/2026-10/charges").0 == 200).then_some(())
    });
    // Time moves on between the two requests: `as_of` and the projection say so.
    let comparable = |mut body: Value| {
        if let Some(object) = body.as_object_mut() {
            object.remove("as_of");
            object.remove("projection");
        }
        body
    };
    for app in &apps {
        for m in ["2026-10".to_string(), month.to_string()] {
            let path = format!("/v1/apps/{app}/usage?month={m}");
            // Each worker reads the published charges at its own pace: the same answer
            // from both once both have read them (a lasting difference fails here).
            let mut last = Vec::new();
            let answered = (0..300).any(|_| {
                let answers: Vec<(u16, Value)> = addresses.iter().map(|a| http_json(*a, &path)).collect();
                let same = answers.iter().all(|(status, _)| *status == 200)
                    && comparable(answers[0].1.clone()) == comparable(answers[1].1.clone());
                last = answers;
                if !same {
                    std::thread::sleep(Duration::from_millis(200));
                }
                same
            });
            assert!(answered, "{path}: the workers answer differently: {last:?}");
            if m == month.to_string() {
                assert_eq!(last[0].1["usage"]["mau"], app % 7 + 1, "{path}: {}", last[0].1);
            }
        }
    }
    for w in workers.iter_mut() {
        w.assert_alive();
    }
    let [a, b] = workers;
    a.stop();
    b.stop();
}

/// A plan change dated in a month that was billed before it was read is late for the usage
/// API as it is for billing (one rule, `SubscriptionLog` in the core): the API prices the open
/// month as billing then bills it. App on Standard; October billed; then a Standard→Premium
/// change dated October 20 (late: Premium from November 1) and a Premium→Standard change on
/// November 5 (a second change between paid plans in November, refused by billing). A ledger
/// applying the events at their dates took the first as October's change and the second as
/// November's only one, and priced November by day as Premium then Standard.
#[test]
fn the_open_month_is_priced_as_billing_bills_it_after_a_late_plan_change() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // One partition, months closed by event time only (never by the clock): which months are
    // billed and open does not depend on today's date.
    let d = Deployment::with_partitions("late-api", 1);
    let (app, marker) = (1_400_000_001u64, 1_400_000_077u64);
    let login =
        |user: &str, ts: &str| format!(r#"{{"type":"login","app_id":{app},"user_id":"{user}","ts":"{ts}"}}"#);
    let change = |ts: &str, plan: &str| {
        format!(r#"{{"type":"plan_changed","app_id":{app},"ts":"{ts}","plan":"{plan}"}}"#)
    };
    let created = format!(r#"{{"type":"app_created","app_id":{app},"ts":"2026-01-01T00:00:00+08:00"}}"#);
    let standard = change("2026-02-01T00:00:00+08:00", "standard");
    // October's usage, then the event that closes October (November stays open).
    let october = [login("u1", "2026-10-05T10:00:00+08:00"), login("u2", "2026-11-02T10:00:00+08:00")];
    d.produce_files(&d.file("october.ndjson", &october), &d.file("subs-1.ndjson", &[created, standard]));
    let settings = [("IM_METER__KAFKA__IDLE_PARTITION_TIMEOUT", "1h")];
    let mut worker = json_worker(&d, &settings);
    let address = worker.http_address();
    eventually(Duration::from_secs(120), "October billed, as the API reads it", || {
        (http_get(address, "/v1/months/2026-10/charges").0 == 200).then_some(())
    });

    // Read after October's bill: the late change, November's change, and a new app's creation
    // after them (once the API knows that app, it has read the two changes).
    let late = [
        change("2026-10-20T10:00:00+08:00", "premium"),
        change("2026-11-05T10:00:00+08:00", "standard"),
        format!(r#"{{"type":"app_created","app_id":{marker},"ts":"2026-11-03T00:00:00+08:00"}}"#),
    ];
    produce_keyed(&d.topic("subscriptions"), &late);
    let path = format!("/v1/apps/{app}/usage?month=2026-11");
    eventually(Duration::from_secs(60), "the API to know the new app", || {
        (http_get(address, &format!("/v1/apps/{marker}/usage?month=2026-11")).0 == 200).then_some(())
    });
    // November as the API prices it, once its answer stays the same for two seconds.
    let figures = |body: &Value| (body["usage"].clone(), body["charges"].clone(), body["total"].clone());
    let mut same = 0;
    let mut last = None;
    let open = eventually(Duration::from_secs(60), "a settled answer for the open month", || {
        let (status, body) = http_json(address, &path);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "open", "{body}");
        same = if last.as_ref() == Some(&figures(&body)) { same + 1 } else { 0 };
        last = Some(figures(&body));
        (same >= 10).then_some(body)
    });

    // November closes: billing bills it.
    d.produce_lines(&[login("u3", "2026-12-01T02:00:00+08:00")]);
    let usage_key = format!("{app}/2026-11");
    let billed_usage = eventually(Duration::from_secs(90), "November's usage", || {
        read_all(&d.topic("usage")).into_iter().find(|r| r.key.as_deref() == Some(usage_key.as_bytes()))
    });
    let billed_usage: Value = serde_json::from_slice(&billed_usage.value).unwrap();
    let billed_charges: Vec<Value> = read_all(&d.topic("charges"))
        .into_iter()
        .map(|r| serde_json::from_slice::<Value>(&r.value).unwrap())
        .filter(|c| c["app_id"] == app && c["month"] == "2026-11")
        .collect();
    let fee = billed_charges.iter().find(|c| c["item"] == "plan_fee").expect("a plan fee");
    // The premise: billing took the late change from November 1 and refused November's.
    assert_eq!((&fee["plan"], &fee["amount"]), (&Value::from("premium"), &Value::from("699.00")), "{fee}");
    let reasons: Vec<String> =
        read_all(&d.topic("dead_letters")).into_iter().map(|r| r.headers["reason"].clone()).collect();
    assert!(
        reasons.iter().any(|r| r == "late") && reasons.iter().any(|r| r == "invalid_change"),
        "{reasons:?}"
    );

    let total: rust_decimal::Decimal = billed_charges
        .iter()
        .map(|c| c["amount"].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap())
        .sum();
    assert_eq!(
        (&open["charges"], &open["total"]),
        (&Value::from(billed_charges.clone()), &Value::from(format!("{total:.2}"))),
        "the API priced the open month November unlike billing's bill of it"
    );
    assert_eq!(open["usage"], billed_usage, "November's usage");
    // October stays as billed, Standard.
    let (status, october) = http_json(address, &format!("/v1/apps/{app}/usage?month=2026-10"));
    assert_eq!((status, &october["status"]), (200, &Value::from("billed")), "{october}");
    assert_eq!(october["charges"][0]["plan"], "standard", "{october}");

    // A worker started now reads the bills' marks before the subscriptions: December, open,
    // is Premium for it as for the worker that read them live.
    let december = format!("/v1/apps/{app}/usage?month=2026-12");
    let charges_of = |address| {
        move || {
            let (status, body) = http_json(address, &format!("/v1/apps/{app}/usage?month=2026-12"));
            (status == 200).then_some(body["charges"].clone())
        }
    };
    let live = eventually(Duration::from_secs(60), "December open", charges_of(address));
    assert_eq!(live[0]["plan"], "premium", "{december}: {live}");
    let mut second = d.worker_with("b", &settings, &["--role", "bill", "--log-format", "json"]);
    let started = eventually(
        Duration::from_secs(60),
        "December open, on a new worker",
        charges_of(second.http_address()),
    );
    assert_eq!(started, live, "{december}");
    for w in [&mut worker, &mut second] {
        w.assert_alive();
    }
    second.stop();
    worker.stop();
}

#[test]
fn sasl_passwords_never_reach_the_logs_or_the_printed_config() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const SECRET: &str = "correct-horse-battery-staple-7731";
    let sasl = [
        ("IM_METER__KAFKA__SECURITY_PROTOCOL", "sasl_plaintext"),
        ("IM_METER__KAFKA__SASL_MECHANISM", "PLAIN"),
        ("IM_METER__KAFKA__SASL_USERNAME", "metering"),
        ("IM_METER__KAFKA__SASL_PASSWORD", SECRET),
    ];
    let printed = Command::new(env!("CARGO_BIN_EXE_im-meter")).arg("config").envs(sasl).output().unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout).into_owned();
    assert!(printed.contains(r#"sasl_password = "<redacted>""#), "{printed}");
    assert!(!printed.contains(SECRET));

    // The broker here speaks no SASL: the worker fails to connect and logs it, verbosely.
    let d = Deployment::new("secret");
    let mut worker = d.worker_with("a", &[sasl.as_slice(), &[("IM_METER_LOG", "trace")]].concat(), &[]);
    std::thread::sleep(Duration::from_secs(8));
    let _ = worker.child.kill();
    let _ = worker.child.wait();
    let log = worker.log_text();
    assert!(log.contains(r#"sasl_username: "metering""#), "the settings are logged: {log}");
    assert!(log.contains("sasl_password: Secret(<redacted>)"), "{log}");
    assert!(!log.contains(SECRET), "the password leaked into the log");
}

/// With `http.api_token` set, the usage API answers 401 without the bearer token (or with
/// another), and the token opens it; the operator endpoints stay open; the token is never
/// printed.
#[test]
fn the_usage_api_requires_the_token_when_one_is_set() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const TOKEN: &str = "s3cret-api-token-5521";
    let printed = Command::new(env!("CARGO_BIN_EXE_im-meter"))
        .arg("config")
        .env("IM_METER__HTTP__API_TOKEN", TOKEN)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout).into_owned();
    assert!(printed.contains(r#"api_token = "<redacted>""#) && !printed.contains(TOKEN), "{printed}");

    let d = Deployment::new("token");
    let mut worker = json_worker(&d, &[("IM_METER__HTTP__API_TOKEN", TOKEN)]);
    let address = worker.http_address();
    let path = "/v1/months/2026-09/charges";
    for headers in
        ["", "Authorization: Bearer wrong-token-0000000000\r\n", "Authorization: s3cret-api-token-5521\r\n"]
    {
        let (status, body) = http_get_with(address, path, headers);
        assert_eq!(status, 401, "{headers:?}: {body}");
        assert!(body.contains("Authorization: Bearer"), "{body}");
    }
    // The token opens the API: September is not billed (503 until the ledger has read the
    // topics, then 404).
    eventually(Duration::from_secs(60), "an answer with the token", || {
        let (status, _) = http_get_with(address, path, &format!("Authorization: Bearer {TOKEN}\r\n"));
        assert!(status == 404 || status == 503, "{status}");
        (status == 404).then_some(())
    });
    for open in ["/healthz", "/metrics"] {
        assert_eq!(http_get(address, open).0, 200, "{open} stays open");
    }
    assert!(!worker.log_text().contains(TOKEN), "the token leaked into the log");
    worker.stop();
}

/// The usage API and `/healthz` never wait for a metering stage: with a stage's lock held
/// (as a long restore or a commit waiting for the broker holds it), both answer at once.
#[test]
fn the_api_answers_while_a_metering_stage_holds_its_lock() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Deployment::new("no-wait");
    let tz = BillingTz::default();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    let month = tz.month_of(Timestamp(now));
    let app = 1_400_000_003u64;
    d.produce_lines(&[format!(r#"{{"type":"login","app_id":{app},"user_id":"u","ts":{now}}}"#)]);
    let hold = std::env::temp_dir().join(format!("{}.hold", d.prefix));
    let mut worker = json_worker(&d, &[("IM_METER_TEST_HOLD_LOCK_FILE", hold.to_str().unwrap())]);
    let address = worker.http_address();
    let path = format!("/v1/apps/{app}/usage?month={month}");
    eventually(Duration::from_secs(120), "this month's usage", || {
        let (status, body) = http_json(address, &path);
        (status == 200 && body["usage"]["mau"] == 1).then_some(())
    });
    std::fs::write(&hold, b"").unwrap();
    eventually(Duration::from_secs(30), "the stage holding its lock", || {
        worker.log_text().contains("failpoint: holding the metering stage's lock").then_some(())
    });
    let mut latencies = Vec::new();
    for _ in 0..20 {
        for p in ["/healthz", path.as_str()] {
            let started = std::time::Instant::now();
            let (status, body) = http_get(address, p);
            latencies.push(started.elapsed());
            assert_eq!(status, 200, "{p}: {body}");
        }
    }
    std::fs::remove_file(&hold).unwrap();
    latencies.sort();
    let (median, worst) = (latencies[latencies.len() / 2], latencies[latencies.len() - 1]);
    eprintln!(
        "with the stage's lock held: median {median:?}, worst {worst:?} over {} requests",
        latencies.len()
    );
    // The lock was held throughout: an answer that waited for it would take until now.
    assert!(median < Duration::from_millis(50), "median {median:?}");
    assert!(worst < Duration::from_secs(1), "worst {worst:?}");
    worker.assert_alive();
    worker.stop();
}
