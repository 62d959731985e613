//! The CUDA backend (cudarc, dynamic loading: nothing CUDA is needed to build, only the driver and
//! cuBLAS at run time). Without a usable GPU every entry point reports `Error::NoCuda` with the
//! reason, never a panic.

use super::DeviceInfo;
use crate::error::{Error, Result};

/// Find GPU 0 and describe it, or say why there is none.
pub fn probe() -> Result<DeviceInfo> {
    // SAFETY: only asks the dynamic loader whether libcuda can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::NoCuda("the NVIDIA driver library (libcuda.so) is not installed".into()));
    }
    // cudarc panics when a symbol is missing from an old driver; keep that a clean error.
    let found = std::panic::catch_unwind(|| -> Result<DeviceInfo> {
        let count = cudarc::driver::CudaContext::device_count().map_err(|e| Error::NoCuda(format!("the driver reports an error: {e}")))?;
        if count < 1 {
            return Err(Error::NoCuda("the driver found no GPU".into()));
        }
        let ctx = cudarc::driver::CudaContext::new(0).map_err(|e| Error::NoCuda(format!("cannot create a context on GPU 0: {e}")))?;
        let name = ctx.name().unwrap_or_else(|_| "NVIDIA GPU".into());
        let (free, total) = ctx.mem_get_info().map_err(|e| Error::NoCuda(format!("cannot query memory: {e}")))?;
        Ok(DeviceInfo { kind: "cuda".into(), name, total_memory_bytes: Some(total as u64), free_memory_bytes: Some(free as u64) })
    });
    match found {
        Ok(r) => r,
        Err(_) => Err(Error::NoCuda("the CUDA driver is too old or incomplete for this build (CUDA 13 is required)".into())),
    }
}
