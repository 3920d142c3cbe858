//! Inter-process communication: fixed-header frames over private
//! SOCK_SEQPACKET socket pairs, with file descriptors attached.
//!
//! See `docs/wire-format.md` for the byte layout.

pub mod channel;
pub mod frame;
pub mod payload;

pub use channel::{Channel, Recv};
pub use frame::{FrameError, Kind, MAP_CHUNK, Message, RETRYABLE};
