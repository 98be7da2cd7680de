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
    /// Index of the first maximum (no NaN, non-empty).
    fn argmax_first(v: &[Self]) -> usize;
    /// Maximum (no NaN, non-empty).
    fn max_of(v: &[Self]) -> Self;
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
        crate::fastmath::exp_in_place_f32(v);
    }
    #[inline]
    fn argmax_first(v: &[f32]) -> usize {
        crate::fastmath::argmax_first_f32(v)
    }
    #[inline]
    fn max_of(v: &[f32]) -> f32 {
        crate::fastmath::max_f32(v)
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
        crate::fastmath::topk_blocks_f32(scores, k, work, block_max, vals, idx)
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
    fn argmax_first(v: &[f64]) -> usize {
        crate::fastmath::argmax_first_scalar(v)
    }
    #[inline]
    fn max_of(v: &[f64]) -> f64 {
        crate::fastmath::max_scalar(v)
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
        crate::fastmath::topk_blocks_scalar(scores, k, work, block_max, vals, idx)
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
