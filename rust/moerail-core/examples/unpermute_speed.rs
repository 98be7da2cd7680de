//! Timing of unpermute alone: `cargo run --release --example unpermute_speed`.
use half::bf16;
use moerail_core::ops::permute::unpermute;
use std::time::Instant;

fn main() {
    moerail_core::util::pool::set_num_threads(1).unwrap();
    let (t, h, k) = (
        std::env::var("T")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4096usize),
        2048usize,
        8usize,
    );
    let n = t * k;
    let x: Vec<bf16> = (0..n * h)
        .map(|i| bf16::from_f32((i % 97) as f32 * 0.01))
        .collect();
    let si: Vec<i64> = (0..n).map(|r| ((r * 7919) % t) as i64).collect();
    let w: Vec<f32> = (0..n).map(|r| 0.1 + (r % 5) as f32 * 0.05).collect();
    let mut out = vec![bf16::ZERO; t * h];
    let iters: usize = std::env::var("ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    for weights in [None, Some(&w[..])] {
        let mut best = f64::MAX;
        for _ in 0..iters {
            let s = Instant::now();
            unpermute(&x, h, &si, weights, t, &mut out).unwrap();
            best = best.min(s.elapsed().as_secs_f64());
        }
        let gb = (n * h * 2 + t * h * 2) as f64 / 1e9;
        println!(
            "probs={}: {:.2} ms, {:.1} GB/s",
            weights.is_some(),
            best * 1e3,
            gb / best
        );
    }
}
