//! Prometheus's XOR chunk encoding (Gorilla-style), as remote_read's
//! STREAMED_XOR_CHUNKS carries it, so stored chunks can be streamed without re-encoding.
//!
//! Hand-written because no well-kept Rust crate implements Prometheus's exact bit
//! layout, and the bytes must match what Prometheus itself produces and reads.
//!
//! ```text
//! chunk  := u16 BE sample count | first | second? | later*        (bit stream, MSB first)
//! first  := varint(t0) (zigzag, as Go's binary.PutVarint) | 64 bits of v0
//! second := uvarint(t1 - t0) | xor(v1)
//! later  := dod(t) | xor(v)      dod = (t - t_prev) - (t_prev - t_prev_prev)
//! dod    := '0' if 0 | '10' + 14 bits | '110' + 17 bits | '1110' + 20 bits | '1111' + 64 bits
//!           (n-bit two's complement; n bits hold -(2^(n-1) - 1) ..= 2^(n-1))
//! xor(v) := '0' if v == prev | '1' '0' + meaningful bits (they fit the previous window)
//!                            | '1' '1' + 5 bits leading zeros (capped at 31)
//!                                      + 6 bits significant-bit count (64 written as 0) + the bits
//! ```
//! The last byte is padded with zero bits (and a whole empty byte follows when the last
//! write was whole bytes ending on a byte boundary, as in Prometheus's own chunks).

/// Prometheus cuts a chunk at this many samples.
pub const SAMPLES_PER_CHUNK_MAX: usize = 120;

#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    /// Bits still free in the last byte (0 when byte-aligned).
    free: u8,
}

impl BitWriter {
    fn bit(&mut self, b: bool) {
        if self.free == 0 {
            self.bytes.push(0);
            self.free = 8;
        }
        if b {
            *self.bytes.last_mut().expect("pushed above") |= 1 << (self.free - 1);
        }
        self.free -= 1;
    }

    /// The low `n` bits of `v`, most significant first, written as Prometheus's bit
    /// stream writes them: its whole bytes go through a byte write, so when `n` is a
    /// whole number of bytes and the stream was aligned, an empty byte follows (see
    /// [`BitWriter::byte`]). Written a byte at a time, not a bit at a time: this is the
    /// server's per-sample hot path.
    fn bits(&mut self, v: u64, n: u8) {
        if n == 0 {
            return;
        }
        let whole_bytes = n & 7 == 0;
        let mut n = u32::from(n);
        let v = if n == 64 { v } else { v & ((1u64 << n) - 1) };
        let aligned = self.free == 0 || self.free == 8;
        if self.free == 0 {
            self.bytes.push(0);
            self.free = 8;
        }
        let f = u32::from(self.free);
        let last = self.bytes.len() - 1;
        if n <= f {
            self.bytes[last] |= (v << (f - n)) as u8;
            self.free = (f - n) as u8;
        } else {
            self.bytes[last] |= (v >> (n - f)) as u8;
            n -= f;
            while n >= 8 {
                n -= 8;
                self.bytes.push((v >> n) as u8);
            }
            if n > 0 {
                self.bytes.push((v << (8 - n)) as u8);
            }
            self.free = ((8 - n) % 8) as u8;
        }
        if aligned && whole_bytes {
            // As Prometheus's byte writes leave it: an empty byte after the last one.
            self.bytes.push(0);
            self.free = 8;
        }
    }

    /// Writes a byte across the current one and a new one, which is always appended
    /// (empty when the stream was aligned): Prometheus's chunks end with that empty
    /// byte when their last write was a whole byte on a byte boundary.
    fn byte(&mut self, b: u8) {
        if self.free == 0 {
            self.bytes.push(0);
            self.free = 8;
        }
        let last = self.bytes.len() - 1;
        self.bytes[last] |= b >> (8 - self.free);
        self.bytes.push((u16::from(b) << self.free) as u8);
    }
}

/// Appends samples to one XOR chunk.
pub struct XorEncoder {
    w: BitWriter,
    count: u16,
    t: i64,
    t_delta: i64,
    v: u64,
    leading: u8,
    trailing: u8,
}

impl Default for XorEncoder {
    fn default() -> Self {
        // The 2-byte sample count, then a full stream (no free bits), as Prometheus starts.
        let w = BitWriter {
            bytes: vec![0, 0],
            free: 0,
        };
        XorEncoder {
            w,
            count: 0,
            t: 0,
            t_delta: 0,
            v: 0,
            leading: 0xff,
            trailing: 0,
        }
    }
}

fn bit_range(x: i64, n: u32) -> bool {
    -((1i64 << (n - 1)) - 1) <= x && x <= 1i64 << (n - 1)
}

impl XorEncoder {
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends a sample; timestamps must not decrease (the caller cuts chunks).
    pub fn append(&mut self, t: i64, value: f64) {
        let v = value.to_bits();
        match self.count {
            0 => {
                let mut buf = [0u8; 10];
                let n = put_varint(&mut buf, t);
                for b in &buf[..n] {
                    self.w.byte(*b);
                }
                self.w.bits(v, 64);
            }
            1 => {
                let delta = t - self.t;
                let mut buf = [0u8; 10];
                let n = put_uvarint(&mut buf, delta as u64);
                for b in &buf[..n] {
                    self.w.byte(*b);
                }
                self.t_delta = delta;
                self.xor(v);
            }
            _ => {
                let delta = t - self.t;
                let dod = delta - self.t_delta;
                if dod == 0 {
                    self.w.bit(false);
                } else if bit_range(dod, 14) {
                    self.w.bits(0b10, 2);
                    self.w.bits(dod as u64, 14);
                } else if bit_range(dod, 17) {
                    self.w.bits(0b110, 3);
                    self.w.bits(dod as u64, 17);
                } else if bit_range(dod, 20) {
                    self.w.bits(0b1110, 4);
                    self.w.bits(dod as u64, 20);
                } else {
                    self.w.bits(0b1111, 4);
                    self.w.bits(dod as u64, 64);
                }
                self.t_delta = delta;
                self.xor(v);
            }
        }
        self.t = t;
        self.v = v;
        self.count += 1;
        let n = self.count.to_be_bytes();
        self.w.bytes[0] = n[0];
        self.w.bytes[1] = n[1];
    }

    fn xor(&mut self, v: u64) {
        let delta = v ^ self.v;
        if delta == 0 {
            self.w.bit(false);
            return;
        }
        self.w.bit(true);
        let leading = (delta.leading_zeros() as u8).min(31);
        let trailing = delta.trailing_zeros() as u8;
        if self.leading != 0xff && leading >= self.leading && trailing >= self.trailing {
            self.w.bit(false);
            let sig = 64 - self.leading - self.trailing;
            self.w.bits(delta >> self.trailing, sig);
        } else {
            self.leading = leading;
            self.trailing = trailing;
            self.w.bit(true);
            self.w.bits(u64::from(leading), 5);
            let sig = 64 - leading - trailing;
            // 64 significant bits do not fit 6 bits: written as 0, read back as 64.
            self.w.bits(u64::from(sig), 6);
            self.w.bits(delta >> trailing, sig);
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.w.bytes
    }

    /// Hints the CPU to load the byte the next [`XorEncoder::append`] writes: a caller
    /// appending to many series in turn calls it a few samples ahead, so the append finds
    /// it in cache instead of waiting on memory.
    #[inline]
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let last = self.w.bytes.len() - 1;
            let p = self.w.bytes[last..].as_ptr().cast();
            // SAFETY: `_mm_prefetch` needs SSE, which every x86_64 CPU has; it only
            // hints the cache (it reads no value and never faults), here at an
            // in-bounds byte.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
        }
    }
}

fn put_uvarint(buf: &mut [u8; 10], mut x: u64) -> usize {
    let mut i = 0;
    while x >= 0x80 {
        buf[i] = x as u8 | 0x80;
        x >>= 7;
        i += 1;
    }
    buf[i] = x as u8;
    i + 1
}

fn put_varint(buf: &mut [u8; 10], x: i64) -> usize {
    put_uvarint(buf, ((x << 1) ^ (x >> 63)) as u64)
}

/// Why a chunk could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XorError {
    Truncated,
    BadVarint,
}

struct BitReader<'a> {
    bytes: &'a [u8],
    /// Bit position from the start.
    pos: usize,
}

impl BitReader<'_> {
    fn bit(&mut self) -> Result<bool, XorError> {
        let byte = *self.bytes.get(self.pos / 8).ok_or(XorError::Truncated)?;
        let b = (byte >> (7 - (self.pos % 8))) & 1 == 1;
        self.pos += 1;
        Ok(b)
    }

    fn bits(&mut self, n: u8) -> Result<u64, XorError> {
        let mut v = 0u64;
        for _ in 0..n {
            v = (v << 1) | u64::from(self.bit()?);
        }
        Ok(v)
    }

    fn uvarint(&mut self) -> Result<u64, XorError> {
        let mut x = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.bits(8)? as u8;
            if shift == 63 && b > 1 {
                return Err(XorError::BadVarint);
            }
            x |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(x);
            }
        }
        Err(XorError::BadVarint)
    }
}

/// Decodes a whole chunk into (timestamp, value) pairs; values are bit-exact.
pub fn decode(chunk: &[u8]) -> Result<Vec<(i64, f64)>, XorError> {
    if chunk.len() < 2 {
        return Err(XorError::Truncated);
    }
    let n = u16::from_be_bytes([chunk[0], chunk[1]]) as usize;
    let mut r = BitReader {
        bytes: chunk,
        pos: 16,
    };
    let mut out = Vec::with_capacity(n);
    let (mut t, mut t_delta, mut v) = (0i64, 0i64, 0u64);
    let (mut leading, mut trailing) = (0u8, 0u8);
    for i in 0..n {
        match i {
            0 => {
                let z = r.uvarint()?;
                t = ((z >> 1) as i64) ^ -((z & 1) as i64);
                v = r.bits(64)?;
            }
            _ => {
                if i == 1 {
                    t_delta = r.uvarint()? as i64;
                } else {
                    let dod = if !r.bit()? {
                        0
                    } else if !r.bit()? {
                        sign_extend(r.bits(14)?, 14)
                    } else if !r.bit()? {
                        sign_extend(r.bits(17)?, 17)
                    } else if !r.bit()? {
                        sign_extend(r.bits(20)?, 20)
                    } else {
                        r.bits(64)? as i64
                    };
                    t_delta += dod;
                }
                t += t_delta;
                if r.bit()? {
                    if r.bit()? {
                        leading = r.bits(5)? as u8;
                        let mut sig = r.bits(6)? as u8;
                        if sig == 0 {
                            sig = 64;
                        }
                        trailing = 64 - leading - sig;
                    }
                    let sig = 64 - leading - trailing;
                    v ^= r.bits(sig)? << trailing;
                }
            }
        }
        out.push((t, f64::from_bits(v)));
    }
    Ok(out)
}

/// The n-bit field holds -(2^(n-1) - 1) ..= 2^(n-1): only values above 2^(n-1) are
/// negative (plain sign extension would misread +2^(n-1)).
fn sign_extend(v: u64, n: u8) -> i64 {
    if v > 1 << (n - 1) {
        v as i64 - (1i64 << n)
    } else {
        v as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(samples: &[(i64, f64)]) {
        let mut e = XorEncoder::default();
        for (t, v) in samples {
            e.append(*t, *v);
        }
        let back = decode(e.bytes()).unwrap();
        assert_eq!(back.len(), samples.len());
        for ((t, v), (bt, bv)) in samples.iter().zip(&back) {
            assert_eq!((t, v.to_bits()), (bt, bv.to_bits()));
        }
    }

    /// A deterministic pseudo-random sequence (xorshift64) from `x`.
    fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// `bits` as Prometheus's stream defines it: whole bytes through `byte`, then one
    /// bit at a time (the encoder's first version, kept as the reference).
    fn bits_one_at_a_time(w: &mut BitWriter, v: u64, n: u8) {
        if n == 0 {
            return;
        }
        let (mut u, mut n) = (v << (64 - u32::from(n)), n);
        while n >= 8 {
            w.byte((u >> 56) as u8);
            u <<= 8;
            n -= 8;
        }
        while n > 0 {
            w.bit(u >> 63 == 1);
            u <<= 1;
            n -= 1;
        }
    }

    #[test]
    fn bits_write_exactly_what_bit_and_byte_writes_do() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..2000 {
            let start = || BitWriter {
                bytes: vec![0, 0],
                free: 0,
            };
            let (mut fast, mut slow) = (start(), start());
            for _ in 0..(next() % 40) {
                let (v, n) = (next(), (next() % 65) as u8);
                match next() % 4 {
                    0 => {
                        let b = v % 2 == 1;
                        fast.bit(b);
                        slow.bit(b);
                    }
                    1 => {
                        fast.byte(v as u8);
                        slow.byte(v as u8);
                    }
                    _ => {
                        fast.bits(v, n);
                        bits_one_at_a_time(&mut slow, v, n);
                    }
                }
                assert_eq!((&fast.bytes, fast.free), (&slow.bytes, slow.free));
            }
        }
    }

    #[test]
    fn round_trips_every_branch() {
        let stale = f64::from_bits(0x7ff0_0000_0000_0002);
        round_trip(&[]);
        round_trip(&[(1_700_000_000_000, 1.0)]);
        round_trip(&[(-5, -0.0), (10, f64::NAN)]);
        let mut s = Vec::new();
        let mut t = 1_700_000_000_000i64;
        for (i, step) in [
            15_000i64,
            15_000,
            15_001,
            14_000,
            30_000,
            200_000,
            1_000_000,
            50,
            3_000_000_000,
            15_000,
        ]
        .iter()
        .enumerate()
        {
            t += step;
            let v = match i % 5 {
                0 => 1.0,
                1 => stale,
                2 => f64::INFINITY,
                3 => 12345.678 * i as f64,
                _ => f64::from_bits(u64::MAX),
            };
            s.push((t, v));
        }
        round_trip(&s);
    }

    #[test]
    fn random_round_trips() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..500 {
            let n = (next() % 121) as usize;
            let mut t = (next() % (1 << 42)) as i64;
            let mut s = Vec::new();
            for _ in 0..n {
                t += (next() % 100_000) as i64 - if next().is_multiple_of(7) { 99_000 } else { 0 };
                let v = match next() % 4 {
                    0 => f64::from_bits(next()),
                    1 => (next() % 1000) as f64,
                    2 => s.last().map_or(0.0, |p: &(i64, f64)| p.1),
                    _ => f64::from_bits(0x7ff0_0000_0000_0002),
                };
                s.push((t, v));
            }
            round_trip(&s);
        }
    }

    #[test]
    fn truncated_chunks_are_errors_not_panics() {
        let mut e = XorEncoder::default();
        for i in 0..50 {
            e.append(i * 1000, i as f64 * 1.5);
        }
        for cut in 0..e.bytes().len() {
            let _ = decode(&e.bytes()[..cut]);
        }
        assert!(decode(&e.bytes()[..e.bytes().len() / 2]).is_err());
    }
}
