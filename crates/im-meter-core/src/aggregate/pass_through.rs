//! The hasher of already-hashed 64-bit user keys: a key is hashed once, at decode time
//! (xxh3-64), and passed through unchanged by the HLL++ sketches ([`super::unique`]) and the
//! hash tables of the exact sets ([`super::user_set`], [`super::user_days`]).

use std::hash::{BuildHasher, Hasher};

use serde::{Deserialize, Serialize};

/// Passes an already-hashed [`UserKey`](crate::ingest::UserKey) through as the sketch's hash.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct PassThrough;

/// The hasher of [`PassThrough`]: returns the last `u64` written.
#[derive(Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are inserted; fold anything else in rather than drop it.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;

    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}
