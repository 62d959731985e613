//! cuDNN's fused flash attention, called through cuDNN's backend API, on the cards where it
//! outruns our own kernels. On Hopper our mma.sync kernels reach about half of what cuDNN's
//! attention does (kernels/NOTES.md, "Against torch's attention on the same card"); there the
//! backend uses cuDNN when `libcudnn.so.9` can be loaded, for every shape cuDNN's engines accept.
//! Elsewhere, without the library, or for a shape it declines, attention runs on our kernels.
//!
//! cuDNN has no single "attention" call that takes our layout: its runtime-fusion engine
//! recognizes a graph of matmul, pointwise and reduction operations as flash attention. The graphs
//! below are the ones cudnn-frontend's SDPA node builds (traced through torch with
//! `scripts/gpu/cudnn_trace.py`): the forward keeps the softmax statistics (the natural-log
//! log-sum-exp of the scaled scores, what our kernels and the CPU reference save), the backward
//! reads them. The causal mask is a comparison of generated row and column indices, so only rows
//! that hold one sequence each (padding at most at the end, [`AttnShape::causal_rows`]) and no
//! sliding window can take this path.
//!
//! Q, K, V, O and their gradients stay in our token-major layout (`[tokens][heads·head_dim]`), the
//! statistics in ours (`[tokens][heads]`): cuDNN takes any strides. The backward's f32 dQ
//! accumulator and row sums (`dO·O`) are placed in our attention scratch, split over sequences
//! and kv heads exactly as our own backward splits (its accumulators take more per unit).
//!
//! `TUNESTUDIO_ATTENTION=own` keeps our kernels on every card (comparisons, and a way out).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, c_void};
use std::rc::Rc;

use cudarc::cudnn::sys as dnn;
use dnn::cudnnBackendAttributeName_t as A;
use dnn::cudnnBackendAttributeType_t as T;
use dnn::cudnnBackendDescriptorType_t as D;
use dnn::cudnnDataType_t as Dt;
use dnn::cudnnPointwiseMode_t as Pw;

use crate::backend::card::CardLimits;

/// The oldest cuDNN whose fused attention we call (9.0: the engines match this graph; from 9.6 the
/// backward initializes its dQ accumulator itself, before that we zero it).
const MIN_VERSION: usize = 9_00_00;
const SELF_ZEROING_DQ_VERSION: usize = 9_06_00;
/// From 9.10 the mask's value is −∞ (cudnn-frontend's choice); before, the lowest finite f32.
const INFINITE_MASK_VERSION: usize = 9_10_00;

/// Whether a card decides for cuDNN's attention: Hopper (compute capability 9.x), where our
/// kernels have no wgmma path. Ampere and Ada run our mma.sync kernels, which are of the class of
/// cuDNN's there. A card profile decides as its card would.
pub fn card_wants_cudnn(card: &CardLimits) -> bool {
    card.compute_capability.0 == 9 && std::env::var("TUNESTUDIO_ATTENTION").map_or(true, |v| v != "own")
}

/// Whether attention runs on cuDNN on `card` in this process: the card decides for it and the
/// library loads (checked once). The cost model and the memory plan ask this; the backend opens
/// the library itself.
pub fn runs_on(card: &CardLimits) -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    card_wants_cudnn(card) && *AVAILABLE.get_or_init(|| std::panic::catch_unwind(library_version).is_ok_and(|v| v.is_ok()))
}

/// The loaded library's version (e.g. 91900 for 9.19.0), or why it cannot be used.
pub fn library_version() -> Result<usize, String> {
    // SAFETY: only asks the dynamic loader whether libcudnn can be opened.
    if !unsafe { dnn::is_culib_present() } {
        return Err("libcudnn.so.9 is not on the library path".into());
    }
    // cudarc panics on a missing symbol (a cuDNN older than its bindings expect): keep that an answer.
    // SAFETY: a plain query without arguments.
    let v = std::panic::catch_unwind(|| unsafe { dnn::cudnnGetVersion() }).map_err(|_| "libcudnn lacks cudnnGetVersion".to_string())?;
    if v < MIN_VERSION {
        return Err(format!("cuDNN {} is older than 9.0", version_name(v)));
    }
    Ok(v)
}

pub fn version_name(v: usize) -> String {
    format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
}

fn check(status: dnn::cudnnStatus_t, what: &str) -> Result<(), String> {
    if status == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Ok(());
    }
    let mut buf = [0 as std::ffi::c_char; 512];
    // SAFETY: cuDNN writes at most `buf.len()` bytes, NUL-terminated.
    let msg = unsafe {
        dnn::cudnnGetLastErrorString(buf.as_mut_ptr(), buf.len());
        CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
    };
    Err(format!("{what}: {status:?}{}", if msg.is_empty() { String::new() } else { format!(" ({msg})") }))
}

/// One backend descriptor, destroyed with its owner.
struct Desc(dnn::cudnnBackendDescriptor_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnBackendCreateDescriptor and destroyed once.
        unsafe { dnn::cudnnBackendDestroyDescriptor(self.0) };
    }
}

impl Desc {
    fn new(kind: D) -> Result<Desc, String> {
        let mut d: dnn::cudnnBackendDescriptor_t = std::ptr::null_mut();
        // SAFETY: cuDNN writes the new descriptor into `d`.
        check(unsafe { dnn::cudnnBackendCreateDescriptor(kind, &mut d) }, &format!("create {kind:?}"))?;
        Ok(Desc(d))
    }

    fn set<V>(&self, name: A, ty: T, values: &[V]) -> Result<(), String> {
        // SAFETY: `values` holds `values.len()` elements of the C type `ty` names (each caller
        // passes the Rust type of that C type); cuDNN copies them.
        check(
            unsafe { dnn::cudnnBackendSetAttribute(self.0, name, ty, values.len() as i64, values.as_ptr() as *const c_void) },
            &format!("set {name:?}"),
        )
    }

    fn set_desc(&self, name: A, values: &[&Desc]) -> Result<(), String> {
        let raw: Vec<dnn::cudnnBackendDescriptor_t> = values.iter().map(|d| d.0).collect();
        self.set(name, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw)
    }

    /// Read up to `out.len()` elements of the C type `ty` names into `out`; the count cuDNN has.
    /// An empty `out` asks only for the count.
    fn get<V>(&self, name: A, ty: T, out: &mut [V]) -> Result<usize, String> {
        let mut count = 0i64;
        let ptr = if out.is_empty() { std::ptr::null_mut() } else { out.as_mut_ptr() as *mut c_void };
        // SAFETY: cuDNN writes at most `out.len()` elements of `ty` (each caller passes the Rust
        // type of that C type) and the count.
        check(unsafe { dnn::cudnnBackendGetAttribute(self.0, name, ty, out.len() as i64, &mut count, ptr) }, &format!("get {name:?}"))?;
        Ok(count.max(0) as usize)
    }

    fn finalize(self) -> Result<Desc, String> {
        // SAFETY: a live descriptor with its attributes set.
        check(unsafe { dnn::cudnnBackendFinalize(self.0) }, "finalize")?;
        Ok(self)
    }
}

/// Which tensor a graph input or output is, in the variant pack.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Uid {
    Q = 1,
    K,
    V,
    O,
    DO,
    Stats,
    DQ,
    DK,
    DV,
    Scale,
    NegInf,
    One,
    RowSum,
    DqAcc,
}

/// dims and strides of a 4-d tensor, outermost first.
type Layout = ([i64; 4], [i64; 4]);

/// A graph under construction: its tensors and operations, kept alive until the plan is built.
struct Graph {
    tensors: Vec<Rc<Desc>>,
    ops: Vec<Desc>,
    next_virtual: i64,
}

#[derive(Clone, Copy)]
enum Kind {
    /// In device memory, given in the variant pack.
    Real,
    /// Lives only inside the fused kernel.
    Virtual,
    /// A host scalar, given by pointer in the variant pack.
    ByValue,
}

impl Graph {
    fn new() -> Graph {
        Graph { tensors: Vec::new(), ops: Vec::new(), next_virtual: 1000 }
    }

    fn tensor(&mut self, uid: i64, dt: Dt, (dims, strides): Layout, kind: Kind) -> Result<Rc<Desc>, String> {
        let d = Desc::new(D::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
        d.set(A::CUDNN_ATTR_TENSOR_DATA_TYPE, T::CUDNN_TYPE_DATA_TYPE, &[dt])?;
        d.set(A::CUDNN_ATTR_TENSOR_DIMENSIONS, T::CUDNN_TYPE_INT64, &dims)?;
        d.set(A::CUDNN_ATTR_TENSOR_STRIDES, T::CUDNN_TYPE_INT64, &strides)?;
        d.set(A::CUDNN_ATTR_TENSOR_UNIQUE_ID, T::CUDNN_TYPE_INT64, &[uid])?;
        d.set(A::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, T::CUDNN_TYPE_INT64, &[16i64])?;
        match kind {
            Kind::Real => {}
            Kind::Virtual => d.set(A::CUDNN_ATTR_TENSOR_IS_VIRTUAL, T::CUDNN_TYPE_BOOLEAN, &[true])?,
            Kind::ByValue => d.set(A::CUDNN_ATTR_TENSOR_IS_BY_VALUE, T::CUDNN_TYPE_BOOLEAN, &[true])?,
        }
        let d = Rc::new(d.finalize()?);
        self.tensors.push(d.clone());
        Ok(d)
    }

    fn real(&mut self, uid: Uid, dt: Dt, layout: Layout) -> Result<Rc<Desc>, String> {
        self.tensor(uid as i64, dt, layout, Kind::Real)
    }

    fn scalar(&mut self, uid: Uid) -> Result<Rc<Desc>, String> {
        self.tensor(uid as i64, Dt::CUDNN_DATA_FLOAT, ([1; 4], [1; 4]), Kind::ByValue)
    }

    fn virt(&mut self, dt: Dt, layout: Layout) -> Result<Rc<Desc>, String> {
        self.next_virtual += 1;
        self.tensor(self.next_virtual, dt, layout, Kind::Virtual)
    }

    /// `y = mode(x, b)` (with `t` the condition of a select); GEN_INDEX takes `axis`.
    #[allow(clippy::too_many_arguments)]
    fn pointwise(
        &mut self,
        mode: Pw,
        prec: Dt,
        axis: Option<i64>,
        x: &Desc,
        b: Option<&Desc>,
        t: Option<&Desc>,
        y: &Desc,
    ) -> Result<(), String> {
        let pw = Desc::new(D::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
        pw.set(A::CUDNN_ATTR_POINTWISE_MODE, T::CUDNN_TYPE_POINTWISE_MODE, &[mode])?;
        pw.set(A::CUDNN_ATTR_POINTWISE_MATH_PREC, T::CUDNN_TYPE_DATA_TYPE, &[prec])?;
        if let Some(axis) = axis {
            pw.set(A::CUDNN_ATTR_POINTWISE_AXIS, T::CUDNN_TYPE_INT64, &[axis])?;
        }
        let pw = pw.finalize()?;
        let op = Desc::new(D::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)?;
        op.set_desc(A::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &[&pw])?;
        op.set_desc(A::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, &[x])?;
        if let Some(b) = b {
            op.set_desc(A::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, &[b])?;
        }
        if let Some(t) = t {
            op.set_desc(A::CUDNN_ATTR_OPERATION_POINTWISE_TDESC, &[t])?;
        }
        op.set_desc(A::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, &[y])?;
        op.set(A::CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, T::CUDNN_TYPE_FLOAT, &[1.0f32])?;
        op.set(A::CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, T::CUDNN_TYPE_FLOAT, &[1.0f32])?;
        self.ops.push(op.finalize()?);
        Ok(())
    }

    fn binary(&mut self, mode: Pw, x: &Desc, b: &Desc, y: &Desc) -> Result<(), String> {
        self.pointwise(mode, Dt::CUDNN_DATA_FLOAT, None, x, Some(b), None, y)
    }

    fn unary(&mut self, mode: Pw, x: &Desc, y: &Desc) -> Result<(), String> {
        self.pointwise(mode, Dt::CUDNN_DATA_FLOAT, None, x, None, None, y)
    }

    fn matmul(&mut self, a: &Desc, b: &Desc, c: &Desc) -> Result<(), String> {
        let mm = Desc::new(D::CUDNN_BACKEND_MATMUL_DESCRIPTOR)?;
        mm.set(A::CUDNN_ATTR_MATMUL_COMP_TYPE, T::CUDNN_TYPE_DATA_TYPE, &[Dt::CUDNN_DATA_FLOAT])?;
        let mm = mm.finalize()?;
        let op = Desc::new(D::CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR)?;
        op.set_desc(A::CUDNN_ATTR_OPERATION_MATMUL_ADESC, &[a])?;
        op.set_desc(A::CUDNN_ATTR_OPERATION_MATMUL_BDESC, &[b])?;
        op.set_desc(A::CUDNN_ATTR_OPERATION_MATMUL_CDESC, &[c])?;
        op.set_desc(A::CUDNN_ATTR_OPERATION_MATMUL_DESC, &[&mm])?;
        self.ops.push(op.finalize()?);
        Ok(())
    }

    fn reduction(&mut self, op_kind: dnn::cudnnReduceTensorOp_t, x: &Desc, y: &Desc) -> Result<(), String> {
        let r = Desc::new(D::CUDNN_BACKEND_REDUCTION_DESCRIPTOR)?;
        r.set(A::CUDNN_ATTR_REDUCTION_COMP_TYPE, T::CUDNN_TYPE_DATA_TYPE, &[Dt::CUDNN_DATA_FLOAT])?;
        r.set(A::CUDNN_ATTR_REDUCTION_OPERATOR, T::CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, &[op_kind])?;
        let r = r.finalize()?;
        let op = Desc::new(D::CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR)?;
        op.set_desc(A::CUDNN_ATTR_OPERATION_REDUCTION_DESC, &[&r])?;
        op.set_desc(A::CUDNN_ATTR_OPERATION_REDUCTION_XDESC, &[x])?;
        op.set_desc(A::CUDNN_ATTR_OPERATION_REDUCTION_YDESC, &[y])?;
        self.ops.push(op.finalize()?);
        Ok(())
    }

    /// `out = a·b` where `out` has as many heads as `a`; with fewer (a kv head's gradient under
    /// GQA), the product per query head into `per_head`'s layout, then summed over each group.
    fn matmul_summed_over_groups(&mut self, a: &Desc, b: &Desc, out: &Desc, per_head: Option<Layout>) -> Result<(), String> {
        let Some(layout) = per_head else { return self.matmul(a, b, out) };
        let full = self.virt(Dt::CUDNN_DATA_BFLOAT16, layout)?;
        self.matmul(a, b, &full)?;
        self.reduction(dnn::cudnnReduceTensorOp_t::CUDNN_REDUCE_TENSOR_ADD, &full, out)
    }

    fn reshape(&mut self, x: &Desc, y: &Desc) -> Result<(), String> {
        let op = Desc::new(D::CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR)?;
        op.set_desc(A::CUDNN_ATTR_OPERATION_RESHAPE_XDESC, &[x])?;
        op.set_desc(A::CUDNN_ATTR_OPERATION_RESHAPE_YDESC, &[y])?;
        self.ops.push(op.finalize()?);
        Ok(())
    }

    /// The causal mask: scores where row ≥ column, the negative infinity elsewhere.
    fn causal(&mut self, scores: &Desc, s: Layout, neg_inf: &Desc) -> Result<Rc<Desc>, String> {
        let row = self.virt(Dt::CUDNN_DATA_INT32, s)?;
        let col = self.virt(Dt::CUDNN_DATA_INT32, s)?;
        self.pointwise(Pw::CUDNN_POINTWISE_GEN_INDEX, Dt::CUDNN_DATA_FLOAT, Some(2), scores, None, None, &row)?;
        self.pointwise(Pw::CUDNN_POINTWISE_GEN_INDEX, Dt::CUDNN_DATA_FLOAT, Some(3), scores, None, None, &col)?;
        let keep = self.virt(Dt::CUDNN_DATA_BOOLEAN, s)?;
        self.pointwise(Pw::CUDNN_POINTWISE_CMP_GE, Dt::CUDNN_DATA_BOOLEAN, None, &row, Some(&col), None, &keep)?;
        let masked = self.virt(Dt::CUDNN_DATA_FLOAT, s)?;
        self.pointwise(Pw::CUDNN_POINTWISE_BINARY_SELECT, Dt::CUDNN_DATA_FLOAT, None, scores, Some(neg_inf), Some(&keep), &masked)?;
        Ok(masked)
    }
}

/// What a plan is for: the direction and the launch's shape (a backward split into launches has
/// one plan per launch shape; row strides are the whole tensors').
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Key {
    pub backward: bool,
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Elements between consecutive tokens of Q (and O, dO, dQ), of K (and V, dK, dV), of the statistics.
    pub q_row: usize,
    pub k_row: usize,
    pub stats_row: usize,
}

/// The layouts of one launch, in cuDNN's (batch, head, row, column) order over our token-major
/// buffers.
struct Layouts {
    q: Layout,
    kt: Layout,
    /// K and V (and their gradients) as stored.
    kv: Layout,
    stats: Layout,
    scores: Layout,
    scores_t: Layout,
    heads_bhsd: Layout,
    bhs1: Layout,
}

impl Key {
    fn layouts(&self) -> Layouts {
        let (b, s, h, hk, d) = (self.batch as i64, self.seq as i64, self.heads as i64, self.kv_heads as i64, self.head_dim as i64);
        let (qr, kr, sr) = (self.q_row as i64, self.k_row as i64, self.stats_row as i64);
        Layouts {
            q: ([b, h, s, d], [s * qr, d, qr, 1]),
            kt: ([b, hk, d, s], [s * kr, d, 1, kr]),
            kv: ([b, hk, s, d], [s * kr, d, kr, 1]),
            stats: ([b, h, s, 1], [s * sr, 1, sr, 1]),
            scores: ([b, h, s, s], [h * s * s, s * s, s, 1]),
            scores_t: ([b, h, s, s], [h * s * s, s * s, 1, s]),
            heads_bhsd: ([b, h, s, d], [h * s * d, s * d, d, 1]),
            bhs1: ([b, h, s, 1], [h * s, s, 1, 1]),
        }
    }

    /// Where the backward's graph tensors lie in the workspace, then the plan's own part: the
    /// row sums dO·O, the f32 dQ accumulator, each at a 256-byte boundary; (row sums, dQ
    /// accumulator, plan workspace, total before the plan's part).
    pub fn workspace_offsets(&self) -> (usize, usize, usize) {
        let up = |x: usize| x.div_ceil(256) * 256;
        let dq_acc = up(self.batch * self.heads * self.seq * 4);
        let plan = dq_acc + up(self.dq_acc_bytes());
        if self.backward { (0, dq_acc, plan) } else { (0, 0, 0) }
    }

    /// Bytes of the backward's f32 dQ accumulator.
    pub fn dq_acc_bytes(&self) -> usize {
        self.batch * self.heads * self.seq * self.head_dim * 4
    }

    /// Bytes of workspace the graph's own tensors take before the plan's part (backward only).
    pub fn graph_workspace_bytes(&self) -> usize {
        self.workspace_offsets().2
    }

    fn forward_graph(&self, g: &mut Graph) -> Result<(), String> {
        let l = self.layouts();
        let (bf16, f32) = (Dt::CUDNN_DATA_BFLOAT16, Dt::CUDNN_DATA_FLOAT);
        let q = g.real(Uid::Q, bf16, l.q)?;
        let kt = g.real(Uid::K, bf16, l.kt)?;
        let v = g.real(Uid::V, bf16, l.kv)?;
        let o = g.real(Uid::O, bf16, l.q)?;
        let stats = g.real(Uid::Stats, f32, l.stats)?;
        let scale = g.scalar(Uid::Scale)?;
        let neg_inf = g.scalar(Uid::NegInf)?;
        let s = g.virt(f32, l.scores)?;
        g.matmul(&q, &kt, &s)?;
        let scaled = g.virt(f32, l.scores)?;
        g.binary(Pw::CUDNN_POINTWISE_MUL, &s, &scale, &scaled)?;
        let masked = g.causal(&scaled, l.scores, &neg_inf)?;
        // Softmax with its statistics: max, exp(s − max), sum, log-sum-exp = max + ln(sum).
        let max = g.virt(f32, l.bhs1)?;
        g.reduction(dnn::cudnnReduceTensorOp_t::CUDNN_REDUCE_TENSOR_MAX, &masked, &max)?;
        let shifted = g.virt(f32, l.scores)?;
        g.binary(Pw::CUDNN_POINTWISE_SUB, &masked, &max, &shifted)?;
        let e = g.virt(f32, l.scores)?;
        g.unary(Pw::CUDNN_POINTWISE_EXP, &shifted, &e)?;
        let sum = g.virt(f32, l.bhs1)?;
        g.reduction(dnn::cudnnReduceTensorOp_t::CUDNN_REDUCE_TENSOR_ADD, &e, &sum)?;
        let ln_sum = g.virt(f32, l.bhs1)?;
        g.unary(Pw::CUDNN_POINTWISE_LOG, &sum, &ln_sum)?;
        g.binary(Pw::CUDNN_POINTWISE_ADD, &max, &ln_sum, &stats)?;
        let p = g.virt(bf16, l.scores)?;
        g.binary(Pw::CUDNN_POINTWISE_DIV, &e, &sum, &p)?;
        g.matmul(&p, &v, &o)
    }

    fn backward_graph(&self, g: &mut Graph) -> Result<(), String> {
        let l = self.layouts();
        let (bf16, f32) = (Dt::CUDNN_DATA_BFLOAT16, Dt::CUDNN_DATA_FLOAT);
        // Under GQA dK and dV come per query head first, then summed over each kv head's group.
        let per_head = (self.heads != self.kv_heads).then_some(l.heads_bhsd);
        let q = g.real(Uid::Q, bf16, l.q)?;
        let kt = g.real(Uid::K, bf16, l.kt)?;
        let vt = g.real(Uid::V, bf16, l.kt)?;
        let o = g.real(Uid::O, bf16, l.q)?;
        let d_o = g.real(Uid::DO, bf16, l.q)?;
        let stats = g.real(Uid::Stats, f32, l.stats)?;
        let dq = g.real(Uid::DQ, bf16, l.q)?;
        let dk = g.real(Uid::DK, bf16, l.kv)?;
        let dv = g.real(Uid::DV, bf16, l.kv)?;
        let scale = g.scalar(Uid::Scale)?;
        let neg_inf = g.scalar(Uid::NegInf)?;
        let one = g.scalar(Uid::One)?;
        let row_sum = g.real(Uid::RowSum, f32, l.bhs1)?;
        let dq_acc = g.real(Uid::DqAcc, f32, l.heads_bhsd)?;
        // D = rowsum(dO∘O), kept in the workspace.
        let (b, h, s, d) = (self.batch as i64, self.heads as i64, self.seq as i64, self.head_dim as i64);
        let prod = g.virt(f32, ([b, h, s, d], [h * s * d, s * d, h * d, 1]))?;
        g.binary(Pw::CUDNN_POINTWISE_MUL, &d_o, &o, &prod)?;
        let dsum = g.virt(f32, l.bhs1)?;
        g.reduction(dnn::cudnnReduceTensorOp_t::CUDNN_REDUCE_TENSOR_ADD, &prod, &dsum)?;
        g.binary(Pw::CUDNN_POINTWISE_MUL, &dsum, &one, &row_sum)?;
        // P = exp(scale·Q·Kᵀ − lse), masked.
        let sc = g.virt(f32, l.scores)?;
        g.matmul(&q, &kt, &sc)?;
        let scaled = g.virt(f32, l.scores)?;
        g.binary(Pw::CUDNN_POINTWISE_MUL, &sc, &scale, &scaled)?;
        let shifted = g.virt(f32, l.scores)?;
        g.binary(Pw::CUDNN_POINTWISE_SUB, &scaled, &stats, &shifted)?;
        let masked = g.causal(&shifted, l.scores, &neg_inf)?;
        let p = g.virt(f32, l.scores)?;
        g.unary(Pw::CUDNN_POINTWISE_EXP, &masked, &p)?;
        // dV = Pᵀ·dO, summed over each kv head's group.
        let pt = g.virt(bf16, l.scores_t)?;
        g.reshape(&p, &pt)?;
        g.matmul_summed_over_groups(&pt, &d_o, &dv, per_head)?;
        // dS = scale · P∘(dO·Vᵀ − D).
        let dp = g.virt(f32, l.scores)?;
        g.matmul(&d_o, &vt, &dp)?;
        let centred = g.virt(f32, l.scores)?;
        g.binary(Pw::CUDNN_POINTWISE_SUB, &dp, &row_sum, &centred)?;
        let ds_raw = g.virt(f32, l.scores)?;
        g.binary(Pw::CUDNN_POINTWISE_MUL, &centred, &p, &ds_raw)?;
        let ds = g.virt(f32, l.scores)?;
        g.binary(Pw::CUDNN_POINTWISE_MUL, &ds_raw, &scale, &ds)?;
        // dK = dSᵀ·Q, summed over each kv head's group.
        let dst = g.virt(bf16, l.scores_t)?;
        g.reshape(&ds, &dst)?;
        g.matmul_summed_over_groups(&dst, &q, &dk, per_head)?;
        // dQ = dS·K through the f32 accumulator.
        let k = g.virt(f32, l.kv)?;
        g.reshape(&kt, &k)?;
        g.matmul(&ds, &k, &dq_acc)?;
        g.unary(Pw::CUDNN_POINTWISE_IDENTITY, &dq_acc, &dq)
    }
}

/// A built execution plan and what it needs at run time.
pub struct Plan {
    plan: Desc,
    /// Bytes of workspace the plan itself asks for (after the graph's own tensors).
    pub workspace: usize,
    // What the plan was built from, kept for as long as it lives.
    _graph: Graph,
    _keep: Vec<Desc>,
    _configs: Vec<Desc>,
}

/// Device pointers of one launch (already offset to its first sequence and head).
pub struct Pointers {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub stats: u64,
    /// Backward only: dO, dQ, dK, dV, and the workspace (graph tensors first, then the plan's).
    pub d_o: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub workspace: u64,
}

/// cuDNN on one stream: a handle and the plans built so far (`None`: the engines declined that
/// shape, so it runs on our kernels).
pub struct Sdpa {
    handle: dnn::cudnnHandle_t,
    pub version: usize,
    plans: RefCell<HashMap<Key, Option<Rc<Plan>>>>,
}

impl Drop for Sdpa {
    fn drop(&mut self) {
        self.plans.borrow_mut().clear();
        // SAFETY: the handle was created by cudnnCreate and every plan using it is gone.
        unsafe { dnn::cudnnDestroy(self.handle) };
    }
}

impl Sdpa {
    /// A handle on `stream` of the current context, or why cuDNN cannot serve.
    pub fn open(stream: cudarc::driver::sys::CUstream) -> Result<Sdpa, String> {
        let version = library_version()?;
        let mut handle: dnn::cudnnHandle_t = std::ptr::null_mut();
        // SAFETY: cuDNN writes the handle; the stream belongs to the current context.
        check(unsafe { dnn::cudnnCreate(&mut handle) }, "cudnnCreate")?;
        let sdpa = Sdpa { handle, version, plans: RefCell::new(HashMap::new()) };
        check(unsafe { dnn::cudnnSetStream(handle, stream as dnn::cudaStream_t) }, "cudnnSetStream")?;
        Ok(sdpa)
    }

    /// Whether the backward must zero its dQ accumulator first.
    pub fn zeroes_dq_itself(&self) -> bool {
        self.version >= SELF_ZEROING_DQ_VERSION
    }

    /// The plan for `key`, built on first use; `Err` (once per key) says why the engines declined it.
    pub fn plan(&self, key: Key) -> Result<Rc<Plan>, Option<String>> {
        if let Some(p) = self.plans.borrow().get(&key) {
            return p.clone().ok_or(None);
        }
        let built = self.build(key);
        self.plans.borrow_mut().insert(key, built.as_ref().ok().cloned());
        built.map_err(Some)
    }

    fn build(&self, key: Key) -> Result<Rc<Plan>, String> {
        let mut g = Graph::new();
        if key.backward {
            key.backward_graph(&mut g)?
        } else {
            key.forward_graph(&mut g)?
        }
        let graph = Desc::new(D::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
        graph.set_desc(A::CUDNN_ATTR_OPERATIONGRAPH_OPS, &g.ops.iter().collect::<Vec<_>>())?;
        graph.set(A::CUDNN_ATTR_OPERATIONGRAPH_HANDLE, T::CUDNN_TYPE_HANDLE, &[self.handle])?;
        let graph = graph.finalize()?;
        let heur = Desc::new(D::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
        heur.set_desc(A::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[&graph])?;
        heur.set(A::CUDNN_ATTR_ENGINEHEUR_MODE, T::CUDNN_TYPE_HEUR_MODE, &[dnn::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A])?;
        let heur = heur.finalize()?;
        let results = (A::CUDNN_ATTR_ENGINEHEUR_RESULTS, T::CUDNN_TYPE_BACKEND_DESCRIPTOR);
        let count = heur.get::<dnn::cudnnBackendDescriptor_t>(results.0, results.1, &mut [])?;
        if count == 0 {
            return Err("no engine of this cuDNN takes the graph".into());
        }
        let configs: Vec<Desc> = (0..count).map(|_| Desc::new(D::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR)).collect::<Result<_, _>>()?;
        // cuDNN fills the engine-config descriptors created here.
        let mut raw: Vec<dnn::cudnnBackendDescriptor_t> = configs.iter().map(|c| c.0).collect();
        let got = heur.get(results.0, results.1, &mut raw)?;
        let mut why = Vec::new();
        for cfg in configs.iter().take(got) {
            match self.plan_for(cfg) {
                Ok((plan, workspace)) => {
                    return Ok(Rc::new(Plan { plan, workspace, _graph: g, _keep: vec![graph, heur], _configs: configs }));
                }
                Err(e) => why.push(e),
            }
        }
        Err(format!("no engine config built a plan: {}", why.join("; ")))
    }

    /// An execution plan of one engine config, and the workspace it asks for.
    fn plan_for(&self, cfg: &Desc) -> Result<(Desc, usize), String> {
        let plan = Desc::new(D::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
        plan.set(A::CUDNN_ATTR_EXECUTION_PLAN_HANDLE, T::CUDNN_TYPE_HANDLE, &[self.handle])?;
        plan.set_desc(A::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[cfg])?;
        let plan = plan.finalize()?;
        let mut ws = [0i64];
        plan.get(A::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, T::CUDNN_TYPE_INT64, &mut ws)?;
        Ok((plan, ws[0].max(0) as usize))
    }

    /// Run `plan` on the handle's stream.
    pub fn execute(&self, key: &Key, plan: &Plan, ptrs: &Pointers, scale: f32) -> Result<(), String> {
        let neg_inf = if self.version < INFINITE_MASK_VERSION { f32::MIN } else { f32::NEG_INFINITY };
        let one = 1.0f32;
        let host = |x: &f32| x as *const f32 as *mut c_void;
        let dev = |p: u64| p as *mut c_void;
        let mut uids = vec![Uid::Q, Uid::K, Uid::V, Uid::O, Uid::Stats, Uid::Scale, Uid::NegInf];
        let mut data = vec![dev(ptrs.q), dev(ptrs.k), dev(ptrs.v), dev(ptrs.o), dev(ptrs.stats), host(&scale), host(&neg_inf)];
        let mut workspace = ptrs.workspace;
        if key.backward {
            let (r, a, p) = key.workspace_offsets();
            let (row_sum, dq_acc) = (ptrs.workspace + r as u64, ptrs.workspace + a as u64);
            workspace = ptrs.workspace + p as u64;
            uids.extend([Uid::DO, Uid::DQ, Uid::DK, Uid::DV, Uid::One, Uid::RowSum, Uid::DqAcc]);
            data.extend([dev(ptrs.d_o), dev(ptrs.dq), dev(ptrs.dk), dev(ptrs.dv), host(&one), dev(row_sum), dev(dq_acc)]);
        }
        // Every tensor was declared 16-byte aligned (the fused kernels load 16 bytes at a time).
        if let Some(i) =
            data.iter().zip(&uids).position(|(&p, u)| !matches!(u, Uid::Scale | Uid::NegInf | Uid::One) && !(p as usize).is_multiple_of(16))
        {
            return Err(format!("{:?} at {:p} is not 16-byte aligned", uids[i], data[i]));
        }
        let uids: Vec<i64> = uids.into_iter().map(|u| u as i64).collect();
        let pack = Desc::new(D::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        pack.set(A::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, T::CUDNN_TYPE_INT64, &uids)?;
        pack.set(A::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, T::CUDNN_TYPE_VOID_PTR, &data)?;
        pack.set(A::CUDNN_ATTR_VARIANT_PACK_WORKSPACE, T::CUDNN_TYPE_VOID_PTR, &[dev(workspace)])?;
        let pack = pack.finalize()?;
        // SAFETY: every pointer in the pack is a live device buffer of the size the plan's graph
        // describes (the caller checked the tensors and placed the workspace in the scratch), or a
        // host scalar that outlives this call; the handle's stream is our compute stream.
        check(unsafe { dnn::cudnnBackendExecute(self.handle, plan.plan.0, pack.0) }, "execute")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::AttnShape;
    use crate::backend::workspace::attention_unit_bytes;

    fn key(backward: bool, batch: usize, seq: usize, heads: usize, kv_heads: usize, head_dim: usize) -> Key {
        Key { backward, batch, seq, heads, kv_heads, head_dim, q_row: heads * head_dim, k_row: kv_heads * head_dim, stats_row: heads }
    }

    /// What cuDNN 9.14's backward plan asked on an H100 (`gpu_bench`'s sweep, run
    /// 2026-12-06-h100-j): one f32 buffer of the launch's dQ size, plus 256 bytes.
    fn measured_plan_workspace(k: &Key) -> usize {
        k.batch * k.heads * k.seq * k.head_dim * 4 + 256
    }

    /// Every launch of `u` (sequence, kv head) units fits `u` scratch units: the graph's tensors at
    /// their 256-byte boundaries and the plan's measured workspace, so the scratch the memory plan
    /// lists serves cuDNN's backward split exactly as it serves ours.
    #[test]
    fn the_scratch_unit_covers_a_cudnn_launch() {
        for (seq, heads, kv_heads, head_dim) in
            [(2048, 32, 8, 128), (65536, 32, 8, 128), (130, 4, 4, 128), (17, 2, 1, 64), (300, 24, 8, 96)]
        {
            let shape = AttnShape { batch: 3, seq, heads, kv_heads, head_dim, causal_rows: true, ..Default::default() };
            let unit = attention_unit_bytes(shape);
            for bn in 1..=3 {
                for kvn in 1..=kv_heads {
                    let k = key(true, bn, seq, kvn * heads / kv_heads, kvn, head_dim);
                    let (rows, acc, plan) = k.workspace_offsets();
                    assert!(rows == 0 && acc % 256 == 0 && plan % 256 == 0 && acc >= bn * k.heads * seq * 4, "{k:?}");
                    assert_eq!(plan - acc, (bn * k.heads * seq * head_dim * 4).div_ceil(256) * 256, "{k:?}: the dQ accumulator");
                    let need = k.graph_workspace_bytes() + measured_plan_workspace(&k);
                    assert!(need <= bn * kvn * unit, "{k:?}: needs {need}, {} units hold {}", bn * kvn, bn * kvn * unit);
                }
            }
        }
        assert_eq!(key(false, 1, 2048, 32, 8, 128).graph_workspace_bytes(), 0, "the forward has no graph workspace");
    }

    /// Token-major tensors in cuDNN's (batch, head, row, column) order: a head is `head_dim`
    /// elements into a token's row, a token is the whole row further; Kᵀ swaps the last two.
    #[test]
    fn layouts_address_our_token_major_buffers() {
        let k = Key { backward: false, batch: 2, seq: 10, heads: 8, kv_heads: 2, head_dim: 64, q_row: 512, k_row: 128, stats_row: 8 };
        let l = k.layouts();
        assert_eq!(l.q, ([2, 8, 10, 64], [10 * 512, 64, 512, 1]));
        assert_eq!(l.kt, ([2, 2, 64, 10], [10 * 128, 64, 1, 128]));
        assert_eq!(l.stats, ([2, 8, 10, 1], [10 * 8, 1, 8, 1]));
        // A launch over some heads keeps the whole tensors' row strides.
        let part = Key { heads: 4, kv_heads: 1, ..k };
        assert_eq!(part.layouts().q.1, [10 * 512, 64, 512, 1]);
    }
}
