//! Reading NDJSON input: files or stdin, line by line, with a progress bar for long runs.

use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where NDJSON comes from: a file, or stdin for `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Standard input.
    Stdin,
    /// A file.
    File(PathBuf),
}

impl Source {
    /// `-` is stdin; anything else a path.
    pub fn parse(arg: &str) -> Source {
        if arg == "-" {
            Source::Stdin
        } else {
            Source::File(PathBuf::from(arg))
        }
    }

    fn open(&self) -> anyhow::Result<(Box<dyn Read>, Option<u64>)> {
        Ok(match self {
            Source::Stdin => (Box::new(io::stdin().lock()), None),
            Source::File(path) => {
                let file =
                    File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
                let len = file.metadata().ok().map(|m| m.len());
                (Box::new(file), len)
            }
        })
    }

    /// A short name for messages.
    pub fn name(&self) -> String {
        match self {
            Source::Stdin => "stdin".into(),
            Source::File(path) => path.display().to_string(),
        }
    }
}

/// Input counters, returned as a value (the reader never prints them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadStats {
    /// Non-blank lines handed on.
    pub lines: u64,
    /// Bytes read, newlines included.
    pub bytes: u64,
}

const READ_BUFFER: usize = 1 << 20;
const PROGRESS_EVERY_LINES: u64 = 1 << 14;
const PROGRESS_AFTER: Duration = Duration::from_millis(300);

/// Calls `each(line_number, bytes)` for every non-blank line (1-based numbers, line end
/// stripped). A progress bar appears on stderr when it is a terminal and the input takes
/// long enough to be worth watching.
pub fn for_each_line(
    source: &Source,
    show_progress: bool,
    mut each: impl FnMut(u64, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<ReadStats> {
    let (reader, len) = source.open()?;
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let mut progress = Progress::new(show_progress && io::stderr().is_terminal(), len);
    let mut stats = ReadStats::default();
    let mut line = Vec::with_capacity(4096);
    let mut number = 0u64;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("cannot read {}", source.name()))?;
        if n == 0 {
            break;
        }
        number += 1;
        stats.bytes += n as u64;
        let content = trim_line_end(&line);
        if content.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        stats.lines += 1;
        each(number, content)?;
        if stats.lines % PROGRESS_EVERY_LINES == 0 {
            progress.update(stats);
        }
    }
    progress.finish();
    Ok(stats)
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A progress bar that shows itself only once a run has lasted a moment.
struct Progress {
    enabled: bool,
    len: Option<u64>,
    started: Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(enabled: bool, len: Option<u64>) -> Self {
        Progress {
            enabled,
            len,
            started: Instant::now(),
            bar: None,
        }
    }

    fn update(&mut self, stats: ReadStats) {
        if !self.enabled {
            return;
        }
        let elapsed = self.started.elapsed();
        if self.bar.is_none() && elapsed >= PROGRESS_AFTER {
            let bar =
                ProgressBar::with_draw_target(self.len, ProgressDrawTarget::stderr_with_hz(4));
            let template = if self.len.is_some() {
                "{bar:30} {bytes}/{total_bytes} ({bytes_per_sec}) {msg}"
            } else {
                "{spinner} {bytes} ({bytes_per_sec}) {msg}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(stats.bytes);
            let rate = stats.lines as f64 / elapsed.as_secs_f64().max(1e-9);
            bar.set_message(format!("{} events, {:.0} events/s", stats.lines, rate));
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
