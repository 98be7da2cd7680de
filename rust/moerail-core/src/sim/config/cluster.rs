//! The cluster section: device count, per-device speeds and memory, link bandwidths, and the
//! per-device efficiency parameters of the cost model.

use super::training::Precision;
use super::value::{unknown, Value};
use crate::error::{ensure, Result};

/// Per-device efficiency parameters of the cost model (see `sim` module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Efficiency {
    /// Fraction of peak a large GEMM reaches.
    pub gemm_efficiency: f64,
    /// Fraction of the FP8 peak a large FP8 GEMM reaches (FP8 tensor cores run further from
    /// their peak than 16-bit ones: scaling, and operands fed at twice the rate).
    pub fp8_gemm_efficiency: f64,
    /// GEMM dimension at which that fraction halves (per dimension: `d / (d + knee)`).
    pub gemm_dim_knee: f64,
    /// Fraction of the 16-bit peak flash attention reaches (forward; backward the same on
    /// 2.5x the FLOPs).
    pub attention_efficiency: f64,
    /// Fraction of memory bandwidth element-wise kernels reach.
    pub memory_efficiency: f64,
    /// Fraction of link bandwidth collectives reach inside a node / across nodes.
    pub intra_node_comm_efficiency: f64,
    pub inter_node_comm_efficiency: f64,
    /// Host-side cost per kernel (launch, Python/CPU overhead), microseconds.
    pub kernel_overhead_us: f64,
    /// Fraction of TP communication hidden behind GEMMs with `tp_comm_overlap`.
    pub tp_overlap_efficiency: f64,
    /// Share of the device's SMs / cores an overlapped EP exchange occupies (DeepEP's kernels
    /// take 24 of an H100's 132 SMs): compute beside it runs that much slower.
    pub comm_sm_fraction: f64,
    /// Fraction of the available compute that can hide overlapped communication (EP
    /// all-to-all with shared-expert or 1F1B overlap, DP reduce, CP ring exchange).
    pub overlap_efficiency: f64,
}

impl Default for Efficiency {
    fn default() -> Self {
        // Priors: published H100 microbenchmarks (see the `sim` module docs).
        Self {
            gemm_efficiency: 0.75,
            fp8_gemm_efficiency: 0.55,
            gemm_dim_knee: 64.0,
            attention_efficiency: 0.55,
            memory_efficiency: 0.7,
            intra_node_comm_efficiency: 0.75,
            inter_node_comm_efficiency: 0.8,
            kernel_overhead_us: 4.0,
            tp_overlap_efficiency: 0.8,
            overlap_efficiency: 0.8,
            comm_sm_fraction: 24.0 / 132.0,
        }
    }
}

impl Efficiency {
    pub const KEYS: &'static [&'static str] = &[
        "gemm_efficiency",
        "fp8_gemm_efficiency",
        "gemm_dim_knee",
        "attention_efficiency",
        "memory_efficiency",
        "intra_node_comm_efficiency",
        "inter_node_comm_efficiency",
        "kernel_overhead_us",
        "tp_overlap_efficiency",
        "overlap_efficiency",
        "comm_sm_fraction",
    ];

    pub(super) fn set(&mut self, key: &str, arg: &str, v: &Value) -> Result<()> {
        let frac = |v: &Value| -> Result<f64> {
            let x = v.f64(arg)?;
            ensure(x > 0.0 && x <= 1.0, arg, || {
                format!("must be in (0, 1], got {x}")
            })?;
            Ok(x)
        };
        match key {
            "gemm_efficiency" => self.gemm_efficiency = frac(v)?,
            "fp8_gemm_efficiency" => self.fp8_gemm_efficiency = frac(v)?,
            "gemm_dim_knee" => self.gemm_dim_knee = v.nonneg_f64(arg)?,
            "attention_efficiency" => self.attention_efficiency = frac(v)?,
            "memory_efficiency" => self.memory_efficiency = frac(v)?,
            "intra_node_comm_efficiency" => self.intra_node_comm_efficiency = frac(v)?,
            "inter_node_comm_efficiency" => self.inter_node_comm_efficiency = frac(v)?,
            "kernel_overhead_us" => self.kernel_overhead_us = v.nonneg_f64(arg)?,
            "tp_overlap_efficiency" => self.tp_overlap_efficiency = v.fraction(arg)?,
            "overlap_efficiency" => self.overlap_efficiency = v.fraction(arg)?,
            "comm_sm_fraction" => {
                let x = v.fraction(arg)?;
                ensure(x < 1.0, arg, || format!("must be below 1, got {x}"))?;
                self.comm_sm_fraction = x;
            }
            _ => return Err(unknown(arg, Self::KEYS)),
        }
        Ok(())
    }
}

/// The cluster: device count and speeds.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub name: String,
    pub devices: Option<usize>,
    pub devices_per_node: usize,
    pub peak_tflops_bf16: f64,
    pub peak_tflops_fp16: Option<f64>,
    pub peak_tflops_fp8: Option<f64>,
    pub memory_gib: f64,
    pub memory_bandwidth_gb_s: f64,
    /// Per device, per direction.
    pub intra_node_bandwidth_gb_s: f64,
    pub intra_node_latency_us: f64,
    /// Per device (its NIC), per direction.
    pub inter_node_bandwidth_gb_s: f64,
    pub inter_node_latency_us: f64,
    /// Host link (PCIe) per device, for offloading.
    pub host_bandwidth_gb_s: f64,
    /// Memory the framework cannot use: runtime context, communicator buffers, fragmentation.
    pub memory_reserved_gib: f64,
    /// Host optimizer throughput, parameters per second per device (optimizer offload).
    pub host_adam_params_per_s: f64,
    pub efficiency: Efficiency,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            name: String::new(),
            devices: None,
            devices_per_node: 8,
            peak_tflops_bf16: 0.0,
            peak_tflops_fp16: None,
            peak_tflops_fp8: None,
            memory_gib: 0.0,
            memory_bandwidth_gb_s: 0.0,
            intra_node_bandwidth_gb_s: 0.0,
            intra_node_latency_us: 5.0,
            inter_node_bandwidth_gb_s: 0.0,
            inter_node_latency_us: 10.0,
            host_bandwidth_gb_s: 50.0,
            memory_reserved_gib: 4.0,
            host_adam_params_per_s: 2.0e9,
            efficiency: Efficiency::default(),
        }
    }
}

impl Cluster {
    pub const KEYS: &'static [&'static str] = &[
        "name",
        "devices",
        "devices_per_node",
        "peak_tflops_bf16",
        "peak_tflops_fp16",
        "peak_tflops_fp8",
        "memory_gib",
        "memory_bandwidth_gb_s",
        "intra_node_bandwidth_gb_s",
        "intra_node_latency_us",
        "inter_node_bandwidth_gb_s",
        "inter_node_latency_us",
        "host_bandwidth_gb_s",
        "memory_reserved_gib",
        "host_adam_params_per_s",
    ];

    pub(super) fn set(&mut self, key: &str, arg: &str, v: &Value) -> Result<()> {
        match key {
            "name" => self.name = v.str(arg)?,
            "devices" => self.devices = v.opt_positive(arg)?,
            "devices_per_node" => self.devices_per_node = v.positive(arg)?,
            "peak_tflops_bf16" => self.peak_tflops_bf16 = v.pos_f64(arg)?,
            "peak_tflops_fp16" => {
                self.peak_tflops_fp16 = match v {
                    Value::None => None,
                    v => Some(v.pos_f64(arg)?),
                }
            }
            "peak_tflops_fp8" => {
                self.peak_tflops_fp8 = match v {
                    Value::None => None,
                    v => Some(v.pos_f64(arg)?),
                }
            }
            "memory_gib" => self.memory_gib = v.pos_f64(arg)?,
            "memory_bandwidth_gb_s" => self.memory_bandwidth_gb_s = v.pos_f64(arg)?,
            "intra_node_bandwidth_gb_s" => self.intra_node_bandwidth_gb_s = v.pos_f64(arg)?,
            "intra_node_latency_us" => self.intra_node_latency_us = v.nonneg_f64(arg)?,
            "inter_node_bandwidth_gb_s" => self.inter_node_bandwidth_gb_s = v.pos_f64(arg)?,
            "inter_node_latency_us" => self.inter_node_latency_us = v.nonneg_f64(arg)?,
            "host_bandwidth_gb_s" => self.host_bandwidth_gb_s = v.pos_f64(arg)?,
            "memory_reserved_gib" => self.memory_reserved_gib = v.nonneg_f64(arg)?,
            "host_adam_params_per_s" => self.host_adam_params_per_s = v.pos_f64(arg)?,
            _ => {
                if Efficiency::KEYS.contains(&key) {
                    return self.efficiency.set(key, arg, v);
                }
                let mut all = Self::KEYS.to_vec();
                all.extend_from_slice(Efficiency::KEYS);
                return Err(unknown(arg, &all));
            }
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<()> {
        for (k, v) in [
            ("peak_tflops_bf16", self.peak_tflops_bf16),
            ("memory_gib", self.memory_gib),
            ("memory_bandwidth_gb_s", self.memory_bandwidth_gb_s),
            ("intra_node_bandwidth_gb_s", self.intra_node_bandwidth_gb_s),
            ("inter_node_bandwidth_gb_s", self.inter_node_bandwidth_gb_s),
        ] {
            ensure(v > 0.0, k, || "is required (cluster section)".into())?;
        }
        Ok(())
    }

    /// Dense peak FLOP/s for GEMMs in `p`.
    pub fn gemm_peak(&self, p: Precision) -> f64 {
        1e12 * match p {
            Precision::Bf16 => self.peak_tflops_bf16,
            Precision::Fp16 => self.peak_tflops_fp16.unwrap_or(self.peak_tflops_bf16),
            Precision::Fp8 => self.peak_tflops_fp8.unwrap_or(2.0 * self.peak_tflops_bf16),
        }
    }

    /// Dense 16-bit peak FLOP/s (the MFU denominator).
    pub fn peak16(&self) -> f64 {
        1e12 * self.peak_tflops_bf16
    }
}
