//! The CUDA backend's fixed scratch, by size: what `backend::cuda` allocates when it opens and
//! when the Trainer reserves attention scratch, and what the memory plan (`engine::plan`) lists
//! for it. Plain numbers and shape arithmetic, no CUDA: the plan reads them without importing the
//! backend.

use super::AttnShape;

/// Where every buffer starts: a view into a block (the engine's arena, the backend's small
/// scratch) sits at a multiple of this, as a `cuMemAlloc` does. Kernels rely on 16 bytes,
/// cuDNN's graphs on 256. The memory plan rounds each device buffer up to it.
pub const BUFFER_ALIGN: usize = 256;

/// Bytes a block holds for buffers of `sizes`, each at a [`BUFFER_ALIGN`] boundary in order.
pub fn packed_bytes(sizes: impl IntoIterator<Item = usize>) -> usize {
    sizes.into_iter().map(|b| b.max(1).next_multiple_of(BUFFER_ALIGN)).sum()
}

/// f32 elements of the loss chunk's logits buffer (plus a bf16 copy of the same size for the
/// gradient): rows per chunk = this / vocab, so 128 MiB + 64 MiB whatever the model. The memory
/// plan reads this constant.
pub const LOSS_CHUNK_ELEMS: usize = 32 << 20;
/// Rows per loss chunk are capped here (the per-row loss buffers are this long).
pub const LOSS_CHUNK_MAX_ROWS: usize = 16384;
/// cuBLASLt workspace (NVIDIA's recommendation for Hopper).
pub const GEMM_WORKSPACE_BYTES: usize = 32 << 20;
/// Partial sums of the deterministic sum-of-squares (one per block of a first-pass launch).
pub const SUMSQ_MAX_BLOCKS: usize = 1024;
/// Results of the sum of squares, one per first-pass launch, read back together after one wait
/// (a step's LoRA gradient of 8B takes about a dozen launches; more wait once per this many).
pub const SUMSQ_MAX_LAUNCHES: usize = 64;
/// The backend's small scratch, packed into one block in this order (name, bytes): the loss's
/// per-row losses and valid flags and its two sums, and the sum of squares' partial sums and
/// results. The memory plan lists the same.
pub const SMALL_SCRATCH: [(&str, usize); 6] = [
    ("loss.row_loss", LOSS_CHUNK_MAX_ROWS * 4),
    ("loss.row_valid", LOSS_CHUNK_MAX_ROWS * 4),
    ("loss.sum", 8),
    ("loss.count", 8),
    ("sumsq.partial", SUMSQ_MAX_BLOCKS * 8),
    ("sumsq.out", SUMSQ_MAX_LAUNCHES * 8),
];

/// The attention backward's f32 scratch: dQ, dK, dV accumulators and D = rowsum(dO∘O) for as
/// many (sequence, kv-head group) pairs as fit; larger problems run in several launches
/// ([`attention_bwd_split`]). At least this much, so short sequences take few launches; more when
/// one sequence of one group needs more (see [`attention_scratch_bytes`]). 160 MiB rather than
/// 128: on Llama-3-8B's shape it lets cuDNN's backward take 4 units a launch at 8K tokens and 2 at
/// 16K instead of 3 and 1, which `gpu_bench attention_bwd_split_sweep` measured 5% and 3% faster
/// on an H200 (470 → 496 and 567 → 582 TFLOP/s); more units a launch were no faster at 8K and
/// slower at 16K.
pub const ATTN_BWD_SCRATCH_BYTES: usize = 160 << 20;

/// Bytes of the attention backward's scratch for one (sequence, kv head) of `shape`, whichever
/// backward runs it: our kernels' f32 accumulators (dQ of the head group, dK, dV) and D, or, on
/// cards where cuDNN's fused attention runs (`cuda::cudnn`), its graph's f32 dQ accumulator and
/// row sums plus the plan's own workspace, which cuDNN 9.14 on an H100 asks as one more f32
/// buffer of dQ's size (`gpu_bench`'s sweep prints it), each at a 256-byte boundary. The larger of
/// the two, so that the scratch is the same on every card and the memory plan need not know which
/// runs; it differs only where one unit outgrows [`ATTN_BWD_SCRATCH_BYTES`] (beyond ~40K tokens
/// on an 8B model; at 64K cuDNN's unit is 257 MiB, 64 MiB more than ours).
pub fn attention_unit_bytes(shape: AttnShape) -> usize {
    let AttnShape { seq, heads, kv_heads, head_dim, .. } = shape;
    let group = heads / kv_heads.max(1);
    let ours = seq * (group * head_dim + 2 * head_dim + group) * 4;
    let cudnn = seq * group * (2 * head_dim + 1) * 4 + 3 * 256;
    ours.max(cudnn)
}

/// Bytes of attention backward scratch for shapes up to `max` (the memory plan lists the same):
/// [`ATTN_BWD_SCRATCH_BYTES`], or one (sequence, kv head) unit of `max` where that is larger.
pub fn attention_scratch_bytes(max: AttnShape) -> usize {
    ATTN_BWD_SCRATCH_BYTES.max(attention_unit_bytes(max))
}

/// How an attention backward of `shape` splits to fit `scratch_bytes`: (sequences, kv heads) per
/// launch, as even as the counts allow; `None` when one sequence of one kv head's group does not
/// fit (the backend's scratch is sized so that it does: [`attention_scratch_bytes`]).
pub fn attention_bwd_split(shape: AttnShape, scratch_bytes: usize) -> Option<(usize, usize)> {
    let AttnShape { batch, kv_heads, .. } = shape;
    if kv_heads == 0 {
        return None;
    }
    let units = scratch_bytes / attention_unit_bytes(shape).max(1);
    if units == 0 {
        return None;
    }
    let kvc = kv_heads.div_ceil(kv_heads.div_ceil(units.min(kv_heads)));
    let per_launch = (units / kvc).clamp(1, batch.max(1));
    let bc = batch.max(1).div_ceil(batch.max(1).div_ceil(per_launch));
    Some((bc, kvc))
}
