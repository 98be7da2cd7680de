//! A vectorisable f32 `exp`.
//!
//! Why: the router evaluates `exp` for every (token, expert) pair (softmax over all experts,
//! sigmoid), and libm's scalar `expf` made it slower than PyTorch's vectorised one. This is
//! Cephes' `expf` (range reduction by ln 2 split in two parts, a degree-6 polynomial, scaling
//! by 2^n through the exponent bits), written as straight-line arithmetic with no branches so
//! the compiler vectorises it. Relative error below 2e-7 (about 1 ulp) for results in the
//! normal range; results below 2^-126 are flushed to zero. Plain IEEE operations in a fixed
//! order (Rust never contracts to FMA): the same bits on every machine.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Rounds to nearest through the mantissa: exact for |v| < 2^22.
const ROUND: f32 = 12_582_912.0;
/// Above this `exp` overflows f32.
const MAX_X: f32 = 88.722_83;
/// Below this the result is not a normal f32.
const MIN_X: f32 = -87.336_55;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

#[inline(always)]
fn exp_one(x: f32) -> f32 {
    let xc = x.clamp(MIN_X, MAX_X);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = P[0];
    for &c in &P[1..] {
        p = p * r + c;
    }
    let y = (p * (r * r) + r) + 1.0;
    // 2^n in two normal factors: n spans [-126, 128] and 2^128 is not an f32.
    let ni = n as i32;
    let half = ni >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((ni - half + 127) as u32) << 23);
    let v = (y * s1) * s2;
    // Branch-free: underflow flushes to zero, overflow (and +inf) saturates to +inf.
    let v = if x < MIN_X { 0.0 } else { v };
    if x > MAX_X {
        f32::INFINITY
    } else {
        v
    }
}

/// `v[i] = exp(v[i])` in place: eight lanes at a time with AVX2 where the CPU has it, else
/// four with SSE2 (x86-64), else one. The same operations in the same order as [`exp_one`]
/// (no FMA), so every element gets the same bits whichever path computes it.
#[inline]
pub fn exp_in_place_f32(v: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked just above).
        done = unsafe { exp_avx2(v) };
    }
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        let n = v.len();
        let p = v.as_mut_ptr();
        // SAFETY: loads and stores at i with i + 4 <= n.
        unsafe {
            let (lo, hi) = (_mm_set1_ps(MIN_X), _mm_set1_ps(MAX_X));
            let (round, log2e) = (_mm_set1_ps(ROUND), _mm_set1_ps(LOG2E));
            let (ln2_hi, ln2_lo) = (_mm_set1_ps(LN2_HI), _mm_set1_ps(LN2_LO));
            let one = _mm_set1_ps(1.0);
            let bias = _mm_set1_epi32(127);
            let inf = _mm_set1_ps(f32::INFINITY);
            let mut i = done;
            while i + 4 <= n {
                let x = _mm_loadu_ps(p.add(i));
                let xc = _mm_min_ps(_mm_max_ps(x, lo), hi);
                let nf = _mm_sub_ps(_mm_add_ps(_mm_mul_ps(xc, log2e), round), round);
                let r = _mm_sub_ps(
                    _mm_sub_ps(xc, _mm_mul_ps(nf, ln2_hi)),
                    _mm_mul_ps(nf, ln2_lo),
                );
                let mut q = _mm_set1_ps(P[0]);
                for &c in &P[1..] {
                    q = _mm_add_ps(_mm_mul_ps(q, r), _mm_set1_ps(c));
                }
                let y = _mm_add_ps(_mm_add_ps(_mm_mul_ps(q, _mm_mul_ps(r, r)), r), one);
                let ni = _mm_cvttps_epi32(nf);
                let half = _mm_srai_epi32(ni, 1);
                let s1 = _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(half, bias), 23));
                let s2 = _mm_castsi128_ps(_mm_slli_epi32(
                    _mm_add_epi32(_mm_sub_epi32(ni, half), bias),
                    23,
                ));
                let val = _mm_mul_ps(_mm_mul_ps(y, s1), s2);
                let val = _mm_andnot_ps(_mm_cmplt_ps(x, lo), val);
                let over = _mm_cmpgt_ps(x, hi);
                let val = _mm_or_ps(_mm_and_ps(over, inf), _mm_andnot_ps(over, val));
                _mm_storeu_ps(p.add(i), val);
                i += 4;
            }
            done = i;
        }
    }
    for x in v[done..].iter_mut() {
        *x = exp_one(*x);
    }
}

/// The AVX2 form of the loop in [`exp_in_place_f32`] (8 lanes; the same operations, no FMA,
/// so the same bits). Returns how many leading elements it computed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_avx2(v: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = v.len();
    let p = v.as_mut_ptr();
    let (lo, hi) = (_mm256_set1_ps(MIN_X), _mm256_set1_ps(MAX_X));
    let (round, log2e) = (_mm256_set1_ps(ROUND), _mm256_set1_ps(LOG2E));
    let (ln2_hi, ln2_lo) = (_mm256_set1_ps(LN2_HI), _mm256_set1_ps(LN2_LO));
    let one = _mm256_set1_ps(1.0);
    let bias = _mm256_set1_epi32(127);
    let inf = _mm256_set1_ps(f32::INFINITY);
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_loadu_ps(p.add(i));
        let xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
        let nf = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(xc, log2e), round), round);
        let r = _mm256_sub_ps(
            _mm256_sub_ps(xc, _mm256_mul_ps(nf, ln2_hi)),
            _mm256_mul_ps(nf, ln2_lo),
        );
        let mut q = _mm256_set1_ps(P[0]);
        for &c in &P[1..] {
            q = _mm256_add_ps(_mm256_mul_ps(q, r), _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(q, _mm256_mul_ps(r, r)), r), one);
        let ni = _mm256_cvttps_epi32(nf);
        let half = _mm256_srai_epi32(ni, 1);
        let s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
        let s2 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_sub_epi32(ni, half), bias),
            23,
        ));
        let val = _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
        let val = _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), val);
        let over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
        let val = _mm256_blendv_ps(val, inf, over);
        _mm256_storeu_ps(p.add(i), val);
        i += 8;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_and_scalar_paths_agree_bitwise() {
        let xs: Vec<f32> = (0..4001).map(|i| -95.0 + i as f32 * 0.0467).collect();
        let mut v = xs.clone();
        exp_in_place_f32(&mut v);
        for (x, y) in xs.iter().zip(&v) {
            assert_eq!(exp_one(*x).to_bits(), y.to_bits(), "x={x}");
        }
    }

    #[test]
    fn matches_libm_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let mut v = [x];
            exp_in_place_f32(&mut v);
            let want = (x as f64).exp();
            let rel = ((v[0] as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        let mut v = [0.0f32, -200.0, 200.0, f32::NEG_INFINITY, 1.0];
        exp_in_place_f32(&mut v);
        assert_eq!(v[0], 1.0);
        assert_eq!(v[1], 0.0);
        assert_eq!(v[2], f32::INFINITY);
        assert_eq!(v[3], 0.0);
        assert!((v[4] - std::f32::consts::E).abs() < 1e-6);
    }
}

/// Index of the first maximum of `v` (no NaN; at least one element), scalar version.
#[inline]
pub fn argmax_first_scalar<A: PartialOrd + Copy>(v: &[A]) -> usize {
    let mut i = 0;
    for (j, x) in v.iter().enumerate().skip(1) {
        if *x > v[i] {
            i = j;
        }
    }
    i
}

#[cfg(test)]
mod argmax_tests {
    use super::*;

    #[test]
    fn first_maximum_wins() {
        for n in 1..40 {
            for at in 0..n {
                let mut v: Vec<f32> = (0..n).map(|i| ((i * 7) % 5) as f32 - 10.0).collect();
                v[at] = 3.0;
                if at + 2 < n {
                    v[at + 2] = 3.0; // a later tie
                }
                v[0] = if at == 0 { 3.0 } else { f32::NEG_INFINITY };
                assert_eq!(argmax_first_scalar(&v), at, "n={n} at={at}");
            }
        }
    }
}

/// Maximum of a non-empty slice without NaN (scalar version).
#[inline]
pub fn max_scalar<A: PartialOrd + Copy>(v: &[A]) -> A {
    let mut m = v[0];
    for &x in &v[1..] {
        if x > m {
            m = x;
        }
    }
    m
}

/// Maximum of a non-empty f32 slice without NaN.
#[inline]
pub fn max_f32(v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        let n = v.len();
        if n < 8 {
            return max_scalar(v);
        }
        let p = v.as_ptr();
        // SAFETY: loads at offsets i with i + 4 <= n.
        unsafe {
            let mut a = _mm_loadu_ps(p);
            let mut b = _mm_loadu_ps(p.add(4));
            let mut i = 8;
            while i + 8 <= n {
                a = _mm_max_ps(a, _mm_loadu_ps(p.add(i)));
                b = _mm_max_ps(b, _mm_loadu_ps(p.add(i + 4)));
                i += 8;
            }
            let m = _mm_max_ps(a, b);
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
            let mut r = _mm_cvtss_f32(m);
            for &x in &v[i..] {
                if x > r {
                    r = x;
                }
            }
            r
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        max_scalar(v)
    }
}

#[cfg(test)]
mod filter_tests {
    use super::*;

    #[test]
    fn sse_helpers_match_scalar() {
        for n in 1..50usize {
            let v: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            assert_eq!(max_f32(&v), max_scalar(&v));
        }
    }
}

/// Top-`k` of `scores` by repeated block argmax: `(vals[j], idx[j])` for `j < k` in
/// descending order, ties to the lower index. `work` and `block_max` are scratch. Needs
/// `k <= scores.len()` and no NaN. Generic version (f64, and f32 off x86-64).
pub fn topk_blocks_scalar<A: PartialOrd + Copy + num_traits::Float>(
    scores: &[A],
    k: usize,
    work: &mut Vec<A>,
    block_max: &mut Vec<A>,
    vals: &mut [A],
    idx: &mut [usize],
) {
    const B: usize = 4;
    work.clear();
    work.extend_from_slice(scores);
    block_max.clear();
    block_max.extend(work.chunks(B).map(max_scalar));
    for j in 0..k {
        let b = argmax_first_scalar(block_max);
        let m = block_max[b];
        let blk = &mut work[b * B..((b + 1) * B).min(scores.len())];
        let p = blk.iter().position(|&x| x == m).unwrap_or(0);
        vals[j] = m;
        idx[j] = b * B + p;
        blk[p] = A::neg_infinity();
        block_max[b] = max_scalar(blk);
    }
}

/// [`topk_blocks_scalar`] for f32 with SSE2: a block is one 4-lane vector, so a block's
/// maximum is two shuffles and its first maximal lane one compare-and-movemask.
pub fn topk_blocks_f32(
    scores: &[f32],
    k: usize,
    work: &mut Vec<f32>,
    block_max: &mut Vec<f32>,
    vals: &mut [f32],
    idx: &mut [usize],
) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        let e = scores.len();
        assert!(k <= e && vals.len() >= k && idx.len() >= k);
        let nb = e.div_ceil(4);
        // Pad to whole vectors with -inf, which is never picked (k <= e finite scores).
        work.clear();
        work.extend_from_slice(scores);
        work.resize(nb * 4, f32::NEG_INFINITY);
        let nbp = nb.div_ceil(4) * 4;
        block_max.clear();
        block_max.resize(nbp, f32::NEG_INFINITY);
        // SAFETY: work has nb * 4 floats, block_max has nbp >= nb floats (a multiple of 4);
        // every load/store below stays inside them.
        unsafe {
            let wp = work.as_mut_ptr();
            let bp = block_max.as_mut_ptr();
            #[inline(always)]
            unsafe fn hmax(v: __m128) -> __m128 {
                let m = _mm_max_ps(v, _mm_movehl_ps(v, v));
                _mm_max_ps(m, _mm_shuffle_ps(m, m, 0b01_01_01_01))
            }
            for b in 0..nb {
                _mm_store_ss(bp.add(b), hmax(_mm_loadu_ps(wp.add(4 * b))));
            }
            for j in 0..k {
                // The first block holding the largest block maximum.
                let mut mv = _mm_loadu_ps(bp);
                let mut q = 4;
                while q < nbp {
                    mv = _mm_max_ps(mv, _mm_loadu_ps(bp.add(q)));
                    q += 4;
                }
                // Broadcast the maximum to all lanes for the comparisons.
                let mv = hmax(mv);
                let mv = _mm_shuffle_ps(mv, mv, 0);
                let mut b = 0;
                loop {
                    let mask = _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(bp.add(b)), mv));
                    if mask != 0 {
                        b += mask.trailing_zeros() as usize;
                        break;
                    }
                    b += 4;
                }
                // The first lane of that block holding it.
                let blk = _mm_loadu_ps(wp.add(4 * b));
                let lane = _mm_movemask_ps(_mm_cmpeq_ps(blk, mv)).trailing_zeros() as usize;
                let i = 4 * b + lane;
                *vals.get_unchecked_mut(j) = _mm_cvtss_f32(mv);
                *idx.get_unchecked_mut(j) = i;
                *wp.add(i) = f32::NEG_INFINITY;
                _mm_store_ss(bp.add(b), hmax(_mm_loadu_ps(wp.add(4 * b))));
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        topk_blocks_scalar(scores, k, work, block_max, vals, idx)
    }
}

#[cfg(test)]
mod topk_tests {
    use super::*;

    #[test]
    fn sse_topk_matches_stable_sort() {
        let mut seed = 7u64;
        for e in 1..70usize {
            for k in [1usize, 2, 3, 8, 13] {
                if k > e {
                    continue;
                }
                // Few distinct values: many ties.
                let v: Vec<f32> = (0..e)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                        ((seed >> 33) % 9) as f32 - 4.0
                    })
                    .collect();
                let mut order: Vec<usize> = (0..e).collect();
                order.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap().then(a.cmp(&b)));
                let (mut w, mut bm) = (Vec::new(), Vec::new());
                let (mut vals, mut idx) = (vec![0f32; k], vec![0usize; k]);
                topk_blocks_f32(&v, k, &mut w, &mut bm, &mut vals, &mut idx);
                assert_eq!(&idx[..], &order[..k], "e={e} k={k}");
                let (mut vals2, mut idx2) = (vec![0f32; k], vec![0usize; k]);
                topk_blocks_scalar(&v, k, &mut w, &mut bm, &mut vals2, &mut idx2);
                assert_eq!(idx2, idx);
                assert_eq!(vals2, vals);
            }
        }
    }
}
