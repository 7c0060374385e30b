//! hint: a cache prefetch for the hot loops that look up large tables in an order
//! the hardware cannot predict (the server's open chunks, the shipper's series
//! references).

/// Hints the cache to load the line holding `p`.
#[inline]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: `_mm_prefetch` needs SSE, which every x86_64 CPU has; it only hints
        // the cache (it reads no value and never faults, whatever the address).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
