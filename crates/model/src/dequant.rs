//! Dequantization of GGML tensor data to `f32`.
//!
//! GGUF files store every tensor in one of ggml's element types: plain floats (F32, F16, BF16)
//! or a block-quantized format, where a fixed run of elements shares a small header (a scale,
//! and for some formats a minimum) followed by packed low-bit quants. This module turns the
//! types vllm-apple loads into plain `f32`, following the block layouts of ggml's
//! `ggml-common.h` and the arithmetic of its reference `dequantize_row_*` functions in
//! `ggml-quants.c`, including the order of the float operations, so the results match ggml's
//! bit for bit. All multi-byte fields are little endian, as GGUF stores them.

use std::fmt;

use half::f16;

/// Elements per block of the original formats (ggml's `QK4_0`, `QK4_1` and `QK8_0`).
const QK: usize = 32;
/// Elements per super-block of the K-quants (ggml's `QK_K`).
const QK_K: usize = 256;
/// Bytes holding the eight 6-bit scales and eight 6-bit mins of Q4_K and Q5_K.
const K_SCALE_SIZE: usize = 12;
/// Bytes of an f16 block header field.
const HALF: usize = 2;

// Block sizes, spelled as the sums of their fields so they can be checked against the structs.
const Q4_0_BYTES: usize = HALF + QK / 2;
const Q4_1_BYTES: usize = 2 * HALF + QK / 2;
const Q8_0_BYTES: usize = HALF + QK;
const Q4_K_BYTES: usize = 2 * HALF + K_SCALE_SIZE + QK_K / 2;
const Q5_K_BYTES: usize = 2 * HALF + K_SCALE_SIZE + QK_K / 8 + QK_K / 2;
const Q6_K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + HALF;

/// The ggml element types this crate can decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

impl GgmlType {
    /// From the GGUF tensor-info type id (ggml_type enum: F32=0, F16=1, Q4_0=2, Q4_1=3, Q8_0=8,
    /// Q4_K=12, Q5_K=13, Q6_K=14, BF16=30). Unknown/unsupported id -> None.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The name ggml and GGUF tools print for this type.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Elements per block; plain float types count as one-element blocks.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => QK,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => Q4_0_BYTES,
            GgmlType::Q4_1 => Q4_1_BYTES,
            GgmlType::Q8_0 => Q8_0_BYTES,
            GgmlType::Q4K => Q4_K_BYTES,
            GgmlType::Q5K => Q5_K_BYTES,
            GgmlType::Q6K => Q6_K_BYTES,
        }
    }

    /// Bytes that `n` elements occupy; Err if n is not a multiple of block_elems (or overflows).
    pub fn bytes_for(self, n: usize) -> Result<usize, DequantError> {
        let block_elems = self.block_elems();
        if !n.is_multiple_of(block_elems) {
            return Err(DequantError::PartialBlock {
                ty: self,
                n,
                block_elems,
            });
        }
        (n / block_elems)
            .checked_mul(self.block_bytes())
            .ok_or(DequantError::Overflow { ty: self, n })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a tensor's bytes could not be dequantized. Each one means the file (or the tensor
/// info describing it) is inconsistent, so the messages give both sides of the mismatch.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    #[error(
        "{n} elements cannot be stored as {ty}: it packs elements in blocks of {block_elems}, \
         and {n} is not a multiple of {block_elems}"
    )]
    PartialBlock {
        ty: GgmlType,
        n: usize,
        block_elems: usize,
    },
    #[error("{n} elements of {ty} take {expected} bytes, but the data is {got} bytes long")]
    LengthMismatch {
        ty: GgmlType,
        n: usize,
        expected: usize,
        got: usize,
    },
    #[error("{n} elements of {ty} would take more bytes than this machine can address")]
    Overflow { ty: GgmlType, n: usize },
}

/// Dequantizes `n` elements stored as `ty` in `data` (little endian, exactly bytes_for(n)
/// bytes) into f32.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>, DequantError> {
    let expected = ty.bytes_for(n)?;
    if data.len() != expected {
        return Err(DequantError::LengthMismatch {
            ty,
            n,
            expected,
            got: data.len(),
        });
    }
    // Only now is `n` known to be backed by real bytes, so it is safe to reserve for it.
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(blocks(data).map(|&b| f32::from_le_bytes(b))),
        GgmlType::F16 => out.extend(blocks(data).map(|&b| f16::from_le_bytes(b).to_f32())),
        GgmlType::BF16 => out.extend(blocks(data).map(|&b| bf16_to_f32(b))),
        GgmlType::Q4_0 => blocks(data).for_each(|b| decode_q4_0(b, &mut out)),
        GgmlType::Q4_1 => blocks(data).for_each(|b| decode_q4_1(b, &mut out)),
        GgmlType::Q8_0 => blocks(data).for_each(|b| decode_q8_0(b, &mut out)),
        GgmlType::Q4K => blocks(data).for_each(|b| decode_q4_k(b, &mut out)),
        GgmlType::Q5K => blocks(data).for_each(|b| decode_q5_k(b, &mut out)),
        GgmlType::Q6K => blocks(data).for_each(|b| decode_q6_k(b, &mut out)),
    }
    Ok(out)
}

/// Views `data` as consecutive `N`-byte blocks. `dequantize` has already checked that the
/// length is a whole number of blocks, so the conversion never drops one. Handing decoders
/// fixed-size arrays means every field access below sits at a constant offset inside the
/// block: no input can steer an index out of bounds.
fn blocks<const N: usize>(data: &[u8]) -> impl Iterator<Item = &[u8; N]> {
    data.chunks_exact(N)
        .filter_map(|chunk| <&[u8; N]>::try_from(chunk).ok())
}

fn f16_to_f32(bytes: [u8; 2]) -> f32 {
    f16::from_le_bytes(bytes).to_f32()
}

/// ggml widens bf16 by placing its bits in the top half of an f32. Doing the same here, rather
/// than going through `half::bf16`, keeps even NaN payloads identical to ggml's.
fn bf16_to_f32(bytes: [u8; 2]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes(bytes)) << 16)
}

/// Q4_0: an f16 scale `d`, then 32 unsigned nibbles centred on 8, so x = (q - 8) * d.
fn decode_q4_0(block: &[u8; Q4_0_BYTES], out: &mut Vec<f32>) {
    let [d0, d1, qs @ ..] = block;
    let d = f16_to_f32([*d0, *d1]);
    // Byte j holds elements j (low nibble) and j + 16 (high nibble), so the low nibbles of all
    // bytes form the first half of the block and the high nibbles the second half.
    out.extend(qs.iter().map(|&q| f32::from(i16::from(q & 0x0f) - 8) * d));
    out.extend(qs.iter().map(|&q| f32::from(i16::from(q >> 4) - 8) * d));
}

/// Q4_1: an f16 scale `d` and an f16 minimum `m`, then 32 nibbles, so x = q * d + m.
fn decode_q4_1(block: &[u8; Q4_1_BYTES], out: &mut Vec<f32>) {
    let [d0, d1, m0, m1, qs @ ..] = block;
    let d = f16_to_f32([*d0, *d1]);
    let m = f16_to_f32([*m0, *m1]);
    // Same nibble order as Q4_0: low nibbles first, then high nibbles.
    out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
    out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
}

/// Q8_0: an f16 scale `d`, then 32 signed bytes, so x = q * d.
fn decode_q8_0(block: &[u8; Q8_0_BYTES], out: &mut Vec<f32>) {
    let [d0, d1, qs @ ..] = block;
    let d = f16_to_f32([*d0, *d1]);
    out.extend(qs.iter().map(|&q| f32::from(q.cast_signed()) * d));
}

/// Unpacks the eight 6-bit scales and eight 6-bit mins that Q4_K and Q5_K squeeze into
/// `K_SCALE_SIZE` bytes (ggml's `get_scale_min_k4`, for all eight sub-blocks at once).
///
/// Sub-blocks 0..4 keep their scale in the low six bits of bytes 0..4 and their min in the low
/// six bits of bytes 4..8. Sub-blocks 4..8 take their low four bits from bytes 8..12 (scale in
/// the low nibble, min in the high one) and their top two bits from the otherwise unused top
/// bits of bytes 0..4 (scales) and 4..8 (mins).
fn unpack_scales_mins_k4(packed: &[u8; K_SCALE_SIZE]) -> ([u8; 8], [u8; 8]) {
    let mut scales = [0; 8];
    let mut mins = [0; 8];
    for j in 0..4 {
        scales[j] = packed[j] & 0x3f;
        mins[j] = packed[j + 4] & 0x3f;
        scales[j + 4] = (packed[j + 8] & 0x0f) | ((packed[j] >> 6) << 4);
        mins[j + 4] = (packed[j + 8] >> 4) | ((packed[j + 4] >> 6) << 4);
    }
    (scales, mins)
}

/// The f16 super-block scale and min plus the packed sub-block scales that open Q4_K and Q5_K
/// blocks, resolved into one (scale, min) pair per 32-element sub-block. ggml computes
/// `d * sc` and `dmin * m` first and only then applies them to the quant; keeping that order
/// keeps the rounding identical.
fn k4_sub_block_params(header: &[u8; 2 * HALF + K_SCALE_SIZE]) -> [(f32, f32); 8] {
    let [d0, d1, m0, m1, packed @ ..] = header;
    let d = f16_to_f32([*d0, *d1]);
    let dmin = f16_to_f32([*m0, *m1]);
    let (scales, mins) = unpack_scales_mins_k4(packed);
    let mut params = [(0.0, 0.0); 8];
    for (p, (&sc, &m)) in params.iter_mut().zip(scales.iter().zip(&mins)) {
        *p = (d * f32::from(sc), dmin * f32::from(m));
    }
    params
}

/// Splits the leading `H`-byte field off a K-quant block (or off what remains of one). Callers
/// pass fixed-size blocks and field sizes from the same layout, so the field always fits and
/// the fallback is dead code: it is there so that even a wrong layout constant would show up
/// as wrong values in the tests rather than as a panic on a user's file.
fn split_front<const H: usize>(block: &[u8]) -> (&[u8; H], &[u8]) {
    const EMPTY: &[u8] = &[];
    match block.split_first_chunk::<H>() {
        Some((header, rest)) => (header, rest),
        None => (&[0; H], EMPTY),
    }
}

/// Q4_K: a super-block of 256 elements in eight sub-blocks of 32, each with its own 6-bit
/// scale and min, so x = (d * scale) * q - dmin * min with 4-bit unsigned q.
fn decode_q4_k(block: &[u8; Q4_K_BYTES], out: &mut Vec<f32>) {
    let (header, qs) = split_front::<{ 2 * HALF + K_SCALE_SIZE }>(block);
    let params = k4_sub_block_params(header);
    // Each 32-byte run of quants carries two consecutive sub-blocks: the first in the low
    // nibbles, the second in the high nibbles.
    let runs = qs.chunks_exact(QK).flat_map(|run| [(run, 0), (run, 4)]);
    for ((run, shift), &(scale, min)) in runs.zip(&params) {
        out.extend(
            run.iter()
                .map(|&q| scale * f32::from((q >> shift) & 0x0f) - min),
        );
    }
}

/// Q5_K: Q4_K with a fifth quant bit, so q runs over 0..32. The fifth bits sit in 32 bytes
/// `qh` ahead of the nibbles: bit `s` of `qh[l]` belongs to element `l` of sub-block `s`.
fn decode_q5_k(block: &[u8; Q5_K_BYTES], out: &mut Vec<f32>) {
    let (header, rest) = split_front::<{ 2 * HALF + K_SCALE_SIZE }>(block);
    let params = k4_sub_block_params(header);
    let (qh, qs) = split_front::<{ QK_K / 8 }>(rest);
    let runs = qs.chunks_exact(QK).flat_map(|run| [(run, 0), (run, 4)]);
    for (sub, ((run, shift), &(scale, min))) in runs.zip(&params).enumerate() {
        out.extend(run.iter().zip(qh).map(|(&q, &h)| {
            let high = ((h >> sub) & 1) << 4;
            scale * f32::from(((q >> shift) & 0x0f) | high) - min
        }));
    }
}

/// Q6_K: 256 elements in sixteen sub-blocks of 16, each with a signed 8-bit scale, and one f16
/// super-block scale stored last, so x = (d * scale) * (q - 32) with 6-bit unsigned q.
///
/// The quants come in two halves of 128 elements, each with 64 bytes of low nibbles `ql` and
/// 32 bytes of high bit pairs `qh`. Within a half, the four runs of 32 elements take their low
/// nibbles from ql[0..32] (low nibbles), ql[32..64] (low), ql[0..32] (high), ql[32..64] (high),
/// and their top two bits from bits 0-1, 2-3, 4-5 and 6-7 of qh[0..32].
fn decode_q6_k(block: &[u8; Q6_K_BYTES], out: &mut Vec<f32>) {
    let [rest @ .., d0, d1] = block;
    let d = f16_to_f32([*d0, *d1]);
    let (ql, rest) = split_front::<{ QK_K / 2 }>(rest);
    let (qh, scales) = split_front::<{ QK_K / 4 }>(rest);
    let halves = ql.chunks_exact(64).zip(qh.chunks_exact(32));
    let scales = scales.chunks_exact(8);
    for ((ql, qh), scales) in halves.zip(scales) {
        let low_runs = ql.chunks_exact(32).cycle();
        let runs = low_runs.zip([0, 0, 4, 4]).zip(scales.chunks_exact(2));
        for (run, ((low, low_shift), run_scales)) in runs.enumerate() {
            let high_shift = 2 * run;
            let quants = low.iter().zip(qh).map(|(&l, &h)| {
                let q = ((l >> low_shift) & 0x0f) | (((h >> high_shift) & 0x03) << 4);
                i16::from(q) - 32
            });
            // Two 16-element sub-blocks per 32-element run, each with its own scale.
            let sub_scales = run_scales.iter().flat_map(|&s| [s; 16]);
            out.extend(
                quants
                    .zip(sub_scales)
                    .map(|(q, s)| d * f32::from(s.cast_signed()) * f32::from(q)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit LCG (Knuth's MMIX constants): deterministic test data without extra crates.
    struct Lcg(u64);

    impl Lcg {
        fn next_u32(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 32) as u32
        }

        fn byte(&mut self) -> u8 {
            (self.next_u32() >> 24) as u8
        }

        fn below(&mut self, n: u32) -> u32 {
            self.next_u32() % n
        }

        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f32 {
            (self.next_u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        }
    }

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    /// The value an f32 takes once stored in a block header.
    fn via_f16(x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }

    const ALL: [GgmlType; 9] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::BF16,
    ];

    // ---- reference quantizers (ggml's quantize_row_*_ref) ----

    /// ggml's quantize_row_q4_0_ref: the signed value of largest magnitude maps to -8, so the
    /// scale may be negative.
    fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for block in x.chunks(QK) {
            let (mut amax, mut max) = (0.0f32, 0.0f32);
            for &v in block {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend(f16_bytes(d));
            let q = |v: f32| ((v * id + 8.5) as i8).min(15).cast_unsigned();
            let (first, second) = block.split_at(QK / 2);
            out.extend(first.iter().zip(second).map(|(&a, &b)| q(a) | (q(b) << 4)));
        }
        out
    }

    /// ggml's quantize_row_q4_1_ref.
    fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for block in x.chunks(QK) {
            let min = block.iter().fold(f32::MAX, |a, &v| a.min(v));
            let max = block.iter().fold(-f32::MAX, |a, &v| a.max(v));
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend(f16_bytes(d));
            out.extend(f16_bytes(min));
            let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15).cast_unsigned();
            let (first, second) = block.split_at(QK / 2);
            out.extend(first.iter().zip(second).map(|(&a, &b)| q(a) | (q(b) << 4)));
        }
        out
    }

    /// ggml's quantize_row_q8_0_ref.
    fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for block in x.chunks(QK) {
            let amax = block.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend(f16_bytes(d));
            out.extend(
                block
                    .iter()
                    .map(|&v| ((v * id).round() as i8).cast_unsigned()),
            );
        }
        out
    }

    // ---- K-quant block builders, written from the format description ----

    /// A Q4_K or Q5_K super-block before packing: one scale and min per 32 elements, and one
    /// unsigned quant per element (4 bits for Q4_K, 5 for Q5_K).
    struct K4Block {
        d: f32,
        dmin: f32,
        scales: [u8; 8],
        mins: [u8; 8],
        q: [u8; QK_K],
    }

    impl K4Block {
        fn random(rng: &mut Lcg, quant_bits: u32) -> K4Block {
            let mut b = K4Block {
                d: rng.unit() * 0.01,
                dmin: rng.unit() * 0.01,
                scales: [0; 8],
                mins: [0; 8],
                q: [0; QK_K],
            };
            b.scales.iter_mut().for_each(|s| *s = rng.below(64) as u8);
            b.mins.iter_mut().for_each(|m| *m = rng.below(64) as u8);
            b.q.iter_mut()
                .for_each(|q| *q = rng.below(1 << quant_bits) as u8);
            b
        }

        /// Scales and mins packed as ggml's quantize_row_q4_K_ref stores them.
        fn packed_scales(&self) -> [u8; K_SCALE_SIZE] {
            let mut p = [0u8; K_SCALE_SIZE];
            for j in 0..4 {
                let (hi_scale, hi_min) = (self.scales[j + 4], self.mins[j + 4]);
                p[j] = self.scales[j] | ((hi_scale >> 4) << 6);
                p[j + 4] = self.mins[j] | ((hi_min >> 4) << 6);
                p[j + 8] = (hi_scale & 0x0f) | ((hi_min & 0x0f) << 4);
            }
            p
        }

        /// Element e lies in sub-block e / 32; sub-blocks 2k and 2k + 1 share the 32 bytes at
        /// 32k, the first in the low nibbles.
        fn nibbles(&self) -> [u8; QK_K / 2] {
            let mut qs = [0u8; QK_K / 2];
            for (e, &q) in self.q.iter().enumerate() {
                qs[32 * (e / 64) + e % 32] |= (q & 0x0f) << (4 * (e / 32 % 2));
            }
            qs
        }

        fn header(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend(f16_bytes(self.d));
            out.extend(f16_bytes(self.dmin));
            out.extend(self.packed_scales());
            out
        }

        fn pack_q4_k(&self) -> Vec<u8> {
            let mut out = self.header();
            out.extend(self.nibbles());
            out
        }

        /// The fifth bit of element e is bit e / 32 of qh[e % 32].
        fn pack_q5_k(&self) -> Vec<u8> {
            let mut qh = [0u8; QK_K / 8];
            for (e, &q) in self.q.iter().enumerate() {
                qh[e % 32] |= ((q >> 4) & 1) << (e / 32);
            }
            let mut out = self.header();
            out.extend(qh);
            out.extend(self.nibbles());
            out
        }

        /// x = d * scale * q - dmin * min, with ggml's association.
        fn expected(&self) -> Vec<f32> {
            let (d, dmin) = (via_f16(self.d), via_f16(self.dmin));
            (0..QK_K)
                .map(|e| {
                    let sub = e / 32;
                    d * f32::from(self.scales[sub]) * f32::from(self.q[e])
                        - dmin * f32::from(self.mins[sub])
                })
                .collect()
        }
    }

    /// A Q6_K super-block before packing: a signed scale per 16 elements and an unsigned 6-bit
    /// quant per element (the value is q - 32).
    struct Q6Block {
        d: f32,
        scales: [i8; 16],
        q: [u8; QK_K],
    }

    impl Q6Block {
        fn random(rng: &mut Lcg) -> Q6Block {
            let mut b = Q6Block {
                d: rng.unit() * 0.01,
                scales: [0; 16],
                q: [0; QK_K],
            };
            b.scales
                .iter_mut()
                .for_each(|s| *s = rng.byte().cast_signed());
            b.q.iter_mut().for_each(|q| *q = rng.below(64) as u8);
            b
        }

        /// Element e sits in half h = e / 128 and run r = (e % 128) / 32 at position l = e % 32.
        /// Its low nibble goes into ql[64h + 32(r % 2) + l] (high nibble of that byte when
        /// r >= 2), its top two bits into bits 2r..2r+2 of qh[32h + l].
        fn pack(&self) -> Vec<u8> {
            let mut ql = [0u8; QK_K / 2];
            let mut qh = [0u8; QK_K / 4];
            for (e, &q) in self.q.iter().enumerate() {
                let (h, r, l) = (e / 128, e % 128 / 32, e % 32);
                ql[64 * h + 32 * (r % 2) + l] |= (q & 0x0f) << (4 * (r / 2));
                qh[32 * h + l] |= (q >> 4) << (2 * r);
            }
            let mut out = Vec::new();
            out.extend(ql);
            out.extend(qh);
            out.extend(self.scales.map(i8::cast_unsigned));
            out.extend(f16_bytes(self.d));
            out
        }

        fn expected(&self) -> Vec<f32> {
            let d = via_f16(self.d);
            (0..QK_K)
                .map(|e| d * f32::from(self.scales[e / 16]) * f32::from(i16::from(self.q[e]) - 32))
                .collect()
        }
    }

    fn assert_bits_eq(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "element {i}: got {g}, want {w}");
        }
    }

    // ---- types and sizes ----

    #[test]
    fn type_ids_names_and_block_sizes_follow_ggml() {
        let table = [
            (0, GgmlType::F32, "F32", 1, 4),
            (1, GgmlType::F16, "F16", 1, 2),
            (2, GgmlType::Q4_0, "Q4_0", 32, 18),
            (3, GgmlType::Q4_1, "Q4_1", 32, 20),
            (8, GgmlType::Q8_0, "Q8_0", 32, 34),
            (12, GgmlType::Q4K, "Q4_K", 256, 144),
            (13, GgmlType::Q5K, "Q5_K", 256, 176),
            (14, GgmlType::Q6K, "Q6_K", 256, 210),
            (30, GgmlType::BF16, "BF16", 1, 2),
        ];
        for (id, ty, name, elems, bytes) in table {
            assert_eq!(GgmlType::from_id(id), Some(ty));
            assert_eq!(ty.name(), name);
            assert_eq!(ty.to_string(), name);
            assert_eq!(ty.block_elems(), elems, "{name}");
            assert_eq!(ty.block_bytes(), bytes, "{name}");
        }
        // Real ggml types this module does not decode, removed ids, and junk.
        for id in [
            4,
            5,
            6,
            7,
            9,
            10,
            11,
            15,
            16,
            24,
            28,
            29,
            31,
            39,
            40,
            1000,
            u32::MAX,
        ] {
            assert_eq!(GgmlType::from_id(id), None, "id {id}");
        }
    }

    #[test]
    fn bytes_for_counts_whole_blocks_and_rejects_partial_ones_and_overflow() {
        assert_eq!(GgmlType::F32.bytes_for(3), Ok(12));
        assert_eq!(GgmlType::BF16.bytes_for(5), Ok(10));
        assert_eq!(GgmlType::Q4_0.bytes_for(64), Ok(36));
        assert_eq!(GgmlType::Q6K.bytes_for(512), Ok(420));
        assert_eq!(GgmlType::Q4K.bytes_for(0), Ok(0));
        assert_eq!(
            GgmlType::Q4_1.bytes_for(33),
            Err(DequantError::PartialBlock {
                ty: GgmlType::Q4_1,
                n: 33,
                block_elems: 32
            })
        );
        assert!(matches!(
            GgmlType::Q5K.bytes_for(255),
            Err(DequantError::PartialBlock { .. })
        ));
        assert_eq!(
            GgmlType::F32.bytes_for(usize::MAX),
            Err(DequantError::Overflow {
                ty: GgmlType::F32,
                n: usize::MAX
            })
        );
        let whole_q8_blocks = usize::MAX - usize::MAX % 32;
        assert!(matches!(
            GgmlType::Q8_0.bytes_for(whole_q8_blocks),
            Err(DequantError::Overflow { .. })
        ));
    }

    // ---- plain floats ----

    #[test]
    fn f32_f16_and_bf16_decode_exactly() {
        let f32_values = [1.5f32, -0.0, f32::INFINITY, f32::from_bits(1), -3.25e38];
        let bytes: Vec<u8> = f32_values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_bits_eq(&dequantize(GgmlType::F32, &bytes, 5).unwrap(), &f32_values);

        // (bits, value) pairs straight from the IEEE half layout.
        let f16_cases: [(u16, f32); 6] = [
            (0x3c00, 1.0),
            (0xc000, -2.0),
            (0x7bff, 65504.0),
            (0x0001, 2f32.powi(-24)),
            (0x3555, 0.333_251_95),
            (0xfc00, f32::NEG_INFINITY),
        ];
        let bytes: Vec<u8> = f16_cases.iter().flat_map(|c| c.0.to_le_bytes()).collect();
        let want: Vec<f32> = f16_cases.iter().map(|c| c.1).collect();
        assert_bits_eq(&dequantize(GgmlType::F16, &bytes, 6).unwrap(), &want);

        // bf16 is the top half of an f32, so every pattern, NaN payloads included, must
        // come back unchanged in the high 16 bits with zeros below.
        let bf16_cases: [(u16, f32); 5] = [
            (0x3f80, 1.0),
            (0xc0a0, -5.0),
            (0x7f7f, 3.389_531_4e38),
            (0x0001, f32::from_bits(0x0001_0000)),
            (0x4049, 3.140_625),
        ];
        let bytes: Vec<u8> = bf16_cases.iter().flat_map(|c| c.0.to_le_bytes()).collect();
        let want: Vec<f32> = bf16_cases.iter().map(|c| c.1).collect();
        assert_bits_eq(&dequantize(GgmlType::BF16, &bytes, 5).unwrap(), &want);
        let nan = dequantize(GgmlType::BF16, &0x7f81u16.to_le_bytes(), 1).unwrap();
        assert_eq!(nan[0].to_bits(), 0x7f81_0000);
    }

    // ---- Q4_0 / Q4_1 / Q8_0 ----

    #[test]
    fn q4_0_known_block() {
        // d = 0.5; byte j holds q = j for element j and q = 15 - j for element j + 16.
        let mut block = f16_bytes(0.5).to_vec();
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let got = dequantize(GgmlType::Q4_0, &block, 32).unwrap();
        assert_eq!(got[0], -4.0);
        assert_eq!(got[8], 0.0);
        assert_eq!(got[15], 3.5);
        assert_eq!(got[16], 3.5);
        assert_eq!(got[31], -4.0);
        let want: Vec<f32> = (0..16)
            .map(|j| (j as f32 - 8.0) * 0.5)
            .chain((0..16).map(|j| (7.0 - j as f32) * 0.5))
            .collect();
        assert_bits_eq(&got, &want);
    }

    #[test]
    fn q4_1_known_block() {
        // d = 0.25, m = -1.5; element j has q = 2j mod 16, element j + 16 has q = 15 - j.
        let mut block = f16_bytes(0.25).to_vec();
        block.extend(f16_bytes(-1.5));
        block.extend((0..16u8).map(|j| ((2 * j) % 16) | ((15 - j) << 4)));
        let got = dequantize(GgmlType::Q4_1, &block, 32).unwrap();
        assert_eq!(got[0], -1.5);
        assert_eq!(got[7], 2.0);
        assert_eq!(got[16], 2.25);
        assert_eq!(got[31], -1.5);
        let want: Vec<f32> = (0..16)
            .map(|j| ((2 * j) % 16) as f32 * 0.25 - 1.5)
            .chain((0..16).map(|j| (15 - j) as f32 * 0.25 - 1.5))
            .collect();
        assert_bits_eq(&got, &want);
    }

    #[test]
    fn q8_0_known_block() {
        // d = 0.125; element j holds 8j - 128 as a signed byte, covering -128..=120.
        let mut block = f16_bytes(0.125).to_vec();
        block.extend((0..32).map(|j: i32| ((8 * j - 128) as i8).cast_unsigned()));
        let got = dequantize(GgmlType::Q8_0, &block, 32).unwrap();
        assert_eq!(got[0], -16.0);
        assert_eq!(got[16], 0.0);
        assert_eq!(got[31], 15.0);
        let want: Vec<f32> = (0..32).map(|j| (8 * j - 128) as f32 * 0.125).collect();
        assert_bits_eq(&got, &want);
    }

    #[test]
    fn legacy_formats_decode_each_block_with_its_own_header() {
        // Three blocks with constant quants but different scales: a decoder that reused one
        // header or misaligned blocks would mix the values up.
        let scales = [1.0f32, -2.0, 0.5];
        let mut q4_0 = Vec::new();
        let mut q4_1 = Vec::new();
        let mut q8_0 = Vec::new();
        for (i, &d) in scales.iter().enumerate() {
            q4_0.extend(f16_bytes(d));
            q4_0.extend([0x9a; 16]); // q = 10 (first half), 9 (second half)
            q4_1.extend(f16_bytes(d));
            q4_1.extend(f16_bytes(i as f32));
            q4_1.extend([0x31; 16]); // q = 1, then 3
            q8_0.extend(f16_bytes(d));
            q8_0.extend([(-3i8).cast_unsigned(); 32]);
        }
        let q4_0 = dequantize(GgmlType::Q4_0, &q4_0, 96).unwrap();
        let q4_1 = dequantize(GgmlType::Q4_1, &q4_1, 96).unwrap();
        let q8_0 = dequantize(GgmlType::Q8_0, &q8_0, 96).unwrap();
        for (i, &d) in scales.iter().enumerate() {
            for j in 0..32 {
                let e = 32 * i + j;
                let (q4, q1) = if j < 16 { (2.0, 1.0) } else { (1.0, 3.0) };
                assert_eq!(q4_0[e], q4 * d, "Q4_0 element {e}");
                assert_eq!(q4_1[e], q1 * d + i as f32, "Q4_1 element {e}");
                assert_eq!(q8_0[e], -3.0 * d, "Q8_0 element {e}");
            }
        }
    }

    /// Random blocks whose magnitudes vary a lot from block to block, so each block's scale
    /// matters.
    fn random_blocks(rng: &mut Lcg, blocks: usize) -> Vec<f32> {
        let mut x = Vec::new();
        for b in 0..blocks {
            let magnitude = 10f32.powi(b as i32 % 7 - 3);
            x.extend((0..QK).map(|_| rng.unit() * magnitude));
        }
        x
    }

    #[test]
    fn q8_0_round_trip_stays_within_half_a_step() {
        let mut rng = Lcg(1);
        let x = random_blocks(&mut rng, 70);
        let got = dequantize(GgmlType::Q8_0, &quantize_q8_0(&x), x.len()).unwrap();
        for (block, out) in x.chunks(QK).zip(got.chunks(QK)) {
            let d = block.iter().fold(0.0f32, |a, &v| a.max(v.abs())) / 127.0;
            // Half a quantization step, plus up to |q| <= 127 times the error of storing d
            // as f16.
            let tol = 0.5 * d + 127.0 * (d - via_f16(d)).abs() + 1e-7 * d;
            for (&v, &y) in block.iter().zip(out) {
                assert!((v - y).abs() <= tol, "{v} -> {y}, tolerance {tol}");
            }
        }
    }

    #[test]
    fn q4_0_round_trip_stays_within_half_a_step() {
        let mut rng = Lcg(2);
        let x = random_blocks(&mut rng, 70);
        let got = dequantize(GgmlType::Q4_0, &quantize_q4_0(&x), x.len()).unwrap();
        for (block, out) in x.chunks(QK).zip(got.chunks(QK)) {
            let max = block
                .iter()
                .fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
            let d = max / -8.0;
            let f16_error = 8.0 * (d - via_f16(d)).abs();
            for (&v, &y) in block.iter().zip(out) {
                // The grid runs from -8d to 7d, so values near -max (grid point +8) get
                // clipped to 7d and may be off by a whole step.
                let steps = if v / d > 7.5 { 1.0 } else { 0.5 };
                let tol = steps * d.abs() + f16_error + 1e-6 * d.abs();
                assert!((v - y).abs() <= tol, "{v} -> {y}, tolerance {tol}");
            }
            // The extreme value is reproduced up to the f16 rounding of d.
            let at_max = block.iter().position(|&v| v == max).unwrap();
            assert!((out[at_max] - max).abs() <= f16_error + 1e-6 * max.abs());
        }
    }

    #[test]
    fn q4_1_round_trip_stays_within_half_a_step() {
        let mut rng = Lcg(3);
        let mut x = random_blocks(&mut rng, 70);
        // An offset block exercises the minimum: all its values are far from zero.
        x.extend((0..QK).map(|_| 100.0 + rng.unit()));
        let got = dequantize(GgmlType::Q4_1, &quantize_q4_1(&x), x.len()).unwrap();
        for (block, out) in x.chunks(QK).zip(got.chunks(QK)) {
            let min = block.iter().fold(f32::MAX, |a, &v| a.min(v));
            let max = block.iter().fold(-f32::MAX, |a, &v| a.max(v));
            let d = (max - min) / 15.0;
            let tol = 0.5 * d
                + 15.0 * (d - via_f16(d)).abs()
                + (min - via_f16(min)).abs()
                + 1e-6 * max.abs().max(min.abs());
            for (&v, &y) in block.iter().zip(out) {
                assert!((v - y).abs() <= tol, "{v} -> {y}, tolerance {tol}");
            }
        }
    }

    // ---- K-quants ----

    /// Scales and mins chosen to cover both packing paths of the 6-bit fields: sub-blocks 0..4
    /// and 4..8, values below 16 and values needing the top two bits.
    const K_SCALES: [u8; 8] = [1, 17, 33, 63, 5, 20, 48, 62];
    const K_MINS: [u8; 8] = [0, 1, 16, 63, 2, 31, 32, 47];

    #[test]
    fn q4_k_known_block() {
        let mut q = [0u8; QK_K];
        // Vary the pattern per sub-block so swapped nibbles or sub-blocks change the result.
        q.iter_mut()
            .enumerate()
            .for_each(|(e, q)| *q = ((e + e / 32) % 16) as u8);
        let block = K4Block {
            d: 1.0,
            dmin: 0.5,
            scales: K_SCALES,
            mins: K_MINS,
            q,
        };
        let got = dequantize(GgmlType::Q4K, &block.pack_q4_k(), QK_K).unwrap();
        // x = scale * q - 0.5 * min, worked out by hand for a few elements.
        assert_eq!(got[0], 0.0); // sub 0: q 0
        assert_eq!(got[33], 33.5); // sub 1: 17 * 2 - 0.5
        assert_eq!(got[42], 186.5); // sub 1: 17 * 11 - 0.5
        assert_eq!(got[127], 94.5); // sub 3: 63 * 2 - 31.5
        assert_eq!(got[160], 84.5); // sub 5: 20 * 5 - 15.5
        assert_eq!(got[255], 348.5); // sub 7: 62 * 6 - 23.5
        assert_bits_eq(&got, &block.expected());
    }

    #[test]
    fn q5_k_known_block() {
        let mut q = [0u8; QK_K];
        q.iter_mut()
            .enumerate()
            .for_each(|(e, q)| *q = ((3 * e + e / 32) % 32) as u8);
        let block = K4Block {
            d: 1.0,
            dmin: 0.5,
            scales: K_SCALES,
            mins: K_MINS,
            q,
        };
        let got = dequantize(GgmlType::Q5K, &block.pack_q5_k(), QK_K).unwrap();
        assert_eq!(got[0], 0.0); // sub 0: q 0
        assert_eq!(got[33], 67.5); // sub 1: 17 * 4 - 0.5
        assert_eq!(got[42], 526.5); // sub 1: 17 * 31 - 0.5 (fifth bit set)
        assert_eq!(got[127], -31.5); // sub 3: 63 * 0 - 31.5
        assert_eq!(got[160], 84.5); // sub 5: 20 * 5 - 15.5
        assert_eq!(got[255], 224.5); // sub 7: 62 * 4 - 23.5
        assert_bits_eq(&got, &block.expected());
    }

    #[test]
    fn q6_k_known_block() {
        let scales = [1, -1, 2, -2, 3, -3, 4, -4, 127, -128, 5, -5, 6, -6, 7, -7];
        let mut q = [0u8; QK_K];
        q.iter_mut()
            .enumerate()
            .for_each(|(e, q)| *q = ((5 * e + e / 16) % 64) as u8);
        let block = Q6Block { d: 0.5, scales, q };
        let got = dequantize(GgmlType::Q6K, &block.pack(), QK_K).unwrap();
        // x = 0.5 * scale * (q - 32), worked out by hand for a few elements.
        assert_eq!(got[0], -16.0); // sub 0: scale 1, q 0
        assert_eq!(got[17], 5.0); // sub 1: scale -1, q 22
        assert_eq!(got[130], -889.0); // sub 8: scale 127, q 18
        assert_eq!(got[150], -1472.0); // sub 9: scale -128, q 55
        assert_eq!(got[200], 60.0); // sub 12: scale 6, q 52
        assert_eq!(got[255], 77.0); // sub 15: scale -7, q 10
        assert_bits_eq(&got, &block.expected());
    }

    #[test]
    fn k_quants_match_the_per_element_formula_over_many_random_blocks() {
        let mut rng = Lcg(4);
        let blocks = 5;

        let q4: Vec<K4Block> = (0..blocks).map(|_| K4Block::random(&mut rng, 4)).collect();
        let data: Vec<u8> = q4.iter().flat_map(K4Block::pack_q4_k).collect();
        let want: Vec<f32> = q4.iter().flat_map(K4Block::expected).collect();
        assert_bits_eq(
            &dequantize(GgmlType::Q4K, &data, blocks * QK_K).unwrap(),
            &want,
        );

        let q5: Vec<K4Block> = (0..blocks).map(|_| K4Block::random(&mut rng, 5)).collect();
        let data: Vec<u8> = q5.iter().flat_map(K4Block::pack_q5_k).collect();
        let want: Vec<f32> = q5.iter().flat_map(K4Block::expected).collect();
        assert_bits_eq(
            &dequantize(GgmlType::Q5K, &data, blocks * QK_K).unwrap(),
            &want,
        );

        let q6: Vec<Q6Block> = (0..blocks).map(|_| Q6Block::random(&mut rng)).collect();
        let data: Vec<u8> = q6.iter().flat_map(Q6Block::pack).collect();
        let want: Vec<f32> = q6.iter().flat_map(Q6Block::expected).collect();
        assert_bits_eq(
            &dequantize(GgmlType::Q6K, &data, blocks * QK_K).unwrap(),
            &want,
        );
    }

    // ---- malformed input ----

    #[test]
    fn wrong_lengths_are_errors_not_panics() {
        for ty in ALL {
            let n = 3 * ty.block_elems();
            let good = ty.bytes_for(n).unwrap();
            let data = vec![0u8; good + 1];
            for len in [0, 1, good - 1, good + 1] {
                assert_eq!(
                    dequantize(ty, &data[..len], n),
                    Err(DequantError::LengthMismatch {
                        ty,
                        n,
                        expected: good,
                        got: len
                    }),
                    "{ty}, {len} bytes"
                );
            }
            assert_eq!(dequantize(ty, &data[..good], n).map(|v| v.len()), Ok(n));
            assert!(matches!(
                dequantize(ty, &data, usize::MAX),
                Err(DequantError::Overflow { .. } | DequantError::PartialBlock { .. })
            ));
            if ty.block_elems() > 1 {
                assert!(matches!(
                    dequantize(ty, &data[..good], n - 1),
                    Err(DequantError::PartialBlock { .. })
                ));
            }
        }
    }

    #[test]
    fn error_messages_name_both_sides_of_the_mismatch() {
        let msg = dequantize(GgmlType::Q4K, &[0; 100], 256)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("Q4_K") && msg.contains("144") && msg.contains("100"),
            "{msg}"
        );
        let msg = GgmlType::Q8_0.bytes_for(40).unwrap_err().to_string();
        assert!(
            msg.contains("Q8_0") && msg.contains("40") && msg.contains("32"),
            "{msg}"
        );
    }

    #[test]
    fn arbitrary_bytes_decode_to_the_right_length_without_panicking() {
        let mut rng = Lcg(5);
        for ty in ALL {
            for blocks in [0, 1, 2, 7] {
                let n = blocks * ty.block_elems();
                let data: Vec<u8> = (0..ty.bytes_for(n).unwrap()).map(|_| rng.byte()).collect();
                assert_eq!(dequantize(ty, &data, n).unwrap().len(), n, "{ty}");
            }
        }
    }
}
