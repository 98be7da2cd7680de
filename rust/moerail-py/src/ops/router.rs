//! Bindings of the router, token dropping and the aux losses.

use moerail_core::ops::aux_loss;
use moerail_core::ops::capacity::{self, DropPolicy};
use moerail_core::ops::router::{self, ProbsGrad, RouteOutputs, RouterConfig, ScoreFunction};
use pyo3::prelude::*;

use crate::tensor::{check_disjoint, run, DType, Tensor};
use crate::with_float;

pub(crate) fn config(
    topk: usize,
    use_pre_softmax: bool,
    num_groups: Option<usize>,
    group_topk: Option<usize>,
    scaling_factor: Option<f64>,
    score_function: &str,
) -> PyResult<RouterConfig> {
    Ok(RouterConfig {
        topk,
        score_function: ScoreFunction::parse(score_function).map_err(crate::tensor::to_py_err)?,
        use_pre_softmax,
        num_groups,
        group_topk,
        scaling_factor,
    })
}

/// Reads a tensor argument: `Tensor::from_py` (CPU) or `Tensor::from_py_on_device`.
pub(crate) type Reader = fn(&Bound<'_, PyAny>, &'static str) -> PyResult<Tensor>;

fn read_optional(
    read: Reader,
    obj: Option<&Bound<'_, PyAny>>,
    name: &'static str,
) -> PyResult<Option<Tensor>> {
    match obj {
        Some(o) if !o.is_none() => Ok(Some(read(o, name)?)),
        _ => Ok(None),
    }
}

/// The checked arguments of a router forward, shared by the CPU and the device bindings.
pub(crate) struct RouterForwardArgs {
    pub lg: Tensor,
    pub t_n: usize,
    pub e_n: usize,
    pub cfg: RouterConfig,
    pub bias: Option<Tensor>,
    pub pk: Tensor,
    pub ix: Tensor,
    pub tpe: Tensor,
    pub dense: Option<(Tensor, Tensor)>,
}

type ConfigArgs<'a> = (
    usize,
    bool,
    Option<usize>,
    Option<usize>,
    Option<f64>,
    &'a str,
);
type Outputs<'a, 'py> = (
    &'a Bound<'py, PyAny>,
    &'a Bound<'py, PyAny>,
    &'a Bound<'py, PyAny>,
);

impl RouterForwardArgs {
    pub(crate) fn read(
        read: Reader,
        logits: &Bound<'_, PyAny>,
        (topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function): ConfigArgs<
            '_,
        >,
        expert_bias: Option<&Bound<'_, PyAny>>,
        (probs_k, indices, tokens_per_expert): Outputs<'_, '_>,
        dense_probs: Option<&Bound<'_, PyAny>>,
        routing_map: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let lg = read(logits, "logits")?;
        lg.expect_ndim(2, "[num_tokens, num_experts]")?;
        let (t_n, e_n) = (lg.shape[0], lg.shape[1]);
        let cfg = config(
            topk,
            use_pre_softmax,
            num_groups,
            group_topk,
            scaling_factor,
            score_function,
        )?;
        let bias = read_optional(read, expert_bias, "expert_bias")?;
        if let Some(b) = &bias {
            b.expect_dtype(&[DType::F32], "float32")?;
            b.expect_shape(&[e_n])?;
        }
        let pk = read(probs_k, "probs")?;
        let ix = read(indices, "indices")?;
        let tpe = read(tokens_per_expert, "tokens_per_expert")?;
        pk.expect_same_dtype(&lg)?;
        pk.expect_shape(&[t_n, topk])?;
        ix.expect_dtype(&[DType::I64], "int64")?;
        ix.expect_shape(&[t_n, topk])?;
        tpe.expect_dtype(&[DType::I64], "int64")?;
        tpe.expect_shape(&[e_n])?;
        let dense = match (
            read_optional(read, dense_probs, "probs")?,
            read_optional(read, routing_map, "routing_map")?,
        ) {
            (Some(p), Some(m)) => {
                p.expect_same_dtype(&lg)?;
                p.expect_shape(&[t_n, e_n])?;
                m.expect_dtype(&[DType::Bool], "bool")?;
                m.expect_shape(&[t_n, e_n])?;
                Some((p, m))
            }
            (None, None) => None,
            _ => {
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "dense_probs and routing_map go together",
                ))
            }
        };
        let mut outs = vec![&pk, &ix, &tpe];
        if let Some((p, m)) = &dense {
            outs.push(p);
            outs.push(m);
        }
        let mut ins = vec![&lg];
        if let Some(b) = &bias {
            ins.push(b);
        }
        check_disjoint(&outs, &ins)?;
        Ok(Self {
            lg,
            t_n,
            e_n,
            cfg,
            bias,
            pk,
            ix,
            tpe,
            dense,
        })
    }
}

/// The checked arguments of a router backward, shared by the CPU and the device bindings.
pub(crate) struct RouterBackwardArgs {
    pub lg: Tensor,
    pub t_n: usize,
    pub e_n: usize,
    pub cfg: RouterConfig,
    pub g: Tensor,
    /// `grad_probs` is `[T, E]` (else `[T, k]`).
    pub dense: bool,
    pub ix: Tensor,
    pub out: Tensor,
}

impl RouterBackwardArgs {
    pub(crate) fn read(
        read: Reader,
        grad_probs: &Bound<'_, PyAny>,
        logits: &Bound<'_, PyAny>,
        indices: &Bound<'_, PyAny>,
        (topk, use_pre_softmax, scaling_factor, score_function): (usize, bool, Option<f64>, &str),
        grad_logits: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let lg = read(logits, "logits")?;
        lg.expect_ndim(2, "[num_tokens, num_experts]")?;
        let (t_n, e_n) = (lg.shape[0], lg.shape[1]);
        let cfg = config(
            topk,
            use_pre_softmax,
            None,
            None,
            scaling_factor,
            score_function,
        )?;
        let g = read(grad_probs, "grad_probs")?;
        g.expect_same_dtype(&lg)?;
        let dense = if g.shape == [t_n, e_n] {
            true
        } else {
            g.expect_shape(&[t_n, topk])?;
            false
        };
        let ix = read(indices, "indices")?;
        ix.expect_dtype(&[DType::I64], "int64")?;
        ix.expect_shape(&[t_n, topk])?;
        let out = read(grad_logits, "grad_logits")?;
        out.expect_same_dtype(&lg)?;
        out.expect_shape(&[t_n, e_n])?;
        check_disjoint(&[&out], &[&lg, &g, &ix])?;
        Ok(Self {
            lg,
            t_n,
            e_n,
            cfg,
            g,
            dense,
            ix,
            out,
        })
    }
}

/// Router forward: writes probs [T, k], indices [T, k], tokens_per_expert [E] and, if given,
/// the dense probs [T, E] and routing_map [T, E].
#[pyfunction]
#[pyo3(signature = (logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function, expert_bias, probs_k, indices, tokens_per_expert, dense_probs=None, routing_map=None))]
#[allow(clippy::too_many_arguments)]
pub fn router_forward(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    topk: usize,
    use_pre_softmax: bool,
    num_groups: Option<usize>,
    group_topk: Option<usize>,
    scaling_factor: Option<f64>,
    score_function: &str,
    expert_bias: Option<&Bound<'_, PyAny>>,
    probs_k: &Bound<'_, PyAny>,
    indices: &Bound<'_, PyAny>,
    tokens_per_expert: &Bound<'_, PyAny>,
    dense_probs: Option<&Bound<'_, PyAny>>,
    routing_map: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let RouterForwardArgs {
        lg,
        t_n,
        e_n,
        cfg,
        bias,
        pk,
        ix,
        tpe,
        dense,
    } = RouterForwardArgs::read(
        Tensor::from_py,
        logits,
        (
            topk,
            use_pre_softmax,
            num_groups,
            group_topk,
            scaling_factor,
            score_function,
        ),
        expert_bias,
        (probs_k, indices, tokens_per_expert),
        dense_probs,
        routing_map,
    )?;
    with_float!(lg, |T| {
        // SAFETY: the tensors are alive for the call (held by the caller) and were checked above.
        let (l, p, i, n) = unsafe {
            (
                lg.slice::<T>(),
                pk.slice_mut::<T>(),
                ix.slice_mut::<i64>(),
                tpe.slice_mut::<i64>(),
            )
        };
        let b = bias.as_ref().map(|b| unsafe { b.slice::<f32>() });
        let d = dense
            .as_ref()
            .map(|(p, m)| unsafe { (p.slice_mut::<T>(), m.slice_mut::<bool>()) });
        run(py, || {
            router::topk_route_forward(
                l,
                t_n,
                e_n,
                b,
                &cfg,
                RouteOutputs {
                    probs_k: p,
                    indices: i,
                    dense: d,
                    tokens_per_expert: n,
                },
            )
        })
    })
}

/// Router backward: grad_logits [T, E] from the gradient of the probs (dense or compact).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn router_backward(
    py: Python<'_>,
    grad_probs: &Bound<'_, PyAny>,
    logits: &Bound<'_, PyAny>,
    indices: &Bound<'_, PyAny>,
    topk: usize,
    use_pre_softmax: bool,
    scaling_factor: Option<f64>,
    score_function: &str,
    grad_logits: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let RouterBackwardArgs {
        lg,
        t_n,
        e_n,
        cfg,
        g,
        dense,
        ix,
        out,
    } = RouterBackwardArgs::read(
        Tensor::from_py,
        grad_probs,
        logits,
        indices,
        (topk, use_pre_softmax, scaling_factor, score_function),
        grad_logits,
    )?;
    with_float!(lg, |T| {
        // SAFETY: checked above; the tensors outlive the call.
        let (gs, l, i, o) = unsafe {
            (
                g.slice::<T>(),
                lg.slice::<T>(),
                ix.slice::<i64>(),
                out.slice_mut::<T>(),
            )
        };
        let grad = if dense {
            ProbsGrad::Dense(gs)
        } else {
            ProbsGrad::Compact(gs)
        };
        run(py, || {
            router::topk_route_backward(grad, l, i, t_n, e_n, &cfg, o)
        })
    })
}

pub(crate) fn acc_dtype(t: &Tensor) -> DType {
    if t.dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Scores for the aux loss: scores [T, E] (fp32, fp64 for fp64 logits), routing_map, counts.
#[pyfunction]
pub fn aux_scores_forward(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    topk: usize,
    score_function: &str,
    scores: &Bound<'_, PyAny>,
    routing_map: &Bound<'_, PyAny>,
    tokens_per_expert: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let lg = Tensor::from_py(logits, "logits")?;
    lg.expect_ndim(2, "[num_tokens, num_experts]")?;
    let (t_n, e_n) = (lg.shape[0], lg.shape[1]);
    let f = ScoreFunction::parse(score_function).map_err(crate::tensor::to_py_err)?;
    let sc = Tensor::from_py(scores, "scores")?;
    sc.expect_dtype(&[acc_dtype(&lg)], "the accumulation dtype")?;
    sc.expect_shape(&[t_n, e_n])?;
    let m = Tensor::from_py(routing_map, "routing_map")?;
    m.expect_dtype(&[DType::Bool], "bool")?;
    m.expect_shape(&[t_n, e_n])?;
    let n = Tensor::from_py(tokens_per_expert, "tokens_per_expert")?;
    n.expect_dtype(&[DType::I64], "int64")?;
    n.expect_shape(&[e_n])?;
    check_disjoint(&[&sc, &m, &n], &[&lg])?;
    with_float!(lg, |T| {
        // SAFETY: checked above.
        let (l, s, mm, nn) = unsafe {
            (
                lg.slice::<T>(),
                sc.slice_mut::<<T as moerail_core::Element>::Acc>(),
                m.slice_mut::<bool>(),
                n.slice_mut::<i64>(),
            )
        };
        run(py, || {
            router::aux_loss_scores_forward(l, t_n, e_n, topk, f, s, mm, nn)
        })
    })
}

#[pyfunction]
pub fn aux_scores_backward(
    py: Python<'_>,
    grad_scores: &Bound<'_, PyAny>,
    logits: &Bound<'_, PyAny>,
    score_function: &str,
    grad_logits: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let lg = Tensor::from_py(logits, "logits")?;
    lg.expect_ndim(2, "[num_tokens, num_experts]")?;
    let (t_n, e_n) = (lg.shape[0], lg.shape[1]);
    let f = ScoreFunction::parse(score_function).map_err(crate::tensor::to_py_err)?;
    let g = Tensor::from_py(grad_scores, "grad_scores")?;
    g.expect_dtype(&[acc_dtype(&lg)], "the accumulation dtype")?;
    g.expect_shape(&[t_n, e_n])?;
    let out = Tensor::from_py(grad_logits, "grad_logits")?;
    out.expect_same_dtype(&lg)?;
    out.expect_shape(&[t_n, e_n])?;
    check_disjoint(&[&out], &[&lg, &g])?;
    with_float!(lg, |T| {
        // SAFETY: checked above.
        let (gs, l, o) = unsafe {
            (
                g.slice::<<T as moerail_core::Element>::Acc>(),
                lg.slice::<T>(),
                out.slice_mut::<T>(),
            )
        };
        run(py, || {
            router::aux_loss_scores_backward(gs, l, t_n, e_n, f, o)
        })
    })
}

fn counts_f64(t: &Tensor) -> PyResult<&'static [f64]> {
    t.expect_dtype(&[DType::F64], "float64")?;
    // SAFETY: checked dtype; the tensor outlives the call.
    Ok(unsafe { t.slice::<f64>() })
}

/// Load-balancing loss value: `scale * sum_{b,e} P[b,e] * tokens_per_expert[b,e]`.
#[pyfunction]
pub fn load_balancing_loss_forward(
    py: Python<'_>,
    probs: &Bound<'_, PyAny>,
    tokens_per_expert: &Bound<'_, PyAny>,
    num_seqs: usize,
    scale: f64,
) -> PyResult<f64> {
    let p = Tensor::from_py(probs, "probs")?;
    p.expect_ndim(2, "[num_tokens, num_experts]")?;
    let n = Tensor::from_py(tokens_per_expert, "tokens_per_expert")?;
    let counts = counts_f64(&n)?;
    let (t_n, e_n) = (p.shape[0], p.shape[1]);
    with_float!(p, |T| {
        // SAFETY: checked above.
        let ps = unsafe { p.slice::<T>() };
        run(py, || {
            aux_loss::load_balancing_loss(ps, t_n, e_n, counts, num_seqs, scale)
                .map(moerail_core::util::elem::Real::into_f64)
        })
    })
}

#[pyfunction]
pub fn load_balancing_loss_backward(
    py: Python<'_>,
    grad: f64,
    tokens_per_expert: &Bound<'_, PyAny>,
    num_seqs: usize,
    scale: f64,
    grad_probs: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let out = Tensor::from_py(grad_probs, "grad_probs")?;
    out.expect_ndim(2, "[num_tokens, num_experts]")?;
    let n = Tensor::from_py(tokens_per_expert, "tokens_per_expert")?;
    check_disjoint(&[&out], &[&n])?;
    let counts = counts_f64(&n)?;
    let (t_n, e_n) = (out.shape[0], out.shape[1]);
    with_float!(out, |T| {
        // SAFETY: checked above.
        let o = unsafe { out.slice_mut::<T>() };
        run(py, || {
            aux_loss::load_balancing_loss_backward(grad, t_n, e_n, counts, num_seqs, scale, o)
        })
    })
}

/// `mean_t logsumexp(logits[t])^2`; writes each token's logsumexp to `lse` (accumulation dtype).
#[pyfunction]
pub fn z_loss_forward(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
) -> PyResult<f64> {
    let lg = Tensor::from_py(logits, "logits")?;
    lg.expect_ndim(2, "[num_tokens, num_experts]")?;
    let (t_n, e_n) = (lg.shape[0], lg.shape[1]);
    let l = Tensor::from_py(lse, "lse")?;
    l.expect_dtype(&[acc_dtype(&lg)], "the accumulation dtype")?;
    l.expect_shape(&[t_n])?;
    check_disjoint(&[&l], &[&lg])?;
    with_float!(lg, |T| {
        // SAFETY: checked above.
        let (x, ls) = unsafe {
            (
                lg.slice::<T>(),
                l.slice_mut::<<T as moerail_core::Element>::Acc>(),
            )
        };
        run(py, || {
            aux_loss::z_loss(x, t_n, e_n, ls).map(moerail_core::util::elem::Real::into_f64)
        })
    })
}

#[pyfunction]
pub fn z_loss_backward(
    py: Python<'_>,
    grad: f64,
    logits: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    grad_logits: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let lg = Tensor::from_py(logits, "logits")?;
    lg.expect_ndim(2, "[num_tokens, num_experts]")?;
    let (t_n, e_n) = (lg.shape[0], lg.shape[1]);
    let l = Tensor::from_py(lse, "lse")?;
    l.expect_dtype(&[acc_dtype(&lg)], "the accumulation dtype")?;
    l.expect_shape(&[t_n])?;
    let out = Tensor::from_py(grad_logits, "grad_logits")?;
    out.expect_same_dtype(&lg)?;
    out.expect_shape(&[t_n, e_n])?;
    check_disjoint(&[&out], &[&lg, &l])?;
    with_float!(lg, |T| {
        // SAFETY: checked above.
        let (x, ls, o) = unsafe {
            (
                lg.slice::<T>(),
                l.slice::<<T as moerail_core::Element>::Acc>(),
                out.slice_mut::<T>(),
            )
        };
        run(py, || aux_loss::z_loss_backward(grad, x, ls, t_n, e_n, o))
    })
}

/// `out = expert_bias + rate * sign(mean(tokens_per_expert) - tokens_per_expert)`.
#[pyfunction]
pub fn expert_bias_update(
    py: Python<'_>,
    tokens_per_expert: &Bound<'_, PyAny>,
    expert_bias: &Bound<'_, PyAny>,
    rate: f64,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let n = Tensor::from_py(tokens_per_expert, "tokens_per_expert")?;
    let b = Tensor::from_py(expert_bias, "expert_bias")?;
    let o = Tensor::from_py(out, "out")?;
    b.expect_dtype(&[DType::F32], "float32")?;
    o.expect_dtype(&[DType::F32], "float32")?;
    if b.shape.is_empty() {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "expert_bias: expected [num_experts] or [num_layers, num_experts]",
        ));
    }
    n.expect_shape(&b.shape)?;
    o.expect_shape(&b.shape)?;
    check_disjoint(&[&o], &[&n, &b])?;
    let e_n = *b.shape.last().unwrap();
    let counts = counts_f64(&n)?;
    // SAFETY: checked above.
    let (bs, os) = unsafe { (b.slice::<f32>(), o.slice_mut::<f32>()) };
    run(py, || {
        aux_loss::expert_bias_update(counts, bs, e_n, rate, os)
    })
}

#[pyfunction]
#[pyo3(signature = (num_tokens, num_experts, capacity_factor, min_capacity=None))]
pub fn get_capacity(
    num_tokens: usize,
    num_experts: usize,
    capacity_factor: f64,
    min_capacity: Option<usize>,
) -> PyResult<usize> {
    capacity::get_capacity(num_tokens, num_experts, capacity_factor, min_capacity)
        .map_err(crate::tensor::to_py_err)
}

/// Applies expert capacity; returns the capacity.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn token_dropping(
    py: Python<'_>,
    probs: &Bound<'_, PyAny>,
    routing_map: &Bound<'_, PyAny>,
    topk: usize,
    capacity_factor: f64,
    drop_policy: &str,
    pad_to_capacity: bool,
    out_probs: &Bound<'_, PyAny>,
    out_map: &Bound<'_, PyAny>,
) -> PyResult<usize> {
    let p = Tensor::from_py(probs, "probs")?;
    p.expect_ndim(2, "[num_tokens, num_experts]")?;
    let (t_n, e_n) = (p.shape[0], p.shape[1]);
    let m = Tensor::from_py(routing_map, "routing_map")?;
    m.expect_dtype(&[DType::Bool], "bool")?;
    m.expect_shape(&[t_n, e_n])?;
    let op = Tensor::from_py(out_probs, "out_probs")?;
    op.expect_same_dtype(&p)?;
    op.expect_shape(&[t_n, e_n])?;
    let om = Tensor::from_py(out_map, "out_map")?;
    om.expect_dtype(&[DType::Bool], "bool")?;
    om.expect_shape(&[t_n, e_n])?;
    check_disjoint(&[&op, &om], &[&p, &m])?;
    let policy = DropPolicy::parse(drop_policy).map_err(crate::tensor::to_py_err)?;
    with_float!(p, |T| {
        // SAFETY: checked above.
        let (ps, ms, ops, oms) = unsafe {
            (
                p.slice::<T>(),
                m.slice::<bool>(),
                op.slice_mut::<T>(),
                om.slice_mut::<bool>(),
            )
        };
        run(py, || {
            capacity::apply_token_dropping(
                ps,
                ms,
                t_n,
                e_n,
                topk,
                capacity_factor,
                policy,
                pad_to_capacity,
                ops,
                oms,
            )
        })
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(router_forward, m)?)?;
    m.add_function(wrap_pyfunction!(router_backward, m)?)?;
    m.add_function(wrap_pyfunction!(aux_scores_forward, m)?)?;
    m.add_function(wrap_pyfunction!(aux_scores_backward, m)?)?;
    m.add_function(wrap_pyfunction!(load_balancing_loss_forward, m)?)?;
    m.add_function(wrap_pyfunction!(load_balancing_loss_backward, m)?)?;
    m.add_function(wrap_pyfunction!(z_loss_forward, m)?)?;
    m.add_function(wrap_pyfunction!(z_loss_backward, m)?)?;
    m.add_function(wrap_pyfunction!(expert_bias_update, m)?)?;
    m.add_function(wrap_pyfunction!(get_capacity, m)?)?;
    m.add_function(wrap_pyfunction!(token_dropping, m)?)?;
    Ok(())
}
