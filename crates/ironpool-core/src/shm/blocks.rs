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
//! way, so that a forked child and its parent never write to one page. (A
//! fork made only to exec, like ironpool's own template start, is exempt:
//! see [`spawning`].) That makes the caller's later writes copy-on-write,
//! so a fork costs memory for every page written afterwards.
//!
//! Segments received from another process are registered too ([`adopt`], by
//! [`crate::shm::Mapping::private_lendable`]): they are private mappings of
//! sealed memfds already, so a received buffer sent on to another task (a
//! result fed to the next `map`, an argument returned) travels without a
//! copy as long as no page of it was written.

use std::cell::UnsafeCell;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::Mapping;
use crate::platform;

/// Blocks alive at once, at most (each holds a descriptor; past the limit,
/// new allocations are left to the ordinary allocator). Lower when the
/// descriptor limit is low: see [`limit`].
pub const MAX_BLOCKS: usize = 128;

/// Received segments registered at once, at most (each keeps its
/// descriptor open); past the limit, further ones are not lendable.
pub const MAX_ADOPTED: usize = 128;

/// `max`, or an eighth of this process's descriptor limit if that is lower,
/// so that blocks never take the descriptors the application needs.
fn limit(max: usize) -> usize {
    let soft = platform::open_files_limit();
    max.min(usize::try_from(soft / 8).unwrap_or(usize::MAX))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Mapped shared and writable: the memfd is the array.
    Writable,
    /// Mapped privately over a sealed memfd: the memfd is a snapshot.
    Sealed,
    /// Sealing failed (someone else writes it too): never lent.
    Unlendable,
    /// A received segment's private mapping, owned by a `Mapping`, not by
    /// the registry: lent like `Sealed`, never freed here.
    Adopted,
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
static ADOPTED: AtomicUsize = AtomicUsize::new(0);
static LENT: AtomicUsize = AtomicUsize::new(0);
static FORK_HOOK: Once = Once::new();

thread_local! {
    /// Set while this thread forks a child that only execs (see `spawning`).
    static EXEC_FOLLOWS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `spawn`, which forks a child that does nothing but exec, without
/// sealing blocks first: the child never touches them before its exec
/// drops them, and sealing would make the caller's pages copy-on-write for
/// nothing.
pub fn spawning<R>(spawn: impl FnOnce() -> R) -> R {
    EXEC_FOLLOWS.with(|f| f.set(true));
    let r = spawn();
    EXEC_FOLLOWS.with(|f| f.set(false));
    r
}

/// Registers the pre-fork hook. Call it before the first block can exist
/// (the Python binding does when it installs the allocator): registering
/// while another thread forks could leave the child's `Once` stuck.
pub fn init() {
    FORK_HOOK.call_once(install_fork_hook);
}

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

/// Whether the registry is empty (most processes never use it).
fn empty() -> bool {
    LIVE.load(Ordering::Relaxed) == 0 && ADOPTED.load(Ordering::Relaxed) == 0
}

/// Buffers sent without a copy so far in this process.
pub fn lent_count() -> usize {
    LENT.load(Ordering::Relaxed)
}

/// Allocates `size` zeroed bytes in a fresh memfd, page-aligned. `None` when
/// the block limit is reached or the kernel refuses; the caller then uses
/// its ordinary allocator.
pub fn alloc(size: usize) -> Option<*mut u8> {
    if size == 0 {
        return None;
    }
    if LIVE.fetch_add(1, Ordering::Relaxed) >= limit(MAX_BLOCKS) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    let ptr = new_block(size);
    if ptr.is_none() {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
    ptr
}

fn new_block(size: usize) -> Option<*mut u8> {
    init();
    let page = platform::page_size();
    let len = size.checked_next_multiple_of(page)?;
    let fd = platform::new_segment("ironpool-array").ok()?;
    platform::set_segment_len(&fd, len as u64).ok()?;
    // A shared mapping of a memfd is not charged against the commit limit,
    // so an absurd size would only fail at first touch (OOM, SIGBUS). A
    // trial private mapping is charged like numpy's own allocation: if the
    // kernel refuses it, so does this, and numpy raises MemoryError.
    drop(Mapping::private(&fd, len).ok()?);
    // Mapped and registered under the lock, so that a fork in between
    // never leaves a child an unregistered shared mapping.
    REGISTRY.with(|blocks| {
        let ptr = platform::map_shared(&fd, len).ok()?;
        let state = State::Writable;
        blocks.insert(ptr as usize, Block { fd, len, state });
        Some(ptr)
    })
}

/// Size of the block starting at `ptr`, if `ptr` is one.
pub fn block_len(ptr: *const u8) -> Option<usize> {
    if LIVE.load(Ordering::Relaxed) == 0 {
        return None;
    }
    REGISTRY.with(|blocks| {
        let b = blocks.get(&(ptr as usize))?;
        (b.state != State::Adopted).then_some(b.len)
    })
}

/// Frees the block starting at `ptr`. Returns false, doing nothing, if
/// `ptr` is not a block (the caller's allocator made it).
pub fn free(ptr: *mut u8) -> bool {
    if LIVE.load(Ordering::Relaxed) == 0 {
        return false;
    }
    let key = ptr as usize;
    // Unmapped under the lock (see `new_block`); the descriptor is closed
    // after it, which is when the kernel frees the pages.
    let block = REGISTRY.with(|blocks| {
        if blocks.get(&key)?.state == State::Adopted {
            return None;
        }
        let block = blocks.remove(&key)?;
        // SAFETY: the registry's key/len are a mapping made by `alloc` (or
        // remapped in place by `seal_in_place`), now out of the registry, so
        // unmapped exactly once. The allocator's caller owns no view of it
        // any more.
        unsafe {
            let _ = platform::unmap(key as *mut u8, block.len);
        }
        Some(block)
    });
    let Some(block) = block else {
        return false;
    };
    drop(block.fd);
    LIVE.fetch_sub(1, Ordering::Relaxed);
    true
}

/// Whether the `len` bytes at `ptr` lie in one block, born here or received
/// (such bytes are lent, not copied, whenever they are sent unchanged).
pub fn contains(ptr: *const u8, len: usize) -> bool {
    if empty() || len == 0 {
        return false;
    }
    let addr = ptr as usize;
    REGISTRY.with(|blocks| {
        blocks
            .range(..=addr)
            .next_back()
            .is_some_and(|(&start, block)| addr + len <= start + block.len)
    })
}

/// A sealed memfd holding exactly the `len` bytes at `ptr`, and their
/// offset in it, if they lie in a block; `None` means copy them instead.
pub fn lend(ptr: *const u8, len: usize) -> Option<(OwnedFd, u64)> {
    if empty() || len == 0 {
        return None;
    }
    let addr = ptr as usize;
    let found = REGISTRY.with(|blocks| {
        let (&start, block) = blocks.range_mut(..=addr).next_back()?;
        if addr + len > start + block.len {
            return None;
        }
        if block.state == State::Writable {
            block.state = seal_in_place(start, block);
        }
        if !matches!(block.state, State::Sealed | State::Adopted) {
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

/// Registers the private mapping `[ptr, ptr + len)` of the sealed segment
/// `fd`, received from another process, so that [`lend`] can send it on.
/// False (and `fd` closed) if the registry is full.
pub fn adopt(ptr: *const u8, len: usize, fd: OwnedFd) -> bool {
    if len == 0 || ADOPTED.fetch_add(1, Ordering::Relaxed) >= MAX_ADOPTED {
        ADOPTED.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    let state = State::Adopted;
    REGISTRY.with(|blocks| blocks.insert(ptr as usize, Block { fd, len, state }));
    true
}

/// Unregisters an adopted mapping before its owner unmaps it.
pub fn forget(ptr: *const u8) {
    let key = ptr as usize;
    let gone = REGISTRY.with(|blocks| match blocks.get(&key) {
        Some(b) if b.state == State::Adopted => blocks.remove(&key),
        _ => None,
    });
    if gone.is_some() {
        ADOPTED.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Replaces the shared mapping of `block` at `start` by a private one of
/// the same memfd, then seals the memfd: its contents are final, and the
/// owner's later writes go to private copies of the pages. Returns the new
/// state: still `Writable` if the remap failed (nothing changed), `Unlendable`
/// if only the seal did.
fn seal_in_place(start: usize, block: &Block) -> State {
    // SAFETY: [start, start + len) is exactly this block's mapping, made by
    // `platform::map_shared` and owned by the registry. The swap is atomic
    // with respect to the owner's accesses: a write before it reached the
    // memfd and shows through the new mapping; one after it copies the page
    // privately. It cannot fail on the commit limit (the memory was checked
    // at allocation), which could leave the range unmapped on older kernels.
    let remapped =
        unsafe { platform::remap_private_in_place(start as *mut u8, block.len, &block.fd) };
    if remapped.is_err() {
        return State::Writable;
    }
    match platform::seal_readonly(block.fd.as_fd()) {
        Ok(()) => State::Sealed,
        Err(_) => State::Unlendable,
    }
}

fn install_fork_hook() {
    extern "C" fn prepare() {
        REGISTRY.lock();
        if EXEC_FOLLOWS.with(std::cell::Cell::get) {
            return;
        }
        // SAFETY: the lock is held until `release` runs after fork().
        let blocks = unsafe { &mut *REGISTRY.blocks.get() };
        for (&start, block) in blocks.iter_mut() {
            if block.state == State::Writable {
                block.state = seal_in_place(start, block);
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
        let _ = platform::run_around_fork(prepare, release, release);
    }
}

/// A fork seals every block of the process, which changes what other tests
/// using blocks see: they take turns.
#[cfg(test)]
pub(crate) static TEST_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(ptr: *mut u8, len: usize, byte: u8) {
        // SAFETY: the caller passes a live block of at least `len` bytes.
        unsafe { std::ptr::write_bytes(ptr, byte, len) };
    }

    fn read_at(fd: &OwnedFd, off: u64) -> u8 {
        let m = Mapping::private(fd, platform::segment_len(fd).unwrap() as usize).unwrap();
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
        assert!(contains(p, n));
        // SAFETY: the last byte of the block; the range runs one past it.
        assert!(!contains(unsafe { p.add(n - 1) }, 2));
        let (fd, off) = lend(p, n).unwrap();
        assert_eq!(off, 0);
        // Unchanged: lent again, same memfd.
        let (fd2, _) = lend(p, n).unwrap();
        let ino = |f: &OwnedFd| {
            use std::os::unix::fs::MetadataExt;
            std::fs::File::from(f.try_clone().unwrap())
                .metadata()
                .unwrap()
                .ino()
        };
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
        assert!(!contains(v.as_ptr(), v.len()));
        assert!(!free(v.as_ptr().cast_mut()));
        assert_eq!(block_len(v.as_ptr()), None);
    }

    #[test]
    fn forked_child_and_parent_do_not_share_writes() {
        let _turn = TEST_TURN.lock().unwrap_or_else(|e| e.into_inner());
        let n = 4096 * 4;
        let p = alloc(n).unwrap();
        fill(p, n, 5);
        // SAFETY: the child only writes memory of the block.
        unsafe { platform::run_in_forked_child(|| fill(p, n, 7)) }.unwrap();
        // SAFETY: within the block.
        assert_eq!(unsafe { *p.add(100) }, 5);
        assert!(free(p));
    }
}
