//! Bindings of the router, token dropping and the aux losses.

use moerail_core::ops::aux_loss;
use moerail_core::ops::capacity::{self, DropPolicy};
use moerail_core::ops::router::{self, ProbsGrad, RouteOutputs, RouterConfig, ScoreFunction};
use pyo3::prelude::*;

use pyo3::exceptions::PyValueError;

use crate::args::{check_disjoint, dims2, Place, TensorArg};
use crate::error::to_py_err;
use crate::tensor::{run, DType, Tensor};
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
        score_function: ScoreFunction::parse(score_function).map_err(to_py_err)?,
        use_pre_softmax,
        num_groups,
        group_topk,
        scaling_factor,
    })
}

/// The router's configuration with Megatron-Core's argument names, parsed once (the score
/// function becomes a typed value); [`PyRouterConfig::validate`] checks it against the number
/// of experts with the core's `RouterConfig::validate`, the one check every backend's router
/// runs (the CPU and CUDA routers inside their call, the NPU path through this method).
#[pyclass(module = "moerail._native.ops", name = "RouterConfig", frozen, from_py_object)]
#[derive(Clone)]
pub struct PyRouterConfig(pub RouterConfig);

#[pymethods]
impl PyRouterConfig {
    #[new]
    #[pyo3(signature = (topk, score_function="softmax", use_pre_softmax=false, num_groups=None, group_topk=None, scaling_factor=None))]
    fn new(
        topk: usize,
        score_function: &str,
        use_pre_softmax: bool,
        num_groups: Option<usize>,
        group_topk: Option<usize>,
        scaling_factor: Option<f64>,
    ) -> PyResult<Self> {
        config(topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function)
            .map(Self)
    }

    /// Checks the configuration against `num_experts` (and an expert bias, if there is one).
    fn validate(&self, num_experts: usize, has_expert_bias: bool) -> PyResult<()> {
        self.0.validate(num_experts, has_expert_bias).map_err(to_py_err)
    }

    #[getter]
    fn topk(&self) -> usize {
        self.0.topk
    }

    #[getter]
    fn score_function(&self) -> &'static str {
        self.0.score_function.name()
    }

    #[getter]
    fn use_pre_softmax(&self) -> bool {
        self.0.use_pre_softmax
    }

    #[getter]
    fn num_groups(&self) -> Option<usize> {
        self.0.num_groups
    }

    #[getter]
    fn group_topk(&self) -> Option<usize> {
        self.0.group_topk
    }

    #[getter]
    fn scaling_factor(&self) -> Option<f64> {
        self.0.scaling_factor
    }

    fn __repr__(&self) -> String {
        fn py<T: std::fmt::Display>(v: Option<T>) -> String {
            v.map_or("None".into(), |v| v.to_string())
        }
        let c = &self.0;
        format!(
            "RouterConfig(topk={}, score_function='{}', use_pre_softmax={}, num_groups={}, group_topk={}, scaling_factor={})",
            c.topk,
            c.score_function.name(),
            if c.use_pre_softmax { "True" } else { "False" },
            py(c.num_groups),
            py(c.group_topk),
            py(c.scaling_factor)
        )
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

type Outputs<'a, 'py> = (&'a Bound<'py, PyAny>, &'a Bound<'py, PyAny>, &'a Bound<'py, PyAny>);

impl RouterForwardArgs {
    pub(crate) fn read(
        place: Place,
        logits: &Bound<'_, PyAny>,
        config: &PyRouterConfig,
        expert_bias: Option<&Bound<'_, PyAny>>,
        (probs_k, indices, tokens_per_expert): Outputs<'_, '_>,
        dense_probs: Option<&Bound<'_, PyAny>>,
        routing_map: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let lg = TensorArg::new(logits, "logits")
            .place(place)
            .ndim(2, "[num_tokens, num_experts]")
            .read()?;
        let (t_n, e_n) = dims2(&lg);
        let cfg = config.0.clone();
        let topk = cfg.topk;
        let bias = TensorArg::optional(expert_bias, "expert_bias")
            .place(place)
            .float32()
            .len(e_n)
            .read_opt()?;
        let out = |obj, name| TensorArg::new(obj, name).place(place);
        let pk = out(probs_k, "probs").same_dtype(&lg).shape(&[t_n, topk]).read()?;
        let ix = out(indices, "indices").int64().shape(&[t_n, topk]).read()?;
        let tpe = out(tokens_per_expert, "tokens_per_expert").int64().len(e_n).read()?;
        let dense_probs = TensorArg::optional(dense_probs, "probs").place(place);
        let routing_map = TensorArg::optional(routing_map, "routing_map").place(place);
        let dense = match (
            dense_probs.same_dtype(&lg).shape(&[t_n, e_n]).read_opt()?,
            routing_map.bool().shape(&[t_n, e_n]).read_opt()?,
        ) {
            (Some(p), Some(m)) => Some((p, m)),
            (None, None) => None,
            _ => return Err(PyValueError::new_err("dense_probs and routing_map go together")),
        };
        let mut outs = vec![&pk, &ix, &tpe];
        if let Some((p, m)) = &dense {
            outs.push(p);
            outs.push(m);
        }
        let mut ins = vec![&lg];
        ins.extend(bias.iter());
        check_disjoint(&outs, &ins)?;
        Ok(Self { lg, t_n, e_n, cfg, bias, pk, ix, tpe, dense })
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
        place: Place,
        grad_probs: &Bound<'_, PyAny>,
        logits: &Bound<'_, PyAny>,
        indices: &Bound<'_, PyAny>,
        config: &PyRouterConfig,
        grad_logits: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let lg = TensorArg::new(logits, "logits")
            .place(place)
            .ndim(2, "[num_tokens, num_experts]")
            .read()?;
        let (t_n, e_n) = dims2(&lg);
        let cfg = config.0.clone();
        let topk = cfg.topk;
        let g = TensorArg::new(grad_probs, "grad_probs").place(place).same_dtype(&lg).read()?;
        let dense = if g.shape == [t_n, e_n] {
            true
        } else {
            g.expect_shape(&[t_n, topk])?;
            false
        };
        let ix =
            TensorArg::new(indices, "indices").place(place).int64().shape(&[t_n, topk]).read()?;
        let out = TensorArg::new(grad_logits, "grad_logits")
            .place(place)
            .same_dtype(&lg)
            .shape(&[t_n, e_n])
            .read()?;
        check_disjoint(&[&out], &[&lg, &g, &ix])?;
        Ok(Self { lg, t_n, e_n, cfg, g, dense, ix, out })
    }
}

/// Router forward: writes probs [T, k], indices [T, k], tokens_per_expert [E] and, if given,
/// the dense probs [T, E] and routing_map [T, E].
#[pyfunction]
#[pyo3(signature = (logits, config, expert_bias, probs_k, indices, tokens_per_expert, dense_probs=None, routing_map=None))]
#[allow(clippy::too_many_arguments)]
pub fn router_forward(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    config: PyRouterConfig,
    expert_bias: Option<&Bound<'_, PyAny>>,
    probs_k: &Bound<'_, PyAny>,
    indices: &Bound<'_, PyAny>,
    tokens_per_expert: &Bound<'_, PyAny>,
    dense_probs: Option<&Bound<'_, PyAny>>,
    routing_map: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let RouterForwardArgs { lg, t_n, e_n, cfg, bias, pk, ix, tpe, dense } =
        RouterForwardArgs::read(
            Place::Cpu,
            logits,
            &config,
            expert_bias,
            (probs_k, indices, tokens_per_expert),
            dense_probs,
            routing_map,
        )?;
    with_float!(lg, |T| {
        // SAFETY: the tensors are alive for the call (held by the caller) and were checked above.
        let (l, p, i, n) = unsafe {
            (lg.slice::<T>(), pk.slice_mut::<T>(), ix.slice_mut::<i64>(), tpe.slice_mut::<i64>())
        };
        // SAFETY: expert_bias was read as float32 [num_experts]; it is an input, only read.
        let b = bias.as_ref().map(|b| unsafe { b.slice::<f32>() });
        // SAFETY: the dense outputs have the logits' dtype `T` and bool, shape [T, E], disjoint from the rest.
        let d = dense.as_ref().map(|(p, m)| unsafe { (p.slice_mut::<T>(), m.slice_mut::<bool>()) });
        run(py, || {
            router::topk_route_forward(
                l,
                t_n,
                e_n,
                b,
                &cfg,
                RouteOutputs { probs_k: p, indices: i, dense: d, tokens_per_expert: n },
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
    config: PyRouterConfig,
    grad_logits: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let RouterBackwardArgs { lg, t_n, e_n, cfg, g, dense, ix, out } =
        RouterBackwardArgs::read(Place::Cpu, grad_probs, logits, indices, &config, grad_logits)?;
    with_float!(lg, |T| {
        // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
        // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
        let (gs, l, i, o) =
            unsafe { (g.slice::<T>(), lg.slice::<T>(), ix.slice::<i64>(), out.slice_mut::<T>()) };
        let grad = if dense { ProbsGrad::Dense(gs) } else { ProbsGrad::Compact(gs) };
        run(py, || router::topk_route_backward(grad, l, i, t_n, e_n, &cfg, o))
    })
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
    let lg = TensorArg::new(logits, "logits").ndim(2, "[num_tokens, num_experts]").read()?;
    let (t_n, e_n) = dims2(&lg);
    let f = ScoreFunction::parse(score_function).map_err(to_py_err)?;
    let sc = TensorArg::new(scores, "scores").acc_of(&lg).shape(&[t_n, e_n]).read()?;
    let m = TensorArg::new(routing_map, "routing_map").bool().shape(&[t_n, e_n]).read()?;
    let n = TensorArg::new(tokens_per_expert, "tokens_per_expert").int64().len(e_n).read()?;
    check_disjoint(&[&sc, &m, &n], &[&lg])?;
    with_float!(lg, |T| {
        // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
        // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
        let (l, s, mm, nn) = unsafe {
            (
                lg.slice::<T>(),
                sc.slice_mut::<<T as moerail_core::Element>::Acc>(),
                m.slice_mut::<bool>(),
                n.slice_mut::<i64>(),
            )
        };
        run(py, || router::aux_loss_scores_forward(l, t_n, e_n, topk, f, s, mm, nn))
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
    let lg = TensorArg::new(logits, "logits").ndim(2, "[num_tokens, num_experts]").read()?;
    let (t_n, e_n) = dims2(&lg);
    let f = ScoreFunction::parse(score_function).map_err(to_py_err)?;
    let g = TensorArg::new(grad_scores, "grad_scores").acc_of(&lg).shape(&[t_n, e_n]).read()?;
    let out =
        TensorArg::new(grad_logits, "grad_logits").same_dtype(&lg).shape(&[t_n, e_n]).read()?;
    check_disjoint(&[&out], &[&lg, &g])?;
    with_float!(lg, |T| {
        // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
        // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
        let (gs, l, o) = unsafe {
            (g.slice::<<T as moerail_core::Element>::Acc>(), lg.slice::<T>(), out.slice_mut::<T>())
        };
        run(py, || router::aux_loss_scores_backward(gs, l, t_n, e_n, f, o))
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
    let p = TensorArg::new(probs, "probs").ndim(2, "[num_tokens, num_experts]").read()?;
    let n = TensorArg::new(tokens_per_expert, "tokens_per_expert").read()?;
    let counts = counts_f64(&n)?;
    let (t_n, e_n) = dims2(&p);
    with_float!(p, |T| {
        // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
        // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
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
    let out =
        TensorArg::new(grad_probs, "grad_probs").ndim(2, "[num_tokens, num_experts]").read()?;
    let n = TensorArg::new(tokens_per_expert, "tokens_per_expert").read()?;
    check_disjoint(&[&out], &[&n])?;
    let counts = counts_f64(&n)?;
    let (t_n, e_n) = dims2(&out);
    with_float!(out, |T| {
        // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
        // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
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
    let lg = TensorArg::new(logits, "logits").ndim(2, "[num_tokens, num_experts]").read()?;
    let (t_n, e_n) = dims2(&lg);
    let l = TensorArg::new(lse, "lse").acc_of(&lg).len(t_n).read()?;
    check_disjoint(&[&l], &[&lg])?;
    with_float!(lg, |T| {
        // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
        // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
        let (x, ls) =
            unsafe { (lg.slice::<T>(), l.slice_mut::<<T as moerail_core::Element>::Acc>()) };
        run(py, || aux_loss::z_loss(x, t_n, e_n, ls).map(moerail_core::util::elem::Real::into_f64))
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
    let lg = TensorArg::new(logits, "logits").ndim(2, "[num_tokens, num_experts]").read()?;
    let (t_n, e_n) = dims2(&lg);
    let l = TensorArg::new(lse, "lse").acc_of(&lg).len(t_n).read()?;
    let out =
        TensorArg::new(grad_logits, "grad_logits").same_dtype(&lg).shape(&[t_n, e_n]).read()?;
    check_disjoint(&[&out], &[&lg, &l])?;
    with_float!(lg, |T| {
        // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
        // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
        let (x, ls, o) = unsafe {
            (lg.slice::<T>(), l.slice::<<T as moerail_core::Element>::Acc>(), out.slice_mut::<T>())
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
    let n = TensorArg::new(tokens_per_expert, "tokens_per_expert").read()?;
    let b = TensorArg::new(expert_bias, "expert_bias").read()?;
    let o = TensorArg::new(out, "out").read()?;
    b.expect_dtype(&[DType::F32], "float32")?;
    o.expect_dtype(&[DType::F32], "float32")?;
    if b.shape.is_empty() {
        return Err(PyValueError::new_err(
            "expert_bias: expected [num_experts] or [num_layers, num_experts]",
        ));
    }
    n.expect_shape(&b.shape)?;
    o.expect_shape(&b.shape)?;
    check_disjoint(&[&o], &[&n, &b])?;
    let e_n = *b.shape.last().unwrap();
    let counts = counts_f64(&n)?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (bs, os) = unsafe { (b.slice::<f32>(), o.slice_mut::<f32>()) };
    run(py, || aux_loss::expert_bias_update(counts, bs, e_n, rate, os))
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
        .map_err(to_py_err)
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
    let p = TensorArg::new(probs, "probs").ndim(2, "[num_tokens, num_experts]").read()?;
    let (t_n, e_n) = dims2(&p);
    let m = TensorArg::new(routing_map, "routing_map").bool().shape(&[t_n, e_n]).read()?;
    let op = TensorArg::new(out_probs, "out_probs").same_dtype(&p).shape(&[t_n, e_n]).read()?;
    let om = TensorArg::new(out_map, "out_map").bool().shape(&[t_n, e_n]).read()?;
    check_disjoint(&[&op, &om], &[&p, &m])?;
    let policy = DropPolicy::parse(drop_policy).map_err(to_py_err)?;
    with_float!(p, |T| {
        // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
        // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
        let (ps, ms, ops, oms) = unsafe {
            (p.slice::<T>(), m.slice::<bool>(), op.slice_mut::<T>(), om.slice_mut::<bool>())
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
    m.add_class::<PyRouterConfig>()?;
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
