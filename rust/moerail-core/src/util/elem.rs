//! Element types the ops accept, and the precision they compute in.
//!
//! Half types compute in f32 and round once at the end (as Megatron's router and
//! TransformerEngine's unpermute do); f64 computes in f64 so gradients can be checked in f64.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use num_traits::Float;

/// The float traits the kernels need in scope.
pub mod prelude {
    pub use super::{Element, Real};
    pub use num_traits::{Float, One, Zero};
}

/// The accumulation type: f32 or f64.
pub trait Real: Float + Default + Send + Sync + std::iter::Sum + std::fmt::Debug + 'static {
    fn of_f64(v: f64) -> Self;
    fn into_f64(self) -> f64;
    /// `v[i] = exp(v[i])`: vectorised for f32 (see `fastmath`), libm for f64.
    fn exp_in_place(v: &mut [Self]);
    /// Maximum (no NaN, non-empty).
    fn max_of(v: &[Self]) -> Self;

    /// Sum of `v` in eight fixed lanes, combined pairwise: vectorisable, and the same bits on
    /// every machine and thread count (the lane count does not depend on the instruction set).
    #[inline]
    fn sum_lanes(v: &[Self]) -> Self {
        let mut lanes = [Self::zero(); 8];
        let mut chunks = v.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                lanes[l] = lanes[l] + c[l];
            }
        }
        for (l, &x) in chunks.remainder().iter().enumerate() {
            lanes[l] = lanes[l] + x;
        }
        ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
            + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
    }

    /// `sum_i a[i] * b[i]` with the lanes of [`Real::sum_lanes`].
    #[inline]
    fn dot_lanes(a: &[Self], b: &[Self]) -> Self {
        let mut lanes = [Self::zero(); 8];
        let mut ca = a.chunks_exact(8);
        let mut cb = b.chunks_exact(8);
        for (x, y) in (&mut ca).zip(&mut cb) {
            for l in 0..8 {
                lanes[l] = lanes[l] + x[l] * y[l];
            }
        }
        for (l, (&x, &y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
            lanes[l] = lanes[l] + x * y;
        }
        ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
            + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
    }
    /// Top-`k` (descending, ties to the lower index) by block argmax; see `fastmath`.
    fn topk_blocks(
        scores: &[Self],
        k: usize,
        work: &mut Vec<Self>,
        block_max: &mut Vec<Self>,
        vals: &mut [Self],
        idx: &mut [usize],
    );
}

impl Real for f32 {
    #[inline(always)]
    fn of_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn into_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn exp_in_place(v: &mut [f32]) {
        crate::util::fastmath::exp_in_place_f32(v);
    }
    #[inline]
    fn max_of(v: &[f32]) -> f32 {
        crate::util::fastmath::max_f32(v)
    }
    #[inline]
    fn topk_blocks(
        scores: &[f32],
        k: usize,
        work: &mut Vec<f32>,
        block_max: &mut Vec<f32>,
        vals: &mut [f32],
        idx: &mut [usize],
    ) {
        crate::util::fastmath::topk_blocks_f32(scores, k, work, block_max, vals, idx)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn of_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn into_f64(self) -> f64 {
        self
    }
    #[inline]
    fn exp_in_place(v: &mut [f64]) {
        v.iter_mut().for_each(|x| *x = x.exp());
    }
    #[inline]
    fn max_of(v: &[f64]) -> f64 {
        crate::util::fastmath::max_scalar(v)
    }
    #[inline]
    fn topk_blocks(
        scores: &[f64],
        k: usize,
        work: &mut Vec<f64>,
        block_max: &mut Vec<f64>,
        vals: &mut [f64],
        idx: &mut [usize],
    ) {
        crate::util::fastmath::topk_blocks_scalar(scores, k, work, block_max, vals, idx)
    }
}

/// A tensor element type: f32, f64, bf16 or f16.
pub trait Element: Copy + Default + Send + Sync + 'static {
    type Acc: Real;
    const NAME: &'static str;
    fn to_acc(self) -> Self::Acc;
    fn from_acc(v: Self::Acc) -> Self;

    /// `dst[i] = src[i]` widened; slices have equal length.
    #[inline]
    fn load_row(src: &[Self], dst: &mut [Self::Acc]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_acc();
        }
    }

    /// `dst[i] = src[i]` rounded once; slices have equal length.
    #[inline]
    fn store_row(src: &[Self::Acc], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::from_acc(*s);
        }
    }

    /// `acc[i] = 0 + row[i] * w` (`w = None`: `0 + row[i]`): the first term of a sum that
    /// starts from +0.0, as a scatter-add into zeros does (so -0.0 becomes +0.0).
    #[inline]
    fn start_sum(acc: &mut [Self::Acc], row: &[Self], w: Option<Self::Acc>) {
        acc.fill(<Self::Acc as num_traits::Zero>::zero());
        match w {
            Some(w) => Self::accumulate_scaled(acc, row, w),
            None => Self::accumulate(acc, row),
        }
    }

    /// `acc[i] += row[i]` (widened).
    #[inline]
    fn accumulate(acc: &mut [Self::Acc], row: &[Self]) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a = *a + v.to_acc();
        }
    }

    /// `acc[i] += row[i] * w`: a rounded product, then a rounded sum (never fused), as
    /// PyTorch's `tokens * probs` followed by `scatter_add_` computes it.
    #[inline]
    fn accumulate_scaled(acc: &mut [Self::Acc], row: &[Self], w: Self::Acc) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a = *a + v.to_acc() * w;
        }
    }
}

impl Element for f32 {
    type Acc = f32;
    const NAME: &'static str = "float32";
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_acc(v: f32) -> Self {
        v
    }
    #[inline]
    fn load_row(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline]
    fn store_row(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Element for f64 {
    type Acc = f64;
    const NAME: &'static str = "float64";
    #[inline(always)]
    fn to_acc(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_acc(v: f64) -> Self {
        v
    }
    #[inline]
    fn load_row(src: &[f64], dst: &mut [f64]) {
        dst.copy_from_slice(src);
    }
    #[inline]
    fn store_row(src: &[f64], dst: &mut [f64]) {
        dst.copy_from_slice(src);
    }
}

/// f32 -> bf16 exactly as PyTorch rounds (`c10::BFloat16`): nearest-even, NaN -> 0x7FC0.
#[inline(always)]
pub fn bf16_from_f32(v: f32) -> bf16 {
    if v.is_nan() {
        return bf16::from_bits(0x7FC0);
    }
    let u = v.to_bits();
    let bias = 0x7FFF + ((u >> 16) & 1);
    bf16::from_bits((u.wrapping_add(bias) >> 16) as u16)
}

/// bf16 -> f32 is exact: the bf16 bits are the top half of the f32.
#[inline(always)]
pub fn bf16_to_f32(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

impl Element for bf16 {
    type Acc = f32;
    const NAME: &'static str = "bfloat16";
    #[inline(always)]
    fn to_acc(self) -> f32 {
        bf16_to_f32(self)
    }
    #[inline(always)]
    fn from_acc(v: f32) -> Self {
        bf16_from_f32(v)
    }
    #[inline]
    fn load_row(src: &[bf16], dst: &mut [f32]) {
        bf16_rows::combine(dst, src, bf16_rows::Op::Load);
    }
    #[inline]
    fn start_sum(acc: &mut [f32], row: &[bf16], w: Option<f32>) {
        let op = match w {
            Some(w) => bf16_rows::Op::StartScaled(w),
            None => bf16_rows::Op::Start,
        };
        bf16_rows::combine(acc, row, op);
    }
    #[inline]
    fn accumulate(acc: &mut [f32], row: &[bf16]) {
        bf16_rows::combine(acc, row, bf16_rows::Op::Add);
    }
    #[inline]
    fn accumulate_scaled(acc: &mut [f32], row: &[bf16], w: f32) {
        bf16_rows::combine(acc, row, bf16_rows::Op::AddScaled(w));
    }
    #[inline]
    fn store_row(src: &[f32], dst: &mut [bf16]) {
        bf16_rows::store(src, dst);
    }
}

/// bf16 row kernels with SSE2 (part of x86-64): the compiler does not vectorise the
/// widening and the rounding well. Same integer and IEEE operations as the scalar
/// `bf16_to_f32` / `bf16_from_f32`, so the same bits.
mod bf16_rows {
    use super::{bf16_from_f32, bf16_to_f32};
    use half::bf16;

    #[derive(Clone, Copy)]
    pub enum Op {
        Load,
        /// `0 + x`
        Start,
        /// `0 + x * w`
        StartScaled(f32),
        Add,
        AddScaled(f32),
    }

    #[inline(always)]
    fn scalar(a: &mut f32, x: bf16, op: Op) {
        let v = bf16_to_f32(x);
        *a = match op {
            Op::Load => v,
            Op::Start => 0.0 + v,
            Op::StartScaled(w) => 0.0 + v * w,
            Op::Add => *a + v,
            Op::AddScaled(w) => *a + v * w,
        };
    }

    /// `acc[i] (op) row[i]`; equal lengths.
    #[inline]
    pub fn combine(acc: &mut [f32], row: &[bf16], op: Op) {
        let n = acc.len().min(row.len());
        let mut i = 0;
        #[cfg(target_arch = "x86_64")]
        if n >= 16 && std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present.
            i = unsafe { combine_avx2(&mut acc[..n], &row[..n], op) };
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: 8 elements are read/written at i with i + 8 <= n, in both slices.
        unsafe {
            use std::arch::x86_64::*;
            let z = _mm_setzero_si128();
            let (a, r) = (acc.as_mut_ptr(), row.as_ptr() as *const u16);
            while i + 8 <= n {
                let v = _mm_loadu_si128(r.add(i) as *const __m128i);
                let lo = _mm_castsi128_ps(_mm_unpacklo_epi16(z, v));
                let hi = _mm_castsi128_ps(_mm_unpackhi_epi16(z, v));
                let (lo, hi) = match op {
                    Op::Load => (lo, hi),
                    Op::Start => {
                        let zero = _mm_setzero_ps();
                        (_mm_add_ps(zero, lo), _mm_add_ps(zero, hi))
                    }
                    Op::StartScaled(w) => {
                        let (zero, w) = (_mm_setzero_ps(), _mm_set1_ps(w));
                        (
                            _mm_add_ps(zero, _mm_mul_ps(lo, w)),
                            _mm_add_ps(zero, _mm_mul_ps(hi, w)),
                        )
                    }
                    Op::Add => (
                        _mm_add_ps(_mm_loadu_ps(a.add(i)), lo),
                        _mm_add_ps(_mm_loadu_ps(a.add(i + 4)), hi),
                    ),
                    Op::AddScaled(w) => {
                        let w = _mm_set1_ps(w);
                        (
                            _mm_add_ps(_mm_loadu_ps(a.add(i)), _mm_mul_ps(lo, w)),
                            _mm_add_ps(_mm_loadu_ps(a.add(i + 4)), _mm_mul_ps(hi, w)),
                        )
                    }
                };
                _mm_storeu_ps(a.add(i), lo);
                _mm_storeu_ps(a.add(i + 4), hi);
                i += 8;
            }
        }
        for j in i..n {
            scalar(&mut acc[j], row[j], op);
        }
    }

    /// `dst[i] = round_to_bf16(src[i])`; equal lengths.
    #[inline]
    pub fn store(src: &[f32], dst: &mut [bf16]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        #[cfg(target_arch = "x86_64")]
        if n >= 16 && std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present.
            i = unsafe { store_avx2(&src[..n], &mut dst[..n]) };
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: 8 elements are read/written at i with i + 8 <= n, in both slices.
        unsafe {
            use std::arch::x86_64::*;
            let (s, d) = (src.as_ptr(), dst.as_mut_ptr() as *mut u16);
            let round = _mm_set1_epi32(0x7FFF);
            let one = _mm_set1_epi32(1);
            let qnan = _mm_set1_epi32(0x7FC0);
            #[inline(always)]
            unsafe fn half(x: __m128, round: __m128i, one: __m128i, qnan: __m128i) -> __m128i {
                let bits = _mm_castps_si128(x);
                let lsb = _mm_and_si128(_mm_srli_epi32(bits, 16), one);
                // Sign-extending shift so that the signed pack below keeps the low 16 bits.
                let r = _mm_srai_epi32(_mm_add_epi32(bits, _mm_add_epi32(round, lsb)), 16);
                let nan = _mm_castps_si128(_mm_cmpunord_ps(x, x));
                _mm_or_si128(_mm_and_si128(nan, qnan), _mm_andnot_si128(nan, r))
            }
            while i + 8 <= n {
                let a = half(_mm_loadu_ps(s.add(i)), round, one, qnan);
                let b = half(_mm_loadu_ps(s.add(i + 4)), round, one, qnan);
                _mm_storeu_si128(d.add(i) as *mut __m128i, _mm_packs_epi32(a, b));
                i += 8;
            }
        }
        for j in i..n {
            dst[j] = bf16_from_f32(src[j]);
        }
    }

    /// The AVX2 form of [`combine`] (8 lanes a step); returns how many elements it did.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn combine_avx2(acc: &mut [f32], row: &[bf16], op: Op) -> usize {
        use std::arch::x86_64::*;
        let n = acc.len();
        let (a, r) = (acc.as_mut_ptr(), row.as_ptr() as *const u16);
        let mut i = 0;
        while i + 8 <= n {
            // Zero-extend 8 u16 to u32 and shift into the high half: the f32 of each bf16.
            let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(r.add(i) as *const __m128i));
            let x = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            let y = match op {
                Op::Load => x,
                Op::Start => _mm256_add_ps(_mm256_setzero_ps(), x),
                Op::StartScaled(w) => {
                    _mm256_add_ps(_mm256_setzero_ps(), _mm256_mul_ps(x, _mm256_set1_ps(w)))
                }
                Op::Add => _mm256_add_ps(_mm256_loadu_ps(a.add(i)), x),
                Op::AddScaled(w) => _mm256_add_ps(
                    _mm256_loadu_ps(a.add(i)),
                    _mm256_mul_ps(x, _mm256_set1_ps(w)),
                ),
            };
            _mm256_storeu_ps(a.add(i), y);
            i += 8;
        }
        i
    }

    /// The AVX2 form of [`store`]; returns how many elements it did.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn store_avx2(src: &[f32], dst: &mut [bf16]) -> usize {
        use std::arch::x86_64::*;
        let n = src.len();
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr() as *mut u16);
        let round = _mm256_set1_epi32(0x7FFF);
        let one = _mm256_set1_epi32(1);
        let qnan = _mm256_set1_epi32(0x7FC0);
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_loadu_ps(s.add(i));
            let bits = _mm256_castps_si256(x);
            let lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
            let r = _mm256_srai_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(round, lsb)), 16);
            let nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
            let r = _mm256_blendv_epi8(r, qnan, nan);
            // Pack the two 128-bit halves in order (a 256-bit pack would interleave them).
            let packed = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
            _mm_storeu_si128(d.add(i) as *mut __m128i, packed);
            i += 8;
        }
        i
    }
}

impl Element for f16 {
    type Acc = f32;
    const NAME: &'static str = "float16";
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(v: f32) -> Self {
        f16::from_f32(v)
    }
    // half's slice conversions detect F16C once per call instead of once per element.
    #[inline]
    fn load_row(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    #[inline]
    fn store_row(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
    #[inline]
    fn accumulate(acc: &mut [f32], row: &[f16]) {
        let mut buf = [0f32; 256];
        for (a, r) in acc.chunks_mut(256).zip(row.chunks(256)) {
            let b = &mut buf[..r.len()];
            r.convert_to_f32_slice(b);
            for (x, &v) in a.iter_mut().zip(b.iter()) {
                *x += v;
            }
        }
    }
    #[inline]
    fn accumulate_scaled(acc: &mut [f32], row: &[f16], w: f32) {
        let mut buf = [0f32; 256];
        for (a, r) in acc.chunks_mut(256).zip(row.chunks(256)) {
            let b = &mut buf[..r.len()];
            r.convert_to_f32_slice(b);
            for (x, &v) in a.iter_mut().zip(b.iter()) {
                *x += v * w;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_row_kernels_match_scalar() {
        let vals: Vec<f32> = (0..1000)
            .map(|i| match i % 7 {
                0 => f32::NAN,
                1 => -((i as f32) * 1.37e-3),
                2 => f32::INFINITY,
                3 => f32::from_bits(0x3F80_8000), // a rounding tie
                4 => -0.0,
                _ => (i as f32).sin() * 1e4,
            })
            .collect();
        for n in [0usize, 1, 7, 8, 9, 33, 1000] {
            let src = &vals[..n];
            let mut fast = vec![bf16::ZERO; n];
            bf16::store_row(src, &mut fast);
            let slow: Vec<bf16> = src.iter().map(|&v| bf16_from_f32(v)).collect();
            assert_eq!(
                fast.iter().map(|b| b.to_bits()).collect::<Vec<_>>(),
                slow.iter().map(|b| b.to_bits()).collect::<Vec<_>>()
            );
            let mut acc: Vec<f32> = (0..n).map(|i| i as f32 * 0.25).collect();
            let mut acc2 = acc.clone();
            bf16::accumulate_scaled(&mut acc, &slow, 0.3);
            for (a, &x) in acc2.iter_mut().zip(&slow) {
                *a += bf16_to_f32(x) * 0.3;
            }
            assert_eq!(
                acc.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                acc2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn bf16_rounding_matches_torch_rule() {
        // 1 + 2^-8 is halfway between two bf16 values; ties go to even (1.0).
        assert_eq!(bf16_from_f32(1.0 + 2f32.powi(-8)).to_bits(), 0x3F80);
        // 1 + 3 * 2^-8 is halfway; rounds up to the even neighbour.
        assert_eq!(bf16_from_f32(1.0 + 3.0 * 2f32.powi(-8)).to_bits(), 0x3F82);
        assert_eq!(bf16_from_f32(f32::NAN).to_bits(), 0x7FC0);
        assert_eq!(bf16_from_f32(f32::INFINITY).to_bits(), 0x7F80);
        assert_eq!(
            bf16_to_f32(bf16::from_bits(0x4049)),
            f32::from_bits(0x4049_0000)
        );
        let xs: Vec<f16> = [0.5f32, -2.25, 65504.0]
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect();
        let mut out = vec![0f32; 3];
        f16::load_row(&xs, &mut out);
        assert_eq!(out, vec![0.5, -2.25, 65504.0]);
    }
}
