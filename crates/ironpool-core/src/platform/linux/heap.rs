//! The C heap (`malloc` and friends), for memory that C code may free or
//! resize with its own allocator: numpy's default handler pairs with it.

use std::ffi::c_void;

/// `size` bytes from the C heap, or null.
pub fn c_malloc(size: usize) -> *mut c_void {
    // SAFETY: plain C allocation; a null result is the caller's to handle.
    unsafe { libc::malloc(size) }
}

/// `n * elsize` zeroed bytes from the C heap, or null (also on overflow).
pub fn c_calloc(n: usize, elsize: usize) -> *mut c_void {
    // SAFETY: as `c_malloc`; calloc checks the product itself.
    unsafe { libc::calloc(n, elsize) }
}

/// Resizes a C heap allocation, C's `realloc`.
///
/// # Safety
///
/// `ptr` is null or a live allocation of the C heap, which this call
/// consumes unless it returns null.
pub unsafe fn c_realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: see above.
    unsafe { libc::realloc(ptr, size) }
}

/// Frees a C heap allocation.
///
/// # Safety
///
/// `ptr` is null or a live allocation of the C heap, freed once.
pub unsafe fn c_free(ptr: *mut c_void) {
    // SAFETY: see above.
    unsafe { libc::free(ptr) }
}
