//! MindSpore `ops.Custom(func_type="aot")` entry points, exported from the extension library.
//!
//! MindSpore calls an AOT custom operator on CPU as
//! `int f(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
//! void *stream, void *extra)`: the inputs, then the outputs (already allocated by MindSpore to the
//! shapes its `out_shape` gave), each as a data pointer, a rank, a shape and a dtype name
//! (`"float32"`, `"float16"`, `"bfloat16"`, `"int64"`, `"bool"`, ...). 0 means success. These
//! functions check what they get, call moerail-core and write the outputs; a failure returns
//! non-zero, writes nothing, and leaves its message for `moerail_aot_last_error()` (per thread).
//! No panic crosses the C boundary.
//!
//! | symbol | inputs | outputs |
//! |---|---|---|
//! | `moerail_aot_permute` | tokens `[T, H]`, routing_map `[T, E]` (bool / int8 / uint8) | permuted `[N, H]`, sorted_indices `[N]` int64 |
//! | `moerail_aot_permute_with_probs` | tokens, routing_map, probs `[T, E]` | permuted, permuted_probs `[N]`, sorted_indices |
//! | `moerail_aot_gather_rows` | x `[T, H]`, sorted_indices `[N]` | out `[N, H]` (`out[r] = x[sorted_indices[r]]`, -1 gives zeros) |
//! | `moerail_aot_unpermute` | permuted `[N, H]` (float), sorted_indices `[N]` | out `[T, H]` |
//! | `moerail_aot_unpermute_weighted` | permuted, sorted_indices, weights `[N]` (float32; float64 for float64) | out `[T, H]` |
//!
//! `N` must be the number of routed (token, expert) pairs; rows are expert-major and ascending in
//! token order within an expert, as everywhere in moerail.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use half::{bf16, f16};
use moerail_core::ops::permute::{self, RoutingMap};
use moerail_core::Element;

use crate::error::panic_message;
use crate::tensor::DType;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// The message of this thread's last failed `moerail_aot_*` call ("" if none). Valid until the
/// next failing call on the same thread.
#[no_mangle]
pub extern "C" fn moerail_aot_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

fn set_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// The dtype of a MindSpore dtype name, in the bindings' shared [`DType`]. Integer types count
/// by size only (the ops here move them, or read a routing map's bytes as booleans), so the
/// unsigned names map to the signed type of the same size.
fn parse_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "float32" | "float" => DType::F32,
        "float64" | "double" => DType::F64,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::BF16,
        "bool" => DType::Bool,
        "int8" | "uint8" => DType::U8,
        "int16" | "uint16" => DType::I16,
        "int32" | "uint32" | "int" | "uint" => DType::I32,
        "int64" | "uint64" => DType::I64,
        _ => return None,
    })
}

/// One input or output buffer as MindSpore passes it.
struct Buf {
    name: &'static str,
    ptr: *mut c_void,
    shape: Vec<usize>,
    dtype: String,
    kind: DType,
}

impl Buf {
    fn numel(&self) -> Result<usize, String> {
        self.shape.iter().try_fold(1usize, |a, &d| {
            a.checked_mul(d)
                .ok_or_else(|| format!("{}: shape {:?} is too large", self.name, self.shape))
        })
    }

    fn expect_rank(&self, rank: usize, doc: &str) -> Result<(), String> {
        if self.shape.len() != rank {
            return Err(format!(
                "{}: expected a {rank}-D tensor {doc}, got shape {:?}",
                self.name, self.shape
            ));
        }
        Ok(())
    }

    fn expect_kind(&self, ok: &[DType], what: &str) -> Result<(), String> {
        if !ok.contains(&self.kind) {
            return Err(format!("{}: expected dtype {what}, got {}", self.name, self.dtype));
        }
        Ok(())
    }

    /// # Safety
    /// The buffer holds `numel()` elements of `T` (checked by the caller through its dtype).
    unsafe fn slice<'a, T>(&self) -> Result<&'a [T], String> {
        let n = self.numel()?;
        if n == 0 {
            return Ok(&[]);
        }
        if self.ptr.is_null() || (self.ptr as usize) % std::mem::align_of::<T>() != 0 {
            return Err(format!("{}: null or misaligned data pointer", self.name));
        }
        Ok(std::slice::from_raw_parts(self.ptr as *const T, n))
    }

    /// # Safety
    /// As [`Buf::slice`]; the buffer is an output no other view aliases.
    unsafe fn slice_mut<'a, T>(&self) -> Result<&'a mut [T], String> {
        let n = self.numel()?;
        if n == 0 {
            return Ok(&mut []);
        }
        if self.ptr.is_null() || (self.ptr as usize) % std::mem::align_of::<T>() != 0 {
            return Err(format!("{}: null or misaligned data pointer", self.name));
        }
        Ok(std::slice::from_raw_parts_mut(self.ptr as *mut T, n))
    }
}

/// Reads MindSpore's argument arrays into named buffers.
///
/// # Safety
/// The arrays hold `nparam` valid entries, as MindSpore's AOT calling convention guarantees.
unsafe fn read_args(
    nparam: c_int,
    params: *mut *mut c_void,
    ndims: *mut c_int,
    shapes: *mut *mut i64,
    dtypes: *mut *const c_char,
    names: &[&'static str],
) -> Result<Vec<Buf>, String> {
    if nparam < 0 || nparam as usize != names.len() {
        return Err(format!(
            "expected {} inputs and outputs ({}), got nparam={nparam}",
            names.len(),
            names.join(", ")
        ));
    }
    if params.is_null() || ndims.is_null() || shapes.is_null() || dtypes.is_null() {
        return Err("null argument array".into());
    }
    let mut out = Vec::with_capacity(names.len());
    for (i, &name) in names.iter().enumerate() {
        let nd = *ndims.add(i);
        if !(0..=16).contains(&nd) {
            return Err(format!("{name}: rank {nd} out of range"));
        }
        let sp = *shapes.add(i);
        let mut shape = Vec::with_capacity(nd as usize);
        for d in 0..nd as usize {
            if sp.is_null() {
                return Err(format!("{name}: null shape"));
            }
            let v = *sp.add(d);
            if v < 0 {
                return Err(format!("{name}: dynamic or negative dimension {v}"));
            }
            shape.push(v as usize);
        }
        let dp = *dtypes.add(i);
        let dtype = if dp.is_null() {
            String::new()
        } else {
            CStr::from_ptr(dp).to_string_lossy().into_owned()
        };
        let kind =
            parse_dtype(&dtype).ok_or_else(|| format!("{name}: unsupported dtype {dtype:?}"))?;
        out.push(Buf { name, ptr: *params.add(i), shape, dtype, kind });
    }
    Ok(out)
}

/// Runs `f`, mapping an error or a panic to a non-zero return and `moerail_aot_last_error`.
fn entry(op: &str, f: impl FnOnce() -> Result<(), String>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(msg)) => {
            set_error(format!("{op}: {msg}"));
            1
        }
        Err(panic) => {
            set_error(format!("{op}: {}", panic_message(&*panic)));
            2
        }
    }
}

fn core(r: moerail_core::Result<()>) -> Result<(), String> {
    r.map_err(|e| e.to_string())
}

const FLOATS: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];

/// Binds `$T` to an unsigned type of `$size` bytes (pure data movement).
macro_rules! with_size {
    ($size:expr, $name:expr, |$T:ident| $body:expr) => {
        match $size {
            1 => {
                type $T = u8;
                $body
            }
            2 => {
                type $T = u16;
                $body
            }
            4 => {
                type $T = u32;
                $body
            }
            8 => {
                type $T = u64;
                $body
            }
            s => Err(format!("{}: unsupported element size {s}", $name)),
        }
    };
}

/// Binds `$T` to the element type of a float kind.
macro_rules! with_float {
    ($kind:expr, |$T:ident| $body:expr) => {
        match $kind {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            k => Err(format!("expected a floating-point dtype, got {k:?}")),
        }
    };
}

/// The routing map as booleans (borrowed when it already is 0/1 bytes).
///
/// # Safety
/// `m` holds `numel()` bytes.
unsafe fn routing_map<'a>(m: &Buf) -> Result<std::borrow::Cow<'a, [bool]>, String> {
    m.expect_rank(2, "[num_tokens, num_experts]")?;
    m.expect_kind(&[DType::Bool, DType::U8], "bool, int8 or uint8")?;
    let bytes: &[u8] = m.slice::<u8>()?;
    if m.kind == DType::Bool && bytes.iter().all(|&b| b <= 1) {
        // SAFETY: every byte is 0 or 1, a valid bool.
        return Ok(std::borrow::Cow::Borrowed(std::slice::from_raw_parts(
            bytes.as_ptr() as *const bool,
            bytes.len(),
        )));
    }
    Ok(std::borrow::Cow::Owned(bytes.iter().map(|&b| b != 0).collect()))
}

/// # Safety
/// `args` come from [`read_args`]: tokens, routing_map, [probs], permuted, [permuted_probs],
/// sorted_indices.
unsafe fn permute_impl(args: &[Buf], with_probs: bool) -> Result<(), String> {
    let (x, m) = (&args[0], &args[1]);
    let (p, out, pp, si) = if with_probs {
        (Some(&args[2]), &args[3], Some(&args[4]), &args[5])
    } else {
        (None, &args[2], None, &args[3])
    };
    x.expect_rank(2, "[num_tokens, hidden]")?;
    let map = routing_map(m)?;
    let (t_n, h, e_n) = (x.shape[0], x.shape[1], m.shape[1]);
    if m.shape[0] != t_n {
        return Err(format!(
            "routing_map: expected {t_n} rows (the rows of tokens), got {}",
            m.shape[0]
        ));
    }
    out.expect_rank(2, "[num_out_tokens, hidden]")?;
    if out.kind.size() != x.kind.size() || out.dtype != x.dtype {
        return Err(format!(
            "permuted: expected dtype {} (that of tokens), got {}",
            x.dtype, out.dtype
        ));
    }
    let n = out.shape[0];
    if out.shape[1] != h {
        return Err(format!(
            "permuted: expected {h} columns (the hidden size), got {}",
            out.shape[1]
        ));
    }
    si.expect_kind(&[DType::I64], "int64")?;
    if si.shape != [n] {
        return Err(format!("sorted_indices: expected shape [{n}], got {:?}", si.shape));
    }
    let rmap = RoutingMap { map: &map, num_tokens: t_n, num_experts: e_n };
    let sorted: &mut [i64] = si.slice_mut::<i64>()?;
    let mut counts = vec![0i64; e_n];
    match (p, pp) {
        (Some(p), Some(pp)) => {
            p.expect_kind(&FLOATS, "a float type")?;
            if p.shape != [t_n, e_n] {
                return Err(format!(
                    "probs: expected shape [{t_n}, {e_n}] (that of routing_map), got {:?}",
                    p.shape
                ));
            }
            if pp.dtype != p.dtype || pp.shape != [n] {
                return Err(format!(
                    "permuted_probs: expected dtype {} and shape [{n}], got {} {:?}",
                    p.dtype, pp.dtype, pp.shape
                ));
            }
            with_size!(p.kind.size(), "probs", |P| {
                let (ps, pps) = (p.slice::<P>()?, pp.slice_mut::<P>()?);
                core(permute::permute_layout(&rmap, 0, Some(ps), sorted, Some(pps), &mut counts))
            })?;
        }
        _ => core(permute::permute_layout::<_, u32>(&rmap, 0, None, sorted, None, &mut counts))?,
    }
    with_size!(x.kind.size(), "tokens", |B| {
        core(permute::gather_rows(x.slice::<B>()?, h, sorted, out.slice_mut::<B>()?))
    })
}

/// Permute (no probabilities): tokens, routing_map -> permuted, sorted_indices.
///
/// # Safety
/// Called by MindSpore with its AOT calling convention (valid arrays of `nparam` entries, each
/// buffer as large as its shape and dtype say, outputs not aliasing inputs).
#[no_mangle]
pub unsafe extern "C" fn moerail_aot_permute(
    nparam: c_int,
    params: *mut *mut c_void,
    ndims: *mut c_int,
    shapes: *mut *mut i64,
    dtypes: *mut *const c_char,
    _stream: *mut c_void,
    _extra: *mut c_void,
) -> c_int {
    entry("moerail_aot_permute", || {
        let names = ["tokens", "routing_map", "permuted", "sorted_indices"];
        let args = read_args(nparam, params, ndims, shapes, dtypes, &names)?;
        permute_impl(&args, false)
    })
}

/// Permute with probabilities: tokens, routing_map, probs -> permuted, permuted_probs,
/// sorted_indices.
///
/// # Safety
/// As [`moerail_aot_permute`].
#[no_mangle]
pub unsafe extern "C" fn moerail_aot_permute_with_probs(
    nparam: c_int,
    params: *mut *mut c_void,
    ndims: *mut c_int,
    shapes: *mut *mut i64,
    dtypes: *mut *const c_char,
    _stream: *mut c_void,
    _extra: *mut c_void,
) -> c_int {
    entry("moerail_aot_permute_with_probs", || {
        let names =
            ["tokens", "routing_map", "probs", "permuted", "permuted_probs", "sorted_indices"];
        let args = read_args(nparam, params, ndims, shapes, dtypes, &names)?;
        permute_impl(&args, true)
    })
}

/// Gather rows: x, sorted_indices -> out (`out[r] = x[sorted_indices[r]]`; -1 rows are zeros).
/// The backward of unpermute with respect to its input.
///
/// # Safety
/// As [`moerail_aot_permute`].
#[no_mangle]
pub unsafe extern "C" fn moerail_aot_gather_rows(
    nparam: c_int,
    params: *mut *mut c_void,
    ndims: *mut c_int,
    shapes: *mut *mut i64,
    dtypes: *mut *const c_char,
    _stream: *mut c_void,
    _extra: *mut c_void,
) -> c_int {
    entry("moerail_aot_gather_rows", || {
        let args =
            read_args(nparam, params, ndims, shapes, dtypes, &["x", "sorted_indices", "out"])?;
        let (x, si, out) = (&args[0], &args[1], &args[2]);
        x.expect_rank(2, "[num_tokens, hidden]")?;
        si.expect_rank(1, "[num_rows]")?;
        si.expect_kind(&[DType::I64], "int64")?;
        let (n, h) = (si.shape[0], x.shape[1]);
        if out.dtype != x.dtype || out.shape != [n, h] {
            return Err(format!(
                "out: expected {} [{n}, {h}], got {} {:?}",
                x.dtype, out.dtype, out.shape
            ));
        }
        with_size!(x.kind.size(), "x", |B| {
            core(permute::gather_rows(
                x.slice::<B>()?,
                h,
                si.slice::<i64>()?,
                out.slice_mut::<B>()?,
            ))
        })
    })
}

/// # Safety
/// `args` come from [`read_args`]: permuted, sorted_indices, [weights], out.
unsafe fn unpermute_impl(args: &[Buf], weighted: bool) -> Result<(), String> {
    let (x, si) = (&args[0], &args[1]);
    let (w, out) = if weighted { (Some(&args[2]), &args[3]) } else { (None, &args[2]) };
    x.expect_rank(2, "[num_rows, hidden]")?;
    x.expect_kind(&FLOATS, "float32, float64, float16 or bfloat16")?;
    let (n, h) = (x.shape[0], x.shape[1]);
    si.expect_kind(&[DType::I64], "int64")?;
    if si.shape != [n] {
        return Err(format!(
            "sorted_indices: expected shape [{n}] (the rows of permuted), got {:?}",
            si.shape
        ));
    }
    out.expect_rank(2, "[num_tokens, hidden]")?;
    if out.dtype != x.dtype || out.shape[1] != h {
        return Err(format!(
            "out: expected {} [num_tokens, {h}], got {} {:?}",
            x.dtype, out.dtype, out.shape
        ));
    }
    let t_n = out.shape[0];
    let acc = if x.kind == DType::F64 { DType::F64 } else { DType::F32 };
    if let Some(w) = w {
        if w.kind != acc || w.shape != [n] {
            return Err(format!(
                "weights: expected {} [{n}], got {} {:?}",
                if acc == DType::F64 { "float64" } else { "float32" },
                w.dtype,
                w.shape
            ));
        }
    }
    with_float!(x.kind, |T| {
        let ws = match w {
            Some(w) => Some(w.slice::<<T as Element>::Acc>()?),
            None => None,
        };
        core(permute::unpermute(
            x.slice::<T>()?,
            h,
            si.slice::<i64>()?,
            ws,
            t_n,
            out.slice_mut::<T>()?,
        ))
    })
}

/// Unpermute (combine, unweighted): permuted, sorted_indices -> out `[T, H]` (`T` from the
/// output's shape); copies of a token are summed in fp32 in ascending expert order.
///
/// # Safety
/// As [`moerail_aot_permute`].
#[no_mangle]
pub unsafe extern "C" fn moerail_aot_unpermute(
    nparam: c_int,
    params: *mut *mut c_void,
    ndims: *mut c_int,
    shapes: *mut *mut i64,
    dtypes: *mut *const c_char,
    _stream: *mut c_void,
    _extra: *mut c_void,
) -> c_int {
    entry("moerail_aot_unpermute", || {
        let names = ["permuted", "sorted_indices", "out"];
        let args = read_args(nparam, params, ndims, shapes, dtypes, &names)?;
        unpermute_impl(&args, false)
    })
}

/// Unpermute with a weight per row: permuted, sorted_indices, weights -> out.
///
/// # Safety
/// As [`moerail_aot_permute`].
#[no_mangle]
pub unsafe extern "C" fn moerail_aot_unpermute_weighted(
    nparam: c_int,
    params: *mut *mut c_void,
    ndims: *mut c_int,
    shapes: *mut *mut i64,
    dtypes: *mut *const c_char,
    _stream: *mut c_void,
    _extra: *mut c_void,
) -> c_int {
    entry("moerail_aot_unpermute_weighted", || {
        let names = ["permuted", "sorted_indices", "weights", "out"];
        let args = read_args(nparam, params, ndims, shapes, dtypes, &names)?;
        unpermute_impl(&args, true)
    })
}
