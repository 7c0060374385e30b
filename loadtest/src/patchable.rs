//! Snappy block-format encoder that keeps chosen byte ranges patchable in place.
//!
//! Why this exists: the harness builds every request body once and, per round, only
//! overwrites the sample timestamps and values inside the *compressed* bytes. That is
//! only sound if those bytes appear verbatim in the compressed stream and nothing else
//! depends on them. `snap`'s encoder may turn timestamp bytes (identical across series
//! in one round) into back-references, and may let later copies read from them, so its
//! output cannot be patched. This encoder takes the uncompressed bytes plus the list of
//! protected ranges and guarantees that every protected byte is emitted inside a literal,
//! that no match starts in, extends into or copies from a protected byte, and that no
//! hash-table entry overlaps one. It returns where each protected range landed in the
//! compressed output. Matching is greedy with a 4-byte hash, like the reference encoder,
//! and copies use 1- or 2-byte offsets (window 64 KiB).

use std::ops::Range;

const HASH_TABLE_BITS: u32 = 14;
const HASH_MULTIPLIER: u32 = 0x1e35_a7bd;
const MIN_MATCH_LEN_BYTES: usize = 4;
const MAX_COPY2_OFFSET_BYTES: usize = 65_535;
const MAX_COPY1_OFFSET_BYTES: usize = 2_047;
const MAX_COPY1_LEN_BYTES: usize = 11;
const MAX_COPY_LEN_BYTES: usize = 64;
const MAX_SHORT_LITERAL_LEN_BYTES: usize = 60;
/// Snappy's miss heuristic: advance by `skip >> 5` bytes after a miss, `skip` grows by one.
const SKIP_START: usize = 32;
const EMPTY_SLOT: u32 = u32::MAX;

/// A compressed snappy block plus, per protected input range, its offset in `bytes`.
#[derive(Clone, Debug)]
pub struct Patchable {
    pub bytes: Vec<u8>,
    /// `offsets[i]` is where `protected[i].start` lives in `bytes`; the range is contiguous.
    pub offsets: Vec<usize>,
}

/// Compresses `input` into a snappy block stream (as `snap::raw` reads it) in which every
/// byte of every range in `protected` is a literal byte that no copy refers to.
/// Ranges may be given in any order and may overlap; they must be non-empty and lie
/// within `input`.
pub fn compress(input: &[u8], protected: &[Range<usize>]) -> Patchable {
    let n = input.len();
    assert!(u32::try_from(n).is_ok(), "snappy block larger than 4 GiB");
    let mut is_protected = vec![false; n];
    for r in protected {
        assert!(
            r.start < r.end && r.end <= n,
            "protected range {r:?} empty or outside 0..{n}"
        );
        is_protected[r.clone()].fill(true);
    }
    // free_run[i] = number of unprotected bytes starting at i (0 when i is protected).
    let mut free_run = vec![0u32; n + 1];
    for i in (0..n).rev() {
        free_run[i] = if is_protected[i] {
            0
        } else {
            free_run[i + 1] + 1
        };
    }
    drop(is_protected);

    let mut out = Vec::with_capacity(n + n / 6 + 16);
    put_varint(&mut out, n as u64);
    // (input start, output start, length) of every literal, in order.
    let mut literals: Vec<(usize, usize, usize)> = Vec::new();
    let mut table = vec![EMPTY_SLOT; 1 << HASH_TABLE_BITS];
    let (mut p, mut lit_start, mut skip) = (0usize, 0usize, SKIP_START);
    while p + MIN_MATCH_LEN_BYTES <= n {
        if (free_run[p] as usize) < MIN_MATCH_LEN_BYTES {
            p += 1;
            continue;
        }
        let word = load32(input, p);
        let slot = &mut table[hash(word)];
        let candidate = *slot;
        *slot = p as u32;
        if candidate != EMPTY_SLOT {
            let c = candidate as usize;
            // Only positions with >= 4 free bytes are ever inserted, so [c, c+4) is free.
            if p - c <= MAX_COPY2_OFFSET_BYTES && load32(input, c) == word {
                let limit = (free_run[p].min(free_run[c])) as usize;
                let mut len = MIN_MATCH_LEN_BYTES;
                while len < limit && input[c + len] == input[p + len] {
                    len += 1;
                }
                emit_literal(&mut out, &mut literals, input, lit_start..p);
                emit_copy(&mut out, p - c, len);
                p += len;
                lit_start = p;
                skip = SKIP_START;
                continue;
            }
        }
        p += skip >> 5;
        skip += 1;
    }
    emit_literal(&mut out, &mut literals, input, lit_start..n);

    let offsets = protected
        .iter()
        .map(|r| {
            let i = literals.partition_point(|&(start, _, _)| start <= r.start);
            let (in_start, out_start, len) = literals[i - 1];
            assert!(
                r.end <= in_start + len,
                "protected range split across elements"
            );
            out_start + (r.start - in_start)
        })
        .collect();
    Patchable {
        bytes: out,
        offsets,
    }
}

fn load32(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn hash(word: u32) -> usize {
    (word.wrapping_mul(HASH_MULTIPLIER) >> (32 - HASH_TABLE_BITS)) as usize
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn emit_literal(
    out: &mut Vec<u8>,
    literals: &mut Vec<(usize, usize, usize)>,
    input: &[u8],
    r: Range<usize>,
) {
    if r.is_empty() {
        return;
    }
    let len_minus_one = r.len() - 1;
    if len_minus_one < MAX_SHORT_LITERAL_LEN_BYTES {
        out.push((len_minus_one as u8) << 2);
    } else {
        let extra_bytes = (4 - (len_minus_one as u32).leading_zeros() as usize / 8).max(1);
        out.push(((59 + extra_bytes) as u8) << 2);
        out.extend_from_slice(&(len_minus_one as u32).to_le_bytes()[..extra_bytes]);
    }
    literals.push((r.start, out.len(), r.len()));
    out.extend_from_slice(&input[r]);
}

fn emit_copy(out: &mut Vec<u8>, offset: usize, mut len: usize) {
    // Same splitting as the reference encoder: keep every piece >= 4 bytes.
    while len >= 68 {
        emit_copy2(out, offset, MAX_COPY_LEN_BYTES);
        len -= MAX_COPY_LEN_BYTES;
    }
    if len > MAX_COPY_LEN_BYTES {
        emit_copy2(out, offset, 60);
        len -= 60;
    }
    if len <= MAX_COPY1_LEN_BYTES && offset <= MAX_COPY1_OFFSET_BYTES {
        out.push(0b01 | (((len - 4) as u8) << 2) | (((offset >> 8) as u8) << 5));
        out.push(offset as u8);
    } else {
        emit_copy2(out, offset, len);
    }
}

fn emit_copy2(out: &mut Vec<u8>, offset: usize, len: usize) {
    out.push(0b10 | (((len - 1) as u8) << 2));
    out.extend_from_slice(&(offset as u16).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::SplitMix64;

    fn decompress(b: &[u8]) -> Vec<u8> {
        snap::raw::Decoder::new()
            .decompress_vec(b)
            .expect("valid snappy block")
    }

    /// Random bytes with plenty of repeats, so that matches happen near protected ranges.
    fn random_input(rng: &mut SplitMix64, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            if v.len() > 8 && rng.below(3) > 0 {
                let from = rng.below(v.len() as u64) as usize;
                let n = (1 + rng.below(40) as usize).min(len - v.len());
                for i in 0..n {
                    v.push(v[from + i]);
                }
            } else {
                v.push(rng.below(4) as u8 + b'a');
            }
        }
        v
    }

    #[test]
    fn random_inputs_round_trip_and_stay_patchable() {
        let mut rng = SplitMix64::new(7);
        for case in 0..300 {
            let len = [0, 1, 3, 4, 5, 17, 100, 1000, 5000, 70_000][case % 10];
            let mut input = random_input(&mut rng, len);
            let mut ranges = Vec::new();
            let mut pos = 0;
            while len > 0 && pos < len {
                pos += rng.below(64) as usize;
                let end = (pos + 1 + rng.below(9) as usize).min(len);
                if pos < end {
                    ranges.push(pos..end);
                }
                pos = end;
            }
            let mut packed = compress(&input, &ranges);
            assert_eq!(decompress(&packed.bytes), input, "case {case}");
            // Overwrite every protected byte in both copies: decompression must follow.
            for (r, &off) in ranges.iter().zip(&packed.offsets) {
                for i in 0..r.len() {
                    let b = rng.next_u64() as u8;
                    input[r.start + i] = b;
                    packed.bytes[off + i] = b;
                }
            }
            assert_eq!(decompress(&packed.bytes), input, "patched case {case}");
        }
    }

    #[test]
    fn compresses_repetitive_data_and_long_literals() {
        let input: Vec<u8> = b"abcdefgh".repeat(10_000);
        let packed = compress(&input, &[]);
        assert!(
            packed.bytes.len() < input.len() / 20,
            "{}",
            packed.bytes.len()
        );
        assert_eq!(decompress(&packed.bytes), input);
        // Incompressible: one literal with a multi-byte length.
        let mut rng = SplitMix64::new(3);
        let noise: Vec<u8> = (0..300_000).map(|_| rng.next_u64() as u8).collect();
        let packed = compress(&noise, &[10..20, 299_990..300_000]);
        assert_eq!(decompress(&packed.bytes), noise);
        assert_eq!(&packed.bytes[packed.offsets[1]..][..10], &noise[299_990..]);
    }
}
