//! Values larger than one Kafka record may hold, written as parts.
//!
//! The broker refuses a record over the topic's `max.message.bytes` (1 MB by default), and
//! a transaction holding one aborts every time it is retried: the consumer writing it would
//! never commit again. Some state can outgrow that (an app-month's usage with every day's
//! DAU sketch at a high HLL precision, a PCC timeline at a 10 s sample interval), so a value
//! over the limit is written as parts `{key}#0` … `{key}#{n-1}` of at most the limit each,
//! followed, in the same transaction and partition, by a small *header* under `{key}` that
//! says how many parts make the value, how long it is and its checksum.
//!
//! A reader of the compacted topic feeds every record, in order, to an [`Assembler`], which
//! keeps the latest part of each part key and hands out the value of a key whole when its
//! header comes. Whoever rewrites a key with fewer parts, or deletes it, deletes the parts
//! it no longer uses ([`part_keys`]); a stale part that is left over is never read, since a
//! header names the parts it needs and checks their sum.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

use crate::aggregate::CodecError;

/// Marks a header value.
const HEADER_MAGIC: &[u8; 4] = b"IMPT";
const HEADER_VERSION: u8 = 1;
/// Magic, version, parts (u32), length (u64), checksum (u64).
const HEADER_LEN: usize = 4 + 1 + 4 + 8 + 8;

/// What a header says of the value it stands for.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Header {
    parts: u32,
    len: u64,
    checksum: u64,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN);
        out.extend_from_slice(HEADER_MAGIC);
        out.push(HEADER_VERSION);
        out.extend_from_slice(&self.parts.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.checksum.to_le_bytes());
        out
    }

    /// The header in `value`, if it is one. (No value written whole starts with the
    /// magic: every encoded state value starts with its own magic or version byte.)
    fn decode(value: &[u8]) -> Option<Header> {
        if value.len() != HEADER_LEN || &value[..4] != HEADER_MAGIC || value[4] != HEADER_VERSION {
            return None;
        }
        let word = |at: usize, n: usize| -> u64 {
            let mut bytes = [0u8; 8];
            bytes[..n].copy_from_slice(&value[at..at + n]);
            u64::from_le_bytes(bytes)
        };
        Some(Header { parts: word(5, 4) as u32, len: word(9, 8), checksum: word(17, 8) })
    }
}

/// The key of part `i` of `key`.
fn part_key(key: &[u8], i: usize) -> Vec<u8> {
    let mut out = key.to_vec();
    out.push(b'#');
    out.extend_from_slice(i.to_string().as_bytes());
    out
}

/// The key a part key belongs to, if `key` is one.
fn owner_of(key: &[u8]) -> Option<&[u8]> {
    let at = key.iter().rposition(|&b| b == b'#')?;
    let digits = &key[at + 1..];
    (at > 0 && !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)).then(|| &key[..at])
}

/// The keys of parts `range` of `key`: what to delete when a value written in parts is
/// deleted or rewritten with fewer parts.
pub fn part_keys(key: &[u8], range: Range<usize>) -> Vec<Vec<u8>> {
    range.map(|i| part_key(key, i)).collect()
}

/// A record to write: key and value.
pub type Record = (Vec<u8>, Vec<u8>);

/// The records that write `value` under `key` with no value over `max_value` bytes: the
/// value itself when it fits, else its parts then their header. Also returns the number of
/// parts (0 when written whole).
pub fn split(key: &[u8], value: Vec<u8>, max_value: usize) -> (Vec<Record>, usize) {
    let max_value = max_value.max(HEADER_LEN);
    // A value that looks like a header goes in parts too (one), or a reader would take it
    // for one: bytes this program encodes never do, but copied bytes (the plan book's) may.
    if value.len() <= max_value && Header::decode(&value).is_none() {
        return (vec![(key.to_vec(), value)], 0);
    }
    let header = Header {
        parts: value.len().div_ceil(max_value) as u32,
        len: value.len() as u64,
        checksum: xxhash_rust::xxh3::xxh3_64(&value),
    };
    let mut records: Vec<Record> =
        value.chunks(max_value).enumerate().map(|(i, part)| (part_key(key, i), part.to_vec())).collect();
    let parts = records.len();
    records.push((key.to_vec(), header.encode()));
    (records, parts)
}

/// A record as an [`Assembler`] hands it on.
#[derive(Debug, PartialEq, Eq)]
pub struct Assembled<'a> {
    /// The record's key.
    pub key: &'a [u8],
    /// Its value, whole (`None`: a deletion).
    pub value: Option<Cow<'a, [u8]>>,
    /// The number of parts it was written in (0: written whole).
    pub parts: usize,
}

/// Reassembles values written by [`split`] while a compacted topic is read in order.
#[derive(Debug, Default)]
pub struct Assembler {
    parts: HashMap<Vec<u8>, Vec<u8>>,
}

impl Assembler {
    /// Takes the next record: `None` for a part (kept until its header comes), else the
    /// record with its value whole. A header whose parts are missing or do not add up is
    /// an error.
    pub fn feed<'a>(
        &mut self,
        key: &'a [u8],
        value: Option<&'a [u8]>,
    ) -> Result<Option<Assembled<'a>>, CodecError> {
        if owner_of(key).is_some() {
            match value {
                Some(part) => self.parts.insert(key.to_vec(), part.to_vec()),
                None => self.parts.remove(key),
            };
            return Ok(None);
        }
        let Some(header) = value.and_then(Header::decode) else {
            return Ok(Some(Assembled { key, value: value.map(Cow::Borrowed), parts: 0 }));
        };
        let text = String::from_utf8_lossy(key);
        let mut whole = Vec::with_capacity(header.len as usize);
        for i in 0..header.parts as usize {
            // Each part is read once: the header that follows them is the one that uses them.
            let part = self.parts.remove(&part_key(key, i)).ok_or_else(|| {
                CodecError::Corrupt(format!("{text}: part {i} of {} missing", header.parts))
            })?;
            whole.extend_from_slice(&part);
        }
        if whole.len() as u64 != header.len || xxhash_rust::xxh3::xxh3_64(&whole) != header.checksum {
            return Err(CodecError::Corrupt(format!("{text}: its {} parts do not add up", header.parts)));
        }
        Ok(Some(Assembled { key, value: Some(Cow::Owned(whole)), parts: header.parts as usize }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_values_are_written_whole() {
        let (records, parts) = split(b"m/1/2026-11", vec![1, 2, 3], 10);
        assert_eq!((records, parts), (vec![(b"m/1/2026-11".to_vec(), vec![1, 2, 3])], 0));
    }

    #[test]
    fn a_value_that_looks_like_a_header_comes_back_as_itself() {
        let lookalike = Header { parts: 2, len: 7, checksum: 1 }.encode();
        let (records, parts) = split(b"1234", lookalike.clone(), 1000);
        assert_eq!(parts, 1, "written in parts: {records:?}");
        let mut assembler = Assembler::default();
        let mut whole = None;
        for (key, value) in &records {
            if let Some(done) = assembler.feed(key, Some(value)).unwrap() {
                whole = done.value.map(|v| v.into_owned());
            }
        }
        assert_eq!(whole, Some(lookalike));
    }

    #[test]
    fn part_keys_are_recognised() {
        assert_eq!(owner_of(b"u/1/2026-11/3#12"), Some(&b"u/1/2026-11/3"[..]));
        assert_eq!(owner_of(b"u/1/2026-11/3"), None);
        assert_eq!(owner_of(b"#1"), None);
        assert_eq!(owner_of(b"k/1#"), None);
        assert_eq!(part_keys(b"d/1", 1..3), vec![b"d/1#1".to_vec(), b"d/1#2".to_vec()]);
    }

    proptest! {
        #[test]
        fn split_values_come_back_whole_through_a_compacted_log(
            len in 0usize..5_000,
            max in 25usize..700,
            rewritten in 0usize..5_000,
        ) {
            let value: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let (records, parts) = split(b"m/7/2026-11", value.clone(), max);
            prop_assert!(records.iter().all(|(_, v)| v.len() <= max));
            prop_assert_eq!(parts, if len <= max { 0 } else { len.div_ceil(max) });
            // A rewrite with another size after it, deleting the parts it no longer uses.
            let newer: Vec<u8> = (0..rewritten).map(|i| (i % 13) as u8).collect();
            let (mut again, n) = split(b"m/7/2026-11", newer.clone(), max);
            for key in part_keys(b"m/7/2026-11", n..parts) {
                again.insert(0, (key, Vec::new()));
            }
            // What compaction may leave: the latest value of each key, in the order written.
            let mut log: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
            for (k, v) in records.into_iter().chain(again) {
                let deletion = v.is_empty() && k.contains(&b'#');
                log.retain(|(old, _)| *old != k);
                log.push((k, if deletion { None } else { Some(v) }));
            }
            let mut assembler = Assembler::default();
            let mut got = Vec::new();
            for (k, v) in &log {
                if let Some(a) = assembler.feed(k, v.as_deref()).unwrap() {
                    got.push(a.value.map(Cow::into_owned));
                }
            }
            prop_assert_eq!(got, vec![Some(newer)]);
        }
    }

    #[test]
    fn a_header_without_its_parts_is_an_error() {
        let (records, _) = split(b"u/1", vec![9; 100], 40);
        let header = &records.last().unwrap().1;
        let mut assembler = Assembler::default();
        assert!(assembler.feed(b"u/1", Some(header)).is_err());
        // And parts that do not add up.
        assembler.feed(b"u/1#0", Some(&[9; 40])).unwrap();
        assembler.feed(b"u/1#1", Some(&[9; 40])).unwrap();
        assembler.feed(b"u/1#2", Some(&[8; 20])).unwrap();
        assert!(assembler.feed(b"u/1", Some(header)).is_err());
    }
}
