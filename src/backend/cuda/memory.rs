//! Device buffers and the allocation counter. Every byte the backend takes from the driver goes
//! through [`DevBuf::new`], so `memory_used` / `peak_memory` are exact for what we allocated
//! (cuBLASLt's workspace included; the context and the loaded modules are not ours to count).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, result as drv};

use crate::error::{Error, Result};

/// What the backend shares with every buffer: the context (to free on drop) and the counters.
pub struct DeviceShared {
    pub ctx: Arc<CudaContext>,
    used: AtomicUsize,
    peak: AtomicUsize,
    count: AtomicUsize,
    /// Pinned host bytes (not device memory; reported apart).
    pinned: AtomicUsize,
    /// Bytes taken from the driver (a block whole), which a limit is held against.
    driver: AtomicUsize,
    /// The most the driver may give us, and why (a card profile's memory, a `--gpu-mem` cap).
    limit: Mutex<Option<(usize, String)>>,
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

    /// Bytes taken from the driver: every allocation of our own (a block counts once, whole).
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

/// Who frees a buffer's memory.
enum Owner {
    /// Its own `cuMemAlloc`.
    Device,
    /// Its own `cuMemHostAlloc` (pinned).
    Host,
    /// A view into a block (`DevBuf::view`): the block is freed when its last view is dropped.
    View(Arc<DevBuf>),
}

/// One device allocation (`cuMemAlloc`), one pinned host allocation (`cuMemHostAlloc`, for
/// offloaded layer inputs and an offloaded embedding table), or a view of a piece of either (the
/// engine's arena: one block per location, carved at the memory plan's offsets). Freed on drop.
/// With unified addressing a pinned host pointer is a valid source or destination of
/// `cuMemcpyAsync`.
pub struct DevBuf {
    ptr: u64,
    bytes: usize,
    owner: Owner,
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
        shared.check_limit(take, take)?;
        // SAFETY: plain allocation in the bound context; the pointer is owned by the returned value.
        let ptr = unsafe { drv::malloc_sync(take) }.map_err(|e| {
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
        shared.driver.fetch_add(take, Ordering::Relaxed);
        let used = shared.used.fetch_add(take, Ordering::Relaxed) + take;
        shared.peak.fetch_max(used, Ordering::Relaxed);
        shared.count.fetch_add(1, Ordering::Relaxed);
        Ok(DevBuf { ptr, bytes, owner: Owner::Device, shared: shared.clone() })
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
        Ok(DevBuf { ptr: ptr as u64, bytes, owner: Owner::Host, shared: shared.clone() })
    }

    /// `bytes` of `block` from `offset` on, which keeps the block alive as long as the view is:
    /// the memory plan's buffers as the engine's arena hands them out (at multiples of
    /// `workspace::BUFFER_ALIGN`), the parts of an NF4 weight (at 16 bytes, what the kernels'
    /// vector loads need). Views count nothing of their own; the block was counted whole.
    pub fn view(block: &Arc<DevBuf>, offset: usize, bytes: usize) -> Result<Self> {
        if !offset.is_multiple_of(16) || offset + bytes > block.bytes.max(1) {
            return Err(Error::bug(
                "DevBuf::view",
                format!("{bytes} bytes at offset {offset} of a {}-byte block, or off a 16-byte boundary", block.bytes),
            ));
        }
        Ok(DevBuf { ptr: block.ptr + offset as u64, bytes, owner: Owner::View(block.clone()), shared: block.shared.clone() })
    }

    /// Write `bytes` into a pinned host buffer from the CPU (no copy engine involved).
    pub fn write_host(&self, bytes: &[u8]) -> Result<()> {
        if !self.is_host() || bytes.len() > self.bytes {
            return Err(Error::bug("write_host", "not a host buffer, or too small"));
        }
        // SAFETY: `ptr` is a live pinned host allocation of at least `bytes.len()` bytes owned by
        // self (or by the block it views); no kernel uses it before the caller hands it out.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr as *mut u8, bytes.len()) };
        Ok(())
    }

    pub fn is_host(&self) -> bool {
        match &self.owner {
            Owner::Device => false,
            Owner::Host => true,
            Owner::View(block) => block.is_host(),
        }
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
        match self.owner {
            Owner::View(_) => {}
            Owner::Host => {
                if self.shared.ctx.bind_to_thread().is_ok() {
                    // SAFETY: `ptr` came from cuMemHostAlloc and is freed exactly once.
                    let _ = unsafe { drv::free_host(self.ptr as *mut std::ffi::c_void) };
                }
                self.shared.pinned.fetch_sub(take, Ordering::Relaxed);
            }
            Owner::Device => {
                if self.shared.ctx.bind_to_thread().is_ok() {
                    // SAFETY: `ptr` came from cuMemAlloc in this context and is freed exactly once;
                    // work that still reads it is ordered before by the synchronous free.
                    let _ = unsafe { drv::free_sync(self.ptr) };
                    self.shared.driver.fetch_sub(take, Ordering::Relaxed);
                }
                self.shared.used.fetch_sub(take, Ordering::Relaxed);
                self.shared.count.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}
