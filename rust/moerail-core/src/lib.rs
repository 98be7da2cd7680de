//! moerail-core: the algorithms of moerail, in pure Rust (no Python, no accelerator).
//!
//! * [`router`]: top-k routing with Megatron-Core's score functions, forward and backward.
//! * [`capacity`]: expert capacity and token dropping.
//! * [`aux_loss`]: load-balancing losses, z-loss, the expert-bias update.
//! * [`permute`]: token permutation, unpermutation (combine) and chunk sorting.
//! * [`pool`]: moerail's fork-safe thread pool.
//!
//! Every function validates its arguments and returns [`Error::InvalidArgument`] naming the
//! argument instead of panicking; outputs are written only after the checks pass.

pub mod a2a;
pub mod aux_loss;
pub mod balance;
pub mod capacity;
pub mod elem;
pub mod error;
pub mod fastmath;
pub mod mem;
pub mod permute;
pub mod pool;
pub mod router;
pub mod sim;
pub mod topology;

pub use elem::Element;
pub use error::{Error, Result};
