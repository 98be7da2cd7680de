//! Bindings of moerail-device, one module per backend: [`cuda`] (the CUDA kernels' launch
//! sequences, NVRTC and driver status) and [`ascend`] (CANN/HCCL status and the HCCL executor).

pub mod ascend;
pub mod cuda;
