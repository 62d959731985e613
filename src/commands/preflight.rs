//! `tunestudio preflight`: the preflight report (`crate::preflight`) as text or one JSON object.
//! The exit status is an error only when the run cannot start.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::Path;

use serde::Serialize;

use crate::RunConfig;
use crate::backend::card::CardProfile;
use crate::data::preflight::{LengthStats, Level, Marking};
use crate::error::{Error, Result};
use crate::preflight::{PreflightReport, Readiness};
use crate::prepare::TokenAction;

/// Longest rendered example printed in full (characters); the JSON keeps every one whole.
const EXAMPLE_CHARS: usize = 3000;

pub fn run(config: &Path, card: Option<&'static CardProfile>, as_json: bool) -> Result<()> {
    let cfg = RunConfig::load(config)?;
    let colour = !as_json && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let report = PreflightReport::build_for(&cfg, if colour { Marking::Ansi } else { Marking::Plain }, card, None)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    } else {
        print!("{}", render(config, &report, colour));
    }
    match report.verdict.status {
        Readiness::CannotStart => Err(Error::op("preflight", format!("cannot start: {}", report.verdict.reasons.join("; ")))),
        Readiness::Ready | Readiness::ReadyWithFixes => Ok(()),
    }
}

/// A serde enum's name as the config and the JSON spell it (`alpaca`, `rendered_prefixes`).
fn name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|j| j.as_str().map(str::to_string)).unwrap_or_default()
}

fn pct(f: f64) -> String {
    format!("{:.1}%", 100.0 * f)
}

/// One character per histogram bucket (`·` for none), with `|` after the bucket that holds
/// `max_seq_len`.
fn sparkline(s: &LengthStats, max_seq_len: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let h = &s.histogram;
    let mark = max_seq_len / h.width;
    let top = h.counts.iter().copied().max().unwrap_or(0).max(1);
    let mut out = String::new();
    for i in 0..h.counts.len().max(mark + 1) {
        let c = h.counts.get(i).copied().unwrap_or(0);
        out.push(if c == 0 { '·' } else { BARS[(c * BARS.len()).div_ceil(top).clamp(1, BARS.len()) - 1] });
        if i == mark {
            out.push('|');
        }
    }
    out
}

/// Where the run would train: the card (and under which profile or cap), the CPU and why, or why
/// the CUDA engine cannot start.
fn device_line(d: &crate::device::DeviceCheck) -> String {
    let asked = format!("train.device = {}", name(&d.requested));
    let mut extra = vec![asked];
    if let Some(p) = &d.card_profile {
        extra.push(format!("as --card {p}"));
    }
    if let Some(cap) = d.memory_cap_bytes {
        extra.push(format!("capped at {}", crate::util::fmt_bytes(cap)));
    }
    match (&d.refusal, &d.note) {
        (Some(why), _) => format!("CANNOT START: {why}"),
        (None, Some(note)) => format!("{} ({}; {note})", d.device, extra.join(", ")),
        (None, None) => format!("{} ({})", d.device, extra.join(", ")),
    }
}

/// The plan's peak against what its target leaves us, and the verdict (`tunestudio plan` has the
/// terms and the changes that fit).
fn memory_line(p: &crate::engine::plan::MemoryPlan) -> String {
    use crate::util::fmt_bytes;
    let t = &p.target;
    let room = t.available_bytes().map_or_else(|| "an unknown amount".to_string(), fmt_bytes);
    let verdict = match (p.fits, p.host_fits) {
        (true, _) => "fits",
        (false, false) => "does not fit: its pinned host memory exceeds the RAM available (see `tunestudio plan`)",
        (false, true) => "does not fit (see `tunestudio plan` for changes that do)",
    };
    format!("{} planned of {room} left on {} (checkpointing {:?}): {verdict}", fmt_bytes(p.peak_bytes), t.name, p.checkpointing)
}

fn render(config: &Path, r: &PreflightReport, colour: bool) -> String {
    let mut o = String::new();
    let d = &r.dataset;
    let st = &r.stats;
    let _ = writeln!(o, "preflight  {}", config.display());
    let _ = writeln!(o, "model      {}", r.model.display());
    let _ = writeln!(o, "device     {}", device_line(&r.device));
    let _ = writeln!(o, "memory     {}", memory_line(&r.plan));
    let _ = writeln!(o);

    let _ = writeln!(o, "dataset    {} ({})", d.path.display(), d.file_kind);
    let _ = writeln!(o, "format     {} ({})", name(&d.format), if d.format_overridden { "set by dataset.format" } else { "detected" });
    let _ = writeln!(
        o,
        "template   {}; trains on {}{}",
        crate::data::template_words(&d.template),
        d.mask.words(),
        if d.packing { "; packed" } else { "" }
    );
    let _ = writeln!(
        o,
        "rows       {} used, {} skipped of {} (refused above {} = dataset.max_bad_fraction)",
        d.rows_used,
        d.rows_skipped,
        d.rows_total,
        pct(d.max_bad_fraction)
    );
    for s in &d.skipped {
        let _ = writeln!(o, "  {}: {}", s.place(&d.file_kind), s.reason);
    }
    if d.rows_skipped > d.skipped.len() {
        let _ = writeln!(o, "  … and {} more skipped rows", d.rows_skipped - d.skipped.len());
    }

    let _ =
        writeln!(o, "lengths    tokens per example, one character per bucket, `|` after the bucket holding max_seq_len {}", d.max_seq_len);
    for (label, s) in [("prompt", &st.prompt), ("response", &st.response), ("total", &st.total)] {
        let _ = writeln!(
            o,
            "  {label:<9} min {:>5}  p50 {:>5}  p95 {:>5}  max {:>5}  ({:>3}/bucket) {}",
            s.min,
            s.p50,
            s.p95,
            s.max,
            s.histogram.width,
            sparkline(s, d.max_seq_len)
        );
    }
    let _ = writeln!(o, "  (prompt and response after truncation, total before)");
    let _ = writeln!(o, "truncated  {} rows ({}) longer than max_seq_len {}", st.truncated_rows, pct(st.truncated_fraction), d.max_seq_len);
    let _ = writeln!(
        o,
        "tokens     {} trained of {} ({}); padding is {} of the batched tokens",
        st.trained_tokens,
        st.total_tokens,
        pct(st.trained_fraction),
        pct(st.padding_fraction)
    );
    let _ = writeln!(
        o,
        "steps      {} per epoch ({} sequences in {} micro-batches); this run makes {}",
        st.steps_per_epoch, st.rows_per_epoch, st.micro_batches_per_epoch, r.total_steps
    );
    let _ = writeln!(o);

    let _ = writeln!(o, "examples   {}", if colour { "trained text in green" } else { "trained text in [[ ]]" });
    for ex in &r.examples {
        let _ = writeln!(o, "  row {} ({} tokens, {} trained):", ex.row, ex.tokens, ex.trained);
        let mut text: String = ex.text.chars().take(EXAMPLE_CHARS).collect();
        let cut = ex.text.chars().count().saturating_sub(EXAMPLE_CHARS);
        if cut > 0 {
            if colour {
                text.push_str("\x1b[0m");
            }
            text.push_str(&format!(" … ({cut} more characters)"));
        }
        for line in text.lines() {
            let _ = writeln!(o, "{}", format!("    {line}").trim_end());
        }
    }
    let _ = writeln!(o);

    if r.tokenizer_checks.is_empty() {
        let _ = writeln!(o, "tokenizer  no findings");
    } else {
        let _ = writeln!(o, "tokenizer");
        for f in &r.tokenizer_checks {
            let level = match f.level {
                Level::Info => "note",
                Level::Warning => "WARNING",
            };
            let _ = writeln!(o, "  {level:<8} {} [{}]", f.message, f.code);
        }
    }
    let _ = writeln!(o);

    let u = &r.untrained_tokens;
    if u.tokens.is_empty() {
        let _ = writeln!(
            o,
            "untrained  none (no rows all ≤ {:e} or shared by several tokens in {}, BOS/EOS/PAD aside)",
            u.eps,
            u.matrices.join(" and ")
        );
    } else {
        let _ = writeln!(
            o,
            "untrained  {} token rows in {}, zero (all ≤ {:e}) or one shared vector (identical rows), BOS/EOS/PAD excluded:",
            u.tokens.len(),
            u.matrices.join(" and "),
            u.eps
        );
        for t in &u.tokens {
            let mut place = Vec::new();
            if t.data_rows > 0 {
                place.push(format!("in {} examples (first at row {})", t.data_rows, t.first_row.unwrap_or(0)));
            }
            if t.in_template {
                place.push("in the chat template".to_string());
            }
            let place = if place.is_empty() { "unused".to_string() } else { format!("USED {}", place.join(", ")) };
            let _ = writeln!(o, "  {:>8}  {:<32} {:<14} {place}", t.id, t.text, t.kind.words());
        }
        let unused = u.tokens.len() - u.used_ids.len();
        if unused > 0 {
            let _ = writeln!(o, "  → {unused} unused: left alone");
        }
        match u.action {
            TokenAction::Fix => {
                let _ = writeln!(
                    o,
                    "  → {} used: fixed; each starts at the mean of the trained rows of {} and is trained with the adapter (PEFT trainable tokens)",
                    u.used_ids.len(),
                    u.fix_trains.join(" and ")
                );
            }
            TokenAction::Refuse => {
                let _ = writeln!(o, "  → {} used, and dataset.fix_untrained_tokens = false: the run refuses to start", u.used_ids.len());
            }
            TokenAction::None | TokenAction::LeaveAlone => {}
        }
    }
    let _ = writeln!(o);

    let v = &r.verdict;
    let warnings = match v.warnings {
        0 => String::new(),
        1 => " (1 tokenizer warning above)".to_string(),
        n => format!(" ({n} tokenizer warnings above)"),
    };
    match v.status {
        Readiness::Ready => {
            let _ = writeln!(o, "verdict    ready{warnings}");
        }
        Readiness::ReadyWithFixes => {
            let _ = writeln!(o, "verdict    ready with fixes{warnings}: {}", v.fixes.join("; "));
        }
        Readiness::CannotStart => {
            let _ = writeln!(o, "verdict    cannot start: {}", v.reasons.join("; "));
        }
    }
    o
}
