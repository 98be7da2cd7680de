//! Load statistics: predictors of the next interval's expert load, their backtest on a recorded
//! history, and the metrics of a placement.
//!
//! A history is `[steps, series]` row-major, oldest step first (a series is one (layer, expert)
//! pair). A prediction is the expected **mean load per step over the next `horizon` steps**.
//!
//! * `ema(alpha)`: `s_0 = x_0`, `s_t = alpha x_t + (1 - alpha) s_{t-1}`; predicts `s_T`.
//! * `mean(window)`: the mean of the last `window` steps.
//! * `trend(window)`: the least-squares line through the last `window` steps, averaged over the
//!   next `horizon` steps, clamped at 0.
//!
//! Series are independent and processed in fixed blocks, so results are the same bits for any
//! number of threads.

use rayon::prelude::*;

use crate::error::{ensure, invalid, Result};
use crate::util::pool;

/// Series per parallel block (fixed, so sums do not depend on the thread count).
const BLOCK: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Predictor {
    Ema { alpha: f64 },
    Mean { window: usize },
    Trend { window: usize },
}

impl Predictor {
    /// `"ema"`, `"mean"` or `"trend"` with its parameter.
    pub fn parse(name: &str, alpha: f64, window: usize) -> Result<Self> {
        let p = match name {
            "ema" => Self::Ema { alpha },
            "mean" => Self::Mean { window },
            "trend" => Self::Trend { window },
            _ => {
                return Err(invalid(
                    "method",
                    format!("expected 'ema', 'mean' or 'trend', got {name:?}"),
                ))
            }
        };
        p.check()?;
        Ok(p)
    }

    fn check(&self) -> Result<()> {
        match *self {
            Self::Ema { alpha } => ensure(alpha > 0.0 && alpha <= 1.0, "alpha", || {
                format!("must be in (0, 1], got {alpha}")
            }),
            Self::Mean { window } | Self::Trend { window } => ensure(window >= 1, "window", || {
                format!("must be >= 1, got {window}")
            }),
        }
    }
}

/// Incremental predictor state of one series.
struct SeriesPredictor<'a> {
    p: Predictor,
    col: &'a dyn Fn(usize) -> f64,
    ema: f64,
}

impl SeriesPredictor<'_> {
    /// Feeds step `t` (only the EMA keeps state; the window predictors read the column).
    fn push(&mut self, t: usize) {
        if let Predictor::Ema { alpha } = self.p {
            let x = (self.col)(t);
            self.ema = if t == 0 {
                x
            } else {
                alpha * x + (1.0 - alpha) * self.ema
            };
        }
    }

    /// Prediction from steps `0..t` (t >= 1) of the mean over the next `horizon` steps.
    fn predict(&self, t: usize, horizon: usize) -> f64 {
        match self.p {
            Predictor::Ema { .. } => self.ema,
            Predictor::Mean { window } => {
                let n = window.min(t);
                let s = (t - n..t).fold(0.0, |a, i| a + (self.col)(i));
                s / n as f64
            }
            Predictor::Trend { window } => {
                let n = window.min(t);
                if n == 1 {
                    return (self.col)(t - 1);
                }
                let x_mean = (n - 1) as f64 / 2.0;
                let y_mean = (t - n..t).fold(0.0, |a, i| a + (self.col)(i)) / n as f64;
                let (mut sxy, mut sxx) = (0.0, 0.0);
                for (j, i) in (t - n..t).enumerate() {
                    let dx = j as f64 - x_mean;
                    sxy += dx * ((self.col)(i) - y_mean);
                    sxx += dx * dx;
                }
                let slope = sxy / sxx;
                // Mean x of the next `horizon` steps: n .. n + horizon - 1.
                let x_future = (n - 1) as f64 + (horizon as f64 + 1.0) / 2.0;
                (y_mean + slope * (x_future - x_mean)).max(0.0)
            }
        }
    }
}

fn check_history(history: &[f64], steps: usize, series: usize) -> Result<()> {
    ensure(history.len() == steps * series, "history", || {
        format!("expected {steps} x {series} values, got {}", history.len())
    })?;
    if let Some(i) = history.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
        return Err(invalid(
            "history",
            format!(
                "loads must be finite and >= 0, got {} at step {}",
                history[i],
                i / series.max(1)
            ),
        ));
    }
    Ok(())
}

/// Predicts the mean load per step of each series over the next `horizon` steps.
pub fn predict(
    history: &[f64],
    steps: usize,
    series: usize,
    p: Predictor,
    horizon: usize,
    out: &mut [f64],
) -> Result<()> {
    p.check()?;
    check_history(history, steps, series)?;
    ensure(steps >= 1, "history", || {
        "needs at least one recorded step".into()
    })?;
    ensure(horizon >= 1, "horizon", || {
        format!("must be >= 1, got {horizon}")
    })?;
    ensure(out.len() == series, "out", || {
        format!("expected {series} values, got {}", out.len())
    })?;
    if series == 0 {
        return Ok(());
    }
    pool::install(|| {
        out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, o)| {
            for (j, slot) in o.iter_mut().enumerate() {
                let k = b * BLOCK + j;
                let col = |t: usize| history[t * series + k];
                let mut sp = SeriesPredictor {
                    p,
                    col: &col,
                    ema: 0.0,
                };
                if let Predictor::Ema { .. } = p {
                    for t in 0..steps {
                        sp.push(t);
                    }
                }
                *slot = sp.predict(steps, horizon);
            }
        })
    });
    Ok(())
}

/// Backtest of a predictor on a history: for every `t` in `warmup..=steps - horizon`, predict
/// from steps `0..t` the mean of steps `t..t + horizon` and compare.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backtest {
    /// Sum over points and series of |prediction - actual|.
    pub abs_error: f64,
    /// Sum over points and series of |actual| (WAPE = abs_error / total).
    pub total: f64,
    /// Sum of squared errors (RMSE = sqrt(sq_error / count)).
    pub sq_error: f64,
    /// Number of (point, series) pairs.
    pub count: usize,
}

pub fn backtest(
    history: &[f64],
    steps: usize,
    series: usize,
    p: Predictor,
    horizon: usize,
    warmup: usize,
) -> Result<Backtest> {
    p.check()?;
    check_history(history, steps, series)?;
    ensure(horizon >= 1, "horizon", || {
        format!("must be >= 1, got {horizon}")
    })?;
    let warmup = warmup.max(1);
    let mut res = Backtest {
        abs_error: 0.0,
        total: 0.0,
        sq_error: 0.0,
        count: 0,
    };
    if series == 0 || steps < warmup + horizon {
        return Ok(res);
    }
    let blocks: Vec<(f64, f64, f64, usize)> = pool::install(|| {
        (0..series.div_ceil(BLOCK))
            .into_par_iter()
            .map(|b| {
                let mut acc = (0.0, 0.0, 0.0, 0usize);
                for k in b * BLOCK..((b + 1) * BLOCK).min(series) {
                    let col = |t: usize| history[t * series + k];
                    let mut sp = SeriesPredictor {
                        p,
                        col: &col,
                        ema: 0.0,
                    };
                    for t in 0..warmup {
                        sp.push(t);
                    }
                    for t in warmup..=steps - horizon {
                        let pred = sp.predict(t, horizon);
                        let actual = (t..t + horizon).fold(0.0, |a, i| a + col(i)) / horizon as f64;
                        let d = pred - actual;
                        acc.0 += d.abs();
                        acc.1 += actual;
                        acc.2 += d * d;
                        acc.3 += 1;
                        sp.push(t);
                    }
                }
                acc
            })
            .collect()
    });
    for (a, t, s, c) in blocks {
        res.abs_error += a;
        res.total += t;
        res.sq_error += s;
        res.count += c;
    }
    Ok(res)
}

/// Metrics of one layer's placement.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerMetrics {
    /// Load of each device (tokens; an expert's load is split evenly over its replicas).
    pub device_load: Vec<f64>,
    /// Load of each node.
    pub node_load: Vec<f64>,
    /// max / mean device load (1 when there is no load).
    pub max_mean_device: f64,
    /// max / mean node load.
    pub max_mean_node: f64,
    /// Coefficient of variation (population std / mean) of the device loads.
    pub cv_device: f64,
    /// The smallest max/mean device load any placement on these slots can reach.
    pub lower_bound: f64,
    /// Tokens over capacity (per slot) when a capacity is given, else 0.
    pub dropped: f64,
    /// Total load of the layer.
    pub total: f64,
}

fn max_over_mean(v: &[f64]) -> f64 {
    let total: f64 = v.iter().fold(0.0, |a, &x| a + x);
    if total <= 0.0 {
        return 1.0;
    }
    v.iter().cloned().fold(f64::NEG_INFINITY, f64::max) * v.len() as f64 / total
}

/// Metrics of a placement `phy2log [layers, R]` for loads `load [layers, E]` on `num_gpus`
/// devices in `num_nodes` nodes; `capacity` is tokens per slot, if tokens are dropped.
#[allow(clippy::too_many_arguments)]
pub fn placement_metrics(
    load: &[f64],
    layers: usize,
    num_experts: usize,
    phy2log: &[i64],
    num_replicas: usize,
    num_gpus: usize,
    num_nodes: usize,
    capacity: Option<f64>,
) -> Result<Vec<LayerMetrics>> {
    super::check_loads(load, layers, num_experts, "load")?;
    let topo = super::Topology::new(num_experts, num_replicas, 1, num_nodes, num_gpus)?;
    super::check_placement(phy2log, layers, &topo, "phy2log")?;
    if let Some(c) = capacity {
        ensure(c.is_finite() && c >= 0.0, "capacity", || {
            format!("must be finite and >= 0, got {c}")
        })?;
    }
    let per_gpu = num_replicas / num_gpus;
    let gpn = num_gpus / num_nodes;
    Ok(pool::install(|| {
        (0..layers)
            .into_par_iter()
            .map(|l| {
                let w = &load[l * num_experts..(l + 1) * num_experts];
                let p2l = &phy2log[l * num_replicas..(l + 1) * num_replicas];
                let mut cnt = vec![0usize; num_experts];
                for &e in p2l {
                    cnt[e as usize] += 1;
                }
                let mut device_load = vec![0.0; num_gpus];
                let mut dropped = 0.0;
                for (s, &e) in p2l.iter().enumerate() {
                    let x = w[e as usize] / cnt[e as usize] as f64;
                    device_load[s / per_gpu] += x;
                    if let Some(c) = capacity {
                        dropped += (x - c).max(0.0);
                    }
                }
                let node_load: Vec<f64> = device_load
                    .chunks(gpn)
                    .map(|c| c.iter().fold(0.0, |a, &x| a + x))
                    .collect();
                let total: f64 = w.iter().fold(0.0, |a, &x| a + x);
                let mean = total / num_gpus as f64;
                let cv_device = if mean > 0.0 {
                    let var = device_load
                        .iter()
                        .fold(0.0, |a, &x| a + (x - mean) * (x - mean))
                        / num_gpus as f64;
                    var.sqrt() / mean
                } else {
                    0.0
                };
                LayerMetrics {
                    max_mean_device: max_over_mean(&device_load),
                    max_mean_node: max_over_mean(&node_load),
                    cv_device,
                    lower_bound: super::lower_bound_ratio(w, num_replicas, num_gpus),
                    dropped,
                    total,
                    device_load,
                    node_load,
                }
            })
            .collect()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictors_on_a_line() {
        // Series 0: 2t + 1, series 1: constant 5.
        let steps = 6;
        let h: Vec<f64> = (0..steps)
            .flat_map(|t| [2.0 * t as f64 + 1.0, 5.0])
            .collect();
        let mut out = [0.0; 2];
        predict(&h, steps, 2, Predictor::Trend { window: 4 }, 1, &mut out).unwrap();
        assert!((out[0] - 13.0).abs() < 1e-12 && (out[1] - 5.0).abs() < 1e-12);
        predict(&h, steps, 2, Predictor::Trend { window: 4 }, 3, &mut out).unwrap();
        assert!((out[0] - 15.0).abs() < 1e-12, "{}", out[0]); // mean of 13, 15, 17
        predict(&h, steps, 2, Predictor::Mean { window: 2 }, 1, &mut out).unwrap();
        assert!((out[0] - 10.0).abs() < 1e-12);
        predict(&h, steps, 2, Predictor::Ema { alpha: 1.0 }, 1, &mut out).unwrap();
        assert_eq!(out[0], 11.0);
        let bt_trend = backtest(&h, steps, 2, Predictor::Trend { window: 4 }, 1, 2).unwrap();
        let bt_ema = backtest(&h, steps, 2, Predictor::Ema { alpha: 0.5 }, 1, 2).unwrap();
        assert!(bt_trend.abs_error < 1e-9);
        assert!(bt_ema.abs_error / bt_ema.total > 0.01);
        assert_eq!(bt_trend.count, 2 * 4);
    }

    #[test]
    fn metrics_of_a_simple_placement() {
        // 4 experts, 2 GPUs, 1 node: [e0, e0 | e1, e2], e3 ... needs a slot: use 3 slots/GPU.
        let load = [8.0, 2.0, 2.0, 4.0];
        let p2l = [0, 1, 2, 0, 3, 3];
        let m = placement_metrics(&load, 1, 4, &p2l, 6, 2, 1, Some(3.0)).unwrap();
        assert_eq!(m[0].device_load, vec![8.0, 8.0]);
        assert_eq!(m[0].max_mean_device, 1.0);
        assert_eq!(m[0].dropped, 2.0);
        assert!(placement_metrics(&load, 1, 4, &[0, 1, 2, 0, 1, 2], 6, 2, 1, None).is_err());
    }
}
