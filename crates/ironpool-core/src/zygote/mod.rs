//! The template process ("zygote"): a clean, single-threaded interpreter
//! that has done its imports once and forks workers on request, so a new or
//! replacement worker costs a fork, not an interpreter start.
//!
//! Process tree: caller ─(keeper thread)─ zygote ─ workers. Each link dies
//! with its parent (PR_SET_PDEATHSIG plus channel EOF). The zygote reaps its
//! children and reports their exit status to the pool that asked for them,
//! over that pool's private session channel.

mod keeper;
mod server;

pub use keeper::{Session, WarmRequest, Zygote};
pub use server::{ForkedChild, Host, Served, Warmed, report_failure, serve};

use crate::task::ExitStatus;

/// Packs an exit status into a frame's `aux` word.
pub fn encode_status(s: ExitStatus) -> u64 {
    match s {
        ExitStatus::Code(c) => c as u32 as u64,
        ExitStatus::Signal(sig) => (1 << 32) | sig as u32 as u64,
    }
}

pub fn decode_status(aux: u64) -> ExitStatus {
    let v = aux as u32 as i32;
    if aux >> 32 == 1 {
        ExitStatus::Signal(v)
    } else {
        ExitStatus::Code(v)
    }
}
