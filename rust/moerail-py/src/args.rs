//! Argument specs shared by every binding: what a tensor argument must be, said once.
//!
//! ```ignore
//! let lg = TensorArg::new(logits, "logits").ndim(2, "[num_tokens, num_experts]").read()?;
//! let ix = TensorArg::new(indices, "indices").int64().shape(&[t, k]).read()?;
//! let b = TensorArg::optional(bias, "expert_bias").float32().len(e).read()?;
//! check_disjoint(&[&ix], &[&lg])?;
//! ```
//!
//! The checks run in the order they are written, so the first wrong property is the one the
//! error names; the texts are those of [`Tensor`]'s `expect_*` methods (`TypeError` for a
//! dtype, `ValueError` for a shape).

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::tensor::{DType, Tensor};

/// Where an argument's memory may live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Host memory only (the CPU ops read and write it).
    Cpu,
    /// Any device: the pointer is only handed to kernels.
    AnyDevice,
}

enum Check<'a> {
    Dtype(&'a [DType], &'a str),
    SameDtype(&'a Tensor),
    Ndim(usize, &'a str),
    Shape(&'a [usize]),
    Len(usize),
    MinBytes(usize),
}

/// `fn name(self) -> Self`: the dtype check `.dtype(&[DType::X], "name")`, one per dtype.
macro_rules! dtype_shortcuts {
    ($($name:ident => $dtype:ident, $what:literal;)*) => {
        $(
            #[doc = concat!("A ", $what, " tensor.")]
            pub fn $name(self) -> Self {
                self.dtype(&[DType::$dtype], $what)
            }
        )*
    };
}

/// A tensor argument and the checks it must pass; [`TensorArg::read`] reads and checks it.
pub struct TensorArg<'a, 'py> {
    obj: Option<&'a Bound<'py, PyAny>>,
    name: &'static str,
    place: Place,
    checks: Vec<Check<'a>>,
}

impl<'a, 'py> TensorArg<'a, 'py> {
    /// A required argument named `name` (the name errors give).
    pub fn new(obj: &'a Bound<'py, PyAny>, name: &'static str) -> Self {
        Self::optional(Some(obj), name)
    }

    /// An optional argument: missing or `None` reads as `None` with [`TensorArg::read_opt`].
    pub fn optional(obj: Option<&'a Bound<'py, PyAny>>, name: &'static str) -> Self {
        Self { obj, name, place: Place::Cpu, checks: Vec::new() }
    }

    /// Where the tensor may live (default: the CPU).
    pub fn place(mut self, place: Place) -> Self {
        self.place = place;
        self
    }

    /// Any device (the device bindings).
    pub fn any_device(self) -> Self {
        self.place(Place::AnyDevice)
    }

    /// One of `allowed`; `what` names them in the error.
    pub fn dtype(mut self, allowed: &'a [DType], what: &'a str) -> Self {
        self.checks.push(Check::Dtype(allowed, what));
        self
    }

    dtype_shortcuts! {
        int64 => I64, "int64";
        int32 => I32, "int32";
        bool => Bool, "bool";
        float32 => F32, "float32";
        float64 => F64, "float64";
        uint8 => U8, "uint8";
    }

    /// The accumulation dtype of `of` (float64 for float64 data, else float32).
    pub fn acc_of(self, of: &Tensor) -> Self {
        self.dtype(acc_dtypes(of), "the accumulation dtype")
    }

    /// The dtype of `other`.
    pub fn same_dtype(mut self, other: &'a Tensor) -> Self {
        self.checks.push(Check::SameDtype(other));
        self
    }

    /// `ndim` dimensions; `what` describes them (e.g. `"[num_tokens, hidden]"`).
    pub fn ndim(mut self, ndim: usize, what: &'a str) -> Self {
        self.checks.push(Check::Ndim(ndim, what));
        self
    }

    /// Exactly this shape.
    pub fn shape(mut self, shape: &'a [usize]) -> Self {
        self.checks.push(Check::Shape(shape));
        self
    }

    /// A vector of `n` entries (shape `[n]`).
    pub fn len(mut self, n: usize) -> Self {
        self.checks.push(Check::Len(n));
        self
    }

    /// At least `bytes` bytes of uint8 (a kernel's workspace).
    pub fn workspace(mut self, bytes: usize) -> Self {
        self = self.uint8();
        self.checks.push(Check::MinBytes(bytes));
        self
    }

    /// Reads the tensor and runs the checks in order.
    pub fn read(self) -> PyResult<Tensor> {
        let name = self.name;
        self.read_opt()?.ok_or_else(|| {
            PyTypeError::new_err(format!("{name}: expected a torch.Tensor, got NoneType"))
        })
    }

    /// As [`TensorArg::read`], for an argument that may be missing or `None`.
    pub fn read_opt(self) -> PyResult<Option<Tensor>> {
        let obj = match self.obj {
            Some(o) if !o.is_none() => o,
            _ => return Ok(None),
        };
        let t = match self.place {
            Place::Cpu => Tensor::from_py(obj, self.name)?,
            Place::AnyDevice => Tensor::from_py_on_device(obj, self.name)?,
        };
        for c in &self.checks {
            match *c {
                Check::Dtype(allowed, what) => t.expect_dtype(allowed, what)?,
                Check::SameDtype(other) => t.expect_same_dtype(other)?,
                Check::Ndim(n, what) => t.expect_ndim(n, what)?,
                Check::Shape(s) => t.expect_shape(s)?,
                Check::Len(n) => t.expect_shape(&[n])?,
                Check::MinBytes(bytes) => {
                    if t.numel < bytes {
                        return Err(PyValueError::new_err(format!(
                            "{}: expected at least {bytes} bytes, got {}",
                            t.name, t.numel
                        )));
                    }
                }
            }
        }
        Ok(Some(t))
    }
}

/// The accumulation dtype of a tensor: float64 for float64 data, else float32.
pub fn acc_dtype(t: &Tensor) -> DType {
    acc_dtypes(t)[0]
}

fn acc_dtypes(t: &Tensor) -> &'static [DType] {
    if t.dtype == DType::F64 {
        &[DType::F64]
    } else {
        &[DType::F32]
    }
}

/// The two dimensions of a tensor checked to be 2-D.
pub fn dims2(t: &Tensor) -> (usize, usize) {
    (t.shape[0], t.shape[1])
}

/// `cond` or a `ValueError` with `msg`: for the pairs of arguments that go together.
pub fn together(cond: bool, msg: &'static str) -> PyResult<()> {
    if cond {
        Ok(())
    } else {
        Err(PyValueError::new_err(msg))
    }
}

/// Outputs must not share memory with inputs or with each other.
pub fn check_disjoint(outputs: &[&Tensor], inputs: &[&Tensor]) -> PyResult<()> {
    for (i, o) in outputs.iter().enumerate() {
        let (a0, a1) = o.byte_range();
        for other in inputs.iter().chain(outputs[i + 1..].iter()) {
            let (b0, b1) = other.byte_range();
            if a0 < b1 && b0 < a1 {
                return Err(PyValueError::new_err(format!(
                    "{}: output memory overlaps {}",
                    o.name, other.name
                )));
            }
        }
    }
    Ok(())
}
