//! Shared memory: sealed memfd segments, the mappings that view them, and
//! the digests that tell whether a shared buffer is still unchanged.
//!
//! Lifetime rule: a segment exists while any process holds its descriptor or a
//! mapping of it. The kernel frees it after the last one goes, including when
//! the holder is SIGKILLed, so nothing here needs a cleanup pass.

pub mod blocks;
pub mod digest;
mod mapping;
mod segment;

pub use mapping::{Mapping, live_mappings};
pub use segment::{SegmentWriter, align_up};
