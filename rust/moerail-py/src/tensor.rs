//! Tensors crossing from Python: (data pointer, shape, strides, dtype, device), checked here.
//! Python allocates every output with torch; Rust only writes into it.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::error::{panic_err, to_py_err};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
    Bool,
    I64,
    I32,
    /// Only from MindSpore's dtype names (`aot`); torch's int16 tensors read as `Other`.
    I16,
    U8,
    Other,
}

/// torch's dtype objects, looked up once.
static DTYPES: PyOnceLock<Vec<(Py<PyAny>, DType)>> = PyOnceLock::new();

fn dtypes(py: Python<'_>) -> PyResult<&'static Vec<(Py<PyAny>, DType)>> {
    DTYPES.get_or_try_init(py, || {
        let torch = py.import("torch")?;
        [
            DType::F32,
            DType::F64,
            DType::BF16,
            DType::F16,
            DType::Bool,
            DType::I64,
            DType::I32,
            DType::U8,
        ]
        .into_iter()
        .map(|d| {
            let attr = d.torch_name().trim_start_matches("torch.");
            Ok((torch.getattr(attr)?.unbind(), d))
        })
        .collect()
    })
}

impl DType {
    fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "torch.float32",
            Self::F64 => "torch.float64",
            Self::BF16 => "torch.bfloat16",
            Self::F16 => "torch.float16",
            Self::Bool => "torch.bool",
            Self::I64 => "torch.int64",
            Self::I32 => "torch.int32",
            Self::I16 => "torch.int16",
            Self::U8 => "torch.uint8",
            Self::Other => "other",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::BF16 | Self::F16 | Self::I16 => 2,
            Self::Bool | Self::U8 => 1,
            Self::Other => 0,
        }
    }
}

/// Where a tensor's memory lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A CUDA device ordinal.
    Cuda(i32),
    /// Any other torch device type (e.g. "npu:0"), by name.
    Other(String),
}

/// A checked view of a contiguous tensor (on the CPU unless read with [`Tensor::from_py_on_device`]).
pub struct Tensor {
    pub name: &'static str,
    pub ptr: usize,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub dtype_name: String,
    pub numel: usize,
    pub device: Device,
}

impl Tensor {
    /// Reads and checks a CPU `torch.Tensor` argument named `name`.
    pub fn from_py(obj: &Bound<'_, PyAny>, name: &'static str) -> PyResult<Self> {
        Self::read(obj, name, false)
    }

    /// Reads and checks a `torch.Tensor` argument on any device (its memory is not touched
    /// here: device pointers are only passed to kernels).
    pub fn from_py_on_device(obj: &Bound<'_, PyAny>, name: &'static str) -> PyResult<Self> {
        Self::read(obj, name, true)
    }

    fn read(obj: &Bound<'_, PyAny>, name: &'static str, any_device: bool) -> PyResult<Self> {
        let py = obj.py();
        let not_a_tensor = || {
            let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
            PyTypeError::new_err(format!("{name}: expected a torch.Tensor, got {ty}"))
        };
        // Identity against the cached torch dtypes: no string per call.
        let dtype_obj = obj.getattr(intern!(py, "dtype")).map_err(|_| not_a_tensor())?;
        let known = dtypes(py)?;
        let dtype =
            known.iter().find(|(d, _)| d.bind(py).is(&dtype_obj)).map_or(DType::Other, |(_, t)| *t);
        let is_cpu: bool =
            obj.getattr(intern!(py, "is_cpu")).map_err(|_| not_a_tensor())?.extract()?;
        let device = if is_cpu {
            Device::Cpu
        } else {
            let dev = obj.getattr(intern!(py, "device"))?;
            let kind: String = dev.getattr(intern!(py, "type"))?.extract()?;
            let index: Option<i32> = dev.getattr(intern!(py, "index"))?.extract()?;
            if !any_device {
                let d: String = dev.str()?.extract()?;
                return Err(PyValueError::new_err(format!(
                    "{name}: expected a CPU tensor, got one on '{d}'"
                )));
            }
            match kind.as_str() {
                "cuda" => Device::Cuda(index.unwrap_or(0)),
                _ => Device::Other(dev.str()?.extract()?),
            }
        };
        let shape: Vec<usize> = obj.getattr(intern!(py, "shape"))?.extract()?;
        let strides: Vec<isize> = obj.call_method0(intern!(py, "stride"))?.extract()?;
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| PyValueError::new_err(format!("{name}: shape {shape:?} overflows")))?;
        // Contiguous: row-major strides, ignoring dimensions of size 1.
        let mut expect = 1isize;
        for (d, s) in shape.iter().zip(&strides).rev() {
            // An empty tensor has no layout to get wrong (torch gives it any strides).
            if numel != 0 && *d != 1 && *s != expect {
                return Err(PyValueError::new_err(format!(
                    "{name}: expected a contiguous tensor (shape {shape:?}, strides {strides:?})"
                )));
            }
            expect = expect.saturating_mul(*d as isize);
        }
        let ptr: usize = obj.call_method0(intern!(py, "data_ptr"))?.extract()?;
        if numel > 0 && (ptr == 0 || ptr % dtype.size().max(1) != 0) {
            return Err(PyValueError::new_err(format!(
                "{name}: data pointer {ptr:#x} is null or misaligned"
            )));
        }
        let dtype_name = if dtype == DType::Other {
            dtype_obj.str()?.extract()?
        } else {
            dtype.torch_name().to_string()
        };
        Ok(Self { name, ptr, shape, dtype, dtype_name, numel, device })
    }

    pub fn optional(obj: Option<&Bound<'_, PyAny>>, name: &'static str) -> PyResult<Option<Self>> {
        match obj {
            Some(o) if !o.is_none() => Ok(Some(Self::from_py(o, name)?)),
            _ => Ok(None),
        }
    }

    pub fn expect_dtype(&self, allowed: &[DType], what: &str) -> PyResult<()> {
        if allowed.contains(&self.dtype) {
            Ok(())
        } else {
            Err(PyTypeError::new_err(format!(
                "{}: expected {what}, got {}",
                self.name, self.dtype_name
            )))
        }
    }

    pub fn expect_same_dtype(&self, other: &Tensor) -> PyResult<()> {
        if self.dtype == other.dtype {
            Ok(())
        } else {
            Err(PyTypeError::new_err(format!(
                "{}: expected dtype {} (the dtype of {}), got {}",
                self.name, other.dtype_name, other.name, self.dtype_name
            )))
        }
    }

    pub fn expect_ndim(&self, ndim: usize, what: &str) -> PyResult<()> {
        if self.shape.len() == ndim {
            Ok(())
        } else {
            Err(PyValueError::new_err(format!(
                "{}: expected a {ndim}-D tensor {what}, got shape {:?}",
                self.name, self.shape
            )))
        }
    }

    pub fn expect_shape(&self, shape: &[usize]) -> PyResult<()> {
        if self.shape == shape {
            Ok(())
        } else {
            Err(PyValueError::new_err(format!(
                "{}: expected shape {shape:?}, got {:?}",
                self.name, self.shape
            )))
        }
    }

    pub(crate) fn byte_range(&self) -> (usize, usize) {
        (self.ptr, self.ptr + self.numel * self.dtype.size())
    }

    /// The tensor's `numel` elements as `T`.
    ///
    /// # Safety
    /// The Python tensor outlives the returned slice, and nothing writes it meanwhile. The
    /// length is sound by construction: `numel` is the product of the shape of a tensor that
    /// [`Tensor::from_py`] proved contiguous, and `T` is asserted to have the dtype's size.
    pub unsafe fn slice<'a, T>(&self) -> &'a [T] {
        assert_eq!(std::mem::size_of::<T>(), self.dtype.size(), "{}", self.name);
        if self.numel == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.ptr as *const T, self.numel)
    }

    /// # Safety
    /// As [`Tensor::slice`], and nothing else reads or writes the tensor meanwhile (the
    /// bindings prove it for outputs with `args::check_disjoint`).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut<'a, T>(&self) -> &'a mut [T] {
        assert_eq!(std::mem::size_of::<T>(), self.dtype.size(), "{}", self.name);
        if self.numel == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.ptr as *mut T, self.numel)
    }
}

/// Runs `f` without the GIL; a panic becomes a RuntimeError instead of crossing into Python.
pub fn run<R: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> moerail_core::Result<R> + Send,
) -> PyResult<R> {
    let out = py.detach(|| catch_unwind(AssertUnwindSafe(f)));
    match out {
        Ok(r) => r.map_err(to_py_err),
        Err(panic) => Err(panic_err(&*panic)),
    }
}

/// Binds `$T` to the Rust element type of a float dtype and evaluates `$body`.
#[macro_export]
macro_rules! with_float {
    ($tensor:expr, |$T:ident| $body:expr) => {{
        let t: &$crate::tensor::Tensor = &$tensor;
        match t.dtype {
            $crate::tensor::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::tensor::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::tensor::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            $crate::tensor::DType::F16 => {
                type $T = half::f16;
                $body
            }
            _ => {
                return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                    "{}: expected a floating-point tensor (float32, float64, bfloat16 or float16), got {}",
                    t.name, t.dtype_name
                )))
            }
        }
    }};
}

/// Binds `$T` to an unsigned type of the tensor's element size (for pure data movement).
#[macro_export]
macro_rules! with_bits {
    ($tensor:expr, |$T:ident| $body:expr) => {{
        let t: &$crate::tensor::Tensor = &$tensor;
        match t.dtype.size() {
            8 => {
                type $T = u64;
                $body
            }
            4 => {
                type $T = u32;
                $body
            }
            2 => {
                type $T = u16;
                $body
            }
            1 => {
                type $T = u8;
                $body
            }
            _ => {
                return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                    "{}: unsupported dtype {}",
                    t.name, t.dtype_name
                )))
            }
        }
    }};
}
