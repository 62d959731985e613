//! The Export page's state and its work: a run's LoRA adapter as a PEFT folder, the base
//! model with the adapter merged in as a 16-bit Hugging Face folder, or the merged model as one
//! GGUF file with an Ollama Modelfile beside it, written into a folder the person chooses,
//! reporting progress through a callback (the app posts it to the window). Both go through the same code as `tunestudio export` (crate::export), so
//! trained token rows travel with the adapter and the merged weights alike. A run that has no
//! `adapter/` yet (failed, or interrupted before its first save) exports its adapter from its
//! newest checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::RunConfig;
use crate::adapter::load_peft;
use crate::export::gguf::{GgufOptions, GgufQuant};
use crate::export::merged::{FsSink, MergeDtype, MergeInput, MergeOptions, Sink, export_merged_with};
use crate::generate::SamplingParams;
use crate::model::ModelSpec;
use crate::session::checkpoint;

#[derive(Debug, Clone, PartialEq)]
pub enum ExportProgress {
    Step { fraction: f32, what: String },
    Done(Result<PathBuf, String>),
}

/// What the Export page writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    Adapter,
    Merged(MergeDtype),
    /// One `.gguf` file and a `Modelfile`, in a folder of their own.
    Gguf(GgufQuant),
}

#[derive(Debug)]
pub struct ExportState {
    /// The run whose adapter is exported.
    pub source: Option<PathBuf>,
    /// The folder the export's own folder is created in.
    pub dest: PathBuf,
    /// The dtype of a merged export.
    pub merged_dtype: MergeDtype,
    /// The quantization of a GGUF export.
    pub gguf_quant: GgufQuant,
    pub progress: Option<(f32, String)>,
    pub result: Option<Result<PathBuf, String>>,
}

impl Default for ExportState {
    fn default() -> Self {
        ExportState {
            source: None,
            dest: PathBuf::new(),
            merged_dtype: MergeDtype::Bf16,
            gguf_quant: GgufQuant::Q8_0,
            progress: None,
            result: None,
        }
    }
}

impl ExportState {
    pub fn busy(&self) -> bool {
        self.progress.is_some()
    }
}

/// `parent/<leaf>`, or `<leaf>-2`, `<leaf>-3`, … when taken: an export never replaces a folder.
pub fn target_dir(parent: &Path, leaf: &str) -> PathBuf {
    let mut p = parent.join(leaf);
    let mut n = 2;
    while p.exists() {
        p = parent.join(format!("{leaf}-{n}"));
        n += 1;
    }
    p
}

fn run_name(run_dir: &Path) -> String {
    run_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "run".into())
}

/// Where an export reports how far it is: a fraction in 0..=1 and what it is doing.
pub type Progress<'a> = &'a (dyn Fn(f32, &str) + Sync);

fn prepare_parent(parent: &Path) -> crate::Result<()> {
    if parent.as_os_str().is_empty() {
        return Err(crate::Error::op("export", "choose a destination folder first"));
    }
    std::fs::create_dir_all(parent).map_err(|e| crate::Error::file(parent, e))
}

/// Write the adapter of `run_dir` (with its trained token rows) into `parent/<run>-adapter`,
/// then read it back against the base model's shapes, so what lands is known to load.
pub fn export_adapter(run_dir: &Path, parent: &Path, progress: Progress<'_>) -> crate::Result<PathBuf> {
    prepare_parent(parent)?;
    let dest = target_dir(parent, &format!("{}-adapter", run_name(run_dir)));
    progress(0.1, "reading the run's adapter");
    let cfg = RunConfig::load(&run_dir.join(checkpoint::CONFIG_FILE))?;
    // crate::export reads adapter/, or the newest checkpoint of a run that has none.
    progress(0.4, "writing adapter_model.safetensors");
    crate::export::run::export_adapter(run_dir, Some(&dest))?;
    progress(0.9, "checking the written adapter loads");
    load_peft(&dest, &ModelSpec::from_dir(&cfg.model.path)?)?;
    Ok(dest)
}

/// Files on disk, counting the bytes written to report progress against the expected total.
struct CountingSink<'a> {
    progress: Progress<'a>,
    written: AtomicU64,
    expected: u64,
}

struct Counted<'a, W> {
    inner: W,
    sink: &'a CountingSink<'a>,
    name: String,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        let step = (self.sink.expected / 200).max(1 << 20);
        let before = self.sink.written.fetch_add(n as u64, Ordering::Relaxed);
        if before / step != (before + n as u64) / step {
            let f = ((before + n as u64) as f64 / self.sink.expected.max(1) as f64).min(0.99) as f32;
            (self.sink.progress)(0.05 + 0.9 * f, &format!("writing {} ({})", self.name, crate::util::fmt_bytes(before + n as u64)));
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Sink for CountingSink<'_> {
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn Write + '_>> {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        Ok(Box::new(Counted { inner: FsSink.create(path)?, sink: self, name }))
    }
}

/// Merge the run's adapter (and trained token rows) into its base model and write a Hugging
/// Face folder of `dtype` weights into `parent/<run>-merged-<dtype>`.
pub fn export_merged(run_dir: &Path, parent: &Path, dtype: MergeDtype, progress: Progress<'_>) -> crate::Result<PathBuf> {
    prepare_parent(parent)?;
    progress(0.02, "reading the run's adapter");
    let input = MergeInput::from_run(run_dir)?;
    let spec = ModelSpec::from_dir(&input.model)?;
    let dest = target_dir(parent, &format!("{}-merged-{}", run_name(run_dir), dtype.name()));
    let sink = CountingSink { progress, written: AtomicU64::new(0), expected: spec.total_params() * dtype.bytes() as u64 };
    let summary = export_merged_with(&input, &dest, &MergeOptions { dtype, ..MergeOptions::default() }, &sink)?;
    progress(
        1.0,
        &format!("{} tensors, {} linears merged, {}", summary.tensors, summary.merged_linears, crate::util::fmt_bytes(summary.total_bytes)),
    );
    Ok(summary.dest)
}

/// Merge the run's adapter into its base and write `parent/<run>-<quant>/<run>-<quant>.gguf`
/// with an Ollama `Modelfile` beside it (`FROM`, the template, stop words and `sampling`, the
/// Chat page's settings), as `tunestudio export gguf` does. Returns the `.gguf` file.
pub fn export_gguf(
    run_dir: &Path,
    parent: &Path,
    quant: GgufQuant,
    sampling: SamplingParams,
    progress: Progress<'_>,
) -> crate::Result<PathBuf> {
    prepare_parent(parent)?;
    progress(0.02, "reading the run's adapter");
    let input = MergeInput::from_run(run_dir)?;
    // The run's own chat template goes into the file and the Modelfile (what it was trained with).
    let template = RunConfig::load(&run_dir.join(checkpoint::CONFIG_FILE)).map(|c| c.dataset.template).unwrap_or_else(|_| "auto".into());
    let name = run_name(run_dir);
    let folder = target_dir(parent, &format!("{name}-{}", quant.name()));
    std::fs::create_dir(&folder).map_err(|e| crate::Error::file(&folder, e))?;
    let dest = folder.join(format!("{name}-{}.gguf", quant.name()));
    let opts = GgufOptions { quant, template, sampling, name };
    let tensors = |done: usize, all: usize| {
        progress(0.05 + 0.9 * done as f32 / all.max(1) as f32, &format!("merging and writing tensor {done} of {all} ({})", quant.name()));
    };
    let summary = match crate::export::gguf::export_gguf(&input, &dest, &opts, &tensors) {
        Ok(s) => s,
        Err(e) => {
            // Nothing half-written stays behind: the folder was created for this export alone.
            let _ = std::fs::remove_dir_all(&folder);
            return Err(e);
        }
    };
    let warn = if summary.warnings.is_empty() { String::new() } else { format!("; {}", summary.warnings.join("; ")) };
    progress(
        1.0,
        &format!(
            "{} tensors, {} linears merged, {}, pre-tokenizer {}{warn}",
            summary.tensors,
            summary.merged_linears,
            crate::util::fmt_bytes(summary.bytes),
            summary.pre_tokenizer
        ),
    );
    Ok(summary.path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_dir_never_reuses_a_folder() {
        let d = tempfile::tempdir().unwrap();
        let a = target_dir(d.path(), "run-adapter");
        assert_eq!(a, d.path().join("run-adapter"));
        std::fs::create_dir(&a).unwrap();
        assert_eq!(target_dir(d.path(), "run-adapter"), d.path().join("run-adapter-2"));
    }
}
