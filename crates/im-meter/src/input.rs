//! Reading NDJSON input: files or stdin, line by line or in chunks of whole lines, with a
//! progress bar for long runs.

use std::fs::File;
use std::io::{self, IsTerminal, Read};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use memmap2::Mmap;

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
/// U+FEFF in UTF-8, as some editors start a file with it.
const BYTE_ORDER_MARK: &[u8] = b"\xEF\xBB\xBF";
const PROGRESS_AFTER: Duration = Duration::from_millis(300);

/// Whole lines of the input, about [`READ_BUFFER`] bytes of them, to hand to another thread.
#[derive(Debug)]
pub struct Chunk {
    /// Its place among the chunks (0, 1, ...).
    pub index: u64,
    /// The number of its first line (1-based, blank lines counted).
    pub first_line: u64,
    /// The lines, each ending with a newline (but the input's last, which may not).
    bytes: ChunkBytes,
}

/// Where a chunk's bytes are.
#[derive(Debug)]
enum ChunkBytes {
    /// Read into a buffer of its own.
    Read(Vec<u8>),
    /// A range of the mapped input file.
    Mapped(Arc<Mmap>, Range<usize>),
}

impl Chunk {
    /// Its lines' bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.bytes {
            ChunkBytes::Read(buffer) => buffer,
            ChunkBytes::Mapped(map, range) => &map[range.clone()],
        }
    }

    /// The buffer it was read into, to read another chunk into (`None` when mapped).
    pub fn into_buffer(self) -> Option<Vec<u8>> {
        match self.bytes {
            ChunkBytes::Read(buffer) => Some(buffer),
            ChunkBytes::Mapped(..) => None,
        }
    }

    /// Calls `each(line_number, bytes)` for every non-blank line (line end stripped; the
    /// input's first line without a UTF-8 byte-order mark, which some editors write);
    /// returns how many there were.
    pub fn for_each_line(
        &self,
        mut each: impl FnMut(u64, &[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<u64> {
        let (mut lines, mut number, mut start) = (0, self.first_line, 0);
        let bytes = self.bytes();
        if self.index == 0 && bytes.starts_with(BYTE_ORDER_MARK) {
            start = BYTE_ORDER_MARK.len();
        }
        while start < bytes.len() {
            let end = memchr::memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |at| start + at + 1);
            let content = trim_line_end(&bytes[start..end]);
            if !content.iter().all(u8::is_ascii_whitespace) {
                lines += 1;
                each(number, content)?;
            }
            number += 1;
            start = end;
        }
        Ok(lines)
    }
}

/// Reads the input as [`Chunk`]s of whole lines, in order, and hands each to `each`, which
/// may give back a buffer done with (a chunk's) to read the next one into: fresh buffers
/// cost page faults. A regular file is mapped instead of read, so its bytes are never
/// copied. A progress bar appears on stderr when it is a terminal and the input takes long
/// enough to be worth watching. Returns the bytes read (the caller counts the lines it
/// handed on: [`ReadStats::lines`] is left 0).
pub fn for_each_chunk(
    source: &Source,
    show_progress: bool,
    each: impl FnMut(Chunk) -> anyhow::Result<Option<Vec<u8>>>,
) -> anyhow::Result<ReadStats> {
    if let Source::File(path) = source {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        if file.metadata().is_ok_and(|m| m.is_file() && m.len() > 0) {
            // SAFETY: the map is only read, and replay's inputs are files at rest: one changed
            // while it runs is not supported (its lines could be read half old, half new), and
            // one cut short meanwhile ends the process (SIGBUS), as for any program that maps
            // its input. Reading it would copy every byte once more.
            let map =
                unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
            return for_each_mapped_chunk(Arc::new(map), show_progress, each);
        }
    }
    let (reader, len) = source.open()?;
    read_chunks(reader, len, &source.name(), show_progress, each)
}

/// [`for_each_chunk`] through `read()`: stdin, and files that cannot be mapped.
fn read_chunks(
    mut reader: impl Read,
    len: Option<u64>,
    name: &str,
    show_progress: bool,
    mut each: impl FnMut(Chunk) -> anyhow::Result<Option<Vec<u8>>>,
) -> anyhow::Result<ReadStats> {
    let mut progress = Progress::new(show_progress && io::stderr().is_terminal(), len);
    let mut stats = ReadStats::default();
    let (mut index, mut first_line) = (0u64, 1u64);
    let mut buf = vec![0u8; READ_BUFFER];
    let mut spare: Option<Vec<u8>> = None;
    let mut end = 0;
    loop {
        if end == buf.len() {
            // A line longer than the buffer: grow it.
            buf.resize(buf.len() * 2, 0);
        }
        let n = match reader.read(&mut buf[end..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {name}")),
        };
        end += n;
        // Whole lines go; a line cut by the end of the read moves to the next buffer.
        let whole = if n == 0 { end } else { memchr::memrchr(b'\n', &buf[..end]).map_or(0, |at| at + 1) };
        if whole > 0 && (n == 0 || end * 2 >= buf.len()) {
            let mut next = spare.take().unwrap_or_default();
            next.resize(buf.len().max(READ_BUFFER), 0);
            next[..end - whole].copy_from_slice(&buf[whole..end]);
            let mut bytes = std::mem::replace(&mut buf, next);
            bytes.truncate(whole);
            end -= whole;
            stats.bytes += whole as u64;
            let lines = memchr::memchr_iter(b'\n', &bytes).count() as u64;
            let chunk = Chunk { index, first_line, bytes: ChunkBytes::Read(bytes) };
            index += 1;
            first_line += lines;
            spare = each(chunk)?;
            progress.update(stats);
        }
        if n == 0 {
            break;
        }
    }
    progress.finish();
    Ok(stats)
}

/// [`for_each_chunk`] over a mapped file: chunks are ranges of it, cut after a newline.
fn for_each_mapped_chunk(
    map: Arc<Mmap>,
    show_progress: bool,
    mut each: impl FnMut(Chunk) -> anyhow::Result<Option<Vec<u8>>>,
) -> anyhow::Result<ReadStats> {
    #[cfg(unix)]
    // Only a hint: read ahead; nothing depends on it.
    let _ = map.advise(memmap2::Advice::Sequential);
    let len = map.len();
    let mut progress = Progress::new(show_progress && io::stderr().is_terminal(), Some(len as u64));
    let mut stats = ReadStats::default();
    let (mut index, mut first_line, mut start) = (0u64, 1u64, 0usize);
    while start < len {
        let cut = (start + READ_BUFFER).min(len);
        let end = memchr::memchr(b'\n', &map[cut - 1..]).map_or(len, |at| cut + at);
        let lines = memchr::memchr_iter(b'\n', &map[start..end]).count() as u64;
        stats.bytes += (end - start) as u64;
        each(Chunk { index, first_line, bytes: ChunkBytes::Mapped(Arc::clone(&map), start..end) })?;
        progress.update(stats);
        (index, first_line, start) = (index + 1, first_line + lines, end);
    }
    progress.finish();
    Ok(stats)
}

/// Calls `each(line_number, bytes)` for every non-blank line (1-based numbers, line end
/// stripped), in order, on this thread. A progress bar appears as [`for_each_chunk`] says.
pub fn for_each_line(
    source: &Source,
    show_progress: bool,
    mut each: impl FnMut(u64, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<ReadStats> {
    let mut lines = 0;
    let mut stats = for_each_chunk(source, show_progress, |chunk| {
        lines += chunk.for_each_line(&mut each)?;
        Ok(chunk.into_buffer())
    })?;
    stats.lines = lines;
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
            bar.set_message(format!("{:.1} MB/s", stats.bytes as f64 / secs / 1e6));
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

    /// The lines of `content` as a mapped file gives them, checked against reading it.
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
        // Read (as stdin is), the same lines and counts.
        let (mut read, mut lines) = (Vec::new(), 0);
        let mut read_stats = read_chunks(content, None, "bytes", false, |chunk| {
            lines += chunk.for_each_line(|n, line| {
                read.push((n, line.to_vec()));
                Ok(())
            })?;
            Ok(chunk.into_buffer())
        })
        .unwrap();
        read_stats.lines = lines;
        assert_eq!((&read, read_stats), (&seen, stats), "read and mapped differ");
        (seen, stats)
    }

    #[test]
    fn a_byte_order_mark_starting_the_input_is_dropped_and_nowhere_else() {
        let (seen, _) = lines_of(b"\xEF\xBB\xBF{\"a\":1}\n\xEF\xBB\xBF{}\n");
        assert_eq!(seen, vec![(1, b"{\"a\":1}".to_vec()), (2, b"\xEF\xBB\xBF{}".to_vec())]);
    }

    #[test]
    fn lines_are_numbered_trimmed_and_blank_ones_skipped() {
        let (seen, stats) = lines_of(b"a\r\n\n  \nb\nc");
        assert_eq!(seen, vec![(1, b"a".to_vec()), (4, b"b".to_vec()), (5, b"c".to_vec())]);
        assert_eq!(stats, ReadStats { lines: 3, bytes: 10 });
    }

    /// Across chunks, every line keeps the number it has in the input.
    #[test]
    fn lines_keep_their_numbers_across_chunks() {
        let content: Vec<u8> = (0..500_000u32)
            .flat_map(|i| if i % 7 == 3 { b"\n".to_vec() } else { format!("{i}\n").into_bytes() })
            .collect();
        assert!(content.len() > 2 * READ_BUFFER);
        let (seen, stats) = lines_of(&content);
        let want: Vec<(u64, Vec<u8>)> = content
            .split(|&b| b == b'\n')
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
            .map(|(i, l)| (i as u64 + 1, l.to_vec()))
            .collect();
        assert_eq!(seen, want);
        assert_eq!(stats, ReadStats { lines: want.len() as u64, bytes: content.len() as u64 });
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
