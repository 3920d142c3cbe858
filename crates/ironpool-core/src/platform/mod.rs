//! The one boundary between ironpool and the operating system's process and
//! memory primitives. Everything above this module is portable Rust; a macOS
//! or Windows port adds a sibling of `linux` and nothing else.

#[cfg(target_os = "linux")]
mod linux;

#[cfg(target_os = "linux")]
pub use linux::*;
