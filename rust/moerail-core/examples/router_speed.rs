//! Quick timing of the router kernel alone: `cargo run --release --example router_speed`.
use half::bf16;
use moerail_core::ops::router::{topk_route_forward, RouteOutputs, RouterConfig, ScoreFunction};
use std::time::Instant;

fn main() {
    moerail_core::util::pool::set_num_threads(1).unwrap();
    let only: Option<usize> = std::env::var("ONLY").ok().and_then(|v| v.parse().ok());
    for (ci, (e, k, f, groups)) in [
        (64usize, 8usize, ScoreFunction::Softmax, None),
        (256, 8, ScoreFunction::Sigmoid, Some((8, 4))),
        (128, 2, ScoreFunction::Softmax, None),
    ]
    .into_iter()
    .enumerate()
    {
        if only.is_some_and(|o| o != ci) {
            continue;
        }
        let t = 4096;
        let mut seed = 12345u64;
        let logits: Vec<bf16> = (0..t * e)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                bf16::from_f32(((seed >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0)
            })
            .collect();
        let cfg = RouterConfig {
            topk: k,
            score_function: f,
            use_pre_softmax: false,
            num_groups: groups.map(|g: (usize, usize)| g.0),
            group_topk: groups.map(|g| g.1),
            scaling_factor: None,
        };
        let (mut p, mut ix, mut n) = (vec![bf16::ZERO; t * k], vec![0i64; t * k], vec![0i64; e]);
        let (mut dp, mut dm) = (vec![bf16::ZERO; t * e], vec![false; t * e]);
        let mut best = f64::MAX;
        let iters: usize = std::env::var("ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30);
        for _ in 0..iters {
            let s = Instant::now();
            topk_route_forward(
                &logits,
                t,
                e,
                None,
                &cfg,
                RouteOutputs {
                    probs_k: &mut p,
                    indices: &mut ix,
                    dense: Some((&mut dp, &mut dm)),
                    tokens_per_expert: &mut n,
                },
            )
            .unwrap();
            best = best.min(s.elapsed().as_secs_f64());
        }
        println!(
            "E={e} k={k} {f:?} groups={groups:?}: {:.3} ms, {:.0} ns/token",
            best * 1e3,
            best * 1e9 / t as f64
        );
    }
}
