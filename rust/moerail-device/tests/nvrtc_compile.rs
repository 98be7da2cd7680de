//! Compiles every kernel module with NVRTC for sm_80 and sm_90 (no GPU needed). NVRTC is found
//! the way the library finds it; this test adds the pip wheels of a virtual environment next to
//! the repository (or `$VIRTUAL_ENV`) to the search, and skips with a message if there is none.

use std::path::PathBuf;

use moerail_device::cuda::{self, locate};

fn venv_lib_dirs() -> Vec<PathBuf> {
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
    dirs
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    locate::configure(locate::SearchConfig {
        dirs: venv_lib_dirs(),
        prefer_major: None,
    });
    let nv = match locate::nvrtc() {
        Ok(n) => n,
        Err(e) => {
            // `make test` sets MOERAIL_REQUIRE_NVRTC: there the venv's torch brings NVRTC, and
            // not finding it must fail the build rather than skip the check.
            if std::env::var_os("MOERAIL_REQUIRE_NVRTC").is_some() {
                panic!("NVRTC not found but MOERAIL_REQUIRE_NVRTC is set: {e}");
            }
            eprintln!("SKIPPED every_kernel_compiles_for_sm80_and_sm90: {e}");
            return;
        }
    };
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
