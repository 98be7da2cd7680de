//! Compiles every kernel module with NVRTC for sm_80 and sm_90 (no GPU needed), once with each
//! NVRTC major version found: the pip wheels of a virtual environment next to the repository (or
//! `$VIRTUAL_ENV`, whose torch brings CUDA 13's), plus the directories in
//! `MOERAIL_TEST_NVRTC_DIRS` (`make test` puts CUDA 12.8's NVRTC wheel there).
//!
//! cudarc binds one NVRTC per process, so each version compiles in a child process (this test
//! binary run again with `MOERAIL_NVRTC_PATH` set). `MOERAIL_REQUIRE_NVRTC=12,13` turns "not
//! found" for those majors into a failure instead of a skip.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use moerail_device::cuda::{self, locate};

const CHILD_ENV: &str = "MOERAIL_NVRTC_COMPILE_CHILD";

fn candidate_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(v) = std::env::var("VIRTUAL_ENV") {
        roots.push(PathBuf::from(v));
    }
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv"));
    let mut dirs = Vec::new();
    for root in roots {
        let Ok(libs) = std::fs::read_dir(root.join("lib")) else {
            continue;
        };
        for py in libs.flatten() {
            let nvidia = py.path().join("site-packages/nvidia");
            if let Ok(pkgs) = std::fs::read_dir(nvidia) {
                for p in pkgs.flatten() {
                    dirs.push(p.path().join("lib"));
                }
            }
        }
    }
    if let Ok(extra) = std::env::var("MOERAIL_TEST_NVRTC_DIRS") {
        dirs.extend(std::env::split_paths(&extra));
    }
    dirs
}

/// One NVRTC library per major version (`libnvrtc.so.<major>`), first found wins.
fn nvrtc_by_major(dirs: &[PathBuf]) -> BTreeMap<u32, PathBuf> {
    let mut found = BTreeMap::new();
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(major) = name
                .to_str()
                .and_then(|n| n.strip_prefix("libnvrtc.so."))
                .and_then(|v| v.parse::<u32>().ok())
            else {
                continue;
            };
            found.entry(major).or_insert_with(|| e.path());
        }
    }
    found
}

fn required_majors() -> Vec<u32> {
    std::env::var("MOERAIL_REQUIRE_NVRTC")
        .map(|v| v.split(',').filter_map(|m| m.trim().parse().ok()).collect())
        .unwrap_or_default()
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return compile_with_the_located_nvrtc();
    }
    let found = nvrtc_by_major(&candidate_dirs());
    let required = required_majors();
    let absent: Vec<_> = required.iter().filter(|m| !found.contains_key(m)).collect();
    assert!(
        absent.is_empty(),
        "MOERAIL_REQUIRE_NVRTC asks for NVRTC {absent:?} but only {:?} were found in {:?}",
        found,
        candidate_dirs()
    );
    if found.is_empty() {
        eprintln!("SKIPPED every_kernel_compiles_for_sm80_and_sm90: no libnvrtc.so.<major> found");
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    for (major, lib) in &found {
        let out = Command::new(&exe)
            .args([
                "--exact",
                "every_kernel_compiles_for_sm80_and_sm90",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .env("MOERAIL_NVRTC_PATH", lib)
            .output()
            .expect("the child test runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("--- NVRTC {major} ({}):\n{text}", lib.display());
        assert!(
            out.status.success(),
            "the kernels do not compile with NVRTC {major} ({})",
            lib.display()
        );
        assert!(
            text.contains(&format!("NVRTC {major}.")),
            "the child did not compile with NVRTC {major}: {text}"
        );
    }
}

fn compile_with_the_located_nvrtc() {
    let nv = locate::nvrtc().expect("NVRTC at MOERAIL_NVRTC_PATH loads");
    eprintln!(
        "NVRTC {}.{} at {} ({})",
        nv.version.0,
        nv.version.1,
        nv.path.display(),
        nv.how
    );
    let reports = cuda::compile_check(&[80, 90]).expect("every module compiles");
    for r in &reports {
        eprintln!(
            "{:>16} {:>6}: {:>8} bytes, {:.2} s, {} kernels",
            r.module, r.arch, r.bytes, r.seconds, r.kernels
        );
        assert!(
            r.missing.is_empty(),
            "{} for {} lacks {:?}",
            r.module,
            r.arch,
            r.missing
        );
    }
    assert_eq!(reports.len(), 2 * cuda::kernels::SOURCES.len());
}

/// The driver functions moerail calls exist in a given `libcuda.so.1` (e.g. the 535 driver of
/// CUDA 12.2 from Debian's `libcuda1` package): `MOERAIL_TEST_LIBCUDA=/path/libcuda.so.1`.
/// Loading a driver needs no GPU; only `cuInit` would.
#[test]
fn driver_symbols_present_in_the_given_driver() {
    let Some(path) = std::env::var_os("MOERAIL_TEST_LIBCUDA") else {
        eprintln!("SKIPPED driver_symbols_present_in_the_given_driver: MOERAIL_TEST_LIBCUDA unset");
        return;
    };
    // SAFETY: loading a driver library runs only its initialisers (no GPU access).
    let lib = unsafe { libloading::Library::new(Path::new(&path)) }.expect("libcuda loads");
    let missing: Vec<_> = locate::DRIVER_SYMBOLS
        .iter()
        // SAFETY: only symbol addresses are read.
        .filter(|s| unsafe { lib.get::<unsafe extern "C" fn()>(s.as_bytes()) }.is_err())
        .collect();
    assert!(missing.is_empty(), "{path:?} lacks {missing:?}");
    eprintln!(
        "{path:?} has all {} driver symbols",
        locate::DRIVER_SYMBOLS.len()
    );
}
