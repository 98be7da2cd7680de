//! The `libhccl.so` table and the executor of exchange plans on it.
//!
//! Prototypes (hccl.h / hccl_types.h): every call returns `HcclResult` (int32, 0 = success);
//! `HcclComm` and `aclrtStream` are opaque pointers; `HcclRootInfo` is 4108 bytes; the counts
//! and displacements of `HcclAlltoAllV` are host `uint64` arrays of one entry per rank, in
//! elements of the data type.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{open_lib, sym};
use crate::error::{invalid, DeviceError, Result};

/// Bytes of `HcclRootInfo`.
pub const ROOT_INFO_BYTES: usize = 4108;

/// `HcclDataType`.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    Int8 = 0,
    Int16 = 1,
    Int32 = 2,
    Fp16 = 3,
    Fp32 = 4,
    Int64 = 5,
    Uint64 = 6,
    Uint8 = 7,
    Uint16 = 8,
    Uint32 = 9,
    Fp64 = 10,
    Bfp16 = 11,
    Int128 = 12,
}

impl DataType {
    pub fn size(self) -> usize {
        match self {
            Self::Int8 | Self::Uint8 => 1,
            Self::Int16 | Self::Fp16 | Self::Uint16 | Self::Bfp16 => 2,
            Self::Int32 | Self::Fp32 | Self::Uint32 => 4,
            Self::Int64 | Self::Uint64 | Self::Fp64 => 8,
            Self::Int128 => 16,
        }
    }

    /// From a torch dtype name (`torch.bfloat16`, `bfloat16`, ...).
    pub fn from_torch(name: &str) -> Option<Self> {
        Some(match name.trim_start_matches("torch.") {
            "int8" => Self::Int8,
            "int16" => Self::Int16,
            "int32" => Self::Int32,
            "float16" | "half" => Self::Fp16,
            "float32" | "float" => Self::Fp32,
            "int64" | "long" => Self::Int64,
            "uint64" => Self::Uint64,
            "uint8" | "bool" => Self::Uint8,
            "uint16" => Self::Uint16,
            "uint32" => Self::Uint32,
            "float64" | "double" => Self::Fp64,
            "bfloat16" => Self::Bfp16,
            _ => return None,
        })
    }
}

const RESULT_NAMES: [&str; 23] = [
    "SUCCESS",
    "E_PARA",
    "E_PTR",
    "E_MEMORY",
    "E_INTERNAL",
    "E_NOT_SUPPORT",
    "E_NOT_FOUND",
    "E_UNAVAIL",
    "E_SYSCALL",
    "E_TIMEOUT",
    "E_OPEN_FILE_FAILURE",
    "E_TCP_CONNECT",
    "E_ROCE_CONNECT",
    "E_TCP_TRANSFER",
    "E_ROCE_TRANSFER",
    "E_RUNTIME",
    "E_DRV",
    "E_PROFILING",
    "E_CCE",
    "E_NETWORK",
    "E_AGAIN",
    "E_REMOTE",
    "E_SUSPENDING",
];

/// `HCCL_E_...` name of a result code.
pub fn result_name(code: i32) -> String {
    usize::try_from(code)
        .ok()
        .and_then(|i| RESULT_NAMES.get(i))
        .map_or_else(|| format!("HcclResult {code}"), |n| format!("HCCL_{n}"))
}

type FnRootInfo = unsafe extern "C" fn(*mut u8) -> c_int;
type FnCommInit = unsafe extern "C" fn(u32, *const u8, u32, *mut *mut c_void) -> c_int;
type FnAllToAllV = unsafe extern "C" fn(
    *const c_void,
    *const c_void,
    *const c_void,
    c_int,
    *const c_void,
    *const c_void,
    *const c_void,
    c_int,
    *mut c_void,
    *mut c_void,
) -> c_int;
type FnAllGather =
    unsafe extern "C" fn(*mut c_void, *mut c_void, u64, c_int, *mut c_void, *mut c_void) -> c_int;
type FnCommDestroy = unsafe extern "C" fn(*mut c_void) -> c_int;
type FnErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

/// The `libhccl.so` table.
pub struct Hccl {
    _lib: libloading::Library,
    pub path: PathBuf,
    get_root_info: FnRootInfo,
    comm_init: FnCommInit,
    alltoallv: FnAllToAllV,
    allgather: FnAllGather,
    comm_destroy: FnCommDestroy,
    error_string: Option<FnErrorString>,
}

impl Hccl {
    pub fn open(path: &Path) -> Result<Self> {
        let lib = open_lib(path)?;
        Ok(Self {
            get_root_info: sym(&lib, path, "HcclGetRootInfo")?,
            comm_init: sym(&lib, path, "HcclCommInitRootInfo")?,
            alltoallv: sym(&lib, path, "HcclAlltoAllV")?,
            allgather: sym(&lib, path, "HcclAllGather")?,
            comm_destroy: sym(&lib, path, "HcclCommDestroy")?,
            error_string: sym(&lib, path, "HcclGetErrorString").ok(),
            _lib: lib,
            path: path.to_path_buf(),
        })
    }

    fn check(&self, call: &str, rc: c_int) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        let text = self
            .error_string
            // SAFETY: returns a static string or NULL.
            .map(|f| unsafe { f(rc) })
            .filter(|p| !p.is_null())
            // SAFETY: NUL-terminated by HCCL.
            .map(|p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned());
        Err(DeviceError::Backend(format!(
            "{call} failed: {}{}",
            result_name(rc),
            text.map(|t| format!(" ({t})")).unwrap_or_default()
        )))
    }

    /// `HcclGetRootInfo` (on the root rank; broadcast the bytes to the others).
    pub fn root_info(&self) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; ROOT_INFO_BYTES];
        // SAFETY: a 4108-byte buffer.
        self.check("HcclGetRootInfo", unsafe {
            (self.get_root_info)(buf.as_mut_ptr())
        })?;
        Ok(buf)
    }

    /// `HcclCommInitRootInfo(n_ranks, root_info, rank)`.
    pub fn init_comm(self: &Arc<Self>, n_ranks: u32, rank: u32, root_info: &[u8]) -> Result<Comm> {
        if root_info.len() != ROOT_INFO_BYTES {
            return Err(invalid(
                "root_info",
                format!(
                    "expected {ROOT_INFO_BYTES} bytes (HcclRootInfo), got {}",
                    root_info.len()
                ),
            ));
        }
        if n_ranks == 0 || rank >= n_ranks {
            return Err(invalid(
                "rank",
                format!("must be in [0, n_ranks={n_ranks}), got {rank}"),
            ));
        }
        let mut comm: *mut c_void = std::ptr::null_mut();
        // SAFETY: a 4108-byte root info; writes one pointer.
        self.check("HcclCommInitRootInfo", unsafe {
            (self.comm_init)(n_ranks, root_info.as_ptr(), rank, &mut comm)
        })?;
        Ok(Comm {
            hccl: self.clone(),
            raw: comm as usize,
            n_ranks: n_ranks as usize,
            rank: rank as usize,
        })
    }
}

/// An HCCL communicator (destroyed on drop).
pub struct Comm {
    hccl: Arc<Hccl>,
    raw: usize,
    pub n_ranks: usize,
    pub rank: usize,
}

/// One side of an all-to-all-v: the buffer, its size in elements, counts and displacements.
#[derive(Clone, Copy, Debug)]
pub struct Side<'a> {
    pub ptr: u64,
    pub elems: u64,
    pub counts: &'a [u64],
    pub displs: &'a [u64],
}

/// Counts and displacements in elements from rows per peer (rows of `row_elems` elements,
/// packed in peer order).
pub fn counts_from_rows(rows: &[u64], row_elems: u64) -> Result<(Vec<u64>, Vec<u64>)> {
    let mut counts = Vec::with_capacity(rows.len());
    let mut displs = Vec::with_capacity(rows.len());
    let mut at = 0u64;
    for &r in rows {
        let c = r
            .checked_mul(row_elems)
            .ok_or_else(|| invalid("rows", format!("{r} rows x {row_elems} elements overflow")))?;
        displs.push(at);
        counts.push(c);
        at = at
            .checked_add(c)
            .ok_or_else(|| invalid("rows", "the total number of elements overflows"))?;
    }
    Ok((counts, displs))
}

fn check_side(name: &str, s: &Side, n: usize, disjoint: bool) -> Result<()> {
    let (cn, dn): (&'static str, &'static str) = if name == "send" {
        ("send_counts", "send_displs")
    } else {
        ("recv_counts", "recv_displs")
    };
    if s.counts.len() != n {
        return Err(invalid(
            cn,
            format!(
                "expected {n} entries (one per rank), got {}",
                s.counts.len()
            ),
        ));
    }
    if s.displs.len() != n {
        return Err(invalid(
            dn,
            format!(
                "expected {n} entries (one per rank), got {}",
                s.displs.len()
            ),
        ));
    }
    let mut spans = Vec::with_capacity(n);
    for (r, (&c, &d)) in s.counts.iter().zip(s.displs).enumerate() {
        let end = d
            .checked_add(c)
            .ok_or_else(|| invalid(dn, format!("rank {r}: displacement + count overflows")))?;
        if end > s.elems {
            return Err(invalid(
                dn,
                format!(
                    "rank {r}: elements [{d}, {end}) exceed the {name} buffer's {} elements",
                    s.elems
                ),
            ));
        }
        if c > 0 {
            spans.push((d, end, r));
        }
    }
    if !spans.is_empty() && s.ptr == 0 {
        return Err(invalid(
            name,
            "null buffer with a non-zero count".to_string(),
        ));
    }
    if disjoint {
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(invalid(
                    dn,
                    format!("the blocks of ranks {} and {} overlap", w[0].2, w[1].2),
                ));
            }
        }
    }
    Ok(())
}

impl Comm {
    pub fn raw(&self) -> u64 {
        self.raw as u64
    }

    /// `HcclAlltoAllV` of `dtype` elements on `stream`, after checking every count and
    /// displacement against the buffers (an error makes no call).
    ///
    /// # Safety
    /// The buffers are device memory of at least the element counts given, alive until the
    /// stream reaches the exchange.
    pub unsafe fn alltoallv(
        &self,
        send: Side,
        recv: Side,
        dtype: DataType,
        stream: u64,
    ) -> Result<()> {
        check_side("send", &send, self.n_ranks, false)?;
        check_side("recv", &recv, self.n_ranks, true)?;
        // A rank's block to itself is one block on both sides: differing counts mean the plans
        // of the ranks disagree, and HCCL would hang or corrupt rather than say so.
        let me = self.rank;
        if me < self.n_ranks && send.counts[me] != recv.counts[me] {
            return Err(invalid(
                "recv_counts",
                format!(
                    "rank {me} sends {} elements to itself but expects to receive {}",
                    send.counts[me], recv.counts[me]
                ),
            ));
        }
        let h = &self.hccl;
        // SAFETY: arrays of n_ranks u64 (checked); buffers forwarded from the caller.
        h.check("HcclAlltoAllV", unsafe {
            (h.alltoallv)(
                send.ptr as *const c_void,
                send.counts.as_ptr() as *const c_void,
                send.displs.as_ptr() as *const c_void,
                dtype as c_int,
                recv.ptr as *const c_void,
                recv.counts.as_ptr() as *const c_void,
                recv.displs.as_ptr() as *const c_void,
                dtype as c_int,
                self.raw as *mut c_void,
                stream as *mut c_void,
            )
        })
    }

    /// `HcclAllGather` of `count` elements from each rank into `recv` (`n_ranks * count`).
    ///
    /// # Safety
    /// As [`Comm::alltoallv`].
    pub unsafe fn allgather(
        &self,
        send: u64,
        recv: u64,
        recv_elems: u64,
        count: u64,
        dtype: DataType,
        stream: u64,
    ) -> Result<()> {
        let need = count
            .checked_mul(self.n_ranks as u64)
            .ok_or_else(|| invalid("count", "count x ranks overflows"))?;
        if need > recv_elems {
            return Err(invalid(
                "recv",
                format!("needs {need} elements ({count} per rank), has {recv_elems}"),
            ));
        }
        if count > 0 && (send == 0 || recv == 0) {
            return Err(invalid("send", "null buffer with a non-zero count"));
        }
        let h = &self.hccl;
        // SAFETY: sizes checked; buffers forwarded from the caller.
        h.check("HcclAllGather", unsafe {
            (h.allgather)(
                send as *mut c_void,
                recv as *mut c_void,
                count,
                dtype as c_int,
                self.raw as *mut c_void,
                stream as *mut c_void,
            )
        })
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: the communicator this value owns; destroyed once.
        let _ = unsafe { (self.hccl.comm_destroy)(self.raw as *mut c_void) };
    }
}
