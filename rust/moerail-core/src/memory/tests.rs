use super::*;

/// A small deterministic generator (xorshift) for random cases.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn module(saved: f64, rc: f64) -> ModuleCost {
    ModuleCost {
        saved_bytes: saved,
        recompute_seconds: rc,
        ..Default::default()
    }
}

fn case(rng: &mut Rng, layers: usize, sched: Schedule, host: bool) -> MemoryCosts {
    let mut out = Vec::new();
    let per_chunk = layers.div_ceil(sched.virtual_pipeline_size);
    for l in 0..layers {
        let mut lc = LayerCosts {
            layer: l,
            vpp_stage: l / per_chunk,
            forward_seconds: 0.5 + rng.unit(),
            backward_seconds: 1.0 + 2.0 * rng.unit(),
            other_saved_bytes: 10.0 * rng.unit(),
            transient_bytes: 20.0 * rng.unit(),
            ..Default::default()
        };
        lc.modules[0] = module(5.0 + 10.0 * rng.unit(), 0.01 + 0.05 * rng.unit());
        lc.modules[1] = module(20.0 + 40.0 * rng.unit(), 0.1 + 0.5 * rng.unit());
        // A recompute frees its consumers' copies of its outputs and holds its inputs: not
        // what a swap frees (more in even layers, less in odd ones).
        let f = if l % 2 == 0 { 1.1 } else { 0.6 } + 0.3 * rng.unit();
        lc.modules[1].recompute_saved_bytes = Some(lc.modules[1].saved_bytes * f);
        let rows = 10.0 + 30.0 * rng.unit();
        lc.modules[EXCHANGE_MODULE] = ModuleCost {
            saved_bytes: rows + 30.0 * rng.unit(),
            recompute_seconds: 0.1 + 0.3 * rng.unit(),
            exchange_seconds: 0.05 + 0.5 * rng.unit(),
            exchange_bytes: rows,
            ..Default::default()
        };
        // The layer input (no draw from `rng`: the earlier cases stay as they were); every
        // case also offers whole-layer recompute.
        lc.input_bytes = Some(0.3 * lc.other_saved_bytes);
        out.push(lc);
    }
    MemoryCosts {
        layers: out,
        static_bytes: 100.0,
        device_bytes: 1e9,
        host_bytes: if host { 60.0 + 400.0 * rng.unit() } else { 0.0 },
        host_link_bytes_per_second: if host { 5.0 + 60.0 * rng.unit() } else { 0.0 },
        schedule: sched,
        executor: None,
    }
}

fn sched(p: usize, r: usize, v: usize, m: usize) -> Schedule {
    Schedule {
        pipeline_size: p,
        pipeline_rank: r,
        virtual_pipeline_size: v,
        num_microbatches: m,
    }
}

/// moerail's executor for `c`: each layer's backward in six segments of random length (`attn`
/// the first three), each module's swap read first by one random segment of its group (the norm
/// and attention in `attn`, the others in `mlp`).
fn with_executor(mut c: MemoryCosts, lookahead: u32, rng: &mut Rng) -> MemoryCosts {
    const N: usize = 6;
    let layers = c
        .layers
        .iter()
        .map(|lc| {
            let w: Vec<f64> = (0..N).map(|_| 0.2 + rng.unit()).collect();
            let sum: f64 = w.iter().sum();
            let mut reads: [Vec<f64>; N_MODULES] = Default::default();
            for (j, mc) in lc.modules.iter().enumerate() {
                if mc.saved_bytes > 0.0 {
                    let seg = (rng.next() % 3) as usize + if j <= 1 { 0 } else { 3 };
                    reads[j] = vec![0.0; N];
                    reads[j][seg] = mc.saved_bytes;
                }
            }
            ExecutorLayer {
                segment_seconds: w.iter().map(|x| x / sum * lc.backward_seconds).collect(),
                reads,
            }
        })
        .collect();
    c.executor = Some(Executor {
        lookahead,
        prefetch_groups: 1,
        mlp_first_segment: 3,
        layers,
    });
    c
}

/// A step-by-step replay of the schedule that counts live chunk-micro-batches.
fn replay_peak(s: &Schedule) -> usize {
    let (mut live, mut peak) = (0usize, 0usize);
    for op in s.ops() {
        if op.forward {
            live += 1;
            peak = peak.max(live);
        } else {
            live -= 1;
        }
    }
    peak
}

#[test]
fn one_f_one_b_holds_p_minus_rank() {
    for p in 1..=8 {
        for r in 0..p {
            for m in 1..=20 {
                let s = sched(p, r, 1, m);
                assert_eq!(replay_peak(&s), (p - r).min(m), "p={p} r={r} m={m}");
                assert_eq!(s.peak_inflight(), (p - r).min(m));
                assert_eq!(s.inflight_mixes(), vec![vec![(p - r).min(m) as u32]]);
            }
        }
    }
}

#[test]
fn interleaved_closed_form_matches_replay() {
    for p in 2..=8 {
        for v in 2..=4 {
            for r in 0..p {
                for k in 1..=4 {
                    let m = p * k;
                    let s = sched(p, r, v, m);
                    assert_eq!(
                        replay_peak(&s),
                        s.peak_inflight(),
                        "p={p} v={v} r={r} m={m}"
                    );
                    // Every forward and backward happens once per chunk and micro-batch, and
                    // each backward follows its forward.
                    let ops = s.ops();
                    assert_eq!(ops.len(), 2 * m * v);
                    let mut seen = vec![vec![false; m]; v];
                    for op in &ops {
                        if op.forward {
                            seen[op.chunk][op.microbatch] = true;
                        } else {
                            assert!(seen[op.chunk][op.microbatch]);
                        }
                    }
                }
            }
        }
    }
    // Megatron's numbers: p=4, v=2, rank 0 warms up 2*3 + 4 = 10, so 11 in flight; the last
    // rank 4 + 1.
    assert_eq!(sched(4, 0, 2, 8).peak_inflight(), 11);
    assert_eq!(sched(4, 3, 2, 8).peak_inflight(), 5);
    // m == p: everything is warm-up.
    assert_eq!(sched(4, 0, 2, 4).peak_inflight(), 8);
}

#[test]
fn peak_is_weighted_by_inflight_not_summed_over_modules() {
    let mut rng = Rng(7);
    let c = case(&mut rng, 2, sched(4, 1, 1, 8), false);
    let keep = vec![[Action::Keep; N_MODULES]; 2];
    let e = evaluate(&c, &keep).unwrap();
    let per_mb: f64 = c
        .layers
        .iter()
        .map(|l| l.other_saved_bytes + l.modules.iter().map(|m| m.saved_bytes).sum::<f64>())
        .sum();
    assert!((e.activation_bytes - 3.0 * per_mb).abs() < 1e-9);
    let t = c
        .layers
        .iter()
        .map(|l| l.transient_bytes)
        .fold(0.0, f64::max);
    assert!((e.peak_bytes - (100.0 + 3.0 * per_mb + t)).abs() < 1e-9);
    assert_eq!(e.added_seconds, 0.0);
}

fn check_against_exhaustive(
    seed: u64,
    s: Schedule,
    layers: usize,
    host: bool,
    lookahead: Option<u32>,
) -> (usize, usize, f64) {
    let mut rng = Rng(seed);
    // Its own draws, so that the cases without an executor stay as they were.
    let mut ex_rng = Rng(seed ^ 0x5eed);
    let (mut exact_cases, mut cases, mut worst) = (0, 0, 0.0f64);
    for _ in 0..12 {
        let mut c = case(&mut rng, layers, s, host);
        if let Some(k) = lookahead {
            c = with_executor(c, k, &mut ex_rng);
        }
        let keep = evaluate(&c, &vec![[Action::Keep; N_MODULES]; layers]).unwrap();
        let mut o = Options::new(0.0);
        o.frontier_limit = 1 << 16;
        let lo = c.static_bytes + 0.2 * keep.activation_bytes;
        let frac = rng.unit();
        o.budget_bytes = lo + frac * (keep.peak_bytes - lo);
        let ex = exhaustive(&c, &o).unwrap();
        let got = solve(&c, &o);
        match (ex, got) {
            (None, Err(e)) => assert!(
                matches!(&e, crate::Error::Unreachable { arg, .. } if arg == "budget_bytes" || arg == "host_bytes"),
                "{e}"
            ),
            (None, Ok(p)) => panic!("solver found {:?} where nothing fits", p.evaluation),
            (Some(b), Err(e)) => panic!("solver failed ({e}) where {:?} fits", b.evaluation),
            (Some(b), Ok(p)) => {
                cases += 1;
                assert!(p.evaluation.peak_bytes <= o.budget_bytes * (1.0 + 1e-9));
                assert!(p.evaluation.host_bytes <= c.host_bytes * (1.0 + 1e-9));
                let (opt, got) = (b.evaluation.added_seconds, p.evaluation.added_seconds);
                assert!(got >= opt - 1e-9);
                if p.exact {
                    exact_cases += 1;
                    assert!(
                        (got - opt).abs() <= 1e-9 * (1.0 + opt),
                        "exact solve {got} vs optimum {opt}"
                    );
                }
                if opt > 0.0 {
                    worst = worst.max(got / opt - 1.0);
                }
            }
        }
    }
    (exact_cases, cases, worst)
}

/// Every solve of [`check_against_exhaustive`]'s cases (at least 4 that fit) is exact and optimal.
fn assert_exact_solves(seed: u64, s: Schedule, layers: usize, host: bool, lookahead: Option<u32>) {
    let (exact, cases, worst) = check_against_exhaustive(seed, s, layers, host, lookahead);
    assert!(cases >= 4, "{cases}");
    assert_eq!(exact, cases);
    assert!(worst < 1e-9, "seed {seed}: {worst}");
}

#[test]
fn optimal_against_exhaustive_search_recompute_only() {
    for (seed, s, l) in [
        (1, sched(1, 0, 1, 4), 3),
        (2, sched(4, 0, 1, 8), 3),
        (3, sched(4, 2, 1, 8), 2),
        (4, sched(8, 7, 1, 16), 3),
    ] {
        let (exact, cases, worst) = check_against_exhaustive(seed, s, l, false, None);
        assert!(cases >= 6, "{cases}");
        assert_eq!(
            exact, cases,
            "without swap or interleaving every solve is exact"
        );
        assert!(worst < 1e-9);
    }
}

#[test]
fn optimal_against_exhaustive_search_with_swap_and_interleaving() {
    // Swap couples the layers through the host memory and the link, the interleaved schedule
    // through several in-flight mixes: the frontiers carry every criterion, so the solve stays
    // exact.
    for (seed, s, l, host) in [
        (11, sched(2, 0, 1, 4), 2, true),
        (12, sched(4, 1, 1, 8), 2, true),
        (13, sched(2, 0, 2, 4), 2, false),
        (14, sched(4, 0, 2, 8), 2, true),
    ] {
        assert_exact_solves(seed, s, l, host, None);
    }
}

#[test]
fn a_larger_budget_never_costs_more() {
    let mut rng = Rng(99);
    for s in [sched(4, 0, 1, 8), sched(2, 1, 1, 6), sched(1, 0, 1, 2)] {
        let c = case(&mut rng, 4, s, false);
        let keep = evaluate(&c, &vec![[Action::Keep; N_MODULES]; 4]).unwrap();
        let least = c.static_bytes + 0.25 * keep.activation_bytes;
        let mut last = f64::INFINITY;
        for k in 0..=40 {
            let b = least + k as f64 / 40.0 * (keep.peak_bytes - least);
            if let Ok(p) = solve(&c, &Options::new(b)) {
                assert!(
                    p.evaluation.added_seconds <= last + 1e-12,
                    "budget {b}: {} > {last}",
                    p.evaluation.added_seconds
                );
                last = p.evaluation.added_seconds;
            }
        }
        assert_eq!(last, 0.0, "keep-all fits its own peak");
    }
}

#[test]
fn bad_budgets_are_refused_naming_the_argument() {
    let mut rng = Rng(5);
    let c = case(&mut rng, 2, sched(2, 0, 1, 4), false);
    let e = solve(&c, &Options::new(50.0)).unwrap_err().to_string();
    assert!(
        e.starts_with("budget_bytes:") && e.contains("weights"),
        "{e}"
    );
    let e = solve(&c, &Options::new(101.0)).unwrap_err().to_string();
    assert!(
        e.starts_with("budget_bytes:") && e.contains("the least this device needs"),
        "{e}"
    );
    let e = solve(&c, &Options::new(2e9)).unwrap_err().to_string();
    assert!(e.contains("more than the device"), "{e}");
    // A plan that swaps without host memory.
    let mut acts = vec![[Action::Keep; N_MODULES]; 2];
    acts[0][1] = Action::Swap;
    let mut c2 = c.clone();
    c2.host_link_bytes_per_second = 10.0;
    let e = check(&c2, &acts, None).unwrap_err().to_string();
    assert!(e.contains("no host memory"), "{e}");
    c2.host_bytes = 1.0;
    let e = check(&c2, &acts, None).unwrap_err().to_string();
    assert!(e.contains("more than the"), "{e}");
    acts[0][1] = Action::RecomputeExchange;
    let e = evaluate(&c, &acts).unwrap_err().to_string();
    assert!(e.contains("expert_fc1"), "{e}");
}

#[test]
fn swap_is_free_when_the_schedule_hides_it() {
    // Stage 0 of 4 keeps 4 micro-batches in flight: long windows; a fast link hides the copy.
    let mut rng = Rng(3);
    let mut c = case(&mut rng, 2, sched(4, 0, 1, 8), true);
    c.host_bytes = 1e6;
    c.host_link_bytes_per_second = 1e6;
    let mut acts = vec![[Action::Keep; N_MODULES]; 2];
    acts[0][1] = Action::Swap;
    let e = evaluate(&c, &acts).unwrap();
    assert_eq!(e.swap_exposed_seconds, 0.0);
    // A slow link: the copy outlasts the window and the rest shows.
    c.host_link_bytes_per_second = 1.0;
    let e = evaluate(&c, &acts).unwrap();
    assert!(e.swap_exposed_seconds > 0.0);
    // The last stage's window of its last layer is only its own backward tail: 0 compute
    // between; any copy shows.
    let mut c = case(&mut rng, 1, sched(4, 3, 1, 8), true);
    c.host_bytes = 1e6;
    c.host_link_bytes_per_second = 1e3;
    let w = c.swap_windows();
    assert!(w[0].iter().all(|&x| x.abs() < 1e-9), "{w:?}");
}

#[test]
fn thinned_frontiers_stay_feasible_and_beat_every_uniform_plan() {
    let mut rng = Rng(21);
    for s in [sched(4, 0, 1, 8), sched(4, 0, 2, 8)] {
        let c = case(&mut rng, 6, s, true);
        let keep = evaluate(&c, &vec![[Action::Keep; N_MODULES]; 6]).unwrap();
        for frac in [0.3, 0.5, 0.8] {
            let mut o = Options::new(c.static_bytes + frac * (keep.peak_bytes - c.static_bytes));
            o.frontier_limit = 16;
            let (Ok(p), Some(u)) = (solve(&c, &o), solve_uniform(&c, &o).unwrap()) else {
                continue;
            };
            assert!(p.evaluation.peak_bytes <= o.budget_bytes * (1.0 + 1e-9));
            assert!(p.evaluation.host_bytes <= c.host_bytes * (1.0 + 1e-9));
            assert!(p.evaluation.added_seconds <= u.evaluation.added_seconds + 1e-12);
        }
    }
}

#[test]
fn recompute_frees_its_own_bytes_not_a_swaps() {
    let mut c = case(&mut Rng(7), 2, sched(1, 0, 1, 4), true);
    let l0 = c.layers[0].clone();
    let mc = l0.modules[1];
    let r = mc.recompute_saved_bytes.unwrap();
    assert!((r - mc.saved_bytes).abs() > 1.0);
    let mut actions = vec![[Action::Keep; N_MODULES]; 2];
    let keep = evaluate(&c, &actions).unwrap();
    actions[0][1] = Action::Recompute;
    let rc = evaluate(&c, &actions).unwrap();
    let peak = c.schedule.peak_inflight() as f64;
    assert!(
        (keep.activation_bytes - rc.activation_bytes - peak * r).abs()
            < 1e-6 * keep.activation_bytes
    );
    actions[0][1] = Action::Swap;
    let sw = evaluate(&c, &actions).unwrap();
    assert!(
        (keep.activation_bytes - sw.activation_bytes - peak * mc.saved_bytes).abs()
            < 1e-6 * keep.activation_bytes
    );
    // The default (no recompute_saved_bytes) is the swap's bytes, as before the field.
    c.layers[0].modules[1].recompute_saved_bytes = None;
    actions[0][1] = Action::Recompute;
    let old = evaluate(&c, &actions).unwrap();
    assert!(
        (keep.activation_bytes - old.activation_bytes - peak * mc.saved_bytes).abs()
            < 1e-6 * keep.activation_bytes
    );
    // A recompute never frees more than its layer keeps.
    c.layers[0].modules[1].recompute_saved_bytes = Some(1e9);
    let all = evaluate(&c, &actions).unwrap();
    assert!(all.activation_bytes >= 0.0);
}

#[test]
fn whole_layer_recompute_reaches_a_budget_module_actions_cannot() {
    let mut rng = Rng(2024);
    let s = sched(4, 0, 1, 8);
    let mut c = case(&mut rng, 3, s, false);
    // A layer-level store no module action frees (the norms' and residual copies).
    for lc in &mut c.layers {
        lc.other_saved_bytes += 40.0;
        lc.input_bytes = Some(4.0);
    }
    let whole = evaluate(&c, &vec![[Action::RecomputeLayer; N_MODULES]; 3]).unwrap();
    let lc0 = &c.layers[0];
    let f: f64 = c.layers.iter().map(|l| l.forward_seconds).sum();
    assert!((whole.recompute_seconds - 8.0 * f).abs() < 1e-9);
    assert!((whole.activation_bytes - 4.0 * 3.0 * 4.0).abs() < 1e-9);
    let t = c
        .layers
        .iter()
        .map(|l| l.transient_bytes + l.saved_bytes())
        .fold(0.0, f64::max);
    assert!((whole.transient_bytes - t).abs() < 1e-9);
    assert!(lc0.saved_bytes() > 40.0);
    let budget = whole.peak_bytes;
    let mut without = c.clone();
    for lc in &mut without.layers {
        lc.input_bytes = None;
    }
    let e = solve(&without, &Options::new(budget)).unwrap_err();
    assert!(e.to_string().contains("cannot be reached"), "{e}");
    assert!(matches!(e, crate::Error::Unreachable { .. }), "{e:?}");
    assert!(exhaustive(&without, &Options::new(budget))
        .unwrap()
        .is_none());
    let p = solve(&c, &Options::new(budget)).unwrap();
    assert!(p.exact);
    assert!(p.evaluation.peak_bytes <= budget * (1.0 + 1e-9));
    assert!(p.actions.iter().any(|r| r[0] == Action::RecomputeLayer));
    let ex = exhaustive(&c, &Options::new(budget)).unwrap().unwrap();
    assert!((ex.evaluation.added_seconds - p.evaluation.added_seconds).abs() < 1e-9);
    // Megatron's full recompute is a uniform setting.
    let u = solve_uniform(&c, &Options::new(budget)).unwrap().unwrap();
    assert_eq!(u.actions, vec![[Action::RecomputeLayer; N_MODULES]; 3]);
    // Off with recomputation.
    let mut o = Options::new(budget);
    o.allow_recompute = false;
    assert!(solve(&c, &o).is_err());
}

#[test]
fn whole_layer_recompute_is_all_or_nothing_in_a_row() {
    let mut rng = Rng(7);
    let mut c = case(&mut rng, 2, sched(2, 0, 1, 4), false);
    let mut row = [Action::RecomputeLayer; N_MODULES];
    row[1] = Action::Recompute;
    let e = evaluate(&c, &vec![row, [Action::Keep; N_MODULES]]).unwrap_err();
    assert!(e.to_string().contains("cannot be mixed"), "{e}");
    c.layers[0].input_bytes = None;
    let e = evaluate(
        &c,
        &vec![
            [Action::RecomputeLayer; N_MODULES],
            [Action::Keep; N_MODULES],
        ],
    )
    .unwrap_err();
    assert!(e.to_string().contains("input_bytes"), "{e}");
    assert_eq!(
        Action::parse("recompute_layer").unwrap(),
        Action::RecomputeLayer
    );
}

#[test]
fn optimal_against_exhaustive_search_with_the_executors_copies() {
    // The executor's waits are a per-layer cost like the bound's: the solve stays exact.
    for (seed, s, l, k) in [
        (31, sched(2, 0, 1, 4), 2, 1),
        (32, sched(4, 1, 1, 8), 2, 0),
        (33, sched(4, 0, 2, 8), 2, 1),
        (34, sched(4, 3, 2, 8), 2, 2),
        (35, sched(4, 0, 1, 8), 3, 2),
    ] {
        assert_exact_solves(seed, s, l, true, Some(k));
    }
}

#[test]
fn a_chunks_first_group_waits_for_its_whole_copy() {
    // One chunk of two layers on stage 0 of 4; the expert inputs (an `mlp` module) read first by
    // the group's first segment in the backward.
    let mut rng = Rng(41);
    let c = case(&mut rng, 2, sched(4, 0, 1, 8), true);
    let mut c = with_executor(c, 1, &mut rng);
    c.host_bytes = 1e9;
    let ex = c.executor.as_mut().unwrap();
    for (el, lc) in ex.layers.iter_mut().zip(&c.layers) {
        el.reads[EXCHANGE_MODULE] = vec![
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            lc.modules[EXCHANGE_MODULE].saved_bytes,
        ];
    }
    let (link, m) = (c.host_link_bytes_per_second, 8.0);
    let copy = |i: usize| c.layers[i].modules[EXCHANGE_MODULE].saved_bytes / link;
    let attn1: f64 = c.executor.as_ref().unwrap().layers[1].segment_seconds[..3]
        .iter()
        .sum();
    let wait = |c: &MemoryCosts, i: usize| {
        let mut acts = vec![[Action::Keep; N_MODULES]; 2];
        acts[i][EXCHANGE_MODULE] = Action::Swap;
        evaluate(c, &acts).unwrap().swap_wait_seconds.unwrap()
    };
    // The last layer's `mlp` group comes first in the chunk's backward: nothing started it.
    assert!((wait(&c, 1) - m * copy(1)).abs() < 1e-9 * (1.0 + m * copy(1)));
    // The first layer's started one group ahead, with the last layer's attention backward.
    let want = m * (copy(0) - attn1).max(0.0);
    assert!((wait(&c, 0) - want).abs() < 1e-9 * (1.0 + want));
    // lookahead=2 starts it in the previous backward, whose forward ran long before on stage 0.
    let mut c2 = c.clone();
    c2.executor.as_mut().unwrap().lookahead = 2;
    assert!(wait(&c2, 1) < wait(&c, 1));
    // Two groups ahead: the first layer's start with the last layer's whole backward.
    let mut cd = c.clone();
    cd.executor.as_mut().unwrap().prefetch_groups = 2;
    let back1: f64 = cd.executor.as_ref().unwrap().layers[1]
        .segment_seconds
        .iter()
        .sum();
    let want = m * (copy(0) - back1).max(0.0);
    assert!((wait(&cd, 0) - want).abs() < 1e-9 * (1.0 + want));
    assert_eq!(wait(&cd, 1), wait(&c, 1)); // the chunk's first group: nothing before it
                                           // Without an executor the planner's bound alone, and no waits reported.
    let mut c0 = c.clone();
    c0.executor = None;
    let mut acts = vec![[Action::Keep; N_MODULES]; 2];
    acts[1][EXCHANGE_MODULE] = Action::Swap;
    let (e, e0) = (evaluate(&c, &acts).unwrap(), evaluate(&c0, &acts).unwrap());
    assert_eq!(e0.swap_wait_seconds, None);
    assert_eq!(e0.swap_exposed_seconds, e0.swap_bound_seconds);
    assert_eq!(e.swap_bound_seconds, e0.swap_bound_seconds);
    assert!(e.swap_exposed_seconds >= e.swap_bound_seconds.max(e.swap_wait_seconds.unwrap()));
}

#[test]
fn more_lookahead_never_waits_longer() {
    let mut rng = Rng(51);
    for s in [
        sched(4, 0, 1, 8),
        sched(4, 3, 1, 8),
        sched(4, 1, 2, 8),
        sched(2, 0, 2, 6),
    ] {
        let c = with_executor(case(&mut rng, 4, s, true), 0, &mut rng);
        for _ in 0..20 {
            let acts: Actions = (0..4)
                .map(|_| {
                    let mut r = [Action::Keep; N_MODULES];
                    for j in [0, 1, EXCHANGE_MODULE] {
                        if rng.unit() < 0.5 {
                            r[j] = Action::Swap;
                        }
                    }
                    r
                })
                .collect();
            let mut last = f64::INFINITY;
            for (k, d) in [(0, 1), (1, 1), (2, 1), (2, 2), (2, 3)] {
                let mut ck = c.clone();
                let ex = ck.executor.as_mut().unwrap();
                (ex.lookahead, ex.prefetch_groups) = (k, d);
                let w = evaluate(&ck, &acts).unwrap().swap_wait_seconds.unwrap();
                assert!(w <= last + 1e-12, "lookahead {k}, groups {d}: {w} > {last}");
                last = w;
            }
        }
    }
}

#[test]
fn a_bad_executor_is_refused_naming_the_field() {
    let mut rng = Rng(61);
    let good = with_executor(case(&mut rng, 2, sched(2, 0, 1, 4), true), 1, &mut rng);
    let err = |f: &dyn Fn(&mut Executor)| {
        let mut c = good.clone();
        f(c.executor.as_mut().unwrap());
        c.validate().unwrap_err().to_string()
    };
    assert!(err(&|e| e.lookahead = 3).starts_with("lookahead:"));
    assert!(err(&|e| e.prefetch_groups = 0).starts_with("prefetch_groups:"));
    assert!(err(&|e| e.prefetch_groups = MAX_PREFETCH_GROUPS + 1).starts_with("prefetch_groups:"));
    assert!(err(&|e| {
        e.layers.pop();
    })
    .starts_with("executor.layers:"));
    assert!(err(&|e| e.mlp_first_segment = 0).starts_with("executor.mlp_first_segment:"));
    assert!(err(&|e| e.layers[0].reads[0] = vec![1.0]).contains("reads[layernorm]"));
    assert!(err(&|e| e.layers[1].segment_seconds[2] = f64::NAN).contains("segment_seconds"));
    assert!(good.validate().is_ok());
}
