//! Device buffers and the allocation counter. Every byte the backend takes from the driver goes
//! through [`DevBuf::new`], so `memory_used` / `peak_memory` are exact for what we allocated
//! (cuBLASLt's workspace included; the context and the loaded modules are not ours to count).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, result as drv};

use crate::error::{Error, Result};

pub use crate::backend::workspace::{SLAB_CHUNK_BYTES, SLAB_MAX_BYTES};
/// Alignment of every device buffer (cuMemAlloc's own is 256 bytes; kernels rely on 16).
const ALIGN: usize = 256;

/// Small device buffers packed into big chunks. A model's LoRA tensors, norms and quant states
/// are thousands of allocations of kilobytes to a few MiB, and the driver's own bookkeeping for
/// those depends on their sizes in ways it does not document (hundreds of MiB for some ranks and
/// shapes, none for others, measured on an H100). Packing them makes what the driver holds equal
/// to what the memory plan lists, up to the unused tail of the last chunk. A chunk is freed when
/// its last buffer is.
struct Slab {
    chunks: Vec<Chunk>,
    next_id: u64,
}

struct Chunk {
    id: u64,
    ptr: u64,
    size: usize,
    offset: usize,
    live: usize,
}

/// What the backend shares with every buffer: the context (to free on drop) and the counters.
pub struct DeviceShared {
    pub ctx: Arc<CudaContext>,
    used: AtomicUsize,
    peak: AtomicUsize,
    count: AtomicUsize,
    /// Pinned host bytes (not device memory; reported apart).
    pinned: AtomicUsize,
    /// Bytes taken from the driver (slab chunks whole), which a limit is held against.
    driver: AtomicUsize,
    /// The most the driver may give us, and why (a card profile's memory, a `--gpu-mem` cap).
    limit: Mutex<Option<(usize, String)>>,
    slab: Mutex<Slab>,
}

impl DeviceShared {
    pub fn new(ctx: Arc<CudaContext>) -> Self {
        DeviceShared {
            ctx,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            count: AtomicUsize::new(0),
            pinned: AtomicUsize::new(0),
            driver: AtomicUsize::new(0),
            limit: Mutex::new(None),
            slab: Mutex::new(Slab { chunks: Vec::new(), next_id: 0 }),
        }
    }

    /// Refuse device allocations past `bytes` taken from the driver in all, saying `why` (an
    /// out-of-memory error on the real card is then one under its profile too).
    pub fn set_limit(&self, bytes: usize, why: String) {
        *self.limit.lock().unwrap_or_else(|p| p.into_inner()) = Some((bytes, why));
    }

    pub fn limit(&self) -> Option<usize> {
        self.limit.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(b, _)| *b)
    }

    /// Bytes taken from the driver: every own allocation, and every slab chunk whole.
    pub fn driver_bytes(&self) -> usize {
        self.driver.load(Ordering::Relaxed)
    }

    /// `Err` when taking `bytes` more from the driver would pass the limit.
    fn check_limit(&self, bytes: usize, asked: usize) -> Result<()> {
        let limit = self.limit.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((max, why)) = limit.as_ref() {
            let have = self.driver_bytes();
            if have + bytes > *max {
                return Err(Error::OutOfMemory {
                    during: format!("allocating {:.1} MiB on the GPU", asked as f64 / 1048576.0),
                    advice: format!(
                        "that would pass {why}: the backend holds {:.2} GiB of the {:.2} GiB it may use; lower the batch size or max sequence length, or enable checkpointing",
                        have as f64 / 1073741824.0,
                        *max as f64 / 1073741824.0
                    ),
                });
            }
        }
        Ok(())
    }

    /// Take `bytes` (< SLAB_MAX_BYTES) from the first chunk with room, or from a new one.
    fn slab_alloc(&self, bytes: usize) -> Result<std::result::Result<(u64, u64), cudarc::driver::DriverError>> {
        let need = bytes.div_ceil(ALIGN) * ALIGN;
        let mut slab = self.slab.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slab.chunks.iter_mut().find(|c| c.size - c.offset >= need) {
            let ptr = c.ptr + c.offset as u64;
            c.offset += need;
            c.live += 1;
            return Ok(Ok((ptr, c.id)));
        }
        self.check_limit(SLAB_CHUNK_BYTES, bytes)?;
        // SAFETY: plain allocation in the bound context; owned by the chunk, freed with its last buffer.
        let ptr = match unsafe { drv::malloc_sync(SLAB_CHUNK_BYTES) } {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        self.driver.fetch_add(SLAB_CHUNK_BYTES, Ordering::Relaxed);
        let id = slab.next_id;
        slab.next_id += 1;
        slab.chunks.push(Chunk { id, ptr, size: SLAB_CHUNK_BYTES, offset: need, live: 1 });
        Ok(Ok((ptr, id)))
    }

    fn slab_free(&self, id: u64) {
        let mut slab = self.slab.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = slab.chunks.iter().position(|c| c.id == id) else { return };
        slab.chunks[i].live -= 1;
        if slab.chunks[i].live == 0 {
            let c = slab.chunks.remove(i);
            // SAFETY: the chunk came from cuMemAlloc and none of its buffers is alive.
            let _ = unsafe { drv::free_sync(c.ptr) };
            self.driver.fetch_sub(c.size, Ordering::Relaxed);
        }
    }
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
    pub fn allocations(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
    pub fn pinned(&self) -> usize {
        self.pinned.load(Ordering::Relaxed)
    }
    pub fn reset_peak(&self) {
        self.peak.store(self.used(), Ordering::Relaxed);
    }
}

/// One device allocation (`cuMemAlloc`, or a 256-byte aligned piece of a slab chunk when small), or a pinned host allocation
/// (`cuMemHostAlloc`, for offloaded layer inputs), freed on drop. With unified addressing a pinned
/// host pointer is a valid source or destination of `cuMemcpyAsync`.
pub struct DevBuf {
    ptr: u64,
    bytes: usize,
    host: bool,
    /// The slab chunk holding this buffer (small device buffers), or `None` for its own allocation.
    chunk: Option<u64>,
    shared: Arc<DeviceShared>,
}

// SAFETY: a device pointer is plain data; the driver accepts it from any thread that has the
// context bound, which every backend entry point (and `Drop`) does first.
unsafe impl Send for DevBuf {}
unsafe impl Sync for DevBuf {}

impl DevBuf {
    /// `bytes` of uninitialised device memory (at least 1 byte is taken so the pointer is valid).
    pub fn new(shared: &Arc<DeviceShared>, bytes: usize) -> Result<Self> {
        shared.ctx.bind_to_thread().map_err(|e| Error::Cuda { op: "bind context".into(), msg: e.to_string() })?;
        let take = bytes.max(1);
        let allocated = if take < SLAB_MAX_BYTES {
            shared.slab_alloc(take)?.map(|(ptr, id)| (ptr, Some(id)))
        } else {
            shared.check_limit(take, take)?;
            // SAFETY: plain allocation in the bound context; the pointer is owned by the returned value.
            let r = unsafe { drv::malloc_sync(take) }.map(|ptr| (ptr, None));
            if r.is_ok() {
                shared.driver.fetch_add(take, Ordering::Relaxed);
            }
            r
        };
        let (ptr, chunk) = allocated.map_err(|e| {
            let (free, total) = shared.ctx.mem_get_info().unwrap_or((0, 0));
            if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                Error::OutOfMemory {
                    during: format!("allocating {:.1} MiB on the GPU", bytes as f64 / 1048576.0),
                    advice: format!(
                        "the backend holds {:.2} GiB, the card has {:.2} GiB free of {:.2} GiB: lower the batch size or max sequence length, or enable checkpointing",
                        shared.used() as f64 / 1073741824.0,
                        free as f64 / 1073741824.0,
                        total as f64 / 1073741824.0
                    ),
                }
            } else {
                Error::Cuda { op: "cuMemAlloc".into(), msg: e.to_string() }
            }
        })?;
        let used = shared.used.fetch_add(take, Ordering::Relaxed) + take;
        shared.peak.fetch_max(used, Ordering::Relaxed);
        shared.count.fetch_add(1, Ordering::Relaxed);
        Ok(DevBuf { ptr, bytes, host: false, chunk, shared: shared.clone() })
    }

    /// `bytes` of pinned host memory. Pinning is slow on some hosts (~1.8 GB/s seen on the H100
    /// VMs), which is why the engine takes all of it once, at start-up.
    pub fn new_host(shared: &Arc<DeviceShared>, bytes: usize) -> Result<Self> {
        shared.ctx.bind_to_thread().map_err(|e| Error::Cuda { op: "bind context".into(), msg: e.to_string() })?;
        // SAFETY: plain pinned allocation; the pointer is owned by the returned value.
        // PORTABLE | DEVICEMAP: kernels may read and write it through the same address (UVA).
        let ptr = unsafe { drv::malloc_host(bytes.max(1), 0x01 | 0x02) }.map_err(|e| Error::OutOfMemory {
            during: format!("pinning {:.1} MiB of host memory for offloaded activations", bytes as f64 / 1048576.0),
            advice: format!("the host could not pin it ({e}): free host memory or use checkpointing = \"layer\""),
        })?;
        shared.pinned.fetch_add(bytes.max(1), Ordering::Relaxed);
        Ok(DevBuf { ptr: ptr as u64, bytes, host: true, chunk: None, shared: shared.clone() })
    }

    /// Write `bytes` into a pinned host buffer from the CPU (no copy engine involved).
    pub fn write_host(&self, bytes: &[u8]) -> Result<()> {
        if !self.host || bytes.len() > self.bytes {
            return Err(Error::bug("write_host", "not a host buffer, or too small"));
        }
        // SAFETY: `ptr` is a live pinned host allocation of at least `bytes.len()` bytes owned by
        // self; no kernel uses it before the caller hands the tensor out.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr as *mut u8, bytes.len()) };
        Ok(())
    }

    pub fn is_host(&self) -> bool {
        self.host
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        let take = self.bytes.max(1);
        if self.host {
            if self.shared.ctx.bind_to_thread().is_ok() {
                // SAFETY: `ptr` came from cuMemHostAlloc and is freed exactly once.
                let _ = unsafe { drv::free_host(self.ptr as *mut std::ffi::c_void) };
            }
            self.shared.pinned.fetch_sub(take, Ordering::Relaxed);
            return;
        }
        if self.shared.ctx.bind_to_thread().is_ok() {
            match self.chunk {
                Some(id) => self.shared.slab_free(id),
                // SAFETY: `ptr` came from cuMemAlloc in this context and is freed exactly once;
                // work that still reads it is ordered before by the synchronous free.
                None => {
                    let _ = unsafe { drv::free_sync(self.ptr) };
                    self.shared.driver.fetch_sub(take, Ordering::Relaxed);
                }
            }
        }
        self.shared.used.fetch_sub(take, Ordering::Relaxed);
        self.shared.count.fetch_sub(1, Ordering::Relaxed);
    }
}
