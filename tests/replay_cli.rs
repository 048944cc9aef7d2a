//! `im-meter replay` end to end: the CLI contract of SPEC §5 on real files and stdin.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use im_meter_core::changelog::billing_partition;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_im-meter"));
    // Tests must not pick up an operator's overrides.
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("IM_METER__")) {
        cmd.env_remove(key);
    }
    cmd
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("im-meter-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn replay_json(events: &Path, subscriptions: Option<&Path>, extra: &[&str]) -> Value {
    let mut cmd = bin();
    cmd.args(["replay", "--format", "json", "--events"]).arg(events);
    if let Some(s) = subscriptions {
        cmd.arg("--subscriptions").arg(s);
    }
    cmd.args(extra);
    serde_json::from_slice(&run_ok(&mut cmd).stdout).unwrap()
}

fn login(app: u64, user: &str, ts: &str) -> String {
    format!(r#"{{"type":"login","app_id":{app},"user_id":"{user}","ts":"{ts}"}}"#)
}

fn charge<'a>(doc: &'a Value, id: &str) -> &'a Value {
    doc["charges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["charge_id"] == id)
        .unwrap_or_else(|| panic!("no charge {id} in {doc}"))
}

#[test]
fn prorated_upgrade_and_standard_month_are_billed_to_the_cent() {
    let dir = temp_dir("prorate");
    let mut events = Vec::new();
    for u in 0..300 {
        events.push(login(11, &format!("dev-{u}"), "2026-11-05T10:00:00+08:00"));
        events.push(login(22, &format!("std-{u}"), "2026-11-20T23:59:59+08:00"));
    }
    let subs = vec![
        r#"{"type":"app_created","app_id":11,"ts":"2026-01-01T00:00:00+08:00"}"#.to_string(),
        r#"{"type":"plan_changed","app_id":11,"ts":"2026-11-11T10:00:00+08:00","plan":"premium"}"#
            .to_string(),
        r#"{"type":"app_created","app_id":22,"ts":"2026-01-01T00:00:00+08:00"}"#.to_string(),
        r#"{"type":"plan_changed","app_id":22,"ts":"2026-02-01T00:00:00+08:00","plan":"standard"}"#
            .to_string(),
        // Standard → Premium on the 5th; a second paid↔paid change in November is refused.
        r#"{"type":"plan_changed","app_id":33,"ts":"2026-02-01T00:00:00+08:00","plan":"standard"}"#
            .to_string(),
        r#"{"type":"plan_changed","app_id":33,"ts":"2026-11-05T00:30:00+08:00","plan":"premium"}"#
            .to_string(),
        r#"{"type":"plan_changed","app_id":33,"ts":"2026-11-20T10:00:00+08:00","plan":"standard"}"#
            .to_string(),
    ];
    let doc = replay_json(&write(&dir, "e.ndjson", &events), Some(&write(&dir, "s.ndjson", &subs)), &[]);

    let fee = charge(&doc, "11/2026-11/plan_fee");
    // Developer → Premium on the 11th: days 11..30 on Premium, 699 × 20/30.
    assert_eq!(fee["amount"], "466.00");
    assert_eq!(fee["plan"], "premium");
    assert_eq!(fee["billing_mode"], "current");
    assert_eq!(fee["currency"], "USD");
    assert_eq!(doc["rejected"], 1);
    // 4 days Standard, 26 days Premium: 399 × 4/30 + 699 × 26/30 = 53.20 + 605.80.
    let switched = charge(&doc, "33/2026-11/plan_fee");
    assert_eq!(switched["amount"], "659.00");
    assert_eq!(switched["plan"], "premium");
    assert_eq!(charge(&doc, "22/2026-11/plan_fee")["amount"], "399.00");
    assert_eq!(charge(&doc, "22/2026-11/pcc")["amount"], "0.00");
    let usage = doc["usage"].as_array().unwrap();
    // App 33 exists (implicitly created) but had no usage: billed, with a zero usage row.
    assert_eq!(usage.len(), 3);
    assert_eq!(usage[2]["app_id"], 33);
    assert_eq!(usage[2]["mau"], 0);
    assert_eq!(usage[0]["mau"], 300);
    assert_eq!(usage[0]["dau_peak"], 300);
    assert_eq!(usage[0]["pcc"], 0);
    assert_eq!(usage[0]["pcc_at"], Value::Null);
    assert!(!doc["charges"].as_array().unwrap().iter().any(|c| c["item"] == "mau_overage"));
}

#[test]
fn output_has_exactly_the_documented_shape() {
    let dir = temp_dir("shape");
    let events = vec![
        login(7, "alice", "2026-11-03T08:15:00Z"),
        r#"{"type":"connect","app_id":7,"user_id":"alice","conn_id":"c-91","ts":1793693700000}"#.into(),
        r#"{"type":"disconnect","app_id":7,"conn_id":"c-91","ts":"2026-11-03T17:00:00+08:00"}"#.into(),
        r#"{"type":"group_stats","app_id":7,"group_count":12,"ts":"2026-11-03T17:00:00+08:00"}"#.into(),
    ];
    let subs = vec![
        r#"{"type":"plan_changed","app_id":7,"ts":"2026-10-01T00:00:00+08:00","plan":"standard"}"#.into(),
    ];
    let doc = replay_json(&write(&dir, "e.ndjson", &events), Some(&write(&dir, "s.ndjson", &subs)), &[]);
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&doc), ["charges", "rejected", "usage"]);
    // SPEC §5's fields, and how the unique-user figures were counted.
    assert_eq!(
        keys(&doc["usage"][0]),
        [
            "app_id",
            "dau_peak",
            "dau_peak_counted",
            "group_count_peak",
            "mau",
            "mau_counted",
            "month",
            "pcc",
            "pcc_at"
        ]
    );
    assert_eq!(
        doc["usage"][0],
        serde_json::json!({"app_id":7,"month":"2026-11","mau":1,"dau_peak":1,"pcc":1,
            "pcc_at":"2026-11-03T16:15:00+08:00","group_count_peak":12,
            "mau_counted":"exact","dau_peak_counted":"exact"})
    );
    let fee = charge(&doc, "7/2026-11/plan_fee");
    assert_eq!(
        keys(fee),
        [
            "amount",
            "app_id",
            "billing_mode",
            "charge_id",
            "currency",
            "description",
            "item",
            "month",
            "plan",
            "quantity",
            "unit_price"
        ]
    );
    assert!(fee["quantity"].is_string() && fee["unit_price"].is_string() && fee["amount"].is_string());
}

#[test]
fn bad_lines_go_to_the_dead_letter_file_and_are_counted() {
    let dir = temp_dir("dlq");
    let events = vec![
        login(5, "a", "2026-11-03T08:15:00Z"),
        "not json".into(),
        r#"{"type":"login","app_id":5,"ts":"2026-11-03T08:15:00Z"}"#.into(),
        String::from_utf8_lossy(b"{\"type\":\"login\"}").into_owned(),
        login(5, "a", "2026-11-03T08:15:00Z"), // a retry: not a rejection
    ];
    let events_path = write(&dir, "e.ndjson", &events);
    // Append a line that is not UTF-8.
    std::fs::OpenOptions::new().append(true).open(&events_path).unwrap().write_all(b"\xff\xfe\n").unwrap();
    let subs =
        vec![r#"{"type":"plan_changed","app_id":5,"ts":"2026-10-01T00:00:00+08:00","plan":"gold"}"#.into()];
    let dlq = dir.join("dlq.ndjson");
    let doc =
        replay_json(&events_path, Some(&write(&dir, "s.ndjson", &subs)), &["--dlq", dlq.to_str().unwrap()]);
    assert_eq!(doc["rejected"], 5);
    assert_eq!(doc["usage"][0]["mau"], 1);

    let letters: Vec<Value> =
        std::fs::read_to_string(&dlq).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let summary: Vec<(String, u64, String)> = letters
        .iter()
        .map(|l| {
            (
                l["source"].as_str().unwrap().into(),
                l["line"].as_u64().unwrap(),
                l["reason"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("subscriptions".into(), 1, "invalid_field".into()),
            ("events".into(), 2, "not_json".into()),
            ("events".into(), 3, "missing_field".into()),
            ("events".into(), 4, "missing_field".into()),
            ("events".into(), 6, "not_utf8".into()),
        ]
    );
    assert_eq!(letters[1]["raw"], "not json");
    assert_eq!(letters[4]["raw_base64"], "//4=");
    assert!(letters[2]["detail"].as_str().unwrap().contains("user_id"));
}

#[test]
fn shuffled_input_prints_identical_json_and_stdin_works() {
    let sample = repo().join("deploy/sample");
    let events = std::fs::read_to_string(sample.join("events.ndjson")).unwrap();
    let subs = std::fs::read_to_string(sample.join("subscriptions.ndjson")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut event_lines: Vec<&str> = events.lines().collect();
    let mut sub_lines: Vec<&str> = subs.lines().collect();
    event_lines.shuffle(&mut rng);
    sub_lines.shuffle(&mut rng);

    let dir = temp_dir("shuffle");
    let subs_path = write(&dir, "s.ndjson", &sub_lines.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let original = run_ok(
        bin()
            .args(["replay", "--format", "json", "--events"])
            .arg(sample.join("events.ndjson"))
            .arg("--subscriptions")
            .arg(sample.join("subscriptions.ndjson")),
    );
    let mut child = bin()
        .args(["replay", "--format", "json", "--events", "-", "--subscriptions"])
        .arg(&subs_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let shuffled = event_lines.join("\n");
    let writer = std::thread::spawn(move || stdin.write_all(shuffled.as_bytes()).unwrap());
    let shuffled_out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(shuffled_out.status.success());
    assert_eq!(
        String::from_utf8(shuffled_out.stdout).unwrap(),
        String::from_utf8(original.stdout.clone()).unwrap()
    );

    // And the sample bills what its README promises: every app, paid ones with fees.
    let doc: Value = serde_json::from_slice(&original.stdout).unwrap();
    assert_eq!(doc["usage"].as_array().unwrap().len(), 6);
    assert_eq!(charge(&doc, "1400000004/2026-11/plan_fee")["amount"], "466.00");
    assert_eq!(charge(&doc, "1400000005/2026-11/group_overage")["quantity"], "2");
    assert!(doc["rejected"].as_u64().unwrap() > 0);
}

/// Replay splits its input over threads (decoding by chunks, metering by app) and prints
/// the same bytes — usage, charges and dead letters in line order — whatever their number,
/// with idle connections closed by the whole input's event time.
#[test]
fn any_number_of_threads_gives_the_same_output() {
    let sample = repo().join("deploy/sample");
    let dir = temp_dir("threads");
    // Ten copies of the sample, apps renumbered, so that every thread has work.
    let events = std::fs::read_to_string(sample.join("events.ndjson")).unwrap();
    let copies: Vec<String> = (0..10)
        .flat_map(|copy| {
            events
                .lines()
                .map(move |l| l.replace("\"app_id\":1400000", &format!("\"app_id\":{}400000", copy + 1)))
        })
        .collect();
    let events = write(&dir, "e.ndjson", &copies);
    let config = write(&dir, "c.toml", &["[metering]".into(), "connection_idle_timeout = \"30m\"".into()]);
    let run = |threads: &str| {
        let dlq = dir.join(format!("dlq-{threads}.ndjson"));
        let out = run_ok(
            bin()
                .args(["replay", "--format", "json", "--threads", threads, "--events"])
                .arg(&events)
                .arg("--subscriptions")
                .arg(sample.join("subscriptions.ndjson"))
                .arg("--config")
                .arg(&config)
                .arg("--dlq")
                .arg(&dlq),
        );
        (String::from_utf8(out.stdout).unwrap(), std::fs::read_to_string(dlq).unwrap())
    };
    let one = run("1");
    let doc: Value = serde_json::from_str(&one.0).unwrap();
    assert!(doc["usage"].as_array().unwrap().len() >= 60, "every copy's apps are billed");
    assert!(one.1.lines().count() > 10, "dead letters written");
    for threads in ["2", "5"] {
        let many = run(threads);
        assert!(many.0 == one.0, "usage and charges differ with {threads} threads");
        assert!(many.1 == one.1, "dead letters differ with {threads} threads");
    }
}

/// An app whose events end early is metered by the whole input's event time, whichever
/// thread meters it: with an idle timeout, its connection silent for hours before the input
/// ends is closed at its last sign of life (here: counting nothing), not left open.
#[test]
fn idle_connections_close_by_the_whole_input_s_event_time() {
    let dir = temp_dir("idle-threads");
    let a = 11u64;
    // An app metered by another of the 8 meters two threads use.
    let b = (12..).find(|&b| billing_partition(b, 8) != billing_partition(a, 8)).unwrap();
    let conn = |app: u64, kind: &str, id: &str, ts: &str| {
        format!(r#"{{"type":"{kind}","app_id":{app},"user_id":"u","conn_id":"{id}","ts":"{ts}"}}"#)
    };
    let events = vec![
        conn(a, "connect", "c1", "2026-11-12T00:00:00+08:00"),
        conn(a, "connect", "c2", "2026-11-12T00:10:00+08:00"),
        conn(a, "disconnect", "c2", "2026-11-12T00:20:00+08:00"),
        login(b, "late", "2026-11-20T00:00:00Z"),
    ];
    let events = write(&dir, "e.ndjson", &events);
    let config = write(&dir, "c.toml", &["[metering]".into(), "connection_idle_timeout = \"30m\"".into()]);
    let pcc = |threads: &str| {
        let out = run_ok(
            bin()
                .args(["replay", "--format", "json", "--threads", threads, "--events"])
                .arg(&events)
                .arg("--config")
                .arg(&config),
        );
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        doc["usage"].as_array().unwrap().iter().find(|u| u["app_id"] == a).unwrap()["pcc"].clone()
    };
    assert_eq!(pcc("1"), 1, "c1 closed at its connect, c2 alone");
    assert_eq!(pcc("2"), 1);
}

/// The sample's busiest app is billed for exactly the users who logged in (derived from the
/// sample here), and says its figures are exact.
#[test]
fn the_sample_is_billed_for_exactly_the_users_who_logged_in() {
    let sample = repo().join("deploy/sample");
    let events = std::fs::read(sample.join("events.ndjson")).unwrap();
    let app = 1_400_000_003u64;
    let users: HashSet<String> = events
        .split(|&b| b == b'\n')
        .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
        .filter(|e| e["type"] == "login" && e["app_id"] == app && e["ok"] != false && !e["ts"].is_null())
        .filter_map(|e| e["user_id"].as_str().map(str::to_string))
        .collect();
    assert!(users.len() > 10_000, "the sample's app {app} is past Standard's 10,000 included MAU");
    let doc = replay_json(&sample.join("events.ndjson"), Some(&sample.join("subscriptions.ndjson")), &[]);
    let usage = doc["usage"].as_array().unwrap().iter().find(|u| u["app_id"] == app).unwrap();
    assert_eq!(usage["mau"], users.len());
    assert_eq!(
        (&usage["mau_counted"], &usage["dau_peak_counted"]),
        (&Value::from("exact"), &Value::from("exact"))
    );
    assert!(usage.get("hll_precision").is_none());
    let overage = charge(&doc, &format!("{app}/2026-11/mau_overage"));
    assert_eq!(overage["quantity"], (users.len() - 10_000).to_string());
}

/// Past `metering.exact_limit` a count is an estimate, and the item and the bill say so.
#[test]
fn an_estimate_says_so_on_the_usage_and_the_bill() {
    let dir = temp_dir("estimate");
    let events: Vec<String> =
        (0..12_000).map(|u| login(3, &format!("u{u}"), "2026-11-09T12:00:00Z")).collect();
    let subs = vec![
        r#"{"type":"plan_changed","app_id":3,"ts":"2026-10-01T00:00:00+08:00","plan":"standard"}"#.into(),
    ];
    let config = write(&dir, "c.toml", &["[metering]".into(), "exact_limit = 1000".into()]);
    let doc = replay_json(
        &write(&dir, "e.ndjson", &events),
        Some(&write(&dir, "s.ndjson", &subs)),
        &["--config", config.to_str().unwrap()],
    );
    let usage = &doc["usage"][0];
    assert_eq!(
        (&usage["mau_counted"], &usage["dau_peak_counted"]),
        (&Value::from("estimated"), &Value::from("estimated"))
    );
    assert_eq!(usage["hll_precision"], 14);
    let mau = usage["mau"].as_u64().unwrap();
    assert!(mau.abs_diff(12_000) < 12_000 * 5 * 81 / 10_000, "{mau}");
    let overage = charge(&doc, "3/2026-11/mau_overage");
    let description = overage["description"].as_str().unwrap();
    assert!(description.contains("HyperLogLog++ estimate, relative standard error 0.81 %"), "{description}");
}

#[test]
fn exact_mode_audits_the_sketch() {
    let dir = temp_dir("exact");
    let events: Vec<String> =
        (0..2_000).map(|u| login(3, &format!("u{u}"), "2026-11-09T12:00:00Z")).collect();
    // Counted exactly to 1,000 users only, so that the figures are estimates to audit.
    let config = write(&dir, "c.toml", &["[metering]".into(), "exact_limit = 1000".into()]);
    let doc = replay_json(
        &write(&dir, "e.ndjson", &events),
        None,
        &["--exact", "--config", config.to_str().unwrap()],
    );
    assert_eq!(doc["usage"][0]["mau_counted"], "estimated");
    let audit = &doc["audit"][0];
    assert_eq!(audit["mau_exact"], 2000);
    assert_eq!(audit["dau_peak_exact"], 2000);
    let error = audit["mau_error"].as_f64().unwrap();
    assert!(error.abs() < 0.01, "{error}");
    assert_eq!(audit["mau"], doc["usage"][0]["mau"]);
}

#[test]
fn table_output_lists_usage_then_charges_with_totals() {
    let sample = repo().join("deploy/sample");
    let out = run_ok(
        bin()
            .args(["replay", "--events"])
            .arg(sample.join("events.ndjson"))
            .arg("--subscriptions")
            .arg(sample.join("subscriptions.ndjson")),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let usage_at = text.find("Usage").unwrap();
    let charges_at = text.find("Charges (USD)").unwrap();
    assert!(usage_at < charges_at);
    assert!(text.contains("466.00"));
    assert!(text.contains("total"));
    // The Developer app with 140 users is past its cap: an alert, not a charge.
    assert!(text.contains("quota_exceeded  app 1400000002 · 2026-11"), "{text}");
    assert!(!text.contains("app 1400000002 · 2026-11 · current mode"), "{text}");
}

#[test]
fn a_bad_config_fails_before_reading_input_and_names_the_field() {
    let dir = temp_dir("config");
    let config = dir.join("bad.toml");
    std::fs::write(&config, "[billing]\ntimezone = \"Nowhere/Town\"\n").unwrap();
    let out = bin()
        .args(["replay", "--format", "json", "--events", "/does/not/exist", "--config"])
        .arg(&config)
        .env("IM_METER__METERING__HLL_PRECISION", "30")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("billing.timezone") && err.contains("metering.hll_precision"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn the_timezone_moves_month_boundaries() {
    let dir = temp_dir("tz");
    // 2026-10-31T20:00Z is November in +08:00 but October in UTC.
    let events = vec![login(9, "night-owl", "2026-10-31T20:00:00Z")];
    let path = write(&dir, "e.ndjson", &events);
    let default = replay_json(&path, None, &[]);
    assert_eq!(default["usage"][0]["month"], "2026-11");
    let out = run_ok(
        bin()
            .args(["replay", "--format", "json", "--events"])
            .arg(&path)
            .env("IM_METER__BILLING__TIMEZONE", "UTC"),
    );
    let utc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(utc["usage"][0]["month"], "2026-10");
}

#[test]
fn an_event_from_the_future_is_refused_and_bills_nothing() {
    let dir = temp_dir("future");
    let stray = login(22, "clockless", "2099-06-01T00:00:00Z");
    let events =
        write(&dir, "events.ndjson", &[login(22, "alice", "2026-11-05T10:00:00+08:00"), stray.clone()]);
    let subs = write(
        &dir,
        "subs.ndjson",
        &[
            r#"{"type":"app_created","app_id":22,"ts":"2026-01-01T00:00:00+08:00"}"#.to_string(),
            r#"{"type":"plan_changed","app_id":22,"ts":"2026-02-01T00:00:00+08:00","plan":"standard"}"#
                .to_string(),
        ],
    );
    let dlq = dir.join("future.dlq");
    let doc = replay_json(&events, Some(&subs), &["--dlq", dlq.to_str().unwrap()]);
    let months: Vec<&str> =
        doc["usage"].as_array().unwrap().iter().map(|u| u["month"].as_str().unwrap()).collect();
    assert_eq!(months, vec!["2026-11"], "no plan fee for June 2099: {doc}");
    assert_eq!(doc["usage"][0]["mau"], 1);
    assert_eq!(doc["rejected"], 1);
    let letter: Value = serde_json::from_str(std::fs::read_to_string(&dlq).unwrap().trim()).unwrap();
    assert_eq!((letter["reason"].as_str(), letter["raw"].as_str()), (Some("future"), Some(stray.as_str())));
}

/// One `group_count` of 2⁶⁴ − 1 from a broken sender would bill an original-mode app 83
/// quadrillion USD: it is refused as `implausible` and bills nothing.
#[test]
fn an_implausible_group_count_is_refused_and_bills_nothing() {
    let dir = temp_dir("implausible");
    let group = |n: &str| {
        format!(r#"{{"type":"group_stats","app_id":23,"group_count":{n},"ts":"2026-11-05T10:00:00+08:00"}}"#)
    };
    let stray = group("18446744073709551615");
    let events = write(&dir, "events.ndjson", &[group("120000"), stray.clone()]);
    let subs = write(
        &dir,
        "subs.ndjson",
        &[r#"{"type":"app_created","app_id":23,"ts":"2021-01-01T00:00:00+08:00"}"#.to_string()],
    );
    let dlq = dir.join("implausible.dlq");
    let doc = replay_json(&events, Some(&subs), &["--dlq", dlq.to_str().unwrap()]);
    assert_eq!(doc["usage"][0]["group_count_peak"], 120_000, "{doc}");
    assert_eq!(doc["rejected"], 1);
    let letter: Value = serde_json::from_str(std::fs::read_to_string(&dlq).unwrap().trim()).unwrap();
    assert_eq!(
        (letter["reason"].as_str(), letter["raw"].as_str()),
        (Some("implausible"), Some(stray.as_str()))
    );
}

/// One stray event dated 2000-01 on a fresh deployment would bill every month since:
/// `billing.start_month` bills from the month it names, and the stray event goes to the dead
/// letters as `before_start`. Without it, billing starts at the first month any event is
/// dated in (documented).
#[test]
fn usage_before_the_start_month_is_refused_and_bills_nothing() {
    let dir = temp_dir("before-start");
    let stray = login(24, "old", "2000-01-15T10:00:00+08:00");
    let events =
        write(&dir, "events.ndjson", &[login(24, "alice", "2026-11-05T10:00:00+08:00"), stray.clone()]);
    let subs = write(
        &dir,
        "subs.ndjson",
        &[r#"{"type":"app_created","app_id":24,"ts":"2000-01-02T00:00:00+08:00"}"#.to_string()],
    );
    let months = |doc: &Value| -> Vec<String> {
        doc["usage"].as_array().unwrap().iter().map(|u| u["month"].to_string()).collect()
    };
    // (replay bills the months events are dated in; the worker every month from the first.)
    let unbounded = replay_json(&events, Some(&subs), &[]);
    assert_eq!(months(&unbounded), ["\"2000-01\"", "\"2026-11\""], "without a start");

    let dlq = dir.join("before-start.dlq");
    let mut cmd = bin();
    cmd.args(["replay", "--format", "json", "--events"])
        .arg(&events)
        .arg("--subscriptions")
        .arg(&subs)
        .args(["--dlq", dlq.to_str().unwrap()])
        .env("IM_METER__BILLING__START_MONTH", "2026-11");
    let doc: Value = serde_json::from_slice(&run_ok(&mut cmd).stdout).unwrap();
    assert_eq!(months(&doc), ["\"2026-11\""], "{doc}");
    assert_eq!((doc["usage"][0]["mau"].as_u64(), doc["rejected"].as_u64()), (Some(1), Some(1)));
    let letter: Value = serde_json::from_str(std::fs::read_to_string(&dlq).unwrap().trim()).unwrap();
    assert_eq!(
        (letter["reason"].as_str(), letter["raw"].as_str()),
        (Some("before_start"), Some(stray.as_str()))
    );

    let mut bad = bin();
    bad.args(["replay", "--events"]).arg(&events).env("IM_METER__BILLING__START_MONTH", "Nov 2026");
    let out = bad.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("billing.start_month"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file saved by an editor that writes a UTF-8 byte-order mark: its first line is read
/// without it. (It was refused as not JSON: an `app_created` there was lost, and an app
/// created before 2022-12-26 was billed in the current mode.)
#[test]
fn a_byte_order_mark_at_the_start_of_a_file_is_not_part_of_its_first_line() {
    let dir = temp_dir("bom");
    let with_bom = |name: &str, lines: &[String]| {
        let path = write(&dir, name, lines);
        let mut bytes = b"\xEF\xBB\xBF".to_vec();
        bytes.extend(std::fs::read(&path).unwrap());
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let events = with_bom("events.ndjson", &[login(31, "alice", "2026-11-05T10:00:00+08:00")]);
    let subs = with_bom(
        "subs.ndjson",
        &[
            r#"{"type":"app_created","app_id":31,"ts":"2021-01-02T00:00:00+08:00"}"#.to_string(),
            r#"{"type":"plan_changed","app_id":31,"ts":"2021-02-01T00:00:00+08:00","plan":"pro"}"#
                .to_string(),
        ],
    );
    let doc = replay_json(&events, Some(&subs), &[]);
    assert_eq!(doc["rejected"].as_u64(), Some(0), "{doc}");
    assert_eq!(doc["usage"][0]["mau"].as_u64(), Some(1), "{doc}");
    assert_eq!(charge(&doc, "31/2026-11/plan_fee")["billing_mode"], "original", "{doc}");
}

/// A Developer app that passes 100 users on November 5 and upgrades on November 20 is
/// alerted: the plan of the day it passed the cap decides, not the plan at the month's end
/// (the worker alerts as it happens, by the same rule). One that upgraded before is not.
#[test]
fn the_quota_alert_follows_the_plan_on_the_day_the_cap_was_passed() {
    let dir = temp_dir("alert-day");
    let mut events: Vec<String> = Vec::new();
    for app in [7, 8] {
        events.extend((0..101).map(|u| login(app, &format!("u{u}"), "2026-11-05T04:00:00Z")));
    }
    let subscriptions = write(
        &dir,
        "s.ndjson",
        &[
            r#"{"type":"app_created","app_id":7,"ts":"2025-01-01T00:00:00+08:00","account_id":"a"}"#.into(),
            r#"{"type":"plan_changed","app_id":7,"ts":"2026-11-20T10:00:00+08:00","plan":"standard"}"#.into(),
            r#"{"type":"app_created","app_id":8,"ts":"2025-01-01T00:00:00+08:00","account_id":"a"}"#.into(),
            r#"{"type":"plan_changed","app_id":8,"ts":"2026-11-04T10:00:00+08:00","plan":"standard"}"#.into(),
        ],
    );
    let out = run_ok(
        bin()
            .args(["replay", "--events"])
            .arg(write(&dir, "e.ndjson", &events))
            .arg("--subscriptions")
            .arg(&subscriptions),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let alerts: Vec<&str> = text.lines().filter(|l| l.contains("quota_exceeded")).map(str::trim).collect();
    assert_eq!(
        alerts,
        ["quota_exceeded  app 7 · 2026-11 · developer plan: MAU 101 over its cap of 100"],
        "{text}"
    );
}
