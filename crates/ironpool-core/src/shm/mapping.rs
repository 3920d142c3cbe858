//! A memory mapping of a segment, unmapped when the last owner drops it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::platform;

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Mappings alive in this process (leak tests read this).
pub fn live_mappings() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// A private copy-on-write view of a sealed segment: readable and writable by
/// its owner, while the segment itself stays immutable for every other reader.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// Registered with `blocks` (see [`Mapping::private_lendable`]).
    adopted: bool,
}

// SAFETY: the mapping is plain memory owned by this value; it is only unmapped
// in Drop, which needs unique ownership. Concurrent writes through exported
// views are the exporter's users' concern, exactly as for a bytearray.
unsafe impl Send for Mapping {}
// SAFETY: see Send; &Mapping only hands out raw pointers.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps all `len` bytes of `fd` privately (copy-on-write).
    pub fn private(fd: impl AsFd, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Ok(Self {
                ptr: NonNull::dangling(),
                len: 0,
                adopted: false,
            });
        }
        // The segment is sealed against shrinking, so pages never vanish
        // under us (no SIGBUS).
        let ptr = platform::map_private(fd, len)?;
        LIVE.fetch_add(1, Ordering::Relaxed);
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Self {
            ptr,
            len,
            adopted: false,
        })
    }

    /// Like [`Mapping::private`], and registers the mapping so that its
    /// bytes can be sent on to another process without a copy while they
    /// are unchanged (see `blocks`). Keeps a duplicate of `fd` for that.
    pub fn private_lendable(fd: &OwnedFd, len: usize) -> io::Result<Self> {
        let mut m = Self::private(fd, len)?;
        if let Ok(dup) = fd.try_clone() {
            m.adopted = super::blocks::adopt(m.ptr.as_ptr(), len, dup);
        }
        Ok(m)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start of the mapping. Valid for `len()` bytes while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        if self.adopted {
            super::blocks::forget(self.ptr.as_ptr());
        }
        // SAFETY: ptr/len came from a successful `platform::map_private` and
        // are unmapped once. Views exported to Python hold an Arc to this
        // value, so none is alive.
        unsafe {
            let _ = platform::unmap(self.ptr.as_ptr(), self.len);
        }
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}
