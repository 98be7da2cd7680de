//! Fuzzing of the core's entry points with sizes drawn up to the integer edges (issue 15).
//!
//! Every case must return `Ok` or `Err(InvalidArgument)`: a panic (an overflow check fires in the
//! test profile, an index goes out of bounds, an `expect` fails) or an abort fails the test.
//! `MOERAIL_FUZZ_CASES` sets the cases per entry point (default 300, `make fuzz` runs many more);
//! `MOERAIL_FUZZ_SEED` the seed. The counts tried are printed per entry point.

use moerail_core::balance::{rebalance_experts, Mode, Topology};
use moerail_core::ep::cost::Links;
use moerail_core::ep::plan::{plan_best, Counts, RowFormat};
use moerail_core::ep::{EpGroup, Strategy};
use moerail_core::ops::permute::{align_up, permute_layout, sort_chunks, RoutingMap};
use moerail_core::parallel::ParallelLayout;
use moerail_core::Error;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// A size: small most of the time, else near a power of two or an integer edge.
    fn size(&mut self) -> u64 {
        match self.below(8) {
            0..=3 => self.below(9),
            4 => self.below(70),
            5 => {
                let b = self.below(64) as u32;
                (1u64 << b).wrapping_add(self.below(3)).wrapping_sub(1)
            }
            6 => [
                0,
                1,
                i64::MAX as u64,
                (i64::MAX as u64) - 1,
                u64::MAX,
                1 << 62,
                1 << 63,
            ][self.below(7) as usize],
            _ => i64::MAX as u64 - self.below(1 << 20),
        }
    }
    fn count(&mut self) -> i64 {
        let s = self.size();
        if self.below(10) == 0 {
            (s as i64).wrapping_neg()
        } else {
            s.min(i64::MAX as u64) as i64
        }
    }
}

fn cases() -> usize {
    std::env::var("MOERAIL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn seed() -> u64 {
    std::env::var("MOERAIL_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15)
}

fn ok_or_invalid<T>(r: moerail_core::Result<T>, what: &str) {
    if let Err(e) = r {
        assert!(matches!(e, Error::InvalidArgument { .. }), "{what}: {e}");
        let s = e.to_string();
        assert!(!s.contains("internal"), "{what}: {s}");
    }
}

fn report(name: &str, n: usize, errors: usize) {
    println!("fuzz {name}: {n} cases, {errors} clean errors, 0 crashes");
}

#[test]
fn fuzz_permute_layout() {
    let mut r = Rng(seed());
    let n = cases();
    let mut errs = 0;
    for _ in 0..n {
        let t = r.below(12) as usize;
        let e = 1 + r.below(6) as usize;
        let map: Vec<bool> = (0..t * e).map(|_| r.below(3) == 0).collect();
        let a = RoutingMap {
            map: &map,
            num_tokens: t,
            num_experts: e,
        };
        let align = r.size() as usize;
        let routed = map.iter().filter(|&&b| b).count();
        // Either the exact padded size (when it fits memory) or an arbitrary small one.
        let exact: Option<usize> = (0..e)
            .map(|j| (0..t).filter(|&i| map[i * e + j]).count() as i64)
            .try_fold(0i64, |acc, c| {
                align_up(c, align).and_then(|p| acc.checked_add(p))
            })
            .and_then(|x| usize::try_from(x).ok())
            .filter(|&x| x < 4096);
        let rows = match (exact, r.below(2)) {
            (Some(x), 0) => x,
            _ => r.below(2 * routed as u64 + 3) as usize,
        };
        let mut si = vec![-7i64; rows];
        let mut pc = vec![-7i64; if r.below(8) == 0 { e + 1 } else { e }];
        let probs: Vec<f32> = (0..t * e).map(|i| i as f32).collect();
        let mut pp = vec![0f32; rows];
        let res = permute_layout(
            &a,
            align,
            Some(&probs[..]),
            &mut si,
            Some(&mut pp[..]),
            &mut pc,
        );
        if res.is_err() {
            errs += 1;
            assert!(
                si.iter().all(|&v| v == -7) && pc.iter().all(|&v| v == -7),
                "outputs touched"
            );
        } else {
            assert_eq!(Some(rows), exact);
            assert!(si.iter().all(|&v| v >= -1 && v < t as i64));
        }
        ok_or_invalid(res, "permute_layout");
    }
    report("permute_layout", n, errs);
}

#[test]
fn fuzz_sort_chunks() {
    let mut r = Rng(seed() ^ 1);
    let n = cases();
    let mut errs = 0;
    for _ in 0..n {
        let k = r.below(5) as usize;
        let row_len = r.below(4) as usize;
        let mut sizes: Vec<i64> = (0..k).map(|_| r.below(4) as i64).collect();
        if r.below(2) == 0 && k > 0 {
            let i = r.below(k as u64) as usize;
            sizes[i] = r.count();
        }
        let rows: usize = if r.below(2) == 0 {
            sizes.iter().map(|&s| s.clamp(0, 64) as usize).sum()
        } else {
            r.below(16) as usize
        };
        let mut order: Vec<i64> = (0..k as i64).collect();
        for i in (1..k).rev() {
            order.swap(i, r.below(i as u64 + 1) as usize);
        }
        if r.below(6) == 0 && k > 0 {
            order[0] = r.count();
        }
        let x: Vec<u16> = (0..rows * row_len).map(|i| i as u16).collect();
        let mut out = vec![0xFFFFu16; x.len()];
        let res = sort_chunks(&x, row_len, &sizes, &order, &mut out);
        if res.is_err() {
            errs += 1;
            assert!(out.iter().all(|&v| v == 0xFFFF), "outputs touched");
        }
        ok_or_invalid(res, "sort_chunks");
    }
    report("sort_chunks", n, errs);
}

#[test]
fn fuzz_plan_best() {
    let mut r = Rng(seed() ^ 2);
    let n = cases();
    let mut errs = 0;
    for _ in 0..n {
        let w = 1 + r.below(4) as usize;
        let rpn = [1, w][r.below(2) as usize];
        let l = 1 + r.below(2) as usize;
        let topo = match EpGroup::new(w, rpn, l) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        let v = Counts::vector_len(&topo);
        // A self-consistent vector: every slot count t (so copies = t x slots).
        let t = if r.below(2) == 0 {
            r.below(50) as i64
        } else {
            r.count().max(0)
        };
        let mut g = vec![0i64; w * v];
        for row in g.chunks_exact_mut(v) {
            row[1] = t;
            row[2] = (w * l) as i64;
            let rest = &mut row[4..];
            let (slots, rest) = rest.split_at_mut(w * l);
            slots.fill(t);
            let (ranks, nodes) = rest.split_at_mut(w);
            ranks.fill(t);
            nodes.fill(t);
            if r.below(5) == 0 {
                let i = r.below(v as u64) as usize;
                row[i] = r.count();
            }
        }
        let counts = match Counts::from_gathered(&g, &topo) {
            Ok(c) => c,
            Err(e) => {
                errs += 1;
                ok_or_invalid::<()>(Err(e), "Counts::from_gathered");
                continue;
            }
        };
        let fmt = RowFormat {
            hidden: r.size() as usize,
            hidden_elem: [1, 2, 4, 8, 3][r.below(5) as usize],
            prob_elem: 4,
            entries: counts.entries,
            probs_grad: r.below(2) == 0,
        };
        let cands = [
            Strategy::Flat,
            Strategy::TwoLevel,
            Strategy::Dedup,
            Strategy::AllGather,
        ];
        let res = plan_best(&cands, &topo, &counts, &fmt, &Links::default());
        if let Ok((plans, secs, _)) = &res {
            for p in plans {
                for pass in [
                    moerail_core::ep::plan::Pass::Dispatch,
                    moerail_core::ep::plan::Pass::Combine,
                ] {
                    let tr = p.traffic(&fmt, pass, &Links::default());
                    assert!(tr.intra_bytes >= 0 && tr.inter_bytes >= 0 && tr.local_bytes >= 0);
                }
            }
            assert!(secs.iter().all(|s| !s.is_nan()));
        } else {
            errs += 1;
        }
        ok_or_invalid(res, "plan_best");
    }
    report("plan_best", n, errs);
}

#[test]
fn fuzz_layouts_and_placement() {
    let mut r = Rng(seed() ^ 3);
    let n = cases();
    let mut errs = 0;
    for _ in 0..n {
        let world = r.size() as usize;
        let d = |r: &mut Rng| {
            if r.below(3) == 0 {
                r.size() as usize
            } else {
                1 + r.below(4) as usize
            }
        };
        let (tp, cp, pp, ep) = (d(&mut r), d(&mut r), d(&mut r), d(&mut r));
        let res =
            ParallelLayout::new(world, tp, cp, pp, ep, None, "tp-cp-ep-dp-pp").and_then(|l| {
                if world <= 4096 {
                    l.groups().map(|_| ())
                } else {
                    Ok(())
                }
            });
        errs += res.is_err() as usize;
        ok_or_invalid(res, "ParallelLayout");

        let e = 1 + r.below(8) as usize;
        let reps = if r.below(3) == 0 {
            r.size() as usize
        } else {
            e + r.below(4) as usize
        };
        let gpus = if r.below(4) == 0 {
            r.size() as usize
        } else {
            1 + r.below(4) as usize
        };
        let layers = if r.below(4) == 0 {
            r.size() as usize
        } else {
            1 + r.below(3) as usize
        };
        let res = Topology::new(e, reps, 1, 1, gpus).and_then(|topo| {
            if layers.saturating_mul(e) > 4096 || reps > 4096 {
                return Ok(());
            }
            let w: Vec<f64> = (0..layers * e).map(|i| (i % 7) as f64).collect();
            rebalance_experts(&w, layers, &topo, Mode::Refine).map(|_| ())
        });
        errs += res.is_err() as usize;
        ok_or_invalid(res, "Topology/rebalance_experts");
    }
    report("ParallelLayout + Topology", n, errs);
}
