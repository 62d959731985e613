//! The CUDA backend (cudarc, dynamic loading: nothing CUDA is needed to build, only the driver and
//! cuBLASLt at run time). Without a usable GPU every entry point reports `Error::NoCuda` with the
//! reason, never a panic.
//!
//! Storage: `DType::Act` is bf16, `DType::F32` is f32; ids are i32. All arithmetic accumulates in
//! f32 (reductions that the host reads back, in f64). One context, a compute stream that runs every
//! kernel and GEMM in order, and a copy stream for set-up uploads. Every buffer comes from
//! `alloc` / `upload*` at set-up; the step itself allocates nothing on the device: the shared
//! scratch (NF4 dequantization, loss chunk, reductions, cuBLASLt workspace) is sized when the
//! backend and the weights are created. `memory_used` / `peak_memory` count every byte we took.
//!
//! Kernels live in `kernels/*.cu` (forward and backward side by side), compiled to PTX by
//! `kernels/build.sh` and embedded; [`kernels::Kernel`] is the one table of their symbols.
//!
//! Every kernel decision comes from the card's [`CardLimits`] (which PTX loads, which attention
//! instance runs, how much shared memory a kernel asks for), read from the device when the backend
//! opens, or taken from a card profile (`TUNESTUDIO_CARD=rtx4090`, `--card`): then the backend
//! decides as that card would and its allocator stops at that card's memory.
//!
//! Environment switches (debugging and tests): `TUNESTUDIO_CUDA_SYNC=1` synchronizes and checks
//! after every launch; `TUNESTUDIO_CARD=NAME` decides as the profiled card (`backend::card`).

pub mod cudnn;
pub mod gemm;
pub mod kernels;
pub mod memory;
pub mod nf4;
pub mod profile;

use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, result as drv, sys};
use half::bf16;

use super::card::{self, CardLimits, CardProfile, PtxTarget};
use super::{
    AdamW, AdamwTensor, AttnShape, Backend, DType, DeviceInfo, HostWeight, KvShape, LinearDims, LoraBwd, LoraFwd, LoraRows, LossSum,
    RmsNorm, WeightPlace,
};
use crate::error::{Error, Result};
use gemm::{Gemm, GemmCall};
use kernels::{ATTN_HEAD_DIMS, AttnKernels, FILES, Kernel};
use memory::{DevBuf, DeviceShared};
use nf4::Nf4Parts;

/// Find GPU 0 and describe it, or say why there is none. The limits are the device's own (a
/// profile does not change what `probe` reports; [`effective_card`] applies one).
pub fn probe() -> Result<DeviceInfo> {
    // SAFETY: only asks the dynamic loader whether libcuda can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::NoCuda("the NVIDIA driver library libcuda.so is not installed".into()));
    }
    // cudarc panics when a symbol is missing from an old driver; keep that a clean error.
    let found = std::panic::catch_unwind(|| -> Result<DeviceInfo> {
        let count = cudarc::driver::CudaContext::device_count().map_err(|e| Error::NoCuda(format!("the driver reports an error: {e}")))?;
        if count < 1 {
            return Err(Error::NoCuda("the driver found no GPU".into()));
        }
        let (limits, pci) = device_limits(0)?;
        // What other programs hold, as NVML counts it, read before the probe's own context exists
        // (where the driver does not report per-process memory, it would count as theirs).
        let others = super::nvml::card_memory(&pci).map(|m| m.others_bytes());
        let ctx = cudarc::driver::CudaContext::new(0).map_err(|e| Error::NoCuda(format!("cannot create a context on GPU 0: {e}")))?;
        let (free, total) = ctx.mem_get_info().map_err(|e| Error::NoCuda(format!("cannot query memory: {e}")))?;
        Ok(DeviceInfo {
            kind: "cuda".into(),
            name: limits.name.clone(),
            total_memory_bytes: Some(total as u64),
            free_memory_bytes: Some(free as u64),
            others_bytes: others,
            pci_bus_id: Some(pci),
            card: Some(limits),
        })
    });
    match found {
        Ok(r) => r,
        Err(_) => Err(Error::NoCuda("the CUDA driver is too old or incomplete for this build (CUDA 13 is required)".into())),
    }
}

/// The limits of CUDA device `ordinal` read from the driver (no context needed), and its PCI bus
/// id in NVML's form.
fn device_limits(ordinal: i32) -> Result<(CardLimits, String)> {
    use sys::CUdevice_attribute as A;
    fn no(what: &'static str) -> impl Fn(drv::DriverError) -> Error {
        move |e| Error::NoCuda(format!("cannot read the GPU's {what}: {e}"))
    }
    drv::init().map_err(no("driver"))?;
    let dev = drv::device::get(ordinal).map_err(no("handle"))?;
    // SAFETY: `dev` is a valid device handle; each call reads one integer attribute.
    let attr = |a: A| unsafe { drv::device::get_attribute(dev, a) }.map_err(no("attributes"));
    let cc = (attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32, attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32);
    let name = drv::device::get_name(dev).unwrap_or_else(|_| "NVIDIA GPU".into());
    // SAFETY: as above; returns the card's total memory in bytes.
    let total = unsafe { drv::device::total_mem(dev) }.map_err(no("memory size"))? as u64;
    let limits = CardLimits {
        name,
        profile: None,
        compute_capability: cc,
        sm_count: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
        smem_per_block_optin: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32,
        smem_per_sm: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)? as u32,
        regs_per_sm: attr(A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR)? as u32,
        max_threads_per_sm: attr(A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR)? as u32,
        memory_bytes: total,
    };
    let pci = format!(
        "{:08x}:{:02x}:{:02x}.0",
        attr(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?,
        attr(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
        attr(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?
    );
    Ok((limits, pci))
}

/// The limits kernels are chosen by on a device with limits `device`: the profile `TUNESTUDIO_CARD`
/// names (never granting more than the device has), else the device's own. `Err` names the
/// variable's bad value.
pub fn effective_card(device: &CardLimits) -> Result<CardLimits> {
    match card::profile_from_env().map_err(|e| Error::Cuda { op: "choose the card".into(), msg: e })? {
        Some(p) => Ok(card::emulate(p, device)),
        None => Ok(device.clone()),
    }
}

/// The CUDA driver API version (13000 for CUDA 13.0), for keying per-driver measurements.
/// Call after `probe` found the driver.
pub fn driver_version() -> Option<i32> {
    // cudarc panics when the symbol is missing; keep that a `None`.
    std::panic::catch_unwind(|| {
        let mut v = 0;
        // SAFETY: writes one int; the driver library is loaded (probe checked it).
        let r = unsafe { sys::cuDriverGetVersion(&mut v) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    })
    .ok()
    .flatten()
}

/// The context bytes to plan with on this machine's card `name` (measured by an earlier
/// backend, else the default).
pub fn planned_context_bytes(name: &str) -> u64 {
    super::context::bytes_for(name, driver_version())
}

// The fixed scratch sizes live in `backend::workspace`, which the memory plan reads without
// importing this module.
use super::workspace::{self, SMALL_SCRATCH, attention_unit_bytes};
pub use super::workspace::{
    ATTN_BWD_SCRATCH_BYTES, GEMM_WORKSPACE_BYTES, LOSS_CHUNK_ELEMS, LOSS_CHUNK_MAX_ROWS, SUMSQ_MAX_BLOCKS, SUMSQ_MAX_LAUNCHES,
    attention_bwd_split, attention_scratch_bytes,
};

fn cuda_err(op: &str) -> impl FnOnce(drv::DriverError) -> Error + '_ {
    move |e| Error::Cuda { op: op.to_string(), msg: e.to_string() }
}

fn elem_bytes(dtype: DType) -> usize {
    match dtype {
        DType::Act => 2,
        DType::F32 => 4,
    }
}

/// A device tensor: `len` elements of `dtype` (bf16 for `Act`).
pub struct CudaTensor {
    buf: DevBuf,
    len: usize,
    dtype: DType,
}

impl CudaTensor {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    fn ptr(&self) -> u64 {
        self.buf.ptr()
    }
    /// Address of element `i`.
    fn at(&self, i: usize) -> u64 {
        self.buf.ptr() + (i * elem_bytes(self.dtype)) as u64
    }
}

/// `len` i32 ids on the device.
pub struct CudaIds {
    buf: DevBuf,
    len: usize,
}

impl CudaIds {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

enum WeightData {
    /// bf16 `[out, in]`.
    Dense(DevBuf),
    /// bitsandbytes NF4 layout, dequantized per call into the backend's shared scratch.
    Nf4 { packed: DevBuf, absmax_q: DevBuf, absmax2: DevBuf, code2: DevBuf, offset: f32 },
}

/// A frozen base linear on the device.
pub struct CudaWeight {
    /// Unique for the process: what the dequantization buffers say they hold.
    id: u64,
    out_features: usize,
    in_features: usize,
    data: WeightData,
    /// bf16 `[out, in]` of an NF4 weight, dequantized once (`Backend::cache_dequantized`): the
    /// GEMMs read it instead of dequantizing into the scratch.
    dequantized: Option<DevBuf>,
    /// bf16 `[out]`.
    bias: Option<DevBuf>,
}

impl CudaWeight {
    pub fn is_nf4(&self) -> bool {
        matches!(self.data, WeightData::Nf4 { .. })
    }

    /// Whether an NF4 weight holds its dequantized copy.
    pub fn is_cached(&self) -> bool {
        self.dequantized.is_some()
    }
}

/// What a generation GEMV multiplies by.
enum GemvWeight<'a> {
    Nf4 {
        weight: &'a CudaWeight,
        packed: &'a DevBuf,
        absmax_q: &'a DevBuf,
        absmax2: &'a DevBuf,
        code2: &'a DevBuf,
        offset: f32,
    },
    /// bf16 `[out, in]` at `ptr`, with a bf16 bias at `bias` (0: none).
    Dense {
        ptr: u64,
        bias: u64,
    },
}

impl<'a> GemvWeight<'a> {
    fn of(w: &'a CudaWeight) -> Self {
        match &w.data {
            WeightData::Dense(b) => GemvWeight::Dense { ptr: b.ptr(), bias: w.bias.as_ref().map_or(0, DevBuf::ptr) },
            WeightData::Nf4 { packed, absmax_q, absmax2, code2, offset } => {
                GemvWeight::Nf4 { weight: w, packed, absmax_q, absmax2, code2, offset: *offset }
            }
        }
    }
}

/// A kernel argument as `cuLaunchKernel` reads it (the payload's address is passed).
#[derive(Clone, Copy)]
enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    U64(u64),
    F32(f32),
    /// A struct passed by value: the address of a `repr(C)` value that mirrors the kernel's
    /// parameter type and outlives the launch (the driver copies it at the call).
    Struct(*const c_void),
}

impl Arg {
    fn addr(&self) -> *mut c_void {
        match self {
            Arg::Ptr(v) | Arg::U64(v) => v as *const u64 as *mut c_void,
            Arg::I32(v) => v as *const i32 as *mut c_void,
            Arg::I64(v) => v as *const i64 as *mut c_void,
            Arg::F32(v) => v as *const f32 as *mut c_void,
            Arg::Struct(p) => *p as *mut c_void,
        }
    }
}

/// Tensors per `adamw_multi` launch and elements per block: `ADAMW_LIST` and `ADAMW_CHUNK` of
/// kernels/adamw.cu.
const ADAMW_LIST: usize = 48;
const ADAMW_CHUNK: usize = 1024;

/// `AdamwList` of kernels/adamw.cu, field for field.
#[repr(C)]
struct AdamwList {
    param: [u64; ADAMW_LIST],
    grad: [u64; ADAMW_LIST],
    m: [u64; ADAMW_LIST],
    v: [u64; ADAMW_LIST],
    compute: [u64; ADAMW_LIST],
    n: [i64; ADAMW_LIST],
    first_block: [i32; ADAMW_LIST + 1],
    count: i32,
}

/// Pieces per `sumsq_partial_multi` launch and elements per block: `SUMSQ_LIST` and
/// `SUMSQ_CHUNK` of kernels/reduce.cu.
const SUMSQ_LIST: usize = 96;
const SUMSQ_CHUNK: usize = 256 * 32;

/// `SumsqList` of kernels/reduce.cu, field for field.
#[repr(C)]
struct SumsqList {
    ptr: [u64; SUMSQ_LIST],
    n: [i64; SUMSQ_LIST],
    first_block: [i32; SUMSQ_LIST + 1],
    is_bf16: [i32; SUMSQ_LIST],
    count: i32,
}

fn p(t: &CudaTensor) -> Arg {
    Arg::Ptr(t.ptr())
}
fn pi(t: &CudaIds) -> Arg {
    Arg::Ptr(t.buf.ptr())
}
fn i64a(v: usize) -> Arg {
    Arg::I64(v as i64)
}
fn i32a(v: usize) -> Arg {
    Arg::I32(v as i32)
}

struct Func(CudaFunction);
// SAFETY: a CUfunction handle is valid in its context from any thread that binds it.
unsafe impl Send for Func {}

/// Scratch owned by the backend, sized at construction or at weight upload (never in a step).
struct Scratch {
    /// bf16 `[out, in]` buffers of the largest NF4 linear uploaded so far, each holding the
    /// dequantized copy of one weight: one, or as many as `hold_dequantized` asked for.
    dequant: Vec<Dequantized>,
    dequant_elems: usize,
    /// Counts the weights served, so the least recently used buffer can be found.
    dequant_uses: u64,
    gemm: Gemm,
}

/// One dequantization buffer and the weight whose copy it holds.
struct Dequantized {
    buf: DevBuf,
    /// `CudaWeight::id` of the weight in it.
    holds: Option<u64>,
    last_use: u64,
}

/// Tells weights apart for the dequantization buffers (an address could be reused by another
/// weight once the first is dropped; an id is not).
static NEXT_WEIGHT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct LossWorkspace {
    logits: DevBuf,
    dlogits: DevBuf,
    row_loss: DevBuf,
    row_valid: DevBuf,
    /// f64 sum and i64 count of the current call.
    sum: DevBuf,
    count: DevBuf,
}

pub struct CudaBackend {
    shared: Arc<DeviceShared>,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    funcs: Vec<Func>,
    scratch: RefCell<Scratch>,
    loss: LossWorkspace,
    sumsq_partial: DevBuf,
    sumsq_out: DevBuf,
    /// f32: the attention backward's accumulators, sized by [`Backend::reserve_attention`].
    attn_scratch: RefCell<Option<DevBuf>>,
    _gemm_workspace: DevBuf,
    /// The card kernels are chosen for (a profile's limits under `TUNESTUDIO_CARD`).
    card: CardLimits,
    /// The device's own limits.
    device_card: CardLimits,
    /// The card's PCI bus id, as NVML names it.
    pci_bus_id: String,
    /// The attention instances this card runs, per entry of [`ATTN_HEAD_DIMS`] (`Err`: why not).
    attention: Vec<std::result::Result<AttnKernels, String>>,
    /// cuDNN's fused attention, where the card decides for it and the library loads
    /// ([`cudnn::card_wants_cudnn`]); `Err`: why our kernels run every shape.
    cudnn: std::result::Result<cudnn::Sdpa, String>,
    /// Whether cuDNN runs an attention shape under a scratch limit, decided once per pair.
    cudnn_decisions: RefCell<std::collections::HashMap<(cudnn::Key, usize), Option<CudnnAttention>>>,
    /// What the CUDA context took when this backend opened, measured (see [`CudaBackend::context_bytes`]).
    context_bytes: Option<u64>,
    /// Synchronize and check after every launch (TUNESTUDIO_CUDA_SYNC=1): slow, for debugging.
    sync_each_launch: bool,
    /// Bytes of the attention scratch the backward may use (tests shrink it to force splits).
    attn_scratch_limit: std::cell::Cell<Option<usize>>,
    /// Run every GEMM on the fallback kernel (tests check it on shapes cuBLASLt would take).
    gemm_fallback_only: std::cell::Cell<bool>,
    profiler: profile::Profiler,
    /// f32 partial results of the cached attention's key splits, allocated by the first
    /// generation call ([`GEN_ATTN_SCRATCH_BYTES`]); training never allocates it.
    gen_scratch: RefCell<Option<DevBuf>>,
}

/// cuDNN's attention for one shape: the forward plan and the backward's split into (sequences, kv
/// heads) launches (their plans are in `cudnn::Sdpa`'s memo).
type CudnnAttention = (std::rc::Rc<cudnn::Plan>, (usize, usize));

/// One launch of an attention backward split into (sequences, kv heads): its first sequence, how
/// many sequences and kv heads it takes, and the element offsets of its first row and head in the
/// Q-shaped tensors (Q, O, dO, dQ), the K-shaped ones (K, V, dK, dV) and the log-sum-exp. Strides
/// stay the whole tensors'. Our backward and cuDNN's walk a split through this one iterator.
#[derive(Clone, Copy)]
struct BwdLaunch {
    b0: usize,
    bn: usize,
    kvn: usize,
    q_off: usize,
    k_off: usize,
    lse_off: usize,
}

/// The launches of `shape`'s backward split as `(bc, kvc)` ([`attention_bwd_split`]), in order.
fn bwd_launches(shape: AttnShape, (bc, kvc): (usize, usize)) -> impl Iterator<Item = BwdLaunch> {
    let AttnShape { batch, seq, heads, kv_heads, head_dim: hd, .. } = shape;
    let group = heads / kv_heads;
    (0..batch).step_by(bc).flat_map(move |b0| {
        (0..kv_heads).step_by(kvc).map(move |kv0| BwdLaunch {
            b0,
            bn: bc.min(batch - b0),
            kvn: kvc.min(kv_heads - kv0),
            q_off: b0 * seq * heads * hd + kv0 * group * hd,
            k_off: b0 * seq * kv_heads * hd + kv0 * hd,
            lse_off: b0 * seq * heads + kv0 * group,
        })
    })
}

/// Whether every pointer is 16-byte aligned, as cuDNN's graphs declare their tensors.
fn aligned16(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p % 16 == 0)
}

/// The cached attention's split scratch: `[rows][heads][splits][head_dim + 2]` f32. 16 MiB holds
/// 8 decode rows of a 64-head, head_dim 128 model in 60 splits; prefill chunks use fewer splits.
pub const GEN_ATTN_SCRATCH_BYTES: usize = 16 << 20;
/// Rows the generation GEMV kernels serve at once (`GEMV_MAX_ROWS` in kernels/generate.cu); more
/// rows go through the dequantize + GEMM path of training.
pub const GEMV_MAX_ROWS: usize = 8;
const GEMV_WARPS: usize = 8;
/// Keys per tile of the cached attention and the (query heads per kv head) × head_dim its
/// registers hold (`ATTC_THREADS`, `ATTC_MAX_GROUP_DIM` in kernels/generate.cu).
const ATTC_THREADS: usize = 128;
const ATTC_MAX_GROUP_DIM: usize = 2048;

// SAFETY: every CUDA handle inside (context, streams, functions, cuBLASLt) may be used from any
// thread once the context is bound there, which each entry point does first; the RefCells are only
// borrowed inside a single call (`&self` methods are never re-entered).
unsafe impl Send for CudaBackend {}

/// How to open the CUDA backend.
#[derive(Debug, Clone, Default)]
pub struct CudaOptions {
    /// Decide as this card would (its limits, its PTX, its memory); `None`: `TUNESTUDIO_CARD`, else
    /// the device itself.
    pub card: Option<&'static CardProfile>,
    /// A hard cap on the device memory the process may use, context included (`--gpu-mem`).
    pub memory_limit_bytes: Option<u64>,
}

impl CudaBackend {
    /// Open GPU 0 as `TUNESTUDIO_CARD` says (the device itself when unset), load the kernels and
    /// allocate the fixed scratch. `Error::NoCuda` with the reason when there is no usable GPU,
    /// `Error::Card` when the card cannot run the engine.
    pub fn new() -> Result<Self> {
        Self::with_options(&CudaOptions::default())
    }

    /// [`CudaBackend::new`] with a card profile and a memory cap.
    pub fn with_options(opts: &CudaOptions) -> Result<Self> {
        probe()?;
        // SAFETY: only asks the dynamic loader whether libcublasLt can be opened.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(Error::NoCuda("cuBLASLt, libcublasLt.so from CUDA 13, is not installed".into()));
        }
        match std::panic::catch_unwind(|| Self::open(opts)) {
            Ok(r) => r,
            Err(_) => Err(Error::NoCuda("the CUDA driver or cuBLASLt is missing a function this build needs (CUDA 13 is required)".into())),
        }
    }

    fn open(opts: &CudaOptions) -> Result<Self> {
        let (device_card, pci) = device_limits(0)?;
        let card = match opts.card {
            Some(p) => card::emulate(p, &device_card),
            None => effective_card(&device_card)?,
        };
        card.check_supported().map_err(|r| Error::Card { card: r.card, msg: r.reason })?;
        // Every process on the card before ours exists: what our context adds is the difference.
        let before = super::nvml::card_memory(&pci);
        let ctx = CudaContext::new(0).map_err(|e| Error::NoCuda(format!("cannot create a context on GPU 0: {e}")))?;
        let compute = ctx.new_stream().map_err(cuda_err("create compute stream"))?;
        let copy = ctx.new_stream().map_err(cuda_err("create copy stream"))?;
        let mut modules = Vec::with_capacity(FILES.len());
        for f in FILES {
            let ptx = match card.ptx_target() {
                PtxTarget::Sm90 => f.sm90,
                PtxTarget::Sm80 => f.sm80,
            };
            let m = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(|e| Error::Cuda {
                op: format!("load kernels/{}.ptx ({}) on {}", f.name, card.ptx_target().name(), card.describe()),
                msg: e.to_string(),
            })?;
            modules.push(m);
        }
        let mut funcs = Vec::with_capacity(Kernel::ALL.len());
        for &k in Kernel::ALL {
            let f = modules[k.file()]
                .load_function(k.symbol())
                .map_err(|e| Error::Cuda { op: format!("find kernel {}", k.symbol()), msg: e.to_string() })?;
            funcs.push(Func(f));
        }
        // The attention instances this card runs, with exactly the shared memory each launches with;
        // the others are never given more than the driver's default.
        let attention: Vec<_> = ATTN_HEAD_DIMS.iter().map(|&hd| kernels::attention_kernels_for(&card, hd)).collect();
        for chosen in attention.iter().flatten() {
            for (k, bytes) in [(chosen.fwd.kernel, chosen.fwd.smem_bytes()), (chosen.bwd.kernel, chosen.bwd.smem_bytes())] {
                // SAFETY: a live function handle of this context; raising its shared-memory limit
                // to what the card allows at most (`attention_kernels_for` checked it).
                unsafe {
                    drv::function::set_function_attribute(
                        funcs[k as usize].0.cu_function(),
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        bytes as i32,
                    )
                }
                .map_err(|e| Error::Cuda {
                    op: format!("allow {bytes} bytes of shared memory to {} on {}", k.symbol(), card.describe()),
                    msg: e.to_string(),
                })?;
            }
        }
        let cudnn = if cudnn::card_wants_cudnn(&card) {
            let stream = compute.cu_stream();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cudnn::Sdpa::open(stream)))
                .unwrap_or_else(|_| Err("libcudnn lacks a function this build calls".into()))
        } else {
            Err(format!("{} runs our attention kernels", card.describe()))
        };
        let shared = Arc::new(DeviceShared::new(ctx));
        let gemm_workspace = DevBuf::new(&shared, GEMM_WORKSPACE_BYTES)?;
        let gemm = Gemm::new(gemm_workspace.ptr(), GEMM_WORKSPACE_BYTES)?;
        // The small scratch is one block carved in `SMALL_SCRATCH`'s order, as the plan lists it.
        let small = Arc::new(DevBuf::new(&shared, workspace::packed_bytes(SMALL_SCRATCH.map(|(_, b)| b)))?);
        let mut offset = 0;
        let [row_loss, row_valid, sum, count, sumsq_partial, sumsq_out] = SMALL_SCRATCH.map(|(_, bytes)| {
            let view = DevBuf::view(&small, offset, bytes);
            offset += workspace::packed_bytes([bytes]);
            view
        });
        let loss = LossWorkspace {
            logits: DevBuf::new(&shared, LOSS_CHUNK_ELEMS * 4)?,
            dlogits: DevBuf::new(&shared, LOSS_CHUNK_ELEMS * 2)?,
            row_loss: row_loss?,
            row_valid: row_valid?,
            sum: sum?,
            count: count?,
        };
        let (sumsq_partial, sumsq_out) = (sumsq_partial?, sumsq_out?);
        // The context: what this process holds beyond our own buffers. NVML's per-process figure
        // is exact; else the growth of the card's use since before our context, in which other
        // processes cancel out. Without NVML nothing is measured (the card's use alone would count
        // every other program as our context).
        shared.ctx.synchronize().map_err(cuda_err("synchronize"))?;
        let ours = shared.used() as u64;
        let context_bytes = super::nvml::card_memory(&pci).and_then(|after| match (after.ours_bytes, before) {
            (Some(mine), _) => Some(mine.saturating_sub(ours)),
            (None, Some(b)) => Some(after.used_bytes.saturating_sub(b.used_bytes).saturating_sub(ours)),
            (None, None) => None,
        });
        if let Some(c) = context_bytes {
            super::context::remember(&card.name, driver_version(), c);
        }
        // A profile or a cap is a hard limit on what the process may take, context included, as the
        // real card (or the user) would impose it.
        let context_for_limit = context_bytes.unwrap_or_else(|| planned_context_bytes(&card.name));
        let mut limits = Vec::new();
        if card.profile.is_some() {
            limits.push((
                card.memory_bytes,
                format!("the {} profile's {}", card.profile.unwrap_or_default(), crate::util::fmt_bytes(card.memory_bytes)),
            ));
        }
        if let Some(cap) = opts.memory_limit_bytes {
            limits.push((cap, format!("the memory cap of {}", crate::util::fmt_bytes(cap))));
        }
        if let Some((bytes, why)) = limits.into_iter().min_by_key(|(b, _)| *b) {
            shared.set_limit(
                bytes.saturating_sub(context_for_limit) as usize,
                format!("{why} (the CUDA context takes {})", crate::util::fmt_bytes(context_for_limit)),
            );
        }
        Ok(CudaBackend {
            sumsq_partial,
            sumsq_out,
            attn_scratch: RefCell::new(None),
            shared,
            compute,
            copy,
            funcs,
            scratch: RefCell::new(Scratch { dequant: Vec::new(), dequant_elems: 0, dequant_uses: 0, gemm }),
            loss,
            _gemm_workspace: gemm_workspace,
            card,
            device_card,
            pci_bus_id: pci,
            attention,
            cudnn,
            cudnn_decisions: RefCell::new(std::collections::HashMap::new()),
            context_bytes,
            sync_each_launch: std::env::var("TUNESTUDIO_CUDA_SYNC").is_ok_and(|v| v == "1"),
            attn_scratch_limit: std::cell::Cell::new(None),
            gemm_fallback_only: std::cell::Cell::new(false),
            profiler: profile::Profiler::default(),
            gen_scratch: RefCell::new(None),
        })
    }

    /// Device memory in use on the real card by every process (total − free), whatever limit a
    /// profile or a cap sets.
    pub fn device_memory_in_use(&self) -> Result<u64> {
        self.bind()?;
        let (free, total) = self.shared.ctx.mem_get_info().map_err(cuda_err("memory info"))?;
        Ok((total - free) as u64)
    }

    /// The card kernels were chosen for (a profile's limits under `TUNESTUDIO_CARD`).
    pub fn card(&self) -> &CardLimits {
        &self.card
    }

    /// The device's own limits, whatever profile the backend decides by.
    pub fn device_card(&self) -> &CardLimits {
        &self.device_card
    }

    /// What the CUDA context took when this backend opened: NVML's count of this process's memory
    /// less our buffers, or the growth of the card's use across our start-up. `None` without NVML.
    pub fn context_bytes(&self) -> Option<u64> {
        self.context_bytes
    }

    /// The attention kernels this backend runs for `head_dim`, or why it cannot.
    pub fn attention_kernels(&self, head_dim: usize) -> std::result::Result<AttnKernels, String> {
        match ATTN_HEAD_DIMS.iter().position(|&d| d == head_dim) {
            Some(i) => self.attention[i].clone(),
            None => kernels::attention_kernels_for(&self.card, head_dim),
        }
    }

    /// Whether cuDNN's fused attention serves the shapes it accepts ("cuDNN 9.19.0"), or why our
    /// kernels run every shape.
    pub fn cudnn_attention(&self) -> std::result::Result<String, String> {
        self.cudnn.as_ref().map(|s| format!("cuDNN {}", cudnn::version_name(s.version))).map_err(Clone::clone)
    }

    /// Whether cuDNN runs the attention of `shape` (building its plans if need be).
    pub fn attention_on_cudnn(&self, shape: AttnShape) -> bool {
        self.cudnn_plans(shape).is_some()
    }

    /// The workspace cuDNN's plan asks for beyond its graph's tensors, for one launch of `bn`
    /// sequences and `kvn` kv heads of `shape` (`None`: no cuDNN, or it declines the shape).
    pub fn cudnn_plan_workspace(&self, shape: AttnShape, backward: bool, bn: usize, kvn: usize) -> Option<usize> {
        let sdpa = self.cudnn.as_ref().ok()?;
        Self::cudnn_plan(sdpa, Self::cudnn_key(shape, backward, bn, kvn)).map(|p| p.workspace)
    }

    /// The cuDNN key of one attention launch of `bn` sequences and `kvn` kv heads of `shape`.
    fn cudnn_key(shape: AttnShape, backward: bool, bn: usize, kvn: usize) -> cudnn::Key {
        let group = shape.heads / shape.kv_heads;
        cudnn::Key {
            backward,
            batch: bn,
            seq: shape.seq,
            heads: kvn * group,
            kv_heads: kvn,
            head_dim: shape.head_dim,
            q_row: shape.heads * shape.head_dim,
            k_row: shape.kv_heads * shape.head_dim,
            stats_row: shape.heads,
        }
    }

    /// cuDNN's plan for `key`, or `None` where it declines (said once on stderr per shape).
    fn cudnn_plan(sdpa: &cudnn::Sdpa, key: cudnn::Key) -> Option<std::rc::Rc<cudnn::Plan>> {
        match sdpa.plan(key) {
            Ok(p) => Some(p),
            Err(Some(why)) => {
                eprintln!("attention: cuDNN {} declined {key:?}, our kernels run it: {why}", cudnn::version_name(sdpa.version));
                None
            }
            Err(None) => None,
        }
    }

    /// The forward plan and the backward's launches with their plans, when cuDNN runs `shape`:
    /// rows that attend causally (no segments needed), no sliding window, and every plan built
    /// and fitting the attention scratch.
    fn cudnn_plans(&self, shape: AttnShape) -> Option<CudnnAttention> {
        let sdpa = self.cudnn.as_ref().ok()?;
        if !shape.causal_rows || shape.effective_window().is_some() || shape.tokens() == 0 {
            return None;
        }
        let scratch = self.attn_scratch.borrow().as_ref().map_or(0, |b| b.bytes());
        let limit = self.attn_scratch_limit.get().unwrap_or(usize::MAX).min(scratch);
        let key = (Self::cudnn_key(shape, false, shape.batch, shape.kv_heads), limit);
        if let Some(known) = self.cudnn_decisions.borrow().get(&key) {
            return known.clone();
        }
        let decided = match self.decide_cudnn(sdpa, shape, limit) {
            Ok(d) => Some(d),
            Err(why) => {
                eprintln!("attention: {} tokens × {} heads run on our kernels: {why}", shape.tokens(), shape.heads);
                None
            }
        };
        self.cudnn_decisions.borrow_mut().insert(key, decided.clone());
        decided
    }

    /// [`CudaBackend::cudnn_plans`] without its memo: the plans, or why our kernels run the shape.
    fn decide_cudnn(&self, sdpa: &cudnn::Sdpa, shape: AttnShape, limit: usize) -> std::result::Result<CudnnAttention, String> {
        let declined = || "cuDNN declined it (said above)".to_string();
        let too_small = || format!("cuDNN's plans do not fit the attention scratch of {}", crate::util::fmt_bytes(limit as u64));
        let fwd = Self::cudnn_plan(sdpa, Self::cudnn_key(shape, false, shape.batch, shape.kv_heads)).ok_or_else(declined)?;
        if fwd.workspace > limit {
            return Err(too_small());
        }
        // The backward splits as our own does (the scratch's unit covers cuDNN's graph tensors and
        // the plan workspace it was measured to ask); should a cuDNN version ask more, the
        // launches shrink by it.
        let mut split = attention_bwd_split(shape, limit).ok_or_else(too_small)?;
        let mut ws_seen = 0;
        for _ in 0..4 {
            let (mut need, mut ws) = (0, 0);
            for l in bwd_launches(shape, split) {
                let key = Self::cudnn_key(shape, true, l.bn, l.kvn);
                let plan = Self::cudnn_plan(sdpa, key).ok_or_else(declined)?;
                need = need.max(key.graph_workspace_bytes() + plan.workspace);
                ws = ws.max(plan.workspace);
            }
            if need <= limit {
                return Ok((fwd, split));
            }
            ws_seen = ws_seen.max(ws);
            split = limit.checked_sub(ws_seen).and_then(|l| attention_bwd_split(shape, l)).ok_or_else(too_small)?;
        }
        Err(too_small())
    }

    /// Bytes currently allocated by this backend (tensors, weights, scratch, cuBLASLt workspace).
    pub fn memory_used(&self) -> usize {
        self.shared.used()
    }

    /// Most bytes allocated at once since creation (or the last `reset_peak_memory`).
    pub fn peak_memory(&self) -> usize {
        self.shared.peak()
    }

    pub fn reset_peak_memory(&self) {
        self.shared.reset_peak()
    }

    /// Live device allocations.
    pub fn allocation_count(&self) -> usize {
        self.shared.allocations()
    }

    /// Run every GEMM on the fallback kernel instead of cuBLASLt (tests: the fallback otherwise runs
    /// only for the few shapes cuBLASLt declines).
    pub fn set_gemm_fallback_only(&self, on: bool) {
        self.gemm_fallback_only.set(on);
    }

    /// Use at most `bytes` of the attention backward's scratch (`None`: all of it), so tests can
    /// exercise the launches split over sequences and kv heads on small shapes.
    pub fn set_attention_scratch_limit(&self, bytes: Option<usize>) {
        self.attn_scratch_limit.set(bytes);
    }

    /// The attention kernels for `shape` on this card, or an error naming the card, the head dim
    /// and what to do.
    fn attention_for(&self, op: &'static str, shape: AttnShape) -> Result<AttnKernels> {
        if shape.kv_heads == 0 || !shape.heads.is_multiple_of(shape.kv_heads) {
            return Err(Error::Shape {
                op,
                expected: "heads a multiple of kv_heads".into(),
                got: format!("{} heads, {} kv heads", shape.heads, shape.kv_heads),
            });
        }
        self.attention_kernels(shape.head_dim).map_err(|msg| Error::Card { card: self.card.describe(), msg })
    }

    /// The attention backward, in launches of `split` = (sequences, kv heads) that fit the scratch:
    /// zero the accumulators, D = rowsum(dO∘O), the fused kernel, then the accumulators to bf16.
    /// Pointers are offset to each launch's first row and head; strides stay the full tensors'.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd_launches(
        &self,
        kern: AttnKernels,
        split: (usize, usize),
        scratch: &DevBuf,
        t: [&CudaTensor; 6],
        segments: &CudaIds,
        shape: AttnShape,
        dq: &CudaTensor,
        dk: &CudaTensor,
        dv: &CudaTensor,
    ) -> Result<()> {
        let [dout, q, k, v, out, lse] = t;
        let AttnShape { seq, heads, kv_heads, head_dim: hd, .. } = shape;
        let group = heads / kv_heads;
        let (qs, ks) = (heads * hd, kv_heads * hd);
        let (scale, window) = (shape.scale() as f32, shape.effective_window().unwrap_or(0));
        let bwd = kern.bwd;
        let key_tiles = seq.div_ceil(bwd.keys()) as u32;
        for BwdLaunch { b0, bn, kvn, q_off: qoff, k_off: koff, lse_off: loff, .. } in bwd_launches(shape, split) {
            let rows = bn * seq;
            let nh = kvn * group;
            // Scratch (f32): dq_acc [rows][nh·hd] | dk_acc, dv_acc [rows][kvn·hd] | D [rows][nh].
            let (dq_len, dk_len) = (rows * nh * hd, rows * kvn * hd);
            let dq_acc = scratch.ptr();
            let dk_acc = dq_acc + (dq_len * 4) as u64;
            let dv_acc = dk_acc + (dk_len * 4) as u64;
            let dsum = dv_acc + (dk_len * 4) as u64;
            assert!((dq_len + 2 * dk_len + rows * nh) * 4 <= scratch.bytes(), "attention_bwd_split sized a launch past the scratch");
            // SAFETY: the accumulators lie inside the scratch (`attention_bwd_split` sizes the
            // launch to fit); an asynchronous memset on our stream.
            unsafe { drv::memset_d8_async(dq_acc, 0, (dq_len + 2 * dk_len) * 4, self.stream()) }.map_err(cuda_err("memset"))?;
            let seg = Arg::Ptr(segments.buf.ptr() + (b0 * seq * 4) as u64);
            // Four threads per (row, head).
            let threads = rows * nh * 4;
            self.launch(
                kern.prep,
                (threads.div_ceil(256) as u32, 1, 1),
                256,
                0,
                &[Arg::Ptr(dout.at(qoff)), Arg::Ptr(out.at(qoff)), Arg::Ptr(dsum), i64a(rows), i32a(nh), i32a(qs)],
            )?;
            self.launch(
                bwd.kernel,
                ((nh * bwd.splits()) as u32, key_tiles, bn as u32),
                bwd.threads(),
                bwd.smem_bytes(),
                &[
                    Arg::Ptr(q.at(qoff)),
                    Arg::Ptr(k.at(koff)),
                    Arg::Ptr(v.at(koff)),
                    Arg::Ptr(dout.at(qoff)),
                    Arg::Ptr(lse.at(loff)),
                    Arg::Ptr(dsum),
                    seg,
                    Arg::Ptr(dq_acc),
                    Arg::Ptr(dk_acc),
                    Arg::Ptr(dv_acc),
                    i32a(seq),
                    i32a(qs),
                    i32a(ks),
                    i32a(heads),
                    i32a(group),
                    Arg::F32(scale),
                    i32a(window),
                ],
            )?;
            for (acc, dst, width, stride) in
                [(dq_acc, dq.at(qoff), nh * hd, qs), (dk_acc, dk.at(koff), kvn * hd, ks), (dv_acc, dv.at(koff), kvn * hd, ks)]
            {
                let threads = rows * width / 8;
                self.launch(
                    Kernel::AttnAccToBf16,
                    (threads.div_ceil(256) as u32, 1, 1),
                    256,
                    0,
                    &[Arg::Ptr(acc), Arg::Ptr(dst), i64a(rows), i32a(width), i32a(stride)],
                )?;
            }
        }
        Ok(())
    }

    /// Whether every launch of a cuDNN backward split as `split` starts 16-byte aligned (a kv-head
    /// split of the log-sum-exp, say, may not).
    fn cudnn_launches_aligned(&self, split: (usize, usize), t: [&CudaTensor; 6], g: [&CudaTensor; 3], shape: AttnShape) -> bool {
        let [dout, q, k, v, out, lse] = t;
        let [dq, dk, dv] = g;
        bwd_launches(shape, split).all(|l| {
            let (qo, ko) = (l.q_off, l.k_off);
            aligned16(&[q.at(qo), out.at(qo), dout.at(qo), dq.at(qo), k.at(ko), v.at(ko), dk.at(ko), dv.at(ko), lse.at(l.lse_off)])
        })
    }

    /// The attention backward on cuDNN, in launches of `split` = (sequences, kv heads) as our own
    /// backward splits, each with its dQ accumulator and row sums at the start of the scratch.
    #[allow(clippy::too_many_arguments)]
    fn cudnn_attention_bwd(
        &self,
        split: (usize, usize),
        t: [&CudaTensor; 6],
        shape: AttnShape,
        dq: &CudaTensor,
        dk: &CudaTensor,
        dv: &CudaTensor,
    ) -> Result<()> {
        let [dout, q, k, v, out, lse] = t;
        let sdpa = self.cudnn.as_ref().expect("cuDNN plans come from an open handle");
        let scratch = self.attn_scratch.borrow();
        let scratch = scratch.as_ref().expect("cudnn_plans checked the scratch");
        for l in bwd_launches(shape, split) {
            let key = Self::cudnn_key(shape, true, l.bn, l.kvn);
            let plan = Self::cudnn_plan(sdpa, key).expect("cudnn_plans built every launch's plan");
            assert!(key.graph_workspace_bytes() + plan.workspace <= scratch.bytes(), "cudnn_plans sized a launch past the scratch");
            if !sdpa.zeroes_dq_itself() {
                let (_, acc, _) = key.workspace_offsets();
                // SAFETY: the dQ accumulator lies inside the scratch (asserted above); an
                // asynchronous memset on our stream.
                unsafe { drv::memset_d8_async(scratch.ptr() + acc as u64, 0, key.dq_acc_bytes(), self.stream()) }
                    .map_err(cuda_err("memset"))?;
            }
            let (qo, ko) = (l.q_off, l.k_off);
            let ptrs = cudnn::Pointers {
                q: q.at(qo),
                k: k.at(ko),
                v: v.at(ko),
                o: out.at(qo),
                stats: lse.at(l.lse_off),
                d_o: dout.at(qo),
                dq: dq.at(qo),
                dk: dk.at(ko),
                dv: dv.at(ko),
                workspace: scratch.ptr(),
            };
            self.profiler.around(
                &self.shared.ctx,
                &self.compute,
                || "cudnn_sdpa_bwd".to_string(),
                || {
                    sdpa.execute(&key, &plan, &ptrs, shape.scale() as f32)
                        .map_err(|msg| Error::Cuda { op: "attention_bwd (cuDNN)".into(), msg })
                },
            )?;
        }
        Ok(())
    }

    /// Warps per output row of a generation GEMV with `out` rows: one, unless that leaves fewer
    /// than two blocks per multiprocessor (then 2, 4 or 8 warps share each row's dot products).
    fn gemv_warps_per_row(&self, out: usize) -> usize {
        let mut wpr = 1;
        while wpr < GEMV_WARPS && out.div_ceil(GEMV_WARPS / wpr) < 2 * self.card.sm_count as usize {
            wpr *= 2;
        }
        wpr
    }

    /// `y[n, out] = x[n, in] · Wᵀ (+ bias) (+ LoRA up-projection)` by the GEMV kernels, for
    /// `n ≤ GEMV_MAX_ROWS`. `w` is a weight, or a bare bf16 `[out, in]` matrix (LoRA's A, the
    /// head); `lora` = (B, xa, row_scale, rank). Returns false when the shape does not suit the
    /// kernels (the caller takes the GEMM path).
    #[allow(clippy::too_many_arguments)]
    fn gemv(
        &self,
        x: &CudaTensor,
        n: usize,
        w: GemvWeight<'_>,
        out: usize,
        inp: usize,
        lora: Option<(&CudaTensor, &CudaTensor, &CudaTensor, usize)>,
        y: u64,
        y_f32: bool,
    ) -> Result<bool> {
        let wpr = self.gemv_warps_per_row(out);
        let blocks = (out.div_ceil(GEMV_WARPS / wpr) as u32, 1, 1);
        let (lb, xa, rs, rank) = match lora {
            Some((b, xa, rs, r)) => (Arg::Ptr(b.ptr()), Arg::Ptr(xa.ptr()), Arg::Ptr(rs.ptr()), r),
            None => (Arg::Ptr(0), Arg::Ptr(0), Arg::Ptr(0), 0),
        };
        let parts = (GEMV_WARPS * GEMV_MAX_ROWS * 4) as u32;
        match w {
            GemvWeight::Nf4 { weight, packed, absmax_q, absmax2, code2, offset } => {
                if n > GEMV_MAX_ROWS || !inp.is_multiple_of(32) || y_f32 {
                    return Ok(false);
                }
                self.launch(
                    Kernel::GemvNf4,
                    blocks,
                    (GEMV_WARPS * 32) as u32,
                    16 * 4 + parts,
                    &[
                        p(x),
                        i32a(n),
                        Arg::Ptr(packed.ptr()),
                        Arg::Ptr(absmax_q.ptr()),
                        Arg::Ptr(absmax2.ptr()),
                        Arg::Ptr(code2.ptr()),
                        Arg::F32(offset),
                        i32a(out),
                        i32a(inp),
                        Arg::Ptr(weight.bias.as_ref().map_or(0, DevBuf::ptr)),
                        lb,
                        xa,
                        rs,
                        i32a(rank),
                        Arg::Ptr(y),
                        i32a(wpr),
                    ],
                )?;
            }
            GemvWeight::Dense { ptr, bias } => {
                if n > GEMV_MAX_ROWS || !inp.is_multiple_of(8) {
                    return Ok(false);
                }
                self.launch(
                    Kernel::GemvBf16,
                    blocks,
                    (GEMV_WARPS * 32) as u32,
                    parts,
                    &[
                        p(x),
                        i32a(n),
                        Arg::Ptr(ptr),
                        i32a(out),
                        i32a(inp),
                        Arg::Ptr(bias),
                        lb,
                        xa,
                        rs,
                        i32a(rank),
                        Arg::Ptr(y),
                        Arg::I32(y_f32 as i32),
                        i32a(wpr),
                    ],
                )?;
            }
        }
        Ok(true)
    }

    /// The generation scratch, allocated on first use.
    fn gen_scratch_ptr(&self) -> Result<u64> {
        let mut s = self.gen_scratch.borrow_mut();
        if s.is_none() {
            *s = Some(DevBuf::new(&self.shared, GEN_ATTN_SCRATCH_BYTES)?);
        }
        Ok(s.as_ref().map_or(0, DevBuf::ptr))
    }

    pub fn compute_capability(&self) -> (u32, u32) {
        self.card.compute_capability
    }

    /// Time every kernel launch and GEMM on the compute stream from now until `finish_profile`.
    pub fn start_profile(&self) {
        self.profiler.start();
    }

    /// Per-kernel times since `start_profile`, the most expensive first (waits for the stream).
    pub fn finish_profile(&self) -> Result<Vec<profile::KernelTime>> {
        self.bind()?;
        self.profiler.finish()
    }

    /// Run `f`, then time it with events on the compute stream (milliseconds). For benchmarks.
    pub fn time_ms(&self, mut f: impl FnMut() -> Result<()>) -> Result<f32> {
        self.bind()?;
        let ctx = &self.shared.ctx;
        let start = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda_err("create event"))?;
        let end = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda_err("create event"))?;
        start.record(&self.compute).map_err(cuda_err("record event"))?;
        f()?;
        end.record(&self.compute).map_err(cuda_err("record event"))?;
        end.synchronize().map_err(cuda_err("synchronize event"))?;
        start.elapsed_ms(&end).map_err(cuda_err("elapsed time"))
    }

    fn bind(&self) -> Result<()> {
        self.shared.ctx.bind_to_thread().map_err(cuda_err("bind context"))
    }

    fn stream(&self) -> sys::CUstream {
        self.compute.cu_stream()
    }

    fn launch(&self, k: Kernel, grid: (u32, u32, u32), block: u32, smem: u32, args: &[Arg]) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let mut ptrs = [std::ptr::null_mut::<c_void>(); 24];
        assert!(args.len() <= ptrs.len(), "kernel {} takes too many arguments", k.symbol());
        for (slot, a) in ptrs.iter_mut().zip(args) {
            *slot = a.addr();
        }
        // SAFETY: the function belongs to this context; `args` matches the kernel's parameter list
        // (each launcher below mirrors its .cu signature) and outlives the call, which copies the
        // values; every pointer argument is a live device buffer whose size the caller checked.
        self.profiler.around(
            &self.shared.ctx,
            &self.compute,
            || k.symbol().to_string(),
            || {
                unsafe {
                    drv::launch_kernel(
                        self.funcs[k as usize].0.cu_function(),
                        grid,
                        (block, 1, 1),
                        smem,
                        self.stream(),
                        &mut ptrs[..args.len()],
                    )
                }
                .map_err(|e| Error::Cuda { op: format!("launch {}", k.symbol()), msg: e.to_string() })
            },
        )?;
        if self.sync_each_launch {
            self.compute.synchronize().map_err(|e| Error::Cuda { op: format!("run {}", k.symbol()), msg: e.to_string() })?;
        }
        Ok(())
    }

    /// Wait for the queued sums of squares and add the first `count` results in order.
    fn read_sumsq_results(&self, count: usize) -> Result<f64> {
        let mut out = [0f64; SUMSQ_MAX_LAUNCHES];
        self.compute.synchronize().map_err(cuda_err("synchronize"))?;
        // SAFETY: `sumsq_out` holds SUMSQ_MAX_LAUNCHES f64 and count ≤ that; the stream has drained.
        unsafe { drv::memcpy_dtoh_sync(&mut out[..count], self.sumsq_out.ptr()) }.map_err(cuda_err("copy to host"))?;
        Ok(out[..count].iter().sum())
    }

    /// One thread per 8 elements, 256 threads a block.
    fn launch_ew(&self, k: Kernel, n: usize, args: &[Arg]) -> Result<()> {
        let threads = n.div_ceil(8);
        self.launch(k, (threads.div_ceil(256) as u32, 1, 1), 256, 0, args)
    }

    fn gemm(&self, call: GemmCall) -> Result<()> {
        self.profiler.around(
            &self.shared.ctx,
            &self.compute,
            || format!("gemm {}x{}x{}", call.m, call.n, call.k),
            || self.gemm_unprofiled(call),
        )
    }

    fn gemm_unprofiled(&self, call: GemmCall) -> Result<()> {
        if call.m == 0 || call.n == 0 {
            return Ok(());
        }
        if call.k == 0 {
            if call.beta == 0.0 {
                let bytes = call.m * call.n * if call.c_f32 { 4 } else { 2 };
                // SAFETY: `c` holds m·n elements (checked by the caller); async memset on our stream.
                unsafe { drv::memset_d8_async(call.c, 0, bytes, self.stream()) }.map_err(cuda_err("memset"))?;
            }
            return Ok(());
        }
        let done = !self.gemm_fallback_only.get() && self.scratch.borrow_mut().gemm.run(&call, self.stream())?;
        if !done {
            let grid = (call.n.div_ceil(16) as u32, call.m.div_ceil(16) as u32, 1);
            let args = [
                i32a(call.m),
                i32a(call.n),
                i32a(call.k),
                Arg::Ptr(call.a),
                Arg::I32(call.a_t as i32),
                Arg::Ptr(call.b),
                Arg::I32(call.b_t as i32),
                Arg::Ptr(call.c),
                Arg::I32(call.c_f32 as i32),
                Arg::F32(call.alpha),
                Arg::F32(call.beta),
                Arg::Ptr(call.bias.unwrap_or(0)),
            ];
            let mut ptrs = [std::ptr::null_mut::<c_void>(); 12];
            for (slot, a) in ptrs.iter_mut().zip(&args) {
                *slot = a.addr();
            }
            // SAFETY: as in `launch`; the fallback takes a 16x16 block.
            unsafe {
                drv::launch_kernel(
                    self.funcs[Kernel::GemmFallback as usize].0.cu_function(),
                    grid,
                    (16, 16, 1),
                    0,
                    self.stream(),
                    &mut ptrs,
                )
            }
            .map_err(cuda_err("launch gemm_fallback"))?;
            if self.sync_each_launch {
                self.compute.synchronize().map_err(cuda_err("run gemm_fallback"))?;
            }
        }
        Ok(())
    }

    /// The bf16 weight a GEMM reads: a dense weight itself, an NF4 weight's dequantized copy when
    /// it holds one, else the NF4 weight dequantized into the shared scratch now.
    fn weight_ptr(&self, w: &CudaWeight) -> Result<u64> {
        if let Some(cached) = &w.dequantized {
            return Ok(cached.ptr());
        }
        match &w.data {
            WeightData::Dense(b) => Ok(b.ptr()),
            WeightData::Nf4 { .. } => {
                let numel = w.out_features * w.in_features;
                let (slot, dst) = {
                    let mut s = self.scratch.borrow_mut();
                    if s.dequant_elems < numel || s.dequant.is_empty() {
                        return Err(Error::bug("NF4 dequantization", "the scratch is smaller than the weight (upload_weight sizes it)"));
                    }
                    s.dequant_uses += 1;
                    let now = s.dequant_uses;
                    if let Some(d) = s.dequant.iter_mut().find(|d| d.holds == Some(w.id)) {
                        d.last_use = now;
                        return Ok(d.buf.ptr());
                    }
                    let slot = (0..s.dequant.len()).min_by_key(|&i| s.dequant[i].last_use).expect("at least one buffer");
                    let d = &mut s.dequant[slot];
                    d.holds = None;
                    d.last_use = now;
                    (slot, d.buf.ptr())
                };
                self.dequantize_into(w, dst)?;
                // What it holds is known once the dequantization is queued (in stream order
                // before every GEMM that reads it, after every one that read the last weight).
                self.scratch.borrow_mut().dequant[slot].holds = Some(w.id);
                Ok(dst)
            }
        }
    }

    /// Dequantize an NF4 weight into `dst` (bf16 `[out, in]`); a dense weight is left alone.
    fn dequantize_into(&self, w: &CudaWeight, dst: u64) -> Result<()> {
        match &w.data {
            WeightData::Dense(_) => Ok(()),
            WeightData::Nf4 { packed, absmax_q, absmax2, code2, offset } => {
                let numel = w.out_features * w.in_features;
                let threads = numel.div_ceil(16);
                self.launch(
                    Kernel::Nf4Dequant,
                    (threads.div_ceil(256) as u32, 1, 1),
                    256,
                    0,
                    &[
                        Arg::Ptr(packed.ptr()),
                        Arg::Ptr(absmax_q.ptr()),
                        Arg::Ptr(absmax2.ptr()),
                        Arg::Ptr(code2.ptr()),
                        Arg::F32(*offset),
                        Arg::Ptr(dst),
                        i64a(numel),
                    ],
                )
            }
        }
    }

    /// Dequantize an NF4 weight into the first scratch buffer, whatever it holds (benchmarks).
    pub fn dequantize_to_scratch(&self, w: &CudaWeight) -> Result<()> {
        self.bind()?;
        let numel = w.out_features * w.in_features;
        let dst = {
            let mut s = self.scratch.borrow_mut();
            let elems = s.dequant_elems;
            match s.dequant.first_mut() {
                Some(d) if elems >= numel => {
                    d.holds = None;
                    d.buf.ptr()
                }
                _ => return Err(Error::bug("dequantize_to_scratch", "no scratch as large as the weight")),
            }
        };
        self.dequantize_into(w, dst)
    }

    /// Dequantize an NF4 weight to bf16 values on the host (the GPU kernel's output), for tests.
    pub fn dequantize_weight(&self, w: &CudaWeight) -> Result<Vec<f32>> {
        self.bind()?;
        let numel = w.out_features * w.in_features;
        let ptr = self.weight_ptr(w)?;
        let mut host = vec![bf16::ZERO; numel];
        self.compute.synchronize().map_err(cuda_err("synchronize"))?;
        // SAFETY: `ptr` holds `numel` bf16 values; synchronous copy after the stream drained.
        unsafe { drv::memcpy_dtoh_sync(&mut host, ptr) }.map_err(cuda_err("copy to host"))?;
        Ok(host.into_iter().map(f32::from).collect())
    }

    /// `bytes` from `src` to `dst` on `stream`; either side may be device or pinned host memory
    /// (unified addressing tells the driver which).
    fn memcpy(&self, dst: u64, src: u64, bytes: usize, stream: sys::CUstream) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: callers check both ranges lie inside their buffers; the buffers do not overlap
        // (distinct allocations, or disjoint ranges of one checked by the caller).
        unsafe { sys::cuMemcpyAsync(dst, src, bytes, stream) }.result().map_err(cuda_err("cuMemcpyAsync"))
    }

    fn new_tensor(&self, len: usize, dtype: DType) -> Result<CudaTensor> {
        Ok(CudaTensor { buf: DevBuf::new(&self.shared, len * elem_bytes(dtype))?, len, dtype })
    }

    fn upload_bytes<T: Copy + bytemuck::Pod>(&self, data: &[T]) -> Result<DevBuf> {
        let buf = DevBuf::new(&self.shared, std::mem::size_of_val(data))?;
        self.write_bytes(&buf, data)?;
        Ok(buf)
    }

    /// Write `data` at the start of `buf` (device or pinned host), done when this returns.
    fn write_bytes<T: Copy + bytemuck::Pod>(&self, buf: &DevBuf, data: &[T]) -> Result<()> {
        check_len("write_bytes", "buffer bytes", buf.bytes(), std::mem::size_of_val(data))?;
        if data.is_empty() {
            return Ok(());
        }
        if buf.is_host() {
            return buf.write_host(bytemuck::cast_slice(data));
        }
        // SAFETY: `buf` holds at least the bytes of `data`; synchronous on the copy stream, after
        // the compute work queued so far (the block's zero fill).
        unsafe {
            self.copy.join(&self.compute).map_err(cuda_err("order the copy stream"))?;
            drv::memcpy_htod_async(buf.ptr(), data, self.copy.cu_stream()).map_err(cuda_err("copy to device"))?;
        }
        self.copy.synchronize().map_err(cuda_err("synchronize copy stream"))
    }

    /// The NF4 dequantization scratch holds at least `numel` elements (one per backend, sized by
    /// the largest NF4 weight: the memory plan's `dequant_scratch`).
    fn ensure_dequant_scratch(&self, numel: usize) -> Result<()> {
        let mut s = self.scratch.borrow_mut();
        if s.dequant_elems < numel {
            let buffers = s.dequant.len().max(1);
            s.dequant.clear();
            for _ in 0..buffers {
                s.dequant.push(Dequantized { buf: DevBuf::new(&self.shared, numel * 2)?, holds: None, last_use: 0 });
            }
            s.dequant_elems = numel;
        }
        Ok(())
    }

    fn to_bf16(data: &[f32]) -> Vec<bf16> {
        data.iter().map(|&x| bf16::from_f32(x)).collect()
    }
}

fn check_len(op: &'static str, what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::Shape { op, expected: format!("{what} with at least {need} elements"), got: have.to_string() });
    }
    Ok(())
}

fn check_dtype(op: &'static str, what: &str, t: &CudaTensor, dtype: DType) -> Result<()> {
    if t.dtype != dtype {
        return Err(Error::Shape { op, expected: format!("{what} of dtype {dtype:?}"), got: format!("{:?}", t.dtype) });
    }
    Ok(())
}

fn act(op: &'static str, what: &str, t: &CudaTensor, need: usize) -> Result<()> {
    check_dtype(op, what, t, DType::Act)?;
    check_len(op, what, t.len, need)
}

fn f32t(op: &'static str, what: &str, t: &CudaTensor, need: usize) -> Result<()> {
    check_dtype(op, what, t, DType::F32)?;
    check_len(op, what, t.len, need)
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Ids = CudaIds;
    type Block = Arc<DevBuf>;

    fn device(&self) -> DeviceInfo {
        let (free, total) = self.shared.ctx.mem_get_info().unwrap_or((0, 0));
        let (mut free, mut total) = (free as u64, total as u64);
        // Under a profile or a cap the card is as small as that limit: what is left of it is the
        // limit less our buffers and context.
        if let Some(limit) = self.shared.limit() {
            let context = self.context_bytes.unwrap_or_else(|| planned_context_bytes(&self.card.name));
            total = total.min(limit as u64 + context);
            free = free.min((limit as u64).saturating_sub(self.shared.driver_bytes() as u64));
        }
        DeviceInfo {
            kind: "cuda".into(),
            name: self.card.name.clone(),
            total_memory_bytes: Some(total),
            free_memory_bytes: Some(free),
            others_bytes: None,
            pci_bus_id: Some(self.pci_bus_id.clone()),
            card: Some(self.card.clone()),
        }
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<Self::Tensor> {
        self.bind()?;
        let t = self.new_tensor(len, dtype)?;
        // SAFETY: the new buffer holds len elements; zeroed on the compute stream before any use.
        unsafe { drv::memset_d8_async(t.ptr(), 0, len * elem_bytes(dtype), self.stream()) }.map_err(cuda_err("memset"))?;
        Ok(t)
    }

    fn upload(&self, data: &[f32], dtype: DType) -> Result<Self::Tensor> {
        self.bind()?;
        let buf = match dtype {
            DType::Act => self.upload_bytes(&Self::to_bf16(data))?,
            DType::F32 => self.upload_bytes(data)?,
        };
        Ok(CudaTensor { buf, len: data.len(), dtype })
    }

    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>> {
        self.bind()?;
        self.compute.synchronize().map_err(cuda_err("synchronize"))?;
        if t.len == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: the buffer holds `len` elements of its dtype; the stream has drained.
        unsafe {
            match t.dtype {
                DType::Act => {
                    let mut h = vec![bf16::ZERO; t.len];
                    drv::memcpy_dtoh_sync(&mut h, t.ptr()).map_err(cuda_err("copy to host"))?;
                    Ok(h.into_iter().map(f32::from).collect())
                }
                DType::F32 => {
                    let mut h = vec![0f32; t.len];
                    drv::memcpy_dtoh_sync(&mut h, t.ptr()).map_err(cuda_err("copy to host"))?;
                    Ok(h)
                }
            }
        }
    }

    fn write(&self, t: &mut Self::Tensor, data: &[f32]) -> Result<()> {
        self.bind()?;
        check_len("write", "destination", t.len, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        if t.buf.is_host() {
            // The CPU writes pinned memory itself, once the GPU's queued work is done with it.
            self.compute.synchronize().map_err(cuda_err("synchronize"))?;
            return match t.dtype {
                DType::Act => t.buf.write_host(bytemuck::cast_slice(&Self::to_bf16(data))),
                DType::F32 => t.buf.write_host(bytemuck::cast_slice(data)),
            };
        }
        // SAFETY: the destination holds at least data.len() elements; pageable source, so the call
        // returns once the driver has staged it (ordered on the compute stream).
        unsafe {
            match t.dtype {
                DType::Act => drv::memcpy_htod_async(t.ptr(), &Self::to_bf16(data), self.stream()),
                DType::F32 => drv::memcpy_htod_async(t.ptr(), data, self.stream()),
            }
        }
        .map_err(cuda_err("copy to device"))?;
        self.compute.synchronize().map_err(cuda_err("synchronize"))
    }

    fn fill(&self, t: &mut Self::Tensor, value: f32) -> Result<()> {
        self.bind()?;
        if value == 0.0 && value.is_sign_positive() {
            // SAFETY: the buffer holds len elements.
            return unsafe { drv::memset_d8_async(t.ptr(), 0, t.len * elem_bytes(t.dtype), self.stream()) }.map_err(cuda_err("memset"));
        }
        let k = match t.dtype {
            DType::Act => Kernel::FillBf16,
            DType::F32 => Kernel::FillF32,
        };
        self.launch_ew(k, t.len, &[p(t), i64a(t.len), Arg::F32(value)])
    }

    fn upload_host(&self, data: &[f32], dtype: DType) -> Result<Self::Tensor> {
        let t = self.alloc_host(data.len(), dtype)?;
        match dtype {
            DType::Act => t.buf.write_host(bytemuck::cast_slice(&Self::to_bf16(data)))?,
            DType::F32 => t.buf.write_host(bytemuck::cast_slice(data))?,
        }
        Ok(t)
    }

    fn alloc_host(&self, len: usize, dtype: DType) -> Result<Self::Tensor> {
        self.bind()?;
        Ok(CudaTensor { buf: DevBuf::new_host(&self.shared, len * elem_bytes(dtype))?, len, dtype })
    }

    fn copy(&self, src: &Self::Tensor, dst: &mut Self::Tensor, n: usize) -> Result<()> {
        self.bind()?;
        check_len("copy", "source", src.len, n)?;
        check_len("copy", "destination", dst.len, n)?;
        match (src.dtype, dst.dtype) {
            (a, b) if a == b => self.memcpy(dst.at(0), src.at(0), n * elem_bytes(a), self.stream()),
            _ if src.buf.is_host() || dst.buf.is_host() => Err(Error::Shape {
                op: "copy",
                expected: "one dtype for a copy to or from host memory".into(),
                got: format!("{:?} → {:?}", src.dtype, dst.dtype),
            }),
            (DType::F32, DType::Act) => self.launch_ew(Kernel::CastF32Bf16, n, &[p(src), p(dst), i64a(n)]),
            (DType::Act, DType::F32) => self.launch_ew(Kernel::CastBf16F32, n, &[p(src), p(dst), i64a(n)]),
            _ => unreachable!("two dtypes"),
        }
    }

    fn copy_range(&self, src: &Self::Tensor, src_off: usize, dst: &mut Self::Tensor, dst_off: usize, n: usize) -> Result<()> {
        self.bind()?;
        check_len("copy_range", "source", src.len, src_off + n)?;
        check_len("copy_range", "destination", dst.len, dst_off + n)?;
        check_dtype("copy_range", "destination", dst, src.dtype)?;
        self.memcpy(dst.at(dst_off), src.at(src_off), n * elem_bytes(src.dtype), self.stream())
    }

    fn copy_async(&self, src: &Self::Tensor, dst: &mut Self::Tensor, n: usize) -> Result<()> {
        self.bind()?;
        check_len("copy_async", "source", src.len, n)?;
        check_len("copy_async", "destination", dst.len, n)?;
        check_dtype("copy_async", "destination", dst, src.dtype)?;
        // The copy stream first waits for the compute work queued so far (which writes `src` or
        // last reads `dst`), then copies while later compute runs.
        self.copy.join(&self.compute).map_err(cuda_err("order the copy stream"))?;
        self.memcpy(dst.at(0), src.at(0), n * elem_bytes(src.dtype), self.copy.cu_stream())
    }

    fn wait_copies(&self) -> Result<()> {
        self.bind()?;
        self.compute.join(&self.copy).map_err(cuda_err("wait for the copy stream"))
    }

    fn alloc_ids(&self, len: usize) -> Result<Self::Ids> {
        self.bind()?;
        let buf = DevBuf::new(&self.shared, len * 4)?;
        // SAFETY: the buffer holds len i32.
        unsafe { drv::memset_d8_async(buf.ptr(), 0, len * 4, self.stream()) }.map_err(cuda_err("memset"))?;
        Ok(CudaIds { buf, len })
    }

    fn write_ids(&self, ids: &mut Self::Ids, data: &[i32]) -> Result<()> {
        self.bind()?;
        check_len("write_ids", "ids", ids.len, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        // SAFETY: the destination holds at least data.len() i32; ordered after earlier kernels
        // that read the ids on the same stream; pageable source is staged before return.
        unsafe { drv::memcpy_htod_async(ids.buf.ptr(), data, self.stream()) }.map_err(cuda_err("copy ids to device"))
    }

    fn upload_weight(&self, w: &HostWeight, bias: Option<&[f32]>) -> Result<Self::Weight> {
        self.bind()?;
        // A block of its own: the weight, then its bias.
        let (o, i) = w.shape();
        let data_bytes = match w {
            HostWeight::Dense { .. } => o * i * 2,
            HostWeight::Nf4(_) => crate::quant::nf4::device_bytes(o * i),
        };
        let bias_at = workspace::packed_bytes([data_bytes]);
        let block = self.alloc_block(bias_at + bias.map_or(0, |b| b.len() * 2), false)?;
        self.weight_in(&block, WeightPlace { data: 0, bias: bias.map(|_| bias_at), dequantized: None }, w, bias)
    }

    fn weight_in(&self, block: &Self::Block, place: WeightPlace, w: &HostWeight, bias: Option<&[f32]>) -> Result<Self::Weight> {
        self.bind()?;
        let (out_features, in_features) = w.shape();
        let numel = out_features * in_features;
        if let Some(b) = bias
            && b.len() != out_features
        {
            return Err(Error::Shape { op: "upload_weight bias", expected: out_features.to_string(), got: b.len().to_string() });
        }
        let data = match w {
            HostWeight::Dense { data, .. } => {
                if data.len() != numel {
                    return Err(Error::Shape {
                        op: "upload_weight",
                        expected: format!("{out_features}x{in_features}"),
                        got: data.len().to_string(),
                    });
                }
                let buf = DevBuf::view(block, place.data, numel * 2)?;
                self.write_bytes(&buf, &Self::to_bf16(data))?;
                WeightData::Dense(buf)
            }
            HostWeight::Nf4(t) => {
                let parts = Nf4Parts::of(t);
                let layout = crate::quant::nf4::device_parts(numel);
                let lens = [parts.packed.len(), parts.absmax_q.len(), parts.absmax2.len() * 4, parts.code2.len() * 4];
                if parts.numel() != numel || lens.iter().zip(&layout).any(|(&have, &(_, planned))| have != planned) {
                    return Err(Error::Shape {
                        op: "upload_weight nf4",
                        expected: format!("{out_features}x{in_features} with parts of {:?} bytes", layout.map(|(_, b)| b)),
                        got: format!("{:?} with parts of {lens:?} bytes", t.shape),
                    });
                }
                self.ensure_dequant_scratch(numel)?;
                let [packed, absmax_q, absmax2, code2] = layout.map(|(at, bytes)| DevBuf::view(block, place.data + at, bytes));
                let (packed, absmax_q, absmax2, code2) = (packed?, absmax_q?, absmax2?, code2?);
                self.write_bytes(&packed, &parts.packed)?;
                self.write_bytes(&absmax_q, &parts.absmax_q)?;
                self.write_bytes(&absmax2, &parts.absmax2)?;
                self.write_bytes(&code2, &parts.code2)?;
                WeightData::Nf4 { packed, absmax_q, absmax2, code2, offset: parts.offset }
            }
        };
        let bias = match (bias, place.bias) {
            (Some(b), Some(at)) => {
                let buf = DevBuf::view(block, at, b.len() * 2)?;
                self.write_bytes(&buf, &Self::to_bf16(b))?;
                Some(buf)
            }
            (None, None) => None,
            _ => return Err(Error::bug("weight_in", "a bias without a place for it, or a place without a bias")),
        };
        let id = NEXT_WEIGHT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut weight = CudaWeight { id, out_features, in_features, data, dequantized: None, bias };
        if let Some(at) = place.dequantized
            && weight.is_nf4()
        {
            let copy = DevBuf::view(block, at, numel * 2)?;
            self.dequantize_into(&weight, copy.ptr())?;
            weight.dequantized = Some(copy);
        }
        Ok(weight)
    }

    fn hold_dequantized(&self, buffers: usize) -> Result<()> {
        self.bind()?;
        let mut s = self.scratch.borrow_mut();
        let elems = s.dequant_elems;
        if elems == 0 {
            return Ok(());
        }
        while s.dequant.len() < buffers {
            s.dequant.push(Dequantized { buf: DevBuf::new(&self.shared, elems * 2)?, holds: None, last_use: 0 });
        }
        Ok(())
    }

    fn alloc_block(&self, bytes: usize, host: bool) -> Result<Self::Block> {
        self.bind()?;
        if host {
            return Ok(Arc::new(DevBuf::new_host(&self.shared, bytes)?));
        }
        let block = DevBuf::new(&self.shared, bytes)?;
        // SAFETY: the block holds `bytes`; zeroed on the compute stream before any use.
        unsafe { drv::memset_d8_async(block.ptr(), 0, bytes, self.stream()) }.map_err(cuda_err("memset"))?;
        Ok(Arc::new(block))
    }

    fn tensor_in(&self, block: &Self::Block, offset: usize, len: usize, dtype: DType) -> Result<Self::Tensor> {
        Ok(CudaTensor { buf: DevBuf::view(block, offset, len * elem_bytes(dtype))?, len, dtype })
    }

    fn ids_in(&self, block: &Self::Block, offset: usize, len: usize) -> Result<Self::Ids> {
        Ok(CudaIds { buf: DevBuf::view(block, offset, len * 4)?, len })
    }

    fn cache_dequantized(&self, w: &mut CudaWeight) -> Result<()> {
        if !w.is_nf4() || w.is_cached() {
            return Ok(());
        }
        self.bind()?;
        let copy = DevBuf::new(&self.shared, w.out_features * w.in_features * 2)?;
        self.dequantize_into(w, copy.ptr())?;
        w.dequantized = Some(copy);
        Ok(())
    }

    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor, n: usize) -> Result<()> {
        self.bind()?;
        check_len("add", "x", x.len, n)?;
        check_len("add", "y", y.len, n)?;
        match (x.dtype, y.dtype) {
            (DType::Act, DType::Act) => self.launch_ew(Kernel::AddBf16, n, &[p(x), p(y), i64a(n)]),
            (DType::F32, DType::F32) => self.launch_ew(Kernel::AddF32, n, &[p(x), p(y), i64a(n)]),
            _ => Err(Error::Shape { op: "add", expected: "x and y of one dtype".into(), got: format!("{:?} and {:?}", x.dtype, y.dtype) }),
        }
    }

    fn dropout(&self, x: &Self::Tensor, out: &mut Self::Tensor, n: usize, p_drop: f32, key: u64, first: u64) -> Result<()> {
        self.bind()?;
        act("dropout", "x", x, n)?;
        act("dropout", "out", out, n)?;
        let keep = (1.0 / (1.0 - p_drop as f64)) as f32;
        self.launch_ew(Kernel::DropoutFwd, n, &[p(x), p(out), i64a(n), Arg::F32(p_drop), Arg::F32(keep), Arg::U64(key), Arg::U64(first)])
    }

    fn dropout_bwd(
        &self,
        dy: &Self::Tensor,
        dx: &mut Self::Tensor,
        n: usize,
        p_drop: f32,
        key: u64,
        first: u64,
        accumulate: bool,
    ) -> Result<()> {
        self.bind()?;
        act("dropout_bwd", "dy", dy, n)?;
        act("dropout_bwd", "dx", dx, n)?;
        let keep = (1.0 / (1.0 - p_drop as f64)) as f32;
        self.launch_ew(
            Kernel::DropoutBwd,
            n,
            &[p(dy), p(dx), i64a(n), Arg::F32(p_drop), Arg::F32(keep), Arg::U64(key), Arg::U64(first), Arg::I32(accumulate as i32)],
        )
    }

    fn embedding_fwd(&self, ids: &Self::Ids, table: &Self::Tensor, n: usize, d: usize, out: &mut Self::Tensor) -> Result<()> {
        self.bind()?;
        check_len("embedding_fwd", "ids", ids.len, n)?;
        check_dtype("embedding_fwd", "table", table, DType::Act)?;
        act("embedding_fwd", "out", out, n * d)?;
        let vocab = table.len / d.max(1);
        self.launch(Kernel::EmbeddingFwd, (n as u32, 1, 1), 256, 0, &[pi(ids), p(table), p(out), i32a(d), i32a(vocab)])
    }

    fn rmsnorm_fwd(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        norm: RmsNorm,
        n: usize,
        d: usize,
        out: &mut Self::Tensor,
        inv_rms: &mut Self::Tensor,
    ) -> Result<()> {
        self.bind()?;
        act("rmsnorm_fwd", "x", x, n * d)?;
        act("rmsnorm_fwd", "w", w, d)?;
        act("rmsnorm_fwd", "out", out, n * d)?;
        f32t("rmsnorm_fwd", "inv_rms", inv_rms, n)?;
        let threads = row_threads(d);
        self.launch(
            Kernel::RmsnormFwd,
            (n as u32, 1, 1),
            threads,
            0,
            &[p(x), p(w), Arg::F32(norm.weight_offset), p(out), p(inv_rms), i32a(d), Arg::F32(norm.eps)],
        )
    }

    fn rmsnorm_bwd(
        &self,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        norm: RmsNorm,
        inv_rms: &Self::Tensor,
        n: usize,
        d: usize,
        dx: &mut Self::Tensor,
        accumulate: bool,
    ) -> Result<()> {
        self.bind()?;
        act("rmsnorm_bwd", "dy", dy, n * d)?;
        act("rmsnorm_bwd", "x", x, n * d)?;
        act("rmsnorm_bwd", "w", w, d)?;
        f32t("rmsnorm_bwd", "inv_rms", inv_rms, n)?;
        act("rmsnorm_bwd", "dx", dx, n * d)?;
        let threads = row_threads(d);
        self.launch(
            Kernel::RmsnormBwd,
            (n as u32, 1, 1),
            threads,
            0,
            &[p(dy), p(x), p(w), Arg::F32(norm.weight_offset), p(inv_rms), p(dx), i32a(d), Arg::I32(accumulate as i32)],
        )
    }

    fn linear_fwd(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: Option<LoraFwd<'_, Self::Tensor>>,
        dims: LinearDims,
        y: &mut Self::Tensor,
    ) -> Result<()> {
        self.bind()?;
        let LinearDims { n, inp, out } = dims;
        if w.in_features != inp || w.out_features != out {
            return Err(Error::Shape {
                op: "linear_fwd",
                expected: format!("{out}x{inp}"),
                got: format!("{}x{}", w.out_features, w.in_features),
            });
        }
        act("linear_fwd", "x", x, n * inp)?;
        act("linear_fwd", "y", y, n * out)?;
        // The LoRA branch first: y = scale · (x_lora · Aᵀ) · Bᵀ only writes y, and the base GEMM
        // adds its product in its epilogue (beta = 1), where the branch's skinny GEMM would
        // otherwise read y back and write it again (memory-bound: it moves 2·n·out bf16 for
        // 2·n·out·r FLOPs).
        let mut beta = 0.0;
        if let Some(l) = lora {
            let r = l.rank;
            act("linear_fwd", "lora A", l.a, r * inp)?;
            act("linear_fwd", "lora B", l.b, out * r)?;
            act("linear_fwd", "lora x", l.x_lora, n * inp)?;
            act("linear_fwd", "lora xa", l.xa, n * r)?;
            self.gemm(GemmCall {
                m: n,
                n: r,
                k: inp,
                a: l.x_lora.ptr(),
                a_t: false,
                b: l.a.ptr(),
                b_t: true,
                c: l.xa.ptr(),
                c_f32: false,
                alpha: 1.0,
                beta: 0.0,
                bias: None,
            })?;
            self.gemm(GemmCall {
                m: n,
                n: out,
                k: r,
                a: l.xa.ptr(),
                a_t: false,
                b: l.b.ptr(),
                b_t: true,
                c: y.ptr(),
                c_f32: false,
                alpha: l.scale,
                beta: 0.0,
                bias: None,
            })?;
            beta = 1.0;
        }
        let wp = self.weight_ptr(w)?;
        self.gemm(GemmCall {
            m: n,
            n: out,
            k: inp,
            a: x.ptr(),
            a_t: false,
            b: wp,
            b_t: true,
            c: y.ptr(),
            c_f32: false,
            alpha: 1.0,
            beta,
            bias: w.bias.as_ref().map(DevBuf::ptr),
        })
    }

    fn linear_bwd(
        &self,
        dy: &Self::Tensor,
        w: &Self::Weight,
        lora: Option<LoraBwd<'_, Self::Tensor>>,
        dims: LinearDims,
        dx: &mut Self::Tensor,
        accumulate: bool,
        dx_lora: Option<&mut Self::Tensor>,
    ) -> Result<()> {
        self.bind()?;
        let LinearDims { n, inp, out } = dims;
        if w.in_features != inp || w.out_features != out {
            return Err(Error::Shape {
                op: "linear_bwd",
                expected: format!("{out}x{inp}"),
                got: format!("{}x{}", w.out_features, w.in_features),
            });
        }
        act("linear_bwd", "dy", dy, n * out)?;
        act("linear_bwd", "dx", dx, n * inp)?;
        // The LoRA branch first, as in the forward: where its input gradient goes to dx it writes
        // (or adds to what an earlier linear left there), and the base GEMM's epilogue adds
        // dy · W, instead of a skinny GEMM reading dx back after it.
        let mut beta = if accumulate { 1.0 } else { 0.0 };
        if let Some(l) = lora {
            let r = l.rank;
            let s = l.scale;
            act("linear_bwd", "lora A", l.a, r * inp)?;
            act("linear_bwd", "lora B", l.b, out * r)?;
            act("linear_bwd", "lora x", l.x_lora, n * inp)?;
            act("linear_bwd", "lora xa", l.xa, n * r)?;
            act("linear_bwd", "lora scratch", l.scratch, n * r)?;
            f32t("linear_bwd", "lora grad A", l.grad_a, r * inp)?;
            f32t("linear_bwd", "lora grad B", l.grad_b, out * r)?;
            // t = dy · B ([n, r])
            self.gemm(GemmCall {
                m: n,
                n: r,
                k: out,
                a: dy.ptr(),
                a_t: false,
                b: l.b.ptr(),
                b_t: false,
                c: l.scratch.ptr(),
                c_f32: false,
                alpha: 1.0,
                beta: 0.0,
                bias: None,
            })?;
            // dB += s · dyᵀ · xa ; dA += s · tᵀ · x_lora (f32 accumulators)
            self.gemm(GemmCall {
                m: out,
                n: r,
                k: n,
                a: dy.ptr(),
                a_t: true,
                b: l.xa.ptr(),
                b_t: false,
                c: l.grad_b.ptr(),
                c_f32: true,
                alpha: s,
                beta: 1.0,
                bias: None,
            })?;
            self.gemm(GemmCall {
                m: r,
                n: inp,
                k: n,
                a: l.scratch.ptr(),
                a_t: true,
                b: l.x_lora.ptr(),
                b_t: false,
                c: l.grad_a.ptr(),
                c_f32: true,
                alpha: s,
                beta: 1.0,
                bias: None,
            })?;
            // The branch's input gradient: s · t · A, into dx_lora (overwrite) or into dx.
            let (c, branch_beta) = match dx_lora {
                Some(d) => {
                    act("linear_bwd", "dx_lora", d, n * inp)?;
                    (d.ptr(), 0.0)
                }
                None => (dx.ptr(), std::mem::replace(&mut beta, 1.0)),
            };
            self.gemm(GemmCall {
                m: n,
                n: inp,
                k: r,
                a: l.scratch.ptr(),
                a_t: false,
                b: l.a.ptr(),
                b_t: false,
                c,
                c_f32: false,
                alpha: s,
                beta: branch_beta,
                bias: None,
            })?;
        }
        // dx (+)= dy · W
        let wp = self.weight_ptr(w)?;
        self.gemm(GemmCall {
            m: n,
            n: inp,
            k: out,
            a: dy.ptr(),
            a_t: false,
            b: wp,
            b_t: false,
            c: dx.ptr(),
            c_f32: false,
            alpha: 1.0,
            beta,
            bias: None,
        })
    }

    fn rope(
        &self,
        x: &mut Self::Tensor,
        n: usize,
        heads: usize,
        head_dim: usize,
        positions: &Self::Ids,
        table: &Self::Tensor,
        inverse: bool,
    ) -> Result<()> {
        self.bind()?;
        act("rope", "x", x, n * heads * head_dim)?;
        check_len("rope", "positions", positions.len, n)?;
        check_dtype("rope", "table", table, DType::F32)?;
        let half = head_dim / 2;
        let max_pos = table.len / (2 * half).max(1);
        let per_head = if half.is_multiple_of(8) { half / 8 } else { half };
        let threads = n * heads * per_head;
        self.launch(
            Kernel::Rope,
            (threads.div_ceil(256) as u32, 1, 1),
            256,
            0,
            &[
                p(x),
                pi(positions),
                p(table),
                i64a(n),
                i32a(heads),
                i32a(head_dim),
                i32a(max_pos),
                Arg::F32(if inverse { -1.0 } else { 1.0 }),
            ],
        )
    }

    fn attention_fwd(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        segments: &Self::Ids,
        shape: AttnShape,
        out: &mut Self::Tensor,
        lse: &mut Self::Tensor,
    ) -> Result<()> {
        self.bind()?;
        let AttnShape { batch, seq, heads, kv_heads, head_dim, .. } = shape;
        let fwd = self.attention_for("attention_fwd", shape)?.fwd;
        let n = batch * seq;
        act("attention_fwd", "q", q, n * heads * head_dim)?;
        act("attention_fwd", "k", k, n * kv_heads * head_dim)?;
        act("attention_fwd", "v", v, n * kv_heads * head_dim)?;
        act("attention_fwd", "out", out, n * heads * head_dim)?;
        f32t("attention_fwd", "lse", lse, n * heads)?;
        check_len("attention_fwd", "segments", segments.len, n)?;
        if let Some((plan, _)) = self.cudnn_plans(shape).filter(|_| aligned16(&[q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.ptr()])) {
            let sdpa = self.cudnn.as_ref().expect("cuDNN plans come from an open handle");
            let key = Self::cudnn_key(shape, false, batch, kv_heads);
            let workspace = self.attn_scratch.borrow().as_ref().map_or(0, |b| b.ptr());
            let ptrs = cudnn::Pointers {
                q: q.ptr(),
                k: k.ptr(),
                v: v.ptr(),
                o: out.ptr(),
                stats: lse.ptr(),
                d_o: 0,
                dq: 0,
                dk: 0,
                dv: 0,
                workspace,
            };
            return self.profiler.around(
                &self.shared.ctx,
                &self.compute,
                || "cudnn_sdpa_fwd".to_string(),
                || {
                    sdpa.execute(&key, &plan, &ptrs, shape.scale() as f32)
                        .map_err(|msg| Error::Cuda { op: "attention_fwd (cuDNN)".into(), msg })
                },
            );
        }
        // A window no shorter than the sequence masks nothing: 0 tells the kernel there is none.
        let (scale, window) = (shape.scale() as f32, shape.effective_window().unwrap_or(0));
        let args = [p(q), p(k), p(v), pi(segments), p(out), p(lse), i32a(seq), i32a(heads), i32a(kv_heads), Arg::F32(scale), i32a(window)];
        self.launch(fwd.kernel, (heads as u32, seq.div_ceil(fwd.rows()) as u32, batch as u32), fwd.threads(), fwd.smem_bytes(), &args)
    }

    fn attention_bwd(
        &self,
        dout: &Self::Tensor,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        out: &Self::Tensor,
        lse: &Self::Tensor,
        segments: &Self::Ids,
        shape: AttnShape,
        dq: &mut Self::Tensor,
        dk: &mut Self::Tensor,
        dv: &mut Self::Tensor,
    ) -> Result<()> {
        self.bind()?;
        let AttnShape { batch, seq, heads, kv_heads, head_dim, .. } = shape;
        let kern = self.attention_for("attention_bwd", shape)?;
        let n = batch * seq;
        let (qn, kn) = (n * heads * head_dim, n * kv_heads * head_dim);
        act("attention_bwd", "dout", dout, qn)?;
        act("attention_bwd", "q", q, qn)?;
        act("attention_bwd", "k", k, kn)?;
        act("attention_bwd", "v", v, kn)?;
        act("attention_bwd", "out", out, qn)?;
        f32t("attention_bwd", "lse", lse, n * heads)?;
        act("attention_bwd", "dq", dq, qn)?;
        act("attention_bwd", "dk", dk, kn)?;
        act("attention_bwd", "dv", dv, kn)?;
        check_len("attention_bwd", "segments", segments.len, n)?;
        if n == 0 {
            return Ok(());
        }
        if let Some((_, split)) =
            self.cudnn_plans(shape).filter(|&(_, split)| self.cudnn_launches_aligned(split, [dout, q, k, v, out, lse], [dq, dk, dv], shape))
        {
            return self.cudnn_attention_bwd(split, [dout, q, k, v, out, lse], shape, dq, dk, dv);
        }
        let scratch = self.attn_scratch.borrow();
        let scratch = scratch.as_ref().ok_or_else(|| Error::Cuda {
            op: "attention_bwd".into(),
            msg: "no attention scratch: reserve_attention must size it for the largest shape first".into(),
        })?;
        let limit = self.attn_scratch_limit.get().unwrap_or(usize::MAX).min(scratch.bytes());
        let split = attention_bwd_split(shape, limit).ok_or_else(|| Error::Cuda {
            op: "attention_bwd".into(),
            msg: format!(
                "one sequence of {seq} tokens needs {} of attention scratch, {} was reserved: reserve_attention was given a smaller shape",
                crate::util::fmt_bytes(attention_unit_bytes(shape) as u64),
                crate::util::fmt_bytes(limit as u64)
            ),
        })?;
        self.attention_bwd_launches(kern, split, scratch, [dout, q, k, v, out, lse], segments, shape, dq, dk, dv)
    }

    fn reserve_attention(&self, max: AttnShape) -> Result<()> {
        self.bind()?;
        let want = attention_scratch_bytes(max);
        let mut slot = self.attn_scratch.borrow_mut();
        if slot.as_ref().is_none_or(|b| b.bytes() < want) {
            *slot = None;
            *slot = Some(DevBuf::new(&self.shared, want)?);
        }
        Ok(())
    }

    fn swiglu_fwd(&self, g: &Self::Tensor, u: &Self::Tensor, n: usize, out: &mut Self::Tensor) -> Result<()> {
        self.bind()?;
        act("swiglu_fwd", "g", g, n)?;
        act("swiglu_fwd", "u", u, n)?;
        act("swiglu_fwd", "out", out, n)?;
        self.launch_ew(Kernel::SwigluFwd, n, &[p(g), p(u), p(out), i64a(n)])
    }

    fn swiglu_bwd(
        &self,
        dout: &Self::Tensor,
        g: &Self::Tensor,
        u: &Self::Tensor,
        n: usize,
        dg: &mut Self::Tensor,
        du: &mut Self::Tensor,
    ) -> Result<()> {
        self.bind()?;
        act("swiglu_bwd", "dout", dout, n)?;
        act("swiglu_bwd", "g", g, n)?;
        act("swiglu_bwd", "u", u, n)?;
        act("swiglu_bwd", "dg", dg, n)?;
        act("swiglu_bwd", "du", du, n)?;
        self.launch_ew(Kernel::SwigluBwd, n, &[p(dout), p(g), p(u), p(dg), p(du), i64a(n)])
    }

    fn geglu_fwd(&self, g: &Self::Tensor, u: &Self::Tensor, n: usize, out: &mut Self::Tensor) -> Result<()> {
        self.bind()?;
        act("geglu_fwd", "g", g, n)?;
        act("geglu_fwd", "u", u, n)?;
        act("geglu_fwd", "out", out, n)?;
        self.launch_ew(Kernel::GegluFwd, n, &[p(g), p(u), p(out), i64a(n)])
    }

    fn geglu_bwd(
        &self,
        dout: &Self::Tensor,
        g: &Self::Tensor,
        u: &Self::Tensor,
        n: usize,
        dg: &mut Self::Tensor,
        du: &mut Self::Tensor,
    ) -> Result<()> {
        self.bind()?;
        act("geglu_bwd", "dout", dout, n)?;
        act("geglu_bwd", "g", g, n)?;
        act("geglu_bwd", "u", u, n)?;
        act("geglu_bwd", "dg", dg, n)?;
        act("geglu_bwd", "du", du, n)?;
        self.launch_ew(Kernel::GegluBwd, n, &[p(dout), p(g), p(u), p(dg), p(du), i64a(n)])
    }

    fn scale(&self, x: &mut Self::Tensor, n: usize, alpha: f32) -> Result<()> {
        self.bind()?;
        check_len("scale", "x", x.len, n)?;
        let (k, alpha) = match x.dtype {
            DType::Act => (Kernel::ScaleBf16, bf16::from_f32(alpha).to_f32()),
            DType::F32 => (Kernel::ScaleF32, alpha),
        };
        self.launch_ew(k, n, &[p(x), i64a(n), Arg::F32(alpha)])
    }

    fn embedding_bwd_rows(
        &self,
        dx: &Self::Tensor,
        ids: &Self::Ids,
        n: usize,
        d: usize,
        slot_of_token: &Self::Ids,
        grad_rows: &mut Self::Tensor,
    ) -> Result<()> {
        self.bind()?;
        act("embedding_bwd_rows", "dx", dx, n * d)?;
        check_len("embedding_bwd_rows", "ids", ids.len, n)?;
        check_dtype("embedding_bwd_rows", "grad_rows", grad_rows, DType::F32)?;
        let k = grad_rows.len / d.max(1);
        self.launch(
            Kernel::EmbeddingBwdRows,
            (k as u32, d.div_ceil(256) as u32, 1),
            256,
            0,
            &[p(dx), pi(ids), i64a(n), i32a(d), pi(slot_of_token), i32a(slot_of_token.len), p(grad_rows)],
        )
    }

    fn set_rows(&self, table: &mut Self::Tensor, d: usize, token_ids: &Self::Ids, values: &Self::Tensor, k: usize) -> Result<()> {
        self.bind()?;
        check_len("set_rows", "token_ids", token_ids.len, k)?;
        check_len("set_rows", "values", values.len, k * d)?;
        let kern = match (table.dtype, values.dtype) {
            (DType::Act, DType::F32) => Kernel::SetRowsBf16F32,
            (DType::Act, DType::Act) => Kernel::SetRowsBf16Bf16,
            (DType::F32, DType::F32) => Kernel::SetRowsF32F32,
            (DType::F32, DType::Act) => Kernel::SetRowsF32Bf16,
        };
        let rows = table.len / d.max(1);
        self.launch(kern, (k as u32, 1, 1), 256, 0, &[p(table), i32a(d), pi(token_ids), p(values), i32a(rows)])
    }

    fn lm_head_ce(
        &self,
        h: &Self::Tensor,
        head: &Self::Tensor,
        targets: &Self::Ids,
        n: usize,
        d: usize,
        vocab: usize,
        grad_scale: f32,
        dh: &mut Self::Tensor,
        head_rows: Option<(&Self::Ids, &mut Self::Tensor)>,
    ) -> Result<LossSum> {
        self.bind()?;
        act("lm_head_ce", "h", h, n * d)?;
        act("lm_head_ce", "head", head, vocab * d)?;
        act("lm_head_ce", "dh", dh, n * d)?;
        check_len("lm_head_ce", "targets", targets.len, n)?;
        if let Some((ids, grad)) = &head_rows {
            f32t("lm_head_ce", "head row gradient", grad, ids.len * d)?;
        }
        let chunk = (LOSS_CHUNK_ELEMS / vocab.max(1)).min(LOSS_CHUNK_MAX_ROWS);
        // Whole multiples of 64 rows keep the chunk GEMMs on full tiles.
        let chunk = if chunk >= 128 { chunk / 64 * 64 } else { chunk.max(1) };
        if chunk * vocab > LOSS_CHUNK_ELEMS {
            return Err(Error::op(
                "lm_head_ce",
                format!(
                    "a vocabulary of {vocab} tokens is too large for the loss workspace ({LOSS_CHUNK_ELEMS} logits): such a model cannot be trained on CUDA yet"
                ),
            ));
        }
        let ws = &self.loss;
        // SAFETY: 8-byte accumulators owned by the backend.
        unsafe {
            drv::memset_d8_async(ws.sum.ptr(), 0, 8, self.stream()).map_err(cuda_err("memset"))?;
            drv::memset_d8_async(ws.count.ptr(), 0, 8, self.stream()).map_err(cuda_err("memset"))?;
        }
        let need_dh = grad_scale != 0.0;
        let write_f32 = head_rows.is_some();
        let mut r0 = 0;
        while r0 < n {
            let rows = chunk.min(n - r0);
            // logits[rows, vocab] (f32) = h[r0.., d] · headᵀ
            self.gemm(GemmCall {
                m: rows,
                n: vocab,
                k: d,
                a: h.at(r0 * d),
                a_t: false,
                b: head.ptr(),
                b_t: true,
                c: ws.logits.ptr(),
                c_f32: true,
                alpha: 1.0,
                beta: 0.0,
                bias: None,
            })?;
            self.launch(
                Kernel::CeSoftmaxGrad,
                (rows as u32, 1, 1),
                512,
                0,
                &[
                    Arg::Ptr(ws.logits.ptr()),
                    Arg::Ptr(targets.buf.ptr() + (r0 * 4) as u64),
                    i32a(vocab),
                    Arg::F32(grad_scale),
                    Arg::Ptr(ws.dlogits.ptr()),
                    Arg::Ptr(ws.row_loss.ptr()),
                    Arg::Ptr(ws.row_valid.ptr()),
                    Arg::I32(write_f32 as i32),
                ],
            )?;
            self.launch(
                Kernel::CeChunkSum,
                (1, 1, 1),
                256,
                0,
                &[Arg::Ptr(ws.row_loss.ptr()), Arg::Ptr(ws.row_valid.ptr()), i32a(rows), Arg::Ptr(ws.sum.ptr()), Arg::Ptr(ws.count.ptr())],
            )?;
            if let Some((ids, grad)) = &head_rows {
                self.launch(
                    Kernel::CeHeadRows,
                    (ids.len as u32, d.div_ceil(256) as u32, 1),
                    256,
                    0,
                    &[Arg::Ptr(ws.logits.ptr()), Arg::Ptr(h.at(r0 * d)), pi(ids), i32a(rows), i32a(vocab), i32a(d), p(grad)],
                )?;
            }
            if need_dh {
                // dh[r0.., d] = dlogits[rows, vocab] · head
                self.gemm(GemmCall {
                    m: rows,
                    n: d,
                    k: vocab,
                    a: ws.dlogits.ptr(),
                    a_t: false,
                    b: head.ptr(),
                    b_t: false,
                    c: dh.at(r0 * d),
                    c_f32: false,
                    alpha: 1.0,
                    beta: 0.0,
                    bias: None,
                })?;
            }
            r0 += rows;
        }
        if !need_dh {
            // SAFETY: dh holds n·d bf16 (checked above).
            unsafe { drv::memset_d8_async(dh.ptr(), 0, n * d * 2, self.stream()) }.map_err(cuda_err("memset"))?;
        }
        let mut sum = [0f64];
        let mut count = [0i64];
        self.compute.synchronize().map_err(cuda_err("synchronize"))?;
        // SAFETY: 8-byte device scalars; the stream has drained.
        unsafe {
            drv::memcpy_dtoh_sync(&mut sum, ws.sum.ptr()).map_err(cuda_err("copy loss to host"))?;
            drv::memcpy_dtoh_sync(&mut count, ws.count.ptr()).map_err(cuda_err("copy loss to host"))?;
        }
        Ok(LossSum { sum: sum[0], count: count[0] as usize })
    }

    fn sum_squares(&self, tensors: &[(&Self::Tensor, usize)]) -> Result<f64> {
        self.bind()?;
        for &(t, n) in tensors {
            check_len("sum_squares", "tensor", t.len, n)?;
        }
        // Each tensor is cut into pieces of at most SUMSQ_MAX_BLOCKS chunks; a launch takes
        // pieces while its list and its partial sums have room and writes one result. All of it
        // depends on the sizes alone, so the same tensors give the same bits.
        let mut total = 0.0f64;
        let mut results = 0usize;
        let mut list =
            SumsqList { ptr: [0; SUMSQ_LIST], n: [0; SUMSQ_LIST], first_block: [0; SUMSQ_LIST + 1], is_bf16: [0; SUMSQ_LIST], count: 0 };
        let piece = SUMSQ_MAX_BLOCKS * SUMSQ_CHUNK;
        let pieces = tensors.iter().flat_map(|&(t, n)| (0..n).step_by(piece).map(move |start| (t, start, piece.min(n - start))));
        let mut pieces = pieces.peekable();
        while pieces.peek().is_some() {
            let mut count = 0;
            let mut blocks = 0usize;
            while let Some(&(t, start, len)) = pieces.peek() {
                let need = len.div_ceil(SUMSQ_CHUNK);
                if count == SUMSQ_LIST || blocks + need > SUMSQ_MAX_BLOCKS {
                    break;
                }
                list.ptr[count] = t.at(start);
                list.n[count] = len as i64;
                list.first_block[count] = blocks as i32;
                list.is_bf16[count] = (t.dtype == DType::Act) as i32;
                count += 1;
                blocks += need;
                pieces.next();
            }
            list.first_block[count] = blocks as i32;
            list.count = count as i32;
            self.launch(
                Kernel::SumsqPartialMulti,
                (blocks as u32, 1, 1),
                256,
                0,
                &[Arg::Struct(&list as *const SumsqList as *const c_void), Arg::Ptr(self.sumsq_partial.ptr())],
            )?;
            self.launch(
                Kernel::SumPartials,
                (1, 1, 1),
                256,
                0,
                &[Arg::Ptr(self.sumsq_partial.ptr()), i32a(blocks), Arg::Ptr(self.sumsq_out.ptr() + 8 * results as u64)],
            )?;
            results += 1;
            if results == SUMSQ_MAX_LAUNCHES || pieces.peek().is_none() {
                total += self.read_sumsq_results(results)?;
                results = 0;
            }
        }
        Ok(total)
    }

    fn adamw(&self, tensors: &mut [AdamwTensor<'_, Self::Tensor>], hp: AdamW) -> Result<()> {
        self.bind()?;
        for x in tensors.iter() {
            for (what, t) in [("param", &*x.param), ("grad", x.grad), ("m", &*x.m), ("v", &*x.v)] {
                f32t("adamw", what, t, x.n)?;
            }
            if let Some(c) = x.compute.as_deref() {
                act("adamw", "compute copy", c, x.n)?;
            }
        }
        // Scalars in f32 exactly as the CPU backend (T = f32) computes them.
        let t = hp.step as i32;
        let bc1 = 1.0f32 - hp.beta1.powi(t);
        let bc2_sqrt = (1.0f32 - hp.beta2.powi(t)).sqrt();
        let step_size = hp.lr / bc1;
        let decay = 1.0f32 - hp.lr * hp.weight_decay;
        for group in tensors.chunks(ADAMW_LIST) {
            let mut list = AdamwList {
                param: [0; ADAMW_LIST],
                grad: [0; ADAMW_LIST],
                m: [0; ADAMW_LIST],
                v: [0; ADAMW_LIST],
                compute: [0; ADAMW_LIST],
                n: [0; ADAMW_LIST],
                first_block: [0; ADAMW_LIST + 1],
                count: group.len() as i32,
            };
            let mut blocks = 0usize;
            for (i, x) in group.iter().enumerate() {
                list.param[i] = x.param.ptr();
                list.grad[i] = x.grad.ptr();
                list.m[i] = x.m.ptr();
                list.v[i] = x.v.ptr();
                list.compute[i] = x.compute.as_deref().map_or(0, CudaTensor::ptr);
                list.n[i] = x.n as i64;
                list.first_block[i] = blocks as i32;
                blocks += x.n.div_ceil(ADAMW_CHUNK);
            }
            list.first_block[group.len()] = blocks as i32;
            self.launch(
                Kernel::AdamwMulti,
                (blocks as u32, 1, 1),
                256,
                0,
                &[
                    Arg::Struct(&list as *const AdamwList as *const c_void),
                    Arg::F32(decay),
                    Arg::F32(hp.beta1),
                    Arg::F32(hp.beta2),
                    Arg::F32(hp.eps),
                    Arg::F32(hp.grad_scale),
                    Arg::F32(step_size),
                    Arg::F32(bc2_sqrt),
                ],
            )?;
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.compute.synchronize().map_err(cuda_err("synchronize"))
    }

    // ---- generation --------------------------------------------------------------------------
    fn linear_rows(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: Option<LoraRows<'_, Self::Tensor>>,
        dims: LinearDims,
        y: &mut Self::Tensor,
    ) -> Result<()> {
        self.bind()?;
        let LinearDims { n, inp, out } = dims;
        if w.in_features != inp || w.out_features != out {
            return Err(Error::Shape {
                op: "linear_rows",
                expected: format!("{out}x{inp}"),
                got: format!("{}x{}", w.out_features, w.in_features),
            });
        }
        act("linear_rows", "x", x, n * inp)?;
        act("linear_rows", "y", y, n * out)?;
        if let Some(l) = &lora {
            act("linear_rows", "lora A", l.a, l.rank * inp)?;
            act("linear_rows", "lora B", l.b, out * l.rank)?;
            act("linear_rows", "lora xa", l.xa, n * l.rank)?;
            f32t("linear_rows", "lora row_scale", l.row_scale, n)?;
        }
        // Few rows (decode): xa = x · Aᵀ, then one GEMV reading the weight once with the bias and
        // the switched LoRA term fused in.
        if n <= GEMV_MAX_ROWS {
            let fits = match &lora {
                Some(l) => self.gemv(x, n, GemvWeight::Dense { ptr: l.a.ptr(), bias: 0 }, l.rank, inp, None, l.xa.ptr(), false)?,
                None => true,
            };
            if fits {
                let up = lora.as_ref().map(|l| (l.b, &*l.xa, l.row_scale, l.rank));
                if self.gemv(x, n, GemvWeight::of(w), out, inp, up, y.ptr(), false)? {
                    return Ok(());
                }
            }
        }
        // Many rows (prefill): training's path, with the LoRA input rows scaled by their switch.
        self.linear_fwd(x, w, None, dims, y)?;
        let Some(l) = lora else { return Ok(()) };
        let r = l.rank;
        self.gemm(GemmCall {
            m: n,
            n: r,
            k: inp,
            a: x.ptr(),
            a_t: false,
            b: l.a.ptr(),
            b_t: true,
            c: l.xa.ptr(),
            c_f32: false,
            alpha: 1.0,
            beta: 0.0,
            bias: None,
        })?;
        self.launch(Kernel::ScaleRowsBf16, ((n * r).div_ceil(256) as u32, 1, 1), 256, 0, &[p(l.xa), p(l.row_scale), i64a(n), i32a(r)])?;
        self.gemm(GemmCall {
            m: n,
            n: out,
            k: r,
            a: l.xa.ptr(),
            a_t: false,
            b: l.b.ptr(),
            b_t: true,
            c: y.ptr(),
            c_f32: false,
            alpha: 1.0,
            beta: 1.0,
            bias: None,
        })
    }

    fn kv_store(
        &self,
        src: &Self::Tensor,
        n: usize,
        kv: KvShape,
        slots: &Self::Ids,
        positions: &Self::Ids,
        cache: &mut Self::Tensor,
    ) -> Result<()> {
        self.bind()?;
        let w = kv.kv_width();
        act("kv_store", "src", src, n * w)?;
        check_dtype("kv_store", "cache", cache, DType::Act)?;
        check_len("kv_store", "slots", slots.len, n)?;
        check_len("kv_store", "positions", positions.len, n)?;
        if !w.is_multiple_of(8) {
            return Err(Error::Shape { op: "kv_store", expected: "kv_heads × head_dim a multiple of 8".into(), got: w.to_string() });
        }
        let slot_count = cache.len / (w * kv.capacity).max(1);
        let threads = n * w / 8;
        self.launch(
            Kernel::KvStore,
            (threads.div_ceil(256) as u32, 1, 1),
            256,
            0,
            &[p(src), i64a(n), i32a(w), pi(slots), pi(positions), i32a(kv.capacity), i32a(slot_count), p(cache)],
        )
    }

    fn attention_cached(
        &self,
        q: &Self::Tensor,
        k_cache: &Self::Tensor,
        v_cache: &Self::Tensor,
        slots: &Self::Ids,
        positions: &Self::Ids,
        n: usize,
        kv: KvShape,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        self.bind()?;
        let KvShape { heads, kv_heads, head_dim: hd, capacity, scale, window } = kv;
        if kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
            || !hd.is_multiple_of(8)
            || hd > 256
            || heads / kv_heads * hd > ATTC_MAX_GROUP_DIM
        {
            return Err(Error::Shape {
                op: "attention_cached",
                expected: format!(
                    "heads a multiple of kv_heads, head_dim a multiple of 8 up to 256, (heads / kv_heads) × head_dim ≤ {ATTC_MAX_GROUP_DIM}"
                ),
                got: format!("{heads} heads, {kv_heads} kv heads, head_dim {hd}"),
            });
        }
        act("attention_cached", "q", q, n * heads * hd)?;
        act("attention_cached", "out", out, n * heads * hd)?;
        check_dtype("attention_cached", "k_cache", k_cache, DType::Act)?;
        check_dtype("attention_cached", "v_cache", v_cache, DType::Act)?;
        check_len("attention_cached", "slots", slots.len, n)?;
        check_len("attention_cached", "positions", positions.len, n)?;
        if n == 0 {
            return Ok(());
        }
        let slot_count = k_cache.len / (kv.kv_width() * capacity).max(1);
        // Key splits: enough blocks for two per multiprocessor, at least one tile of keys each,
        // within the scratch. The kernels read each row's length from `positions`, so the split
        // is sized for the longest a row can be (the window, else the capacity).
        let longest = window.map_or(capacity, |w| w.min(capacity));
        let blocks = n * kv_heads;
        let want = (2 * self.card.sm_count as usize).div_ceil(blocks).clamp(1, longest.div_ceil(ATTC_THREADS));
        let fit = GEN_ATTN_SCRATCH_BYTES / (n * heads * (hd + 2) * 4).max(1);
        let splits = want.min(fit).max(1);
        let split_len = longest.div_ceil(splits);
        let group = heads / kv_heads;
        let smem = ((group * hd + group * ATTC_THREADS + 3 * group) * 4) as u32;
        let part = if splits > 1 { self.gen_scratch_ptr()? } else { 0 };
        self.launch(
            Kernel::AttnCachedPart,
            (kv_heads as u32, n as u32, splits as u32),
            ATTC_THREADS as u32,
            smem,
            &[
                p(q),
                p(k_cache),
                p(v_cache),
                pi(slots),
                pi(positions),
                i32a(heads),
                i32a(kv_heads),
                i32a(hd),
                i32a(capacity),
                i32a(slot_count),
                Arg::F32(scale),
                i32a(window.unwrap_or(0)),
                i32a(split_len),
                Arg::Ptr(part),
                p(out),
            ],
        )?;
        if splits > 1 {
            self.launch(
                Kernel::AttnCachedCombine,
                (heads as u32, n as u32, 1),
                hd.next_multiple_of(32) as u32,
                0,
                &[Arg::Ptr(part), i32a(heads), i32a(hd), i32a(splits), p(out)],
            )?;
        }
        Ok(())
    }

    fn logits(&self, h: &Self::Tensor, head: &Self::Tensor, n: usize, d: usize, vocab: usize, out: &mut Self::Tensor) -> Result<()> {
        self.bind()?;
        act("logits", "h", h, n * d)?;
        act("logits", "head", head, vocab * d)?;
        f32t("logits", "out", out, n * vocab)?;
        if n <= GEMV_MAX_ROWS && self.gemv(h, n, GemvWeight::Dense { ptr: head.ptr(), bias: 0 }, vocab, d, None, out.ptr(), true)? {
            return Ok(());
        }
        self.gemm(GemmCall {
            m: n,
            n: vocab,
            k: d,
            a: h.ptr(),
            a_t: false,
            b: head.ptr(),
            b_t: true,
            c: out.ptr(),
            c_f32: true,
            alpha: 1.0,
            beta: 0.0,
            bias: None,
        })
    }
}

/// Threads per row for the row kernels: enough for one 8-wide chunk each, 32 to 1024.
fn row_threads(d: usize) -> u32 {
    (d.div_ceil(8).div_ceil(32) * 32).clamp(32, 1024) as u32
}

#[cfg(test)]
mod tests {
    use super::kernels::{FILES, Kernel};
    use super::{AdamwList, SumsqList};

    /// The byte size of a kernel's first parameter as a PTX declares it (`.b8 NAME_param_0[N]`).
    fn first_param_bytes(ptx: &str, k: Kernel) -> usize {
        let decl = format!("{}_param_0[", k.symbol());
        let at = ptx.find(&decl).unwrap_or_else(|| panic!("{} takes no struct first", k.symbol())) + decl.len();
        ptx[at..].split(']').next().and_then(|n| n.parse().ok()).expect("a byte count")
    }

    /// The lists the multi-tensor kernels take by value are the structs the host fills, byte for
    /// byte in both PTX builds: a field added on one side only would shift every later one.
    #[test]
    fn multi_tensor_lists_match_the_kernels_parameters() {
        for (k, host) in [(Kernel::AdamwMulti, size_of::<AdamwList>()), (Kernel::SumsqPartialMulti, size_of::<SumsqList>())] {
            for ptx in [FILES[k.file()].sm90, FILES[k.file()].sm80] {
                assert_eq!(first_param_bytes(ptx, k), host, "{}", k.symbol());
            }
        }
    }
}
