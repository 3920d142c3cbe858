//! Large allocations made directly in memfd memory, so that a buffer can be
//! sent to another process without being copied: the descriptor travels and
//! the receiver maps the same pages.
//!
//! The Python binding installs these as numpy's data allocator where asked
//! (`ironpool.shared_memory()`). A block is lent to a message like this:
//!
//! 1. On the first send, the owner's mapping is replaced in place by a
//!    private (copy-on-write) mapping of the same memfd, and the memfd is
//!    sealed against writes. The message now carries an immutable snapshot,
//!    while the owner keeps writing to its array as before; each page it
//!    writes becomes its own private copy.
//! 2. Later sends check `/proc/self/pagemap`: if no page of the buffer was
//!    copied on write since, the sealed memfd still holds exactly the
//!    buffer's bytes and is sent again. Otherwise [`lend`] declines and the
//!    buffer is copied like any other.
//!
//! Before any `fork()`, every block still mapped shared is sealed the same
//! way, so that a forked child and its parent never write to one page.

use std::cell::UnsafeCell;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rustix::mm::{MapFlags, ProtFlags};

use crate::platform;

/// Blocks alive at once. Each holds a descriptor; past this many, new
/// allocations are left to the ordinary allocator.
pub const MAX_BLOCKS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Mapped shared and writable: the memfd is the array.
    Shared,
    /// Mapped privately over a sealed memfd: the memfd is a snapshot.
    Sealed,
    /// Sealing failed (someone else writes it too): never lent.
    Unlendable,
}

#[derive(Debug)]
struct Block {
    fd: OwnedFd,
    len: usize,
    state: State,
}

/// The registry, under a spin lock rather than a `Mutex`: `fork()` must find
/// it unlocked in the child, so the pre-fork hook holds it across `fork()`
/// and both sides release it afterwards, which a guard cannot express.
struct Registry {
    locked: AtomicBool,
    blocks: UnsafeCell<BTreeMap<usize, Block>>,
}

// SAFETY: `blocks` is only touched while `locked` is held (see `with`).
unsafe impl Sync for Registry {}

static REGISTRY: Registry = Registry {
    locked: AtomicBool::new(false),
    blocks: UnsafeCell::new(BTreeMap::new()),
};
static LIVE: AtomicUsize = AtomicUsize::new(0);
static LENT: AtomicUsize = AtomicUsize::new(0);
static FORK_HOOK: Once = Once::new();

impl Registry {
    fn lock(&self) {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
    }

    fn unlock(&self) {
        self.locked.store(false, Ordering::Release);
    }

    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<usize, Block>) -> R) -> R {
        self.lock();
        // SAFETY: the lock is held, so this is the only reference.
        let r = f(unsafe { &mut *self.blocks.get() });
        self.unlock();
        r
    }
}

/// Blocks alive in this process.
pub fn live_blocks() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Buffers sent without a copy so far in this process.
pub fn lent_count() -> usize {
    LENT.load(Ordering::Relaxed)
}

/// Allocates `size` zeroed bytes in a fresh memfd, page-aligned. `None` when
/// the block limit is reached or the kernel refuses; the caller then uses
/// its ordinary allocator.
pub fn alloc(size: usize) -> Option<*mut u8> {
    if size == 0 || LIVE.load(Ordering::Relaxed) >= MAX_BLOCKS {
        return None;
    }
    FORK_HOOK.call_once(install_fork_hook);
    let page = rustix::param::page_size();
    let len = size.checked_next_multiple_of(page)?;
    let fd = platform::memfd("ironpool-array").ok()?;
    rustix::fs::ftruncate(&fd, len as u64).ok()?;
    // SAFETY: a fresh mapping at an address the kernel picks aliases nothing.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
            &fd,
            0,
        )
    }
    .ok()?;
    let state = State::Shared;
    REGISTRY.with(|blocks| blocks.insert(ptr as usize, Block { fd, len, state }));
    LIVE.fetch_add(1, Ordering::Relaxed);
    Some(ptr.cast())
}

/// Size of the block starting at `ptr`, if `ptr` is one.
pub fn block_len(ptr: *const u8) -> Option<usize> {
    if LIVE.load(Ordering::Relaxed) == 0 {
        return None;
    }
    REGISTRY.with(|blocks| blocks.get(&(ptr as usize)).map(|b| b.len))
}

/// Frees the block starting at `ptr`. Returns false, doing nothing, if
/// `ptr` is not a block (the caller's allocator made it).
pub fn free(ptr: *mut u8) -> bool {
    if LIVE.load(Ordering::Relaxed) == 0 {
        return false;
    }
    let Some(block) = REGISTRY.with(|blocks| blocks.remove(&(ptr as usize))) else {
        return false;
    };
    // SAFETY: ptr/len are a mapping made by `alloc` (or remapped in place by
    // `seal_in_place`), now out of the registry, so unmapped exactly once.
    // The allocator's caller owns no view of it any more.
    unsafe {
        let _ = rustix::mm::munmap(ptr.cast(), block.len);
    }
    LIVE.fetch_sub(1, Ordering::Relaxed);
    true
}

/// A sealed memfd holding exactly the `len` bytes at `ptr`, and their
/// offset in it, if they lie in a block; `None` means copy them instead.
pub fn lend(ptr: *const u8, len: usize) -> Option<(OwnedFd, u64)> {
    if LIVE.load(Ordering::Relaxed) == 0 || len == 0 {
        return None;
    }
    let addr = ptr as usize;
    let found = REGISTRY.with(|blocks| {
        let (&start, block) = blocks.range_mut(..=addr).next_back()?;
        if addr + len > start + block.len {
            return None;
        }
        if block.state == State::Shared {
            block.state = match seal_in_place(start, block) {
                Ok(()) => State::Sealed,
                Err(_) => State::Unlendable,
            };
        }
        if block.state != State::Sealed {
            return None;
        }
        let fd = block.fd.try_clone().ok()?;
        Some((fd, (addr - start) as u64))
    })?;
    // Outside the lock: a page walk over a large buffer takes a while, and
    // the block cannot go away while the caller holds a view of the buffer.
    if !platform::pages_unmodified(addr, len).unwrap_or(false) {
        return None;
    }
    LENT.fetch_add(1, Ordering::Relaxed);
    Some(found)
}

/// Replaces the shared mapping of `block` at `start` by a private one of
/// the same memfd, then seals the memfd: its contents are final, and the
/// owner's later writes go to private copies of the pages.
fn seal_in_place(start: usize, block: &Block) -> io::Result<()> {
    // SAFETY: [start, start + len) is exactly this block's mapping, owned by
    // the registry. MAP_FIXED swaps it atomically with respect to the
    // owner's accesses: a write before the swap reached the memfd and shows
    // through the new mapping; one after it copies the page privately.
    unsafe {
        rustix::mm::mmap(
            start as *mut _,
            block.len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::FIXED,
            &block.fd,
            0,
        )?;
    }
    platform::seal_readonly(block.fd.as_fd())
}

fn install_fork_hook() {
    extern "C" fn prepare() {
        REGISTRY.lock();
        // SAFETY: the lock is held until `release` runs after fork().
        let blocks = unsafe { &mut *REGISTRY.blocks.get() };
        for (&start, block) in blocks.iter_mut() {
            if block.state == State::Shared {
                block.state = match seal_in_place(start, block) {
                    Ok(()) => State::Sealed,
                    Err(_) => State::Unlendable,
                };
            }
        }
    }
    extern "C" fn release() {
        REGISTRY.unlock();
    }
    // SAFETY: the handlers only touch the registry, which they lock and
    // unlock; they call no allocator-reentrant or signal-unsafe code that
    // could deadlock against the forking thread.
    unsafe {
        libc::pthread_atfork(Some(prepare), Some(release), Some(release));
    }
}

/// A fork seals every block of the process, which changes what other tests
/// using blocks see: they take turns.
#[cfg(test)]
pub(crate) static TEST_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::Mapping;

    fn fill(ptr: *mut u8, len: usize, byte: u8) {
        // SAFETY: the caller passes a live block of at least `len` bytes.
        unsafe { std::ptr::write_bytes(ptr, byte, len) };
    }

    fn read_at(fd: &OwnedFd, off: u64) -> u8 {
        let m = Mapping::private(fd, rustix::fs::fstat(fd).unwrap().st_size as usize).unwrap();
        // SAFETY: offsets used below are within the block.
        unsafe { *m.as_ptr().add(off as usize) }
    }

    #[test]
    fn lend_snapshots_and_detects_later_writes() {
        let _turn = TEST_TURN.lock().unwrap_or_else(|e| e.into_inner());
        let n = 1 << 20;
        let p = alloc(n).unwrap();
        assert_eq!(block_len(p), Some(n));
        fill(p, n, 1);
        let (fd, off) = lend(p, n).unwrap();
        assert_eq!(off, 0);
        // Unchanged: lent again, same memfd.
        let (fd2, _) = lend(p, n).unwrap();
        let ino = |f: &OwnedFd| rustix::fs::fstat(f).unwrap().st_ino;
        assert_eq!(ino(&fd), ino(&fd2));
        // The owner writes: its memory changes, the snapshot does not, and
        // the written range is no longer lent (other pages still are).
        fill(p, 10, 9);
        // SAFETY: within the block.
        assert_eq!(unsafe { *p }, 9);
        assert_eq!(read_at(&fd, 0), 1);
        assert!(lend(p, 4096).is_none());
        // SAFETY: an interior range of the block.
        let (_, off) = lend(unsafe { p.add(8192) }, 4096).unwrap();
        assert_eq!(off, 8192);
        assert!(free(p));
        assert!(!free(p));
    }

    #[test]
    fn foreign_pointers_are_not_blocks() {
        let _turn = TEST_TURN.lock().unwrap_or_else(|e| e.into_inner());
        let v = vec![0u8; 1 << 20];
        assert!(lend(v.as_ptr(), v.len()).is_none());
        assert!(!free(v.as_ptr().cast_mut()));
        assert_eq!(block_len(v.as_ptr()), None);
    }

    #[test]
    fn forked_child_and_parent_do_not_share_writes() {
        let _turn = TEST_TURN.lock().unwrap_or_else(|e| e.into_inner());
        let n = 4096 * 4;
        let p = alloc(n).unwrap();
        fill(p, n, 5);
        // SAFETY: the child only writes memory and exits without unwinding.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            fill(p, n, 7);
            // SAFETY: leaving the child without running the test harness.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        // SAFETY: within the block.
        assert_eq!(unsafe { *p.add(100) }, 5);
        assert!(free(p));
    }
}
