//! Shared memory: sealed memfd segments and the mappings that view them.
//!
//! Lifetime rule: a segment exists while any process holds its descriptor or a
//! mapping of it. The kernel frees it after the last one goes, including when
//! the holder is SIGKILLed, so nothing here needs a cleanup pass.

pub mod blocks;
mod mapping;
mod segment;

pub use mapping::{Mapping, live_mappings};
pub use segment::{SegmentWriter, align_up};
