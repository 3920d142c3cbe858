//! Maps and sets keyed by the engine's own integer ids (tasks, workers,
//! objects, pids). The std hasher (SipHash) resists keys chosen to
//! collide, which ids the engine numbers itself cannot be, and it cost
//! 4% of the supervisor thread's samples on the per-task path; a
//! multiply-rotate hash of the integer is enough for them.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
pub type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

/// An odd constant with well-spread bits (from the golden ratio).
const SPREAD: u64 = 0x9e37_79b9_7f4a_7c15;

#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        // The table takes its bucket from the low bits and a tag from the
        // top ones: the multiply fills the top, the rotate and xor feed the
        // high half of the key into the low bits.
        self.0 = (self.0.rotate_left(5) ^ n ^ (n >> 32)).wrapping_mul(SPREAD);
    }

    fn write_i32(&mut self, n: i32) {
        self.write_u64(n as u32 as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_ids_spread_over_buckets_and_tags() {
        let hashes: Vec<u64> = (0..4096u64)
            .map(|id| {
                let mut h = IdHasher::default();
                h.write_u64(id);
                h.finish()
            })
            .collect();
        let buckets: IdSet<u64> = hashes.iter().map(|h| h & 1023).collect();
        let tags: IdSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(buckets.len() > 900, "{} of 1024 buckets", buckets.len());
        assert_eq!(tags.len(), 128);
    }

    #[test]
    fn maps_keyed_by_ids_behave_as_maps() {
        let mut m: IdMap<u64, u64> = IdMap::default();
        for id in (0..10_000u64).map(|i| i * 7 + (1 << 62)) {
            m.insert(id, id + 1);
        }
        assert_eq!(m.len(), 10_000);
        assert!((0..10_000u64).all(|i| m[&(i * 7 + (1 << 62))] == i * 7 + (1 << 62) + 1));
    }
}
