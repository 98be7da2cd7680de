//! Building blocks shared by every algorithm: element types, fast math, memory hints and the
//! thread pool. Nothing here knows about MoE.
//!
//! * [`elem`]: the [`Element`](elem::Element) trait over f32/f64/bf16/f16 and its accumulation
//!   type.
//! * [`fastmath`]: vectorised exp, max and block top-k on f32 slices.
//! * [`mem`]: memory hints (huge pages for large outputs).
//! * [`pool`]: moerail's fork-safe thread pool.

pub mod elem;
pub mod fastmath;
pub mod mem;
pub mod pool;
