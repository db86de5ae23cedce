//! Page-aligned buffers for `O_DIRECT` I/O, a per-thread pool of them, and a pool shared
//! between threads that buffers handed on as `Bytes` return to by themselves.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::backing::DIRECT_IO_ALIGN;

/// A zero-initialised buffer aligned to [`DIRECT_IO_ALIGN`], whose capacity is a multiple of it
/// (but [`AlignedBuf::empty`], which holds nothing and allocates nothing).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` bytes (capacity rounded up to the alignment).
    pub fn new(len: usize) -> Self {
        let align = DIRECT_IO_ALIGN as usize;
        let capacity = len.max(1).div_ceil(align) * align;
        let layout = Layout::from_size_align(capacity, align).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, capacity, len }
    }

    /// A buffer of no bytes, which allocates nothing (a placeholder for one moved out).
    pub fn empty() -> Self {
        Self {
            ptr: NonNull::dangling(),
            capacity: 0,
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the length; panics past the capacity. Bytes keep whatever they held.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "length {len} past capacity {}",
            self.capacity
        );
        self.len = len;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity >= len initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for capacity >= len initialised bytes, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.capacity == 0 {
            // `empty`: nothing was allocated.
            return;
        }
        let layout = Layout::from_size_align(self.capacity, DIRECT_IO_ALIGN as usize)
            .expect("layout was valid at allocation");
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// Free lists of buffers by power-of-two capacity, so the I/O path does not allocate per
/// request once warm. Not shared between threads.
pub struct BufPool {
    classes: Vec<Vec<AlignedBuf>>,
    /// Bytes held idle in the pool, and the most it keeps.
    idle_bytes: usize,
    max_idle_bytes: usize,
}

/// Enough for a connection's in-flight limit at 1 MiB requests with room to spare.
const MAX_IDLE_BYTES: usize = 64 << 20;

impl Default for BufPool {
    fn default() -> Self {
        Self::with_idle_limit(MAX_IDLE_BYTES)
    }
}

impl BufPool {
    /// A pool that keeps at most `max_idle_bytes` of buffers idle (a user's in-flight
    /// bound: the pool then never holds more than the user did at its peak).
    pub fn with_idle_limit(max_idle_bytes: usize) -> Self {
        Self {
            classes: Vec::new(),
            idle_bytes: 0,
            max_idle_bytes,
        }
    }

    /// A buffer of at least `len` bytes, with its length set to `len`.
    pub fn take(&mut self, len: usize) -> AlignedBuf {
        self.take_idle(len).unwrap_or_else(|| Self::fresh(len))
    }

    /// A new buffer of `len` bytes, of the capacity of its class (to be given back).
    fn fresh(len: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::new(Self::class_capacity(Self::class_of(len)));
        buf.set_len(len);
        buf
    }

    /// An idle buffer of at least `len` bytes, with its length set to `len`, if the pool
    /// holds one.
    pub fn take_idle(&mut self, len: usize) -> Option<AlignedBuf> {
        let mut buf = self
            .classes
            .get_mut(Self::class_of(len))
            .and_then(Vec::pop)?;
        self.idle_bytes -= buf.capacity();
        buf.set_len(len);
        Some(buf)
    }

    pub fn give(&mut self, buf: AlignedBuf) {
        let class = Self::class_of(buf.capacity());
        if Self::class_capacity(class) != buf.capacity()
            || self.idle_bytes + buf.capacity() > self.max_idle_bytes
        {
            return;
        }
        if self.classes.len() <= class {
            self.classes.resize_with(class + 1, Vec::new);
        }
        self.idle_bytes += buf.capacity();
        self.classes[class].push(buf);
    }

    fn class_of(len: usize) -> usize {
        let units = len.max(1).div_ceil(DIRECT_IO_ALIGN as usize);
        units.next_power_of_two().trailing_zeros() as usize
    }

    fn class_capacity(class: usize) -> usize {
        (DIRECT_IO_ALIGN as usize) << class
    }
}

/// A [`BufPool`] shared between threads, for buffers handed on as `Bytes`
/// (`Bytes::from_owner` of a [`PooledBuf`]): one goes back to the pool when the last
/// reference to it drops, on whichever thread that is (the replication link's, once the
/// peer has it), rather than being freed there and allocated and zeroed again here.
#[derive(Clone)]
pub struct SharedPool {
    pool: Arc<Mutex<BufPool>>,
}

impl SharedPool {
    /// A pool that keeps at most `max_idle_bytes` of buffers idle.
    pub fn with_idle_limit(max_idle_bytes: usize) -> Self {
        Self {
            pool: Arc::new(Mutex::new(BufPool::with_idle_limit(max_idle_bytes))),
        }
    }

    /// A buffer of at least `len` bytes (idle, or new), with its length set to `len`.
    pub fn take(&self, len: usize) -> AlignedBuf {
        let idle = self.lock().take_idle(len);
        // Allocated (and zeroed) outside the lock.
        idle.unwrap_or_else(|| BufPool::fresh(len))
    }

    pub fn give(&self, buf: AlignedBuf) {
        self.lock().give(buf);
    }

    /// `buf`, given back to this pool when dropped.
    pub fn returning(&self, buf: AlignedBuf) -> PooledBuf {
        PooledBuf {
            buf,
            pool: self.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BufPool> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A buffer that goes back to its [`SharedPool`] when dropped.
pub struct PooledBuf {
    buf: AlignedBuf,
    pool: SharedPool,
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl AsMut<[u8]> for PooledBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        self.pool
            .give(std::mem::replace(&mut self.buf, AlignedBuf::empty()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        let buf = AlignedBuf::new(5000);
        assert_eq!(buf.as_ptr() as usize % DIRECT_IO_ALIGN as usize, 0);
        assert_eq!(buf.capacity(), 8192);
        assert_eq!(buf.len(), 5000);
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn an_empty_buffer_holds_nothing_and_the_pool_does_not_keep_it() {
        let empty = AlignedBuf::empty();
        assert_eq!((empty.len(), empty.capacity()), (0, 0));
        assert!(empty.is_empty());
        let mut pool = BufPool::default();
        pool.give(empty);
        assert_eq!(pool.idle_bytes, 0);
        assert_eq!(pool.take(4096).capacity(), 4096);
    }

    #[test]
    fn pool_reuses_by_class() {
        let mut pool = BufPool::default();
        let a = pool.take(4096);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(100);
        assert_eq!(b.as_ptr(), ptr, "same class reuses the buffer");
        assert_eq!(b.len(), 100);
        let c = pool.take(3 * 4096);
        assert_eq!(c.capacity(), 4 * 4096);
    }

    #[test]
    fn pool_keeps_no_more_than_its_idle_limit() {
        let mut pool = BufPool::with_idle_limit(8192);
        let (a, b, c) = (pool.take(4096), pool.take(4096), pool.take(4096));
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        pool.give(a);
        pool.give(b);
        pool.give(c);
        let kept = [pool.take(4096).as_ptr(), pool.take(4096).as_ptr()];
        assert!(
            kept.contains(&pa) && kept.contains(&pb),
            "the first two were kept"
        );
        assert_eq!(pool.idle_bytes, 0, "the third was freed, not kept");
    }

    /// A buffer handed on as `Bytes` goes back to its pool when the last reference drops,
    /// on another thread too, and the next take reuses it; the idle bound holds.
    #[test]
    fn a_shared_buffer_returns_to_its_pool_once_its_last_reference_drops() {
        let pool = SharedPool::with_idle_limit(1 << 20);
        let mut buf = pool.returning(pool.take(1 << 20));
        buf.fill(7);
        let at = buf.as_ptr();
        let bytes = bytes::Bytes::from_owner(buf);
        let held = bytes.clone();
        drop(bytes);
        let other = pool.take(1 << 20);
        assert_ne!(other.as_ptr(), at, "still held: not in the pool");
        assert!(held.iter().all(|&b| b == 7));
        std::thread::spawn(move || drop(held)).join().unwrap();
        assert_eq!(pool.take(1 << 20).as_ptr(), at);
        // Past the idle bound a buffer given back is freed.
        pool.give(other);
        pool.give(AlignedBuf::new(1 << 20));
        assert!(pool.lock().take_idle(1 << 20).is_some());
        assert!(pool.lock().take_idle(1 << 20).is_none());
    }
}
