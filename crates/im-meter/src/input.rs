//! Reading NDJSON input: files or stdin, line by line, with a progress bar for long runs.

use std::fs::File;
use std::io::{self, IsTerminal, Read};
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
                let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
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
    let (mut reader, len) = source.open()?;
    let mut progress = Progress::new(show_progress && io::stderr().is_terminal(), len);
    let mut stats = ReadStats::default();
    let mut number = 0u64;
    let mut on_line = |line: &[u8], stats: &mut ReadStats| -> anyhow::Result<()> {
        number += 1;
        let content = trim_line_end(line);
        if content.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        stats.lines += 1;
        each(number, content)?;
        if stats.lines.is_multiple_of(PROGRESS_EVERY_LINES) {
            progress.update(*stats);
        }
        Ok(())
    };
    // Lines are handed out straight from the read buffer (no per-line copy); only a line
    // cut by the end of a read moves, to the buffer's front.
    let mut buf = vec![0u8; READ_BUFFER];
    let (mut start, mut end) = (0, 0);
    loop {
        while let Some(pos) = memchr::memchr(b'\n', &buf[start..end]) {
            let line = &buf[start..=start + pos];
            stats.bytes += line.len() as u64;
            on_line(line, &mut stats)?;
            start += pos + 1;
        }
        buf.copy_within(start..end, 0);
        end -= start;
        start = 0;
        if end == buf.len() {
            // A line longer than the buffer: grow it.
            buf.resize(buf.len() * 2, 0);
        }
        let n = match reader.read(&mut buf[end..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", source.name())),
        };
        if n == 0 {
            if end > 0 {
                stats.bytes += end as u64;
                on_line(&buf[..end], &mut stats)?;
            }
            break;
        }
        end += n;
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
        Progress { enabled, len, started: Instant::now(), bar: None }
    }

    fn update(&mut self, stats: ReadStats) {
        if !self.enabled {
            return;
        }
        let elapsed = self.started.elapsed();
        if self.bar.is_none() && elapsed >= PROGRESS_AFTER {
            let bar = ProgressBar::with_draw_target(self.len, ProgressDrawTarget::stderr_with_hz(4));
            let template = if self.len.is_some() {
                "{bar:30} {bytes}/{total_bytes} {msg}"
            } else {
                "{spinner} {bytes} {msg}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(stats.bytes);
            // Rates over the whole run: indicatif's own estimate starts only when the bar
            // appears, after a jump of position, and overshoots.
            let secs = elapsed.as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{:.1} MB/s, {} events, {:.0} events/s",
                stats.bytes as f64 / secs / 1e6,
                stats.lines,
                stats.lines as f64 / secs
            ));
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(content: &[u8]) -> (Vec<(u64, Vec<u8>)>, ReadStats) {
        let path =
            std::env::temp_dir().join(format!("im-meter-input-{}-{}", std::process::id(), content.len()));
        std::fs::write(&path, content).unwrap();
        let mut seen = Vec::new();
        let stats = for_each_line(&Source::File(path.clone()), false, |n, line| {
            seen.push((n, line.to_vec()));
            Ok(())
        })
        .unwrap();
        std::fs::remove_file(path).unwrap();
        (seen, stats)
    }

    #[test]
    fn lines_are_numbered_trimmed_and_blank_ones_skipped() {
        let (seen, stats) = lines_of(b"a\r\n\n  \nb\nc");
        assert_eq!(seen, vec![(1, b"a".to_vec()), (4, b"b".to_vec()), (5, b"c".to_vec())]);
        assert_eq!(stats, ReadStats { lines: 3, bytes: 10 });
    }

    #[test]
    fn lines_longer_than_the_buffer_and_across_reads_arrive_whole() {
        let long = vec![b'x'; READ_BUFFER * 2 + 17];
        let mut content = Vec::new();
        for i in 0..3 {
            content.extend_from_slice(&long[..long.len() - i]);
            content.push(b'\n');
        }
        let (seen, stats) = lines_of(&content);
        assert_eq!(seen.len(), 3);
        for (i, (_, line)) in seen.iter().enumerate() {
            assert_eq!(line.len(), long.len() - i);
        }
        assert_eq!(stats.bytes, content.len() as u64);
    }
}
