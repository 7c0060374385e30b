//! A minimal protobuf wire-format reader over a borrowed slice.
//!
//! Hand-written rather than prost because the hot path must not allocate or copy: it
//! yields field keys, scalars and the *positions* of length-delimited fields, which the
//! decoder keeps as [`Span`]s into the body. prost stays the reference it is checked
//! against (see the differential tests in `decode`).

use crate::batch::Span;

pub const VARINT: u8 = 0;
pub const I64: u8 = 1;
pub const LEN: u8 = 2;
pub const SGROUP: u8 = 3;
pub const EGROUP: u8 = 4;
pub const I32: u8 = 5;

/// Groups nest; a hostile body must not recurse without bound.
const GROUP_DEPTH_MAX: u32 = 32;

/// A structural fault in the protobuf bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    Truncated,
    VarintOverflow,
    BadKey,
    BadWireType { field: u32, wire_type: u8 },
    UnmatchedGroup,
    GroupTooDeep,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Truncated => f.write_str("truncated message"),
            WireError::VarintOverflow => f.write_str("varint longer than 64 bits"),
            WireError::BadKey => f.write_str("invalid field key"),
            WireError::BadWireType { field, wire_type } => {
                write!(f, "field {field} has unexpected wire type {wire_type}")
            }
            WireError::UnmatchedGroup => f.write_str("unmatched group"),
            WireError::GroupTooDeep => f.write_str("groups nested too deep"),
        }
    }
}

/// Reads one message. `base` is the offset of `data[0]` within the whole body, so the
/// spans it returns are body offsets.
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    base: u32,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader {
            data,
            pos: 0,
            base: 0,
        }
    }

    /// A second reader at the same position: a cheap way to make another pass.
    pub fn snapshot(&self) -> Reader<'a> {
        Reader {
            data: self.data,
            pos: self.pos,
            base: self.base,
        }
    }

    /// The body offset of the next byte to read.
    pub fn offset(&self) -> u32 {
        self.base + self.pos as u32
    }

    pub fn at_end(&self) -> bool {
        self.pos >= self.data.len()
    }

    #[inline]
    pub fn varint(&mut self) -> Result<u64, WireError> {
        // Fast path: one byte.
        if let Some(&b) = self.data.get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(u64::from(b));
            }
        }
        self.varint_long()
    }

    /// A varint of two bytes or more: lengths of series messages, and timestamps (six
    /// bytes for milliseconds since 1970, at the end of their sample message), so still
    /// hot. Up to eight bytes are decoded from one little-endian word, zero-padded when
    /// fewer remain: the first byte with a clear top bit ends the varint (one in the
    /// padding means it runs past the end), and the 7-bit groups are gathered by shifts
    /// instead of a loop over bytes. Longer varints go byte by byte.
    #[inline(never)]
    fn varint_long(&mut self) -> Result<u64, WireError> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let k = rest.len().min(8);
        let word = match rest.get(..8) {
            Some(w) => u64::from_le_bytes(w.try_into().expect("8 bytes")),
            None => {
                let mut w = [0u8; 8];
                w[..k].copy_from_slice(&rest[..k]);
                u64::from_le_bytes(w)
            }
        };
        let ends = !word & 0x8080_8080_8080_8080;
        if ends != 0 {
            let n = (ends.trailing_zeros() / 8 + 1) as usize;
            if n > k {
                return Err(WireError::Truncated);
            }
            let w = if n == 8 {
                word
            } else {
                word & ((1u64 << (8 * n)) - 1)
            };
            let mut value = 0u64;
            for i in 0..8 {
                value |= (w >> i) & (0x7f << (7 * i));
            }
            self.pos += n;
            return Ok(value);
        }
        let mut value = 0u64;
        let mut shift = 0u32;
        loop {
            let b = *self.data.get(self.pos).ok_or(WireError::Truncated)?;
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(WireError::VarintOverflow);
            }
            value |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(value);
            }
            shift += 7;
            if shift > 63 {
                return Err(WireError::VarintOverflow);
            }
        }
    }

    /// The next field key as (field number, wire type).
    #[inline]
    pub fn key(&mut self) -> Result<(u32, u8), WireError> {
        let key = self.varint()?;
        let field = key >> 3;
        if field == 0 || field > u64::from(u32::MAX >> 3) {
            return Err(WireError::BadKey);
        }
        let wire_type = (key & 7) as u8;
        if wire_type > I32 {
            return Err(WireError::BadKey);
        }
        Ok((field as u32, wire_type))
    }

    #[inline]
    pub fn fixed64(&mut self) -> Result<u64, WireError> {
        let bytes = self
            .data
            .get(self.pos..self.pos + 8)
            .ok_or(WireError::Truncated)?;
        self.pos += 8;
        let mut b = [0u8; 8];
        b.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(b))
    }

    /// A length-delimited field: its span in the body.
    #[inline]
    pub fn span(&mut self) -> Result<Span, WireError> {
        let len = self.varint()?;
        let remaining = (self.data.len() - self.pos) as u64;
        if len > remaining {
            return Err(WireError::Truncated);
        }
        let span = Span {
            start: self.base + self.pos as u32,
            len: len as u32,
        };
        self.pos += len as usize;
        Ok(span)
    }

    /// The common shape of a two-field message, `k1 LEN k2 LEN` and nothing else (a
    /// label as every sender writes it): both spans, or `None` with nothing consumed so
    /// the caller takes the general path.
    #[inline]
    pub fn two_spans(&mut self, k1: u8, k2: u8) -> Option<(Span, Span)> {
        let start = self.pos;
        let two = (|| {
            if *self.data.get(self.pos)? != k1 {
                return None;
            }
            self.pos += 1;
            let a = self.span().ok()?;
            if *self.data.get(self.pos)? != k2 {
                return None;
            }
            self.pos += 1;
            let b = self.span().ok()?;
            self.at_end().then_some((a, b))
        })();
        if two.is_none() {
            self.pos = start;
        }
        two
    }

    /// The common shape of a sample, `k1 I64 k2 VARINT` and nothing else: the fixed64
    /// and the varint, or `None` with nothing consumed.
    #[inline]
    pub fn fixed64_varint(&mut self, k1: u8, k2: u8) -> Option<(u64, u64)> {
        let d = self.data.get(self.pos..)?;
        if d.len() < 11 || d[0] != k1 || d[9] != k2 {
            return None;
        }
        let start = self.pos;
        self.pos += 1;
        let a = self.fixed64().ok()?;
        self.pos += 1;
        match self.varint() {
            Ok(b) if self.at_end() => Some((a, b)),
            _ => {
                self.pos = start;
                None
            }
        }
    }

    /// A length-delimited field as a reader over its contents.
    #[inline]
    pub fn message(&mut self) -> Result<Reader<'a>, WireError> {
        let span = self.span()?;
        let local = (span.start - self.base) as usize;
        Ok(Reader {
            data: &self.data[local..local + span.len as usize],
            pos: 0,
            base: span.start,
        })
    }

    /// Skips a field of any wire type whose key was just read.
    pub fn skip(&mut self, field: u32, wire_type: u8) -> Result<(), WireError> {
        self.skip_depth(field, wire_type, 0)
    }

    fn skip_depth(&mut self, field: u32, wire_type: u8, depth: u32) -> Result<(), WireError> {
        match wire_type {
            VARINT => self.varint().map(drop),
            I64 => self.advance(8),
            LEN => self.span().map(drop),
            I32 => self.advance(4),
            SGROUP => {
                if depth >= GROUP_DEPTH_MAX {
                    return Err(WireError::GroupTooDeep);
                }
                loop {
                    let (f, wt) = self.key()?;
                    if wt == EGROUP {
                        return if f == field {
                            Ok(())
                        } else {
                            Err(WireError::UnmatchedGroup)
                        };
                    }
                    self.skip_depth(f, wt, depth + 1)?;
                }
            }
            _ => Err(WireError::UnmatchedGroup),
        }
    }

    fn advance(&mut self, n: usize) -> Result<(), WireError> {
        if self.data.len() - self.pos < n {
            return Err(WireError::Truncated);
        }
        self.pos += n;
        Ok(())
    }

    /// Requires `wire_type` for a known field.
    #[inline]
    pub fn expect(field: u32, wire_type: u8, want: u8) -> Result<(), WireError> {
        if wire_type == want {
            Ok(())
        } else {
            Err(WireError::BadWireType { field, wire_type })
        }
    }

    /// Reads a repeated varint field, packed (LEN) or not, calling `f` per element.
    pub fn repeated_varint(
        &mut self,
        field: u32,
        wire_type: u8,
        mut f: impl FnMut(u64),
    ) -> Result<(), WireError> {
        match wire_type {
            VARINT => {
                f(self.varint()?);
                Ok(())
            }
            LEN => {
                let mut packed = self.message()?;
                while !packed.at_end() {
                    f(packed.varint()?);
                }
                Ok(())
            }
            _ => Err(WireError::BadWireType { field, wire_type }),
        }
    }

    /// Reads a repeated double field, packed (LEN) or not, calling `f` per element.
    pub fn repeated_double(
        &mut self,
        field: u32,
        wire_type: u8,
        mut f: impl FnMut(f64),
    ) -> Result<(), WireError> {
        match wire_type {
            I64 => {
                f(f64::from_bits(self.fixed64()?));
                Ok(())
            }
            LEN => {
                let mut packed = self.message()?;
                if packed.data.len() % 8 != 0 {
                    return Err(WireError::Truncated);
                }
                while !packed.at_end() {
                    f(f64::from_bits(packed.fixed64()?));
                }
                Ok(())
            }
            _ => Err(WireError::BadWireType { field, wire_type }),
        }
    }
}

#[inline]
pub fn zigzag32(v: u64) -> i32 {
    let v = v as u32;
    ((v >> 1) as i32) ^ -((v & 1) as i32)
}

#[inline]
pub fn zigzag64(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::{Reader, WireError};

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// Byte by byte, as the protobuf encoding defines it.
    fn reference(b: &[u8]) -> Result<(u64, usize), WireError> {
        let mut v = 0u64;
        for (i, &x) in b.iter().enumerate().take(10) {
            if i == 9 && x > 1 {
                return Err(WireError::VarintOverflow);
            }
            v |= u64::from(x & 0x7f) << (7 * i);
            if x < 0x80 {
                return Ok((v, i + 1));
            }
        }
        if b.len() >= 10 {
            Err(WireError::VarintOverflow)
        } else {
            Err(WireError::Truncated)
        }
    }

    /// Every length from 1 to 10 bytes, each at the very end of its slice and followed
    /// by other bytes, and every truncation of each: the word-at-a-time decoder agrees
    /// with the byte-by-byte definition on value, length and error.
    #[test]
    fn varints_of_every_length_at_every_distance_from_the_end() {
        let mut values: Vec<u64> = vec![0, 1, 127, 128, 300, 1_700_000_000_000, u64::MAX];
        for bits in 1..64 {
            values.extend([(1u64 << bits) - 1, 1u64 << bits, (1u64 << bits) + 1]);
        }
        for v in values {
            let mut enc = Vec::new();
            put_varint(&mut enc, v);
            for tail in [
                &[][..],
                &[0x00][..],
                &[0xff, 0xff, 0xff, 0x01][..],
                &[0x80; 12][..],
            ] {
                let mut b = enc.clone();
                b.extend_from_slice(tail);
                let mut r = Reader::new(&b);
                assert_eq!(r.varint(), Ok(v), "{v} then {tail:?}");
                assert_eq!(r.pos, enc.len());
            }
            for cut in 0..enc.len() {
                let mut r = Reader::new(&enc[..cut]);
                assert_eq!(r.varint(), Err(WireError::Truncated), "{v} cut at {cut}");
            }
        }
        // Overlong and overflowing forms.
        for b in [
            vec![0xff; 10],
            vec![0xff; 11],
            [vec![0x80; 9], vec![0x02]].concat(),
            [vec![0xff; 9], vec![0x01]].concat(),
            [vec![0x80; 8], vec![0x00]].concat(),
        ] {
            let mut r = Reader::new(&b);
            let got = r.varint().map(|v| (v, r.pos));
            assert_eq!(got, reference(&b), "{b:02x?}");
        }
    }
}
