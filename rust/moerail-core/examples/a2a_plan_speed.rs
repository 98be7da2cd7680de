//! Timing of the all-to-all planning metadata (T=4096 tokens, top-8, EP=64 as 8 nodes x 8):
//! `cargo run --release --example a2a_plan_speed`. Prints the median of many runs of the
//! dispatch layout of one rank, the plans of all four strategies with the `auto` choice, and
//! both together; with `PARTS=1` also each strategy's plan and this rank's route alone.
use moerail_core::ep::cost::Links;
use moerail_core::ep::dispatch_layout::{layout, DispatchLayout};
use moerail_core::ep::plan::{plan_best, Counts, RowFormat};
use moerail_core::ep::route::Route;
use moerail_core::ep::{EpGroup, Strategy};
use std::time::Instant;

fn slots(t: usize, k: usize, r: usize, seed: &mut u64) -> Vec<i64> {
    let mut out = Vec::with_capacity(t * k);
    for _ in 0..t {
        let start = out.len();
        while out.len() < start + k {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let s = ((*seed >> 33) % r as u64) as i64;
            if !out[start..].contains(&s) {
                out.push(s);
            }
        }
    }
    out
}

fn median(mut f: impl FnMut(), reps: usize) -> f64 {
    for _ in 0..reps / 10 + 1 {
        f();
    }
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    // The fastest tenth: the machine's own speed, without other processes' interference.
    v[reps / 10]
}

fn main() {
    let threads: usize = std::env::var("THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    moerail_core::util::pool::set_num_threads(threads).unwrap();
    let (t, k) = (4096usize, 8usize);
    for (w, g, e) in [(64usize, 8usize, 64usize), (64, 8, 256)] {
        let topo = EpGroup::new(w, g, e / w).unwrap();
        let mut seed = 7u64;
        let all: Vec<Vec<i64>> = (0..w)
            .map(|_| slots(t, k, topo.slots(), &mut seed))
            .collect();
        let layouts: Vec<DispatchLayout> = all
            .iter()
            .map(|s| layout(s, t, k, &topo, None, true).unwrap())
            .collect();
        let counts = Counts::from_layouts(&layouts, &vec![t as i64; w]);
        let fmt = RowFormat {
            hidden: 7168,
            hidden_elem: 2,
            prob_elem: 4,
            entries: k,
            probs_grad: true,
        };
        let links = Links::default();
        let t_layout = median(
            || {
                std::hint::black_box(layout(&all[0], t, k, &topo, None, false).unwrap());
            },
            2000,
        );
        let t_plan = median(
            || {
                std::hint::black_box(
                    plan_best(&Strategy::ALL, &topo, &counts, &fmt, &links).unwrap(),
                );
            },
            2000,
        );
        let t_both = median(
            || {
                let l = layout(&all[0], t, k, &topo, None, false).unwrap();
                std::hint::black_box(&l);
                std::hint::black_box(
                    plan_best(&Strategy::ALL, &topo, &counts, &fmt, &links).unwrap(),
                );
            },
            2000,
        );
        if std::env::var("PARTS").is_ok() {
            use moerail_core::ep::plan::Plan;
            for st in Strategy::ALL {
                let tt = median(
                    || {
                        std::hint::black_box(Plan::new(st, &topo, &counts).unwrap());
                    },
                    2000,
                );
                println!("  Plan::new({}) {:.1} us", st.name(), tt * 1e6);
            }
            let tc = median(
                || {
                    std::hint::black_box(counts.copies(&topo));
                },
                2000,
            );
            println!("  copies {:.1} us", tc * 1e6);
            // What a dispatch builds after choosing: this rank's route (every hop's index).
            let (plans, _, _) = plan_best(&Strategy::ALL, &topo, &counts, &fmt, &links).unwrap();
            for p in &plans {
                let tr = median(
                    || {
                        std::hint::black_box(
                            Route::new(p.clone(), &counts, 0, &all[0], k).unwrap(),
                        );
                    },
                    500,
                );
                println!("  Route::new({}) {:.1} us", p.strategy.name(), tr * 1e6);
            }
        }
        let (_, secs, best) = plan_best(&Strategy::ALL, &topo, &counts, &fmt, &links).unwrap();
        println!(
            "T={t} k={k} EP={w} ({} nodes x {g}) E={e} threads={threads}: layout {:.1} us, plan (4 strategies + auto) {:.1} us, both {:.1} us; auto -> {} ({:?} ms)",
            w / g,
            t_layout * 1e6,
            t_plan * 1e6,
            t_both * 1e6,
            Strategy::ALL[best].name(),
            secs.iter().map(|s| (s * 1e5).round() / 1e2).collect::<Vec<_>>()
        );
    }
}

#[allow(dead_code)]
fn parts() {}
