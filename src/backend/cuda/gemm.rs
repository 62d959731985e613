//! Row-major GEMM on cuBLASLt (bf16 operands, f32 accumulation, bf16 or f32 output, optional bias
//! epilogue), with the same conventions as the CPU backend's `matmul`:
//! `C[m, n] = alpha · op(A) · op(B) + beta · C (+ bias[n])`, `A` `[m, k]` (`[k, m]` when `a_t`),
//! `B` `[k, n]` (`[n, k]` when `b_t`).
//!
//! cuBLASLt is column-major, so the row-major product is computed as its transpose:
//! `Cᵀ[n, m] = op(B)ᵀ · op(A)ᵀ`, i.e. cuBLASLt's A is our B and its B is our A, with no data
//! movement. Descriptors, layouts and the chosen algorithm are cached per shape; the heuristic
//! runs once per shape, at the first step. A shape cuBLASLt declines goes to `gemm_fallback`.

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::result::CublasError;
use cudarc::cublaslt::sys as lt;

use crate::error::{Error, Result};

/// One product to run. Pointers are raw device addresses.
#[derive(Debug, Clone, Copy)]
pub struct GemmCall {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub a_t: bool,
    pub b: u64,
    pub b_t: bool,
    pub c: u64,
    /// `C` is f32 (else bf16).
    pub c_f32: bool,
    pub alpha: f32,
    pub beta: f32,
    /// bf16 `[n]`, added to every row (cuBLASLt's bias epilogue).
    pub bias: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    a_t: bool,
    b_t: bool,
    c_f32: bool,
    bias: bool,
    align: u32,
}

/// Cached cuBLASLt objects for one shape (`None`: cuBLASLt has no algorithm, use the fallback).
struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    layouts: [lt::cublasLtMatrixLayout_t; 3],
    algo: lt::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created in `Gemm::plan`, destroyed once here.
        unsafe {
            let _ = lt::cublasLtMatmulDescDestroy(self.desc);
            for l in self.layouts {
                let _ = lt::cublasLtMatrixLayoutDestroy(l);
            }
        }
    }
}

pub struct Gemm {
    handle: lt::cublasLtHandle_t,
    workspace: u64,
    workspace_bytes: usize,
    plans: HashMap<Key, Option<Plan>>,
}

// SAFETY: the handle and descriptors are only used through `&mut Gemm` on the thread that has the
// backend's context bound; cuBLASLt handles are not tied to the creating thread.
unsafe impl Send for Gemm {}

fn lt_err(op: &str, e: CublasError) -> Error {
    Error::Cuda { op: op.into(), msg: format!("{e:?}") }
}

fn check(op: &str, s: lt::cublasStatus_t) -> Result<()> {
    s.result().map_err(|e| lt_err(op, e))
}

/// Largest power of two (up to 256) dividing the address: what the heuristic may assume.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 { 256 } else { 1u32 << ptr.trailing_zeros().min(8) }
}

impl Gemm {
    /// `workspace` is a device buffer of `workspace_bytes` owned by the backend.
    pub fn new(workspace: u64, workspace_bytes: usize) -> Result<Self> {
        let handle = cudarc::cublaslt::result::create_handle().map_err(|e| lt_err("cublasLtCreate", e))?;
        Ok(Gemm { handle, workspace, workspace_bytes, plans: HashMap::new() })
    }

    fn plan(&mut self, key: Key) -> Result<Option<&Plan>> {
        if !self.plans.contains_key(&key) {
            let plan = self.make_plan(key)?;
            self.plans.insert(key, plan);
        }
        Ok(self.plans.get(&key).and_then(Option::as_ref))
    }

    fn make_plan(&self, key: Key) -> Result<Option<Plan>> {
        let Key { m, n, k, a_t, b_t, c_f32, bias, align } = key;
        let bf16 = lt::cudaDataType_t::CUDA_R_16BF;
        let out = if c_f32 { lt::cudaDataType_t::CUDA_R_32F } else { bf16 };
        // cuBLASLt's A = our B, its B = our A (see the module doc).
        let (op_a, a_rows, a_cols) = if b_t { (1i32, k, n) } else { (0i32, n, k) };
        let (op_b, b_rows, b_cols) = if a_t { (1i32, m, k) } else { (0i32, k, m) };
        let desc =
            cudarc::cublaslt::result::create_matmul_desc(lt::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt::cudaDataType_t::CUDA_R_32F)
                .map_err(|e| lt_err("cublasLtMatmulDescCreate", e))?;
        let mut layouts = [std::ptr::null_mut(); 3];
        let make = |t, rows: usize, cols: usize| {
            cudarc::cublaslt::result::create_matrix_layout(t, rows as u64, cols as u64, rows as i64)
                .map_err(|e| lt_err("cublasLtMatrixLayoutCreate", e))
        };
        layouts[0] = make(bf16, a_rows, a_cols)?;
        layouts[1] = make(bf16, b_rows, b_cols)?;
        layouts[2] = make(out, n, m)?;
        let mut plan = Plan { desc, layouts, algo: lt::cublasLtMatmulAlgo_t { data: [0; 8] } };
        // SAFETY: the descriptor is live; every attribute buffer is a local of the right size.
        unsafe {
            use lt::cublasLtMatmulDescAttributes_t as A;
            let set = |attr, v: &i32| {
                check("cublasLtMatmulDescSetAttribute", lt::cublasLtMatmulDescSetAttribute(desc, attr, v as *const i32 as *const c_void, 4))
            };
            set(A::CUBLASLT_MATMUL_DESC_TRANSA, &op_a)?;
            set(A::CUBLASLT_MATMUL_DESC_TRANSB, &op_b)?;
            if bias {
                let epi = lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as i32;
                set(A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi)?;
            }
            let pref = cudarc::cublaslt::result::create_matmul_pref().map_err(|e| lt_err("cublasLtMatmulPreferenceCreate", e))?;
            use lt::cublasLtMatmulPreferenceAttributes_t as P;
            let ws = self.workspace_bytes as u64;
            let r = (|| -> Result<Option<lt::cublasLtMatmulHeuristicResult_t>> {
                check(
                    "cublasLtMatmulPreferenceSetAttribute",
                    lt::cublasLtMatmulPreferenceSetAttribute(
                        pref,
                        P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                        &ws as *const u64 as *const c_void,
                        8,
                    ),
                )?;
                for attr in [
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ] {
                    check(
                        "cublasLtMatmulPreferenceSetAttribute",
                        lt::cublasLtMatmulPreferenceSetAttribute(pref, attr, &align as *const u32 as *const c_void, 4),
                    )?;
                }
                let mut result = std::mem::MaybeUninit::<lt::cublasLtMatmulHeuristicResult_t>::zeroed();
                let mut count = 0i32;
                let s = lt::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    desc,
                    layouts[0],
                    layouts[1],
                    layouts[2],
                    layouts[2],
                    pref,
                    1,
                    result.as_mut_ptr(),
                    &mut count,
                );
                if s != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS || count == 0 {
                    return Ok(None);
                }
                let result = result.assume_init();
                if result.state != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS || result.workspaceSize > self.workspace_bytes {
                    return Ok(None);
                }
                Ok(Some(result))
            })();
            let _ = lt::cublasLtMatmulPreferenceDestroy(pref);
            match r? {
                Some(h) => plan.algo = h.algo,
                None => return Ok(None),
            }
        }
        Ok(Some(plan))
    }

    /// Run `call` on `stream` through cuBLASLt. Returns false when cuBLASLt has no algorithm for
    /// the shape (the caller then runs the fallback kernel).
    pub fn run(&mut self, call: &GemmCall, stream: cudarc::driver::sys::CUstream) -> Result<bool> {
        let align = [call.a, call.b, call.c, call.bias.unwrap_or(0)].into_iter().map(alignment).min().unwrap_or(256);
        let key =
            Key { m: call.m, n: call.n, k: call.k, a_t: call.a_t, b_t: call.b_t, c_f32: call.c_f32, bias: call.bias.is_some(), align };
        let (handle, workspace, workspace_bytes) = (self.handle, self.workspace, self.workspace_bytes);
        let Some(plan) = self.plan(key)? else { return Ok(false) };
        // SAFETY: the plan's objects are live; pointers are device addresses of buffers the caller
        // checked to hold the shapes; alpha/beta live across the (host-synchronous) enqueue.
        unsafe {
            if let Some(bias) = call.bias {
                check(
                    "cublasLtMatmulDescSetAttribute(bias)",
                    lt::cublasLtMatmulDescSetAttribute(
                        plan.desc,
                        lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        &bias as *const u64 as *const c_void,
                        8,
                    ),
                )?;
            }
            let (alpha, beta) = (call.alpha, call.beta);
            let status = lt::cublasLtMatmul(
                handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                call.b as *const c_void,
                plan.layouts[0],
                call.a as *const c_void,
                plan.layouts[1],
                &beta as *const f32 as *const c_void,
                call.c as *const c_void,
                plan.layouts[2],
                call.c as *mut c_void,
                plan.layouts[2],
                &plan.algo,
                workspace as *mut c_void,
                workspace_bytes,
                stream as lt::cudaStream_t,
            );
            if status == lt::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED {
                // The heuristic offered an algorithm the call then refused: remember the shape
                // as unsupported and let the caller use the fallback kernel.
                self.plans.insert(key, None);
                return Ok(false);
            }
            check("cublasLtMatmul", status)?;
        }
        Ok(true)
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            let _ = lt::cublasLtDestroy(self.handle);
        }
    }
}
