//! Per-kernel timing of the compute stream, for `tunestudio bench --profile`: while a profile is
//! open, every kernel launch and GEMM is bracketed by two events; closing it waits for the stream
//! and sums the elapsed times by name. Events are only created while profiling, so a normal step
//! pays one `Option` check per launch.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, sys};
use serde::Serialize;

use crate::error::{Error, Result};

/// Time spent in one kernel (or GEMM shape) over the profiled region.
#[derive(Debug, Clone, Serialize)]
pub struct KernelTime {
    pub name: String,
    pub calls: usize,
    pub total_ms: f64,
}

#[derive(Default)]
pub struct Profiler {
    open: RefCell<Option<Vec<(String, CudaEvent, CudaEvent)>>>,
}

fn event(ctx: &Arc<CudaContext>) -> Result<CudaEvent> {
    ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| Error::Cuda { op: "create profiling event".into(), msg: e.to_string() })
}

impl Profiler {
    pub fn start(&self) {
        *self.open.borrow_mut() = Some(Vec::new());
    }

    pub fn is_open(&self) -> bool {
        self.open.borrow().is_some()
    }

    /// Run `launch` between two events when a profile is open; otherwise just run it.
    pub fn around(
        &self,
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        name: impl FnOnce() -> String,
        launch: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if !self.is_open() {
            return launch();
        }
        let rec = |e: &CudaEvent| e.record(stream).map_err(|e| Error::Cuda { op: "record profiling event".into(), msg: e.to_string() });
        let (start, end) = (event(ctx)?, event(ctx)?);
        rec(&start)?;
        launch()?;
        rec(&end)?;
        if let Some(v) = self.open.borrow_mut().as_mut() {
            v.push((name(), start, end));
        }
        Ok(())
    }

    /// Close the profile: per name, calls and milliseconds, the most expensive first.
    pub fn finish(&self) -> Result<Vec<KernelTime>> {
        let Some(entries) = self.open.borrow_mut().take() else { return Ok(Vec::new()) };
        let mut by_name: BTreeMap<String, (usize, f64)> = BTreeMap::new();
        for (name, start, end) in entries {
            end.synchronize().map_err(|e| Error::Cuda { op: "wait for profiling event".into(), msg: e.to_string() })?;
            let ms = start.elapsed_ms(&end).map_err(|e| Error::Cuda { op: "profiling elapsed time".into(), msg: e.to_string() })?;
            let slot = by_name.entry(name).or_default();
            slot.0 += 1;
            slot.1 += ms as f64;
        }
        let mut out: Vec<KernelTime> = by_name.into_iter().map(|(name, (calls, total_ms))| KernelTime { name, calls, total_ms }).collect();
        out.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
        Ok(out)
    }
}
