//! Shared-memory segments: anonymous files that can be sealed (memfd with
//! `F_ADD_SEALS`), passed by descriptor and mapped by any holder.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::SealFlags;

/// An anonymous, sealable shared-memory file. Never a path in /dev/shm, so
/// nothing is left behind when any holder is SIGKILLed.
pub fn new_segment(name: &str) -> io::Result<OwnedFd> {
    use rustix::fs::MemfdFlags;
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    match rustix::fs::memfd_create(name, flags | MemfdFlags::NOEXEC_SEAL) {
        Ok(fd) => Ok(fd),
        // Kernels before 6.3 do not know MFD_NOEXEC_SEAL.
        Err(rustix::io::Errno::INVAL) => Ok(rustix::fs::memfd_create(name, flags)?),
        Err(e) => Err(e.into()),
    }
}

/// Sets the segment's size; new bytes read as zeros.
pub fn set_segment_len(fd: impl AsFd, len: u64) -> io::Result<()> {
    rustix::fs::ftruncate(fd, len)?;
    Ok(())
}

/// The segment's size in bytes.
pub fn segment_len(fd: impl AsFd) -> io::Result<u64> {
    Ok(rustix::fs::fstat(fd)?.st_size as u64)
}

/// Forbids any further change of size or content.
pub fn seal_readonly(fd: impl AsFd) -> io::Result<()> {
    let size = SealFlags::SHRINK | SealFlags::GROW;
    match rustix::fs::fcntl_add_seals(&fd, size | SealFlags::WRITE | SealFlags::SEAL) {
        // F_SEAL_WRITE also fails while any page of the file is pinned,
        // and pages just written can sit pinned in another CPU's LRU batch
        // (test_zero_copy saw EBUSY once in CI). FUTURE_WRITE refuses every
        // later write and writable shared mapping without that check; the
        // segment is written with pwrite and has no mapping, so receivers
        // get the same guarantee.
        Err(rustix::io::Errno::BUSY) => {
            rustix::fs::fcntl_add_seals(&fd, size | SealFlags::FUTURE_WRITE | SealFlags::SEAL)?;
        }
        other => other?,
    }
    Ok(())
}

/// Whether no holder of `fd` can shrink it any more, so that a mapping of
/// it never loses pages under its reader (SIGBUS). An error means `fd` is
/// not a sealable segment at all.
pub fn is_sealed_against_shrinking(fd: impl AsFd) -> io::Result<bool> {
    Ok(rustix::fs::fcntl_get_seals(fd)?.contains(SealFlags::SHRINK))
}

/// Number of ironpool segments this process holds open (tests and leak
/// checks).
pub fn open_segments() -> usize {
    let Ok(dir) = fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("/memfd:ironpool"))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::mm::{MapFlags, ProtFlags, mmap, munmap};

    #[test]
    fn a_segment_the_write_seal_refuses_is_sealed_against_later_writes_all_the_same() {
        let fd = new_segment("seal-test").unwrap();
        set_segment_len(&fd, 4096).unwrap();
        // A writable shared mapping makes F_SEAL_WRITE fail with EBUSY, as a
        // pinned page does.
        // SAFETY: a fresh mapping of a file of 4096 bytes, unmapped below
        // and never dereferenced.
        let map = unsafe {
            mmap(
                std::ptr::null_mut(),
                4096,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .unwrap();
        seal_readonly(&fd).unwrap();
        let seals = rustix::fs::fcntl_get_seals(&fd).unwrap();
        assert!(seals.contains(
            SealFlags::FUTURE_WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL
        ));
        let file = fs::File::from(fd);
        assert!(std::os::unix::fs::FileExt::write_at(&file, b"x", 0).is_err());
        // SAFETY: the mapping made above, of 4096 bytes.
        unsafe { munmap(map, 4096) }.unwrap();
    }
}
