//! Content digests for send-once: an object shared automatically is reused
//! only while the digest of its bytes is the one taken when it was shared.
//!
//! xxh3-128 runs at memory bandwidth, a fraction of what a copy into a fresh
//! segment costs (the copy also faults in new pages), and 128 bits make an
//! accidental match between two different contents negligible.

use xxhash_rust::xxh3::Xxh3;

/// A digest built part by part, for hashing bytes while they are copied.
/// Each part's length is mixed in before its bytes, so moving a byte across
/// a part boundary changes the digest.
pub struct Digest {
    hasher: Xxh3,
    void: bool,
}

impl Digest {
    pub fn new() -> Self {
        Self {
            hasher: Xxh3::new(),
            void: false,
        }
    }

    /// Marks the digest as not describing the bytes sent (they changed
    /// while being digested): [`Digest::finish`] then gives `None`.
    pub fn void(&mut self) {
        self.void = true;
    }

    /// Starts a part of `len` bytes; its bytes follow through [`Digest::update`].
    pub fn begin_part(&mut self, len: usize) {
        self.hasher.update(&(len as u64).to_le_bytes());
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
    }

    pub fn finish(&self) -> Option<u128> {
        (!self.void).then(|| self.hasher.digest128())
    }
}

impl Default for Digest {
    fn default() -> Self {
        Self::new()
    }
}

/// One digest over several byte slices, in order.
pub fn digest(parts: &[&[u8]]) -> u128 {
    let mut h = Digest::new();
    for part in parts {
        h.begin_part(part.len());
        h.update(part);
    }
    h.hasher.digest128()
}

#[cfg(test)]
mod tests {
    use super::digest;

    #[test]
    fn same_bytes_same_digest() {
        let a = vec![7u8; 1 << 20];
        assert_eq!(digest(&[&a, b"x"]), digest(&[&a.clone(), b"x"]));
    }

    #[test]
    fn one_changed_byte_changes_it() {
        let a = vec![0u8; 1 << 20];
        let mut b = a.clone();
        b[123_457] = 1;
        assert_ne!(digest(&[&a]), digest(&[&b]));
    }

    #[test]
    fn piecewise_equals_whole() {
        let a: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut h = super::Digest::new();
        h.begin_part(a.len());
        for chunk in a.chunks(4096) {
            h.update(chunk);
        }
        h.begin_part(1);
        h.update(b"x");
        assert_eq!(h.finish(), Some(digest(&[&a, b"x"])));
    }

    #[test]
    fn part_boundaries_count() {
        assert_ne!(digest(&[b"ab", b"c"]), digest(&[b"a", b"bc"]));
        assert_ne!(digest(&[b"abc"]), digest(&[b"abc", b""]));
    }
}
