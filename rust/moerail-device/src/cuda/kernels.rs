//! The kernel sources (embedded at build time from `csrc/cuda`) and the list of entry points
//! (`csrc/cuda/kernels.def`).

use std::sync::OnceLock;

macro_rules! csrc {
    ($f:literal) => {
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../csrc/cuda/", $f))
    };
}

/// The header every source includes, by the name it includes it as.
pub const HEADER_NAME: &str = "common.cuh";
pub const HEADER: &str = csrc!("common.cuh");

/// (file stem, source) of each module.
pub const SOURCES: &[(&str, &str)] = &[
    ("router", csrc!("router.cu")),
    ("permute", csrc!("permute.cu")),
    ("unpermute", csrc!("unpermute.cu")),
    ("sort_chunks", csrc!("sort_chunks.cu")),
];

const DEF: &str = csrc!("kernels.def");

/// Every entry point as (module stem, kernel name), in kernels.def order.
pub fn entry_points() -> &'static [(&'static str, &'static str)] {
    static LIST: OnceLock<Vec<(&'static str, &'static str)>> = OnceLock::new();
    LIST.get_or_init(|| {
        DEF.lines()
            .filter_map(|l| {
                let l = l.trim();
                let inner = l.strip_prefix("MOERAIL_KERNEL(")?.strip_suffix(')')?;
                let (stem, name) = inner.split_once(',')?;
                Some((stem.trim(), name.trim()))
            })
            .collect()
    })
}

/// The module (file stem) that defines `kernel`.
pub fn module_of(kernel: &str) -> Option<&'static str> {
    entry_points()
        .iter()
        .find(|(_, k)| *k == kernel)
        .map(|(m, _)| *m)
}

pub fn source(stem: &str) -> Option<&'static str> {
    SOURCES
        .iter()
        .find(|(s, _)| *s == stem)
        .map(|(_, src)| *src)
}

/// 64-bit FNV-1a: a stable hash (std's hasher may change between Rust releases).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // Separator, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    // That each name is defined is checked by the NVRTC compile test, which looks for each
    // symbol in the CUBIN.
    #[test]
    fn entry_points_name_existing_modules_once() {
        let list = entry_points();
        assert!(list.len() > 60, "{} entry points", list.len());
        for (stem, name) in list {
            assert!(source(stem).is_some(), "{name}: no module {stem}");
            assert!(name.starts_with("moerail_"), "{name}");
        }
        let mut names: Vec<_> = list.iter().map(|(_, n)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), list.len());
        assert_eq!(module_of("moerail_router_fwd_bf16"), Some("router"));
    }

    #[test]
    fn fnv_is_stable_and_separates_parts() {
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_eq!(fnv1a(&[b"moerail"]), fnv1a(&[b"moerail"]));
    }
}
