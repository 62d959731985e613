//! The memory plan is the allocation. An `Arena` takes a list of the plan's buffers (the frozen
//! model and the Trainer's, or a generation model's), allocates one device block and one pinned
//! host block of exactly the bytes the plan counts, and hands each buffer out by its plan name
//! at its offset, with the plan's length and dtype. Callers name what they need; no size is
//! written twice, so what the plan previews and what the engine takes cannot drift apart. Every
//! planned buffer must be taken exactly once ([`Arena::finish`]).

use std::collections::HashMap;

use crate::backend::{Backend, DType, HostWeight, WeightPlace};
use crate::engine::plan::{self, BackendKind, Location, PlannedBuffer};
use crate::error::{Error, Result};

pub struct Arena<'b, B: Backend> {
    be: &'b B,
    device: B::Block,
    host: B::Block,
    buffers: Vec<PlannedBuffer>,
    offsets: Vec<u64>,
    index: HashMap<String, usize>,
    taken: Vec<bool>,
}

impl<'b, B: Backend> Arena<'b, B> {
    /// Allocate the blocks for `buffers` (names unique).
    pub fn new(be: &'b B, buffers: Vec<PlannedBuffer>) -> Result<Self> {
        let kind = BackendKind::of(&be.device());
        let (offsets, [device_bytes, host_bytes]) = plan::arena_offsets(&buffers, kind);
        let mut index = HashMap::with_capacity(buffers.len());
        for (i, b) in buffers.iter().enumerate() {
            if index.insert(b.name.clone(), i).is_some() {
                return Err(Error::bug("Arena::new", format!("the plan lists {} twice", b.name)));
            }
        }
        let device = be.alloc_block(device_bytes as usize, false)?;
        let host = be.alloc_block(host_bytes as usize, true)?;
        let taken = vec![false; buffers.len()];
        Ok(Arena { be, device, host, buffers, offsets, index, taken })
    }

    /// Whether the plan lists `name` (a weight's optional bias or dequantized copy).
    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Where the plan lists `name`.
    fn position(&self, name: &str) -> Result<usize> {
        self.index.get(name).copied().ok_or_else(|| Error::bug("Arena", format!("the memory plan lists no buffer {name}")))
    }

    /// The elements the plan gives `name`.
    pub fn elems(&self, name: &str) -> Result<usize> {
        Ok(self.buffers[self.position(name)?].elems as usize)
    }

    /// The planned buffer `name`, marked taken: its entry, offset and block.
    fn take(&mut self, name: &str) -> Result<(&PlannedBuffer, usize, &B::Block)> {
        let i = self.position(name)?;
        if std::mem::replace(&mut self.taken[i], true) {
            return Err(Error::bug("Arena", format!("{name} was taken twice")));
        }
        let b = &self.buffers[i];
        let block = if b.location == Location::PinnedHost { &self.host } else { &self.device };
        Ok((b, self.offsets[i] as usize, block))
    }

    fn typed(&mut self, name: &str) -> Result<(usize, DType, usize, &B::Block)> {
        let (b, offset, block) = self.take(name)?;
        let dtype = b.dtype.ok_or_else(|| Error::bug("Arena", format!("{name} is planned as raw bytes, not a tensor")))?;
        Ok((b.elems as usize, dtype, offset, block))
    }

    /// The zero-filled tensor `name` (device buffers; pinned host ones are not cleared).
    pub fn tensor(&mut self, name: &str) -> Result<B::Tensor> {
        let be = self.be;
        let (len, dtype, offset, block) = self.typed(name)?;
        be.tensor_in(block, offset, len, dtype)
    }

    /// The tensor `name` holding `data`, which must be as long as the plan says.
    pub fn upload(&mut self, name: &str, data: &[f32]) -> Result<B::Tensor> {
        let be = self.be;
        let (len, dtype, offset, block) = self.typed(name)?;
        if data.len() != len {
            return Err(Error::bug("Arena::upload", format!("{name} is planned with {len} elements, given {}", data.len())));
        }
        let mut t = be.tensor_in(block, offset, len, dtype)?;
        be.write(&mut t, data)?;
        Ok(t)
    }

    /// The id buffer `name` (planned as 4-byte elements), zero-filled.
    pub fn ids(&mut self, name: &str) -> Result<B::Ids> {
        let be = self.be;
        let (len, _, offset, block) = self.typed(name)?;
        be.ids_in(block, offset, len)
    }

    /// The frozen linear `name`, with its bias at `{name}.bias` and, when the plan gives it one,
    /// its dequantized copy at `{name}.dequantized`.
    pub fn weight(&mut self, name: &str, w: &HostWeight, bias: Option<&[f32]>) -> Result<B::Weight> {
        let be = self.be;
        let data = self.take(name)?.1;
        let bias_at = match bias {
            Some(_) => Some(self.take(&format!("{name}.bias"))?.1),
            None => None,
        };
        let copy = format!("{name}.dequantized");
        let dequantized = if self.has(&copy) { Some(self.take(&copy)?.1) } else { None };
        be.weight_in(&self.device, WeightPlace { data, bias: bias_at, dequantized }, w, bias)
    }

    /// Check that every planned buffer was taken, and give back the list (what was allocated,
    /// in the plan's order and names).
    pub fn finish(self) -> Result<Vec<PlannedBuffer>> {
        if let Some(i) = self.taken.iter().position(|t| !t) {
            return Err(Error::bug("Arena::finish", format!("the memory plan lists {}, which nothing took", self.buffers[i].name)));
        }
        Ok(self.buffers)
    }
}
