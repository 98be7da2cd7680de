//! The CANN/HCCL tables against a stand-in library (tests/ascend_standin/standin.c, built here
//! with `cc` as lib64/libascendcl.so and lib64/libhccl.so): the symbols load with the documented
//! prototypes, every call receives exactly the marshalled arguments (read back from the
//! stand-in's call log), errors carry HCCL's names, bad arguments make no call, and a missing
//! library or symbol is a clear "unavailable". Skips (with a message) without a C compiler.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use moerail_device::ascend::{self, hccl, Acl, DataType, Hccl};
use moerail_device::DeviceError;

fn build(dir: &Path, extra: &[&str]) -> Option<()> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ascend_standin/standin.c");
    std::fs::create_dir_all(dir.join("lib64")).ok()?;
    for name in ["libascendcl.so", "libhccl.so"] {
        let out = dir.join("lib64").join(name);
        let st = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&out)
            .arg(&src)
            .args(extra)
            .status()
            .ok()?;
        assert!(st.success(), "building the stand-in failed");
    }
    Some(())
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moerail-ascend-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn log(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

// One test: the stand-in reads its switches from the environment, which is process-wide.
#[test]
fn ascend_tables_against_a_stand_in() {
    let dir = tmpdir("ok");
    if build(&dir, &[]).is_none() {
        eprintln!("skipped: no C compiler (cc) to build the CANN/HCCL stand-in");
        return;
    }
    let logf = dir.join("calls.log");
    std::env::set_var("STANDIN_LOG", &logf);
    std::env::set_var("MOERAIL_ASCEND_LIB_DIR", dir.join("lib64"));

    // Found where the override points, by that name.
    let found = ascend::locate("libhccl.so", "HcclAlltoAllV").unwrap();
    assert_eq!(found.path, dir.join("lib64/libhccl.so"));
    assert_eq!(found.how, "MOERAIL_ASCEND_LIB_DIR");
    assert!(!found.preloaded);

    // ACL: aclInit once, even when asked twice; 100002 is success.
    let acl = Acl::open(&dir.join("lib64/libascendcl.so"), false).unwrap();
    acl.ensure_initialized().unwrap();
    acl.ensure_initialized().unwrap();
    assert_eq!(acl.device_count().unwrap(), 8);
    assert_eq!(acl.version(), Some((8, 0, 1)));
    let calls = log(&logf);
    assert_eq!(
        calls.iter().filter(|l| l.starts_with("aclInit")).count(),
        1,
        "{calls:?}"
    );
    assert!(calls[0].starts_with("aclInit config=NULL"), "{calls:?}");
    std::env::set_var("STANDIN_ACL_REPEAT", "1");
    let again = Acl::open(&dir.join("lib64/libascendcl.so"), false).unwrap();
    again.ensure_initialized().unwrap(); // 100002: initialised elsewhere
    std::env::remove_var("STANDIN_ACL_REPEAT");
    let pre = Acl::open(&dir.join("lib64/libascendcl.so"), true).unwrap();
    let n_before = log(&logf).len();
    pre.ensure_initialized().unwrap(); // torch_npu's copy: no aclInit at all
    assert_eq!(log(&logf).len(), n_before);
    let stream = acl.create_stream().unwrap();
    let src = [1u8, 2, 3, 4];
    let mut dst = [0u8; 8];
    // SAFETY: host buffers of the sizes given (the stand-in copies on the host).
    unsafe {
        acl.memcpy(
            dst.as_mut_ptr() as u64,
            8,
            src.as_ptr() as u64,
            4,
            ascend::MemcpyKind::DeviceToDevice,
            Some(stream),
        )
        .unwrap();
        let e = acl
            .memcpy(
                dst.as_mut_ptr() as u64,
                2,
                src.as_ptr() as u64,
                4,
                ascend::MemcpyKind::HostToDevice,
                None,
            )
            .unwrap_err();
        assert!(
            matches!(e, DeviceError::Invalid(_)) && e.to_string().starts_with("count:"),
            "{e}"
        );
    }
    assert_eq!(&dst[..4], &src);
    acl.synchronize(stream).unwrap();
    // ACL used before initialisation: the error says how to initialise it.
    std::env::set_var("STANDIN_FAIL", "aclrtSynchronizeStream:100001");
    let e = acl.synchronize(stream).unwrap_err().to_string();
    std::env::remove_var("STANDIN_FAIL");
    assert!(
        e.contains("aclrtSynchronizeStream")
            && e.contains("ACL_ERROR_UNINITIALIZE")
            && e.contains("torch.npu.init()"),
        "{e}"
    );
    acl.destroy_stream(stream).unwrap();
    let l = log(&logf);
    assert!(
        l.iter()
            .any(|x| x.contains("aclrtMemcpyAsync") && x.contains("count=4 kind=3 stream=0x5157")),
        "{l:?}"
    );

    // HCCL: root info, communicator, all-to-all-v with the exact arrays.
    let h = Arc::new(Hccl::open(&dir.join("lib64/libhccl.so")).unwrap());
    let root = h.root_info().unwrap();
    assert_eq!(root.len(), 4108);
    assert_eq!(&root[..12], b"standin-root");
    let comm = h.init_comm(4, 2, &root).unwrap();
    let (send_counts, send_displs) = hccl::counts_from_rows(&[1, 0, 3, 2], 8).unwrap();
    assert_eq!(send_counts, vec![8, 0, 24, 16]);
    assert_eq!(send_displs, vec![0, 8, 8, 32]);
    let recv_counts = vec![16, 8, 24, 0];
    let recv_displs = vec![0, 16, 24, 48];
    let send: Vec<u16> = (0..48).collect();
    let mut recv = vec![0u16; 48];
    let side = |ptr: u64, elems: u64, c: &'static [u64], d: &'static [u64]| hccl::Side {
        ptr,
        elems,
        counts: c,
        displs: d,
    };
    let sc: &'static [u64] = Box::leak(send_counts.into_boxed_slice());
    let sd: &'static [u64] = Box::leak(send_displs.into_boxed_slice());
    let rc: &'static [u64] = Box::leak(recv_counts.into_boxed_slice());
    let rd: &'static [u64] = Box::leak(recv_displs.into_boxed_slice());
    // SAFETY: host buffers of the element counts given.
    unsafe {
        comm.alltoallv(
            side(send.as_ptr() as u64, 48, sc, sd),
            side(recv.as_mut_ptr() as u64, 48, rc, rd),
            DataType::Bfp16,
            0xabc,
        )
        .unwrap();
    }
    // Rank 2's block to itself moved: 24 elements from displacement 8 to displacement 24.
    assert_eq!(&recv[24..48], &send[8..32]);
    let l = log(&logf);
    let line = l
        .iter()
        .rev()
        .find(|x| x.starts_with("HcclAlltoAllV"))
        .unwrap();
    for part in [
        "counts=[8,0,24,16]",
        "sdispls=[0,8,8,32]",
        "type=11",
        "rcounts=[16,8,24,0]",
        "rdispls=[0,16,24,48]",
        "rtype=11",
        "comm=2/4",
        "stream=0xabc",
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }
    assert!(
        l.iter()
            .any(|x| x.contains("HcclCommInitRootInfo n=4 rank=2 root=standin-root last=127")),
        "{l:?}"
    );
    // All-gather: fp32 code 4, count per rank.
    let g_send = [1.0f32, 2.0];
    let mut g_recv = [0f32; 8];
    // SAFETY: as above.
    unsafe {
        comm.allgather(
            g_send.as_ptr() as u64,
            g_recv.as_mut_ptr() as u64,
            8,
            2,
            DataType::Fp32,
            7,
        )
        .unwrap();
        assert!(comm
            .allgather(
                g_send.as_ptr() as u64,
                g_recv.as_mut_ptr() as u64,
                7,
                2,
                DataType::Fp32,
                7
            )
            .is_err());
    }
    assert_eq!(&g_recv[4..6], &g_send);
    assert!(log(&logf)
        .iter()
        .any(|x| x.contains("HcclAllGather") && x.contains("count=2 type=4 comm=2/4")));

    // Bad arguments: named, and no call reaches the library.
    let n_calls = log(&logf).len();
    type Case<'a> = (&'a [u64], &'a [u64], &'a [u64], &'a [u64], &'a str);
    let bad: [Case; 5] = [
        (&[8, 0, 24], sd, rc, rd, "send_counts"),
        (sc, sd, &[16, 8, 16, 0], rd, "recv_counts"), // rank 2 sends itself 24, expects 16
        (sc, sd, rc, &[0, 16, 40, 48], "recv_displs"), // rank 2 would end at 64 > 48
        (sc, sd, rc, &[0, 8, 24, 48], "recv_displs"), // ranks 0 and 1 overlap
        (&[u64::MAX, 0, 0, 0], &[1, 0, 0, 0], rc, rd, "send_displs"), // overflow
    ];
    for (a, b, c, d, arg) in bad {
        // SAFETY: rejected before any call.
        let e = unsafe {
            comm.alltoallv(
                side(send.as_ptr() as u64, 48, a, b),
                side(recv.as_mut_ptr() as u64, 48, c, d),
                DataType::Bfp16,
                0,
            )
        }
        .unwrap_err();
        assert!(matches!(e, DeviceError::Invalid(_)), "{e}");
        assert!(e.to_string().starts_with(&format!("{arg}:")), "{arg}: {e}");
    }
    assert!(h.init_comm(4, 4, &root).is_err());
    let e = h
        .init_comm(4, 0, &root[..100])
        .err()
        .expect("a short root info must fail");
    assert!(e.to_string().starts_with("root_info:"), "{e}");
    assert_eq!(
        log(&logf).len(),
        n_calls,
        "a rejected call reached the library"
    );

    // An HCCL error carries the function and the code's name.
    std::env::set_var("STANDIN_FAIL", "HcclAlltoAllV:4");
    // SAFETY: valid arguments; the stand-in fails on request.
    let e = unsafe {
        comm.alltoallv(
            side(send.as_ptr() as u64, 48, sc, sd),
            side(recv.as_mut_ptr() as u64, 48, rc, rd),
            DataType::Bfp16,
            0,
        )
    }
    .unwrap_err();
    std::env::remove_var("STANDIN_FAIL");
    let msg = e.to_string();
    assert!(
        matches!(e, DeviceError::Backend(_))
            && msg.contains("HcclAlltoAllV")
            && msg.contains("HCCL_E_INTERNAL"),
        "{msg}"
    );
    drop(comm);
    assert!(log(&logf)
        .last()
        .unwrap()
        .starts_with("HcclCommDestroy comm=2/4"));
    assert_eq!(hccl::result_name(21), "HCCL_E_REMOTE");
    assert_eq!(hccl::result_name(22), "HCCL_E_SUSPENDING");
    assert_eq!(hccl::result_name(23), "HcclResult 23");
    assert_eq!(
        DataType::from_torch("torch.bfloat16"),
        Some(DataType::Bfp16)
    );

    // Status as doctor shows it.
    let st = ascend::status(true);
    assert!(st.acl.is_ok() && st.hccl.is_ok());
    assert_eq!(st.devices.unwrap().unwrap(), 8);

    // Not there: every path tried is named.
    let empty = tmpdir("empty");
    std::env::set_var("MOERAIL_ASCEND_LIB_DIR", &empty);
    std::env::remove_var("ASCEND_HOME_PATH");
    let e = ascend::locate("libhccl.so", "HcclAlltoAllV").unwrap_err();
    assert!(
        e.contains(&empty.join("libhccl.so").display().to_string()) && e.contains("loader path"),
        "{e}"
    );

    // A library without one symbol.
    let partial = tmpdir("partial");
    build(&partial, &["-DHcclAllGather=HcclAllGather_renamed"]).unwrap();
    let err = Hccl::open(&partial.join("lib64/libhccl.so"))
        .err()
        .expect("a missing symbol must fail");
    assert!(
        matches!(err, DeviceError::Unavailable(_))
            && err.to_string().contains("no symbol HcclAllGather"),
        "{err}"
    );
    for d in [dir, empty, partial] {
        let _ = std::fs::remove_dir_all(d);
    }
}
