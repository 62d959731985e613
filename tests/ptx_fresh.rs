//! The committed PTX must come from the committed kernel sources: each `kernels/<name>.sm90.ptx`
//! and `.sm80.ptx` starts with the SHA-256 of `kernels/<name>.cu` followed by `kernels/common.cuh`
//! (what `kernels/build.sh` hashes). A source edited without rerunning build.sh fails here, on
//! any machine, GPU or not.

use std::path::Path;

use tunestudio::backend::cuda::kernels::{FILES, ptx_source_hash, sha256_hex};

#[test]
fn every_ptx_matches_its_source() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let common = std::fs::read(dir.join("common.cuh")).expect("kernels/common.cuh");
    let mut stale = Vec::new();
    for f in FILES {
        let mut src = std::fs::read(dir.join(format!("{}.cu", f.name))).unwrap_or_else(|e| panic!("kernels/{}.cu: {e}", f.name));
        src.extend_from_slice(&common);
        let want = sha256_hex(&src);
        for (target, ptx) in [("sm90", f.sm90), ("sm80", f.sm80)] {
            // The embedded copy and the file on disk must both be current.
            let on_disk = std::fs::read_to_string(dir.join(format!("{}.{target}.ptx", f.name))).unwrap_or_default();
            for (which, text) in [("embedded", ptx), ("on disk", on_disk.as_str())] {
                if ptx_source_hash(text) != Some(want.as_str()) {
                    stale.push(format!("kernels/{}.{target}.ptx ({which})", f.name));
                }
            }
        }
    }
    assert!(stale.is_empty(), "stale PTX, rerun kernels/build.sh: {}", stale.join(", "));
}

#[test]
fn every_kernel_source_is_in_the_table() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("cu") {
            let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
            assert!(FILES.iter().any(|f| f.name == stem), "kernels/{stem}.cu is not in backend::cuda::kernels::FILES");
        }
    }
}

#[test]
fn no_gpu_means_a_clean_error() {
    // On a machine without a GPU this must be NoCuda, not a panic; with one, it must work.
    match tunestudio::backend::cuda::CudaBackend::new() {
        Ok(_) => {}
        Err(tunestudio::Error::NoCuda(why)) => assert!(!why.is_empty()),
        Err(e) => panic!("expected NoCuda or success, got {e}"),
    }
}
