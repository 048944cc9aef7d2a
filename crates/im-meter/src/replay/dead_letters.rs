//! The dead-letter output of `replay`: every refused line, with its reason, as NDJSON.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use base64::Engine;
use im_meter_core::ingest::Rejection;
use serde::Serialize;

/// One refused input record, as written to the dead-letter file.
#[derive(Debug, Serialize)]
pub struct DeadLetter<'a> {
    /// Which input: `events` or `subscriptions`.
    pub source: &'a str,
    /// 1-based line number in that input.
    pub line: u64,
    /// The bounded reason code.
    pub reason: &'static str,
    /// What exactly was wrong.
    pub detail: &'a str,
    /// The line itself, when it is UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<&'a str>,
    /// The line's bytes in base64, when it is not UTF-8 (so nothing is lost).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_base64: Option<String>,
}

/// Counts refused records by reason and, when asked, writes them to a file.
#[derive(Debug, Default)]
pub struct DeadLetters {
    file: Option<BufWriter<File>>,
    by_reason: BTreeMap<&'static str, u64>,
}

impl DeadLetters {
    /// Counts only.
    pub fn counting() -> Self {
        Self::default()
    }

    /// Counts and writes NDJSON to `path` (created or truncated).
    pub fn to_file(path: &Path) -> anyhow::Result<Self> {
        let file = File::create(path)
            .with_context(|| format!("cannot create dead-letter file {}", path.display()))?;
        Ok(DeadLetters { file: Some(BufWriter::new(file)), by_reason: BTreeMap::new() })
    }

    /// Records one refused line.
    pub fn reject(&mut self, source: &str, line: u64, raw: &[u8], why: &Rejection) -> anyhow::Result<()> {
        *self.by_reason.entry(why.reason.code()).or_default() += 1;
        let Some(out) = self.file.as_mut() else {
            return Ok(());
        };
        let text = std::str::from_utf8(raw).ok();
        let letter = DeadLetter {
            source,
            line,
            reason: why.reason.code(),
            detail: &why.detail,
            raw: text,
            raw_base64: text.is_none().then(|| base64::engine::general_purpose::STANDARD.encode(raw)),
        };
        serde_json::to_writer(&mut *out, &letter)?;
        out.write_all(b"\n").context("cannot write dead letter")?;
        Ok(())
    }

    /// Refusals by reason code.
    pub fn by_reason(&self) -> &BTreeMap<&'static str, u64> {
        &self.by_reason
    }

    /// Flushes the file.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        if let Some(out) = self.file.as_mut() {
            out.flush().context("cannot write dead-letter file")?;
        }
        Ok(())
    }
}
