//! Content digests for send-once: an object shared automatically is reused
//! only while the digest of its bytes is the one taken when it was shared.
//!
//! xxh3-128 runs at memory bandwidth, a fraction of what a copy into a fresh
//! segment costs (the copy also faults in new pages), and 128 bits make an
//! accidental match between two different contents negligible.

use xxhash_rust::xxh3::Xxh3;

/// One digest over several byte slices, in order. Each slice's length is
/// mixed in, so moving a byte across a slice boundary changes the digest.
pub fn digest(parts: &[&[u8]]) -> u128 {
    let mut h = Xxh3::new();
    for part in parts {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.digest128()
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
    fn part_boundaries_count() {
        assert_ne!(digest(&[b"ab", b"c"]), digest(&[b"a", b"bc"]));
        assert_ne!(digest(&[b"abc"]), digest(&[b"abc", b""]));
    }
}
