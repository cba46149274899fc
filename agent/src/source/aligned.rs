//! Buffers for `O_DIRECT` reads: the kernel transfers straight into user
//! memory, so the buffer's address (as well as the file offset and the
//! length) must be a multiple of the device's logical block size. 4096
//! ([`DIRECT_ALIGN`]) covers 512-byte and 4K-sector devices alike.
//! `Vec<u8>` only promises 1-byte alignment, hence this type.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of buffer addresses, file offsets and lengths for `O_DIRECT`.
pub const DIRECT_ALIGN: usize = 4096;

/// A zero-filled byte buffer whose address is a multiple of
/// [`DIRECT_ALIGN`] and whose allocation is rounded up to a multiple of it
/// (the slice has the length asked for).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes, aligned. Panics, like `vec![0; len]`, only when
    /// the size overflows `isize` or memory is exhausted.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let cap = len.max(1).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let layout = match Layout::from_size_align(cap, DIRECT_ALIGN) {
            Ok(l) => l,
            Err(_) => panic!("aligned buffer of {len} bytes is too large"),
        };
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// Bytes allocated: `len()` rounded up to [`DIRECT_ALIGN`]. The bytes
    /// past `len()` exist and may be read into with [`AlignedBuf::full_mut`].
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// The whole allocation, including the rounding past `len()`: the target
    /// of a direct read whose length had to be rounded up.
    pub fn full_mut(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is `layout.size()` initialised (zeroed)
        // bytes owned by self, borrowed mutably for the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len <= layout.size()` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, borrowed mutably through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this very layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

/// Whether `ptr`, `offset` and `len` all meet `O_DIRECT`'s alignment.
pub fn is_direct_aligned(ptr: *const u8, offset: u64, len: usize) -> bool {
    let a = DIRECT_ALIGN;
    (ptr as usize).is_multiple_of(a) && offset.is_multiple_of(a as u64) && len.is_multiple_of(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_rounded() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
            assert_eq!(b.capacity() % DIRECT_ALIGN, 0);
            assert!(b.capacity() >= len.max(1));
            assert!(b.iter().all(|&x| x == 0));
            b.full_mut().fill(7);
            assert!(b.iter().all(|&x| x == 7));
        }
    }

    #[test]
    fn alignment_check_covers_address_offset_and_length() {
        let b = AlignedBuf::zeroed(8192);
        assert!(is_direct_aligned(b.as_ptr(), 4096, 4096));
        assert!(!is_direct_aligned(b[1..].as_ptr(), 4096, 4096));
        assert!(!is_direct_aligned(b.as_ptr(), 512, 4096));
        assert!(!is_direct_aligned(b.as_ptr(), 4096, 4000));
    }
}
