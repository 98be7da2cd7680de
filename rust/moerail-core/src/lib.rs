//! moerail-core: the algorithms of moerail, in pure Rust (no Python, no accelerator).
//!
//! Each folder owns one concept, and the data goes one way through them:
//! `util` <- `ops` <- `ep`, `balance` <- `parallel` <- `sim`.
//!
//! * [`error`]: the crate-wide [`Error`] / [`Result`] and the argument-check helpers.
//! * [`util`]: element types ([`Element`]), vectorised fast math, memory hints and moerail's
//!   fork-safe thread pool. Nothing MoE-specific.
//! * [`ops`]: the per-step MoE ops on host slices — [`ops::router`] (top-k routing with
//!   Megatron-Core's score functions), [`ops::capacity`] (expert capacity, token dropping),
//!   [`ops::aux_loss`] (load-balancing losses, z-loss, expert-bias update) and
//!   [`ops::permute`] (permute / unpermute / chunk sorting), forward and backward.
//! * [`ep`]: the expert-parallel token exchange over an [`ep::EpGroup`]: what one rank sends
//!   ([`ep::dispatch_layout`], DeepEP's `get_dispatch_layout`), the plans of the four
//!   strategies, their α-β cost and the local data movement of dispatch and combine.
//! * [`balance`]: expert load balancing — load statistics and predictors, EPLB and its refined
//!   placement, replica choice per token, migration planning.
//! * [`parallel`]: Megatron-Core's rank groups (`RankGenerator`) of a [`parallel::ParallelLayout`]
//!   (tp/cp/pp/ep/etp with MoE Parallel Folding).
//! * [`memory`]: the activation memory planner (keep / recompute / swap per module and layer
//!   under a budget, on the pipeline schedule's timeline).
//! * [`sim`]: the training-step simulator (step time, MFU, memory) and the layout search.
//!
//! Every function validates its arguments and returns [`Error::InvalidArgument`] naming the
//! argument instead of panicking; outputs are written only after the checks pass.

pub mod balance;
pub mod ep;
pub mod error;
pub mod memory;
pub mod ops;
pub mod parallel;
pub mod sim;
pub mod util;

pub use error::{Error, Result};
pub use util::elem::Element;
