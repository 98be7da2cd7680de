//! Memory hints for the large outputs moerail's kernels fill.

/// Outputs smaller than this are left alone.
const HUGE_PAGE_MIN_BYTES: usize = 8 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back `buf` with transparent huge pages before it is first written.
///
/// Why: outputs are freshly allocated by torch, and large allocations are fresh anonymous
/// mappings, so filling a 100+ MB permute output takes one page fault (and one page clear) per
/// 4 KiB; on this class of machine those faults cost several times the copy itself. With
/// `madvise(MADV_HUGEPAGE)` the kernel faults in 2 MiB pages instead (512x fewer faults). It is
/// a hint: the data is unaffected, and it is a no-op where THP is off or on other systems.
pub fn prefer_huge_pages<T>(buf: &mut [T]) {
    let bytes = std::mem::size_of_val(buf);
    if bytes < HUGE_PAGE_MIN_BYTES {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let start = buf.as_mut_ptr() as usize;
        let first = start.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        let last = (start + bytes) / HUGE_PAGE * HUGE_PAGE;
        if last > first {
            // SAFETY: the range lies inside `buf`, which we borrow mutably; MADV_HUGEPAGE
            // changes no contents. The result is ignored: the hint is optional.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
}
