//! Faults the broker-backed tests switch on inside a running worker, each named by an
//! environment variable (`IM_METER_TEST_*`) the worker reads when it starts.
//!
//! Compiled in only with the `failpoints` cargo feature, which `scripts/test.sh` turns on
//! for the test binaries. Without it (`cargo build --release`, `cargo install`) every probe
//! below is a constant "off": the variables' names are not even in the binary, and the code
//! around a probe folds away — a production worker cannot be made to misbehave through
//! its environment.

use std::path::PathBuf;

/// A fault a test can switch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// While the file exists, the metering loop stops polling, as a consumer stuck in a
    /// blocking call would (`tests/http.rs`).
    Pause,
    /// While the file exists, the metering loop holds its stage locked, as a long restore or
    /// a commit waiting for the broker does: the usage API and the metrics must not wait.
    HoldLock,
    /// While the file exists, a metering transaction that closes a month stalls after
    /// writing its records, before it adds the consumed offsets: a member blocked past
    /// `max.poll.interval.ms` while a month is due.
    StallClose,
    /// A text: a metering transaction holding a record whose payload contains it fails, as
    /// one a broker refuses for that record would (a poison record).
    PoisonMarker,
    /// A number of milliseconds each metering partition's restore takes longer, as one of a
    /// large state does.
    SlowRestoreMs,
    /// When the file exists, the next billing transaction that commits a month is reported
    /// as failed, as one whose answer timed out, after its commit succeeded: a commit whose
    /// answer was lost. The file is removed, unless it holds `every`: then every such commit
    /// is reported failed while it exists.
    FailAfterBill,
    /// While the file exists, billing bills no month (it reads, alerts and copies as usual).
    HoldBills,
    /// When the file exists, the worker aborts (as kill -9 would) right after a part of a
    /// month's bill that is not its last commits (the file is removed): a bill in several
    /// transactions cut between two.
    ExitAfterBillPart,
    /// While the file exists, every metadata request for a topic's partition count fails as
    /// one that timed out would: a broker that is slow or restarting.
    MetadataFails,
    /// A number of milliseconds added to the worker's clock (negative: slow), as a VM
    /// resumed or a broken NTP leaves it.
    ClockOffsetMs,
    /// When the file exists, preparing the topics at start fails once (the file is removed)
    /// as a request to a broker killed while it answers does: a broker transport failure.
    PrepareFails,
}

impl Failpoint {
    /// The environment variable that switches the fault on.
    #[cfg(feature = "failpoints")]
    fn variable(self) -> &'static str {
        match self {
            Failpoint::Pause => "IM_METER_TEST_PAUSE_FILE",
            Failpoint::HoldLock => "IM_METER_TEST_HOLD_LOCK_FILE",
            Failpoint::StallClose => "IM_METER_TEST_STALL_CLOSE_FILE",
            Failpoint::PoisonMarker => "IM_METER_TEST_POISON_MARKER",
            Failpoint::SlowRestoreMs => "IM_METER_TEST_SLOW_RESTORE_MS",
            Failpoint::FailAfterBill => "IM_METER_TEST_FAIL_AFTER_BILL_FILE",
            Failpoint::HoldBills => "IM_METER_TEST_HOLD_BILLS_FILE",
            Failpoint::ExitAfterBillPart => "IM_METER_TEST_EXIT_AFTER_BILL_PART_FILE",
            Failpoint::MetadataFails => "IM_METER_TEST_METADATA_FAILS_FILE",
            Failpoint::ClockOffsetMs => "IM_METER_TEST_CLOCK_OFFSET_MS",
            Failpoint::PrepareFails => "IM_METER_TEST_PREPARE_FAILS_FILE",
        }
    }

    /// The variable's value, if the fault is set.
    #[cfg(feature = "failpoints")]
    pub fn value(self) -> Option<std::ffi::OsString> {
        std::env::var_os(self.variable())
    }

    /// Never set: failpoints are compiled out.
    #[cfg(not(feature = "failpoints"))]
    pub fn value(self) -> Option<std::ffi::OsString> {
        None
    }

    /// The file whose existence switches the fault on, if the fault is set.
    pub fn file(self) -> Option<PathBuf> {
        self.value().map(PathBuf::from)
    }

    /// Whether the fault's file is set and exists now, and fires once: the file is removed,
    /// unless it holds `every` (then it fires each time while it exists).
    pub fn fire(self) -> bool {
        let Some(file) = self.file() else { return false };
        match std::fs::read(&file) {
            Ok(content) if content.trim_ascii() == b"every" => true,
            Ok(_) => std::fs::remove_file(&file).is_ok(),
            Err(_) => false,
        }
    }

    /// Whether the fault's file is set and exists now.
    pub fn active(self) -> bool {
        self.file().is_some_and(|f| f.exists())
    }
}

/// Whether this build has failpoints at all (the worker logs it at start).
pub const COMPILED_IN: bool = cfg!(feature = "failpoints");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failpoint_is_set_only_in_builds_that_have_them() {
        // A variable no other test sets: the probe reads it only where failpoints exist.
        let file = std::env::temp_dir().join(format!("im-meter-failpoint-{}", std::process::id()));
        std::fs::write(&file, b"").expect("temp file");
        std::env::set_var("IM_METER_TEST_METADATA_FAILS_FILE", &file);
        assert_eq!(Failpoint::MetadataFails.active(), COMPILED_IN);
        std::fs::remove_file(&file).expect("temp file");
        assert!(!Failpoint::MetadataFails.active());
    }
}
