//! series_refs: a ship connection's dictionary from (series fingerprint, target
//! reference) to the reference the series was sent under.
//!
//! Written here rather than taken from hashbrown because of the shipper's hot loop: it
//! looks up every series of every record it copies from a ship section, in a table of
//! as many entries as the connection has series (128k in the load test: ~6 MB, so most
//! lookups miss the cache), and a miss costs more than the rest of the sample's work.
//! Prefetching the slot of a series a few places ahead hides that, and needs the
//! slot's address from the key, which hashbrown does not give. The fingerprints are
//! keyed 128-bit hashes (`crate::prepared::SeriesHasher`), so their bits index the
//! table as they are. Open addressing with linear probing, at most 3/4 full (a hit
//! reads 1.3-2.5 slots on average as the table fills from 3/8 to 3/4, 24 bytes each,
//! so mostly one or two cache lines); nothing is ever removed.

use promgate_proto::hint::prefetch;

/// One entry: 24 bytes, 8-byte aligned.
#[derive(Clone, Copy)]
struct Slot {
    hi: u64,
    lo: u64,
    target: u32,
    /// The series reference; [`FREE`] in an unused slot.
    series: u32,
}

/// The reference of no series: marks a free slot.
const FREE: u32 = u32::MAX;

const FREE_SLOT: Slot = Slot {
    hi: 0,
    lo: 0,
    target: 0,
    series: FREE,
};

/// Slots of the first table.
const SLOTS_MIN: usize = 1024;

/// (series fingerprint, target reference) → series reference.
#[derive(Default)]
pub struct SeriesRefs {
    /// A power of two long (or empty).
    slots: Vec<Slot>,
    len: usize,
}

impl SeriesRefs {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where a key's probe starts.
    fn home(&self, hi: u64, target: u32) -> usize {
        let h = hi ^ u64::from(target).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h as usize & (self.slots.len() - 1)
    }

    /// Hints the cache to load the slot where a lookup of this key starts.
    #[inline]
    pub fn prefetch(&self, fingerprint: u128, target: u32) {
        if !self.slots.is_empty() {
            let at = self.home((fingerprint >> 64) as u64, target);
            prefetch(self.slots[at..].as_ptr());
        }
    }

    /// The series reference of a key, if it has one.
    #[inline]
    pub fn get(&self, fingerprint: u128, target: u32) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let (hi, lo) = ((fingerprint >> 64) as u64, fingerprint as u64);
        let mask = self.slots.len() - 1;
        let mut at = self.home(hi, target);
        loop {
            let s = &self.slots[at];
            if s.series == FREE {
                return None;
            }
            if s.hi == hi && s.lo == lo && s.target == target {
                return Some(s.series);
            }
            at = (at + 1) & mask;
        }
    }

    /// Adds a key that has no reference yet.
    pub fn insert(&mut self, fingerprint: u128, target: u32, series: u32) {
        assert_ne!(series, FREE, "the largest u32 is not a series reference");
        debug_assert!(self.get(fingerprint, target).is_none());
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        self.place(Slot {
            hi: (fingerprint >> 64) as u64,
            lo: fingerprint as u64,
            target,
            series,
        });
        self.len += 1;
    }

    fn place(&mut self, slot: Slot) {
        let mask = self.slots.len() - 1;
        let mut at = self.home(slot.hi, slot.target);
        while self.slots[at].series != FREE {
            at = (at + 1) & mask;
        }
        self.slots[at] = slot;
    }

    fn grow(&mut self) {
        let slots = (self.slots.len() * 2).max(SLOTS_MIN);
        let old = std::mem::replace(&mut self.slots, vec![FREE_SLOT; slots]);
        for s in old.into_iter().filter(|s| s.series != FREE) {
            self.place(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key inserted is found with its reference, through several growths, and
    /// keys that differ in any part (either half of the fingerprint, the target) are
    /// told apart, also when they share a probe start.
    #[test]
    fn finds_what_was_inserted_and_nothing_else() {
        let mut refs = SeriesRefs::default();
        assert_eq!(refs.get(7, 0), None);
        let key =
            |i: u64| (u128::from(i.wrapping_mul(0x2545_f491_4f6c_dd1d)) << 64) | u128::from(i);
        for i in 0..10_000u64 {
            refs.insert(key(i), (i % 3) as u32, i as u32);
            // Same high half (same probe start), other low half or target.
            refs.insert(key(i) ^ 1 << 1, (i % 3) as u32, (i + 100_000) as u32);
            refs.insert(key(i), (i % 3) as u32 + 3, (i + 200_000) as u32);
        }
        assert_eq!(refs.len(), 30_000);
        assert!(refs.slots.len() * 3 >= refs.len() * 4);
        for i in 0..10_000u64 {
            let t = (i % 3) as u32;
            assert_eq!(refs.get(key(i), t), Some(i as u32));
            assert_eq!(refs.get(key(i) ^ 1 << 1, t), Some((i + 100_000) as u32));
            assert_eq!(refs.get(key(i), t + 3), Some((i + 200_000) as u32));
            assert_eq!(refs.get(key(i) ^ 1 << 2, t), None);
            assert_eq!(refs.get(key(i), t + 6), None);
            refs.prefetch(key(i), t);
        }
    }
}
