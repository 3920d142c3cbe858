//! Memory pages: the page size, mapping segments shared or private
//! (copy-on-write), swapping a mapping in place, unmapping, and telling
//! whether a private mapping was written (`/proc/self/pagemap`).

use std::fs;
use std::io;
use std::os::fd::AsFd;

use rustix::mm::{MapFlags, ProtFlags};

pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// Maps `len` bytes of `fd` readable and writable at an address the kernel
/// picks. Unmap with [`unmap`].
fn map(fd: impl AsFd, len: usize, flags: MapFlags) -> io::Result<*mut u8> {
    // SAFETY: a fresh mapping at an address the kernel picks aliases nothing.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            flags,
            fd,
            0,
        )?
    };
    Ok(ptr.cast())
}

/// Maps `len` bytes of `fd` shared: writes go to the segment, and every
/// other shared mapping of it sees them.
pub fn map_shared(fd: impl AsFd, len: usize) -> io::Result<*mut u8> {
    map(fd, len, MapFlags::SHARED)
}

/// Maps `len` bytes of `fd` privately: writes go to copies of the pages,
/// and the segment stays as it is for every other holder.
pub fn map_private(fd: impl AsFd, len: usize) -> io::Result<*mut u8> {
    map(fd, len, MapFlags::PRIVATE)
}

/// Replaces the mapping `[addr, addr + len)` by a private one of `fd`,
/// atomically with respect to accesses by other threads: a write before
/// the swap reached the old mapping's pages and shows through if those are
/// `fd`'s; one after it copies the page privately. Charged to nothing
/// (NORESERVE), so it cannot fail on the commit limit and leave the range
/// unmapped.
///
/// # Safety
///
/// `[addr, addr + len)` must be a whole mapping the caller owns, made by
/// this module; no Rust reference may rely on it staying the same memory.
pub unsafe fn remap_private_in_place(addr: *mut u8, len: usize, fd: impl AsFd) -> io::Result<()> {
    // SAFETY: the caller owns the range (see above); MAP_FIXED replaces it
    // and nothing else.
    unsafe {
        rustix::mm::mmap(
            addr.cast(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
            fd,
            0,
        )?;
    }
    Ok(())
}

/// Unmaps `[ptr, ptr + len)`.
///
/// # Safety
///
/// The range must be a whole mapping made by this module, unmapped once,
/// with nothing left that reads or writes it.
pub unsafe fn unmap(ptr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: see above.
    unsafe { rustix::mm::munmap(ptr.cast(), len)? };
    Ok(())
}

/// Whether no page of `[addr, addr + len)` was written since the range was
/// mapped privately from a file: no page is anonymous (copied on write) or
/// swapped out. Reads `/proc/self/pagemap`, whose flag bits need no privilege.
pub fn pages_unmodified(addr: usize, len: usize) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_PAGE: u64 = 1 << 61;
    if len == 0 {
        return Ok(true);
    }
    let page = page_size();
    let first = addr / page;
    let last = (addr + len - 1) / page;
    // Opened per call: a descriptor kept across fork would read the parent.
    let map = fs::File::open("/proc/self/pagemap")?;
    let mut buf = vec![0u8; 8 * 8192];
    let mut at = first;
    while at <= last {
        let n = (last + 1 - at).min(8192);
        let bytes = &mut buf[..8 * n];
        map.read_exact_at(bytes, (at * 8) as u64)?;
        for entry in bytes.chunks_exact(8) {
            let mut e = [0u8; 8];
            e.copy_from_slice(entry);
            let e = u64::from_le_bytes(e);
            if e & SWAPPED != 0 || (e & PRESENT != 0 && e & FILE_PAGE == 0) {
                return Ok(false);
            }
        }
        at += n;
    }
    Ok(true)
}
