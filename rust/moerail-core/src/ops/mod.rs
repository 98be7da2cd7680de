//! The per-step MoE ops, forward and backward, on host slices: routing, token dropping, the
//! auxiliary losses and the permutation of tokens into expert-major order.
//!
//! * [`router`]: top-k routing with Megatron-Core's score functions, forward and backward.
//! * [`capacity`]: expert capacity and token dropping.
//! * [`aux_loss`]: load-balancing losses, z-loss, the expert-bias update.
//! * [`permute`]: token permutation, unpermutation (combine) and chunk sorting.
//!
//! Sums run in a fixed order, so results do not depend on the thread count.

pub mod aux_loss;
pub mod capacity;
pub mod permute;
pub mod router;
