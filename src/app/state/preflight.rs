//! The preflight dialog's state, between pressing Start and the first step: `PreflightView`, the
//! studio's view of `crate::preflight::PreflightReport` (what will run, the tokenizer and data
//! checks, the untrained-token report with the fix to accept, the memory budget) plus what only
//! a window run needs to know. `check` gathers it on a worker; `verdict` and `untrained_lines`
//! are the view model the dialog (`panels::preflight`) draws.

use crate::config::{DeviceChoice, RunConfig};
use crate::data::preflight::{self as data_preflight, Marking};
use crate::model::ModelSpec;
use crate::session::checkpoint::STATUS_FILE;

use super::memory::{self as budget, BudgetView, Machine};
use crate::app::jobs::Load;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    /// Worth knowing; nothing is wrong.
    Info,
    Warn,
    /// The run cannot start until this is dealt with.
    Block,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub level: Level,
    pub text: String,
}

impl Check {
    fn new(level: Level, text: impl Into<String>) -> Self {
        Check { level, text: text.into() }
    }
}

/// A never-trained token that the data uses.
#[derive(Debug, Clone, PartialEq)]
pub struct UntrainedUse {
    pub id: u32,
    pub text: String,
    /// Examples that contain it.
    pub rows: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PreflightView {
    pub model: String,
    pub data: String,
    pub steps: String,
    pub device: String,
    pub checks: Vec<Check>,
    /// Untrained rows in the model (BOS/EOS/PAD excluded), whether used or not, with their text.
    pub untrained: Vec<(u32, String)>,
    pub untrained_used: Vec<UntrainedUse>,
    /// The memory plan on the device the run will use.
    pub budget: Option<BudgetView>,
    /// Why the CUDA engine cannot start on the card the run asked for (or `auto` found), with
    /// what to do: the dialog offers the CPU instead.
    pub cuda_refusal: Option<String>,
}

/// Untrained rows named in a line: the first dozen, then how many more.
fn name_rows(rows: &[(u32, String)]) -> String {
    const SHOWN: usize = 12;
    let mut names: Vec<String> = rows.iter().take(SHOWN).map(|(i, t)| format!("{i} {t}")).collect();
    if rows.len() > SHOWN {
        names.push(format!("and {} more", rows.len() - SHOWN));
    }
    names.join(", ")
}

/// What the dialog lets the person do.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Ready,
    /// The data uses untrained tokens and `dataset.fix_untrained_tokens` is off: accept the fix
    /// or go back and change the data.
    NeedsFix,
    /// The CUDA engine cannot start on this card: train on the CPU instead, or cancel.
    CpuOffered(String),
    Blocked(String),
}

pub fn verdict(r: &PreflightView, fix_enabled: bool) -> Verdict {
    if let Some(c) = r.checks.iter().find(|c| c.level == Level::Block) {
        return Verdict::Blocked(c.text.clone());
    }
    if let Some(why) = &r.cuda_refusal {
        return Verdict::CpuOffered(why.clone());
    }
    if !r.untrained_used.is_empty() && !fix_enabled {
        return Verdict::NeedsFix;
    }
    Verdict::Ready
}

/// The untrained-token section as lines of text (the dialog draws these; tests read them).
pub fn untrained_lines(r: &PreflightView, fix_enabled: bool) -> Vec<(Level, String)> {
    if r.untrained.is_empty() {
        return vec![(Level::Ok, "The model has no untrained token rows.".into())];
    }
    if r.untrained_used.is_empty() {
        return vec![(
            Level::Ok,
            format!(
                "{} token rows of the model were never trained (all zero): {}. The data does not use them, so they are left alone.",
                r.untrained.len(),
                name_rows(&r.untrained)
            ),
        )];
    }
    let names: Vec<String> = r.untrained_used.iter().map(|u| format!("{} {} (in {} rows)", u.id, u.text, u.rows)).collect();
    let mut out = vec![(
        Level::Warn,
        format!(
            "The data uses {} of the model's {} untrained token rows: {}. Their embeddings are zero, so the loss would become NaN or inf.",
            r.untrained_used.len(),
            r.untrained.len(),
            names.join(", ")
        ),
    )];
    out.push(if fix_enabled {
        (Level::Ok, "Fix on (dataset.fix_untrained_tokens): they start at the mean of the trained rows and are trained with the adapter.".into())
    } else {
        (
            Level::Block,
            "The fix is off (dataset.fix_untrained_tokens = false). Accept it to start these rows at the mean of the trained rows and train them, or remove the tokens from the data.".into(),
        )
    });
    out
}

/// Gather every fact the dialog shows. Runs on a worker. The facts are the CLI's
/// (`crate::preflight::PreflightReport`: the dataset prepared as the session will, its
/// statistics, the tokenizer checks, the untrained-token decision and the verdict); the studio
/// adds what only a window run needs to know (an occupied run name, the device, the memory
/// budget). `machine` is what the studio probed at start-up (probed here when it has not arrived).
pub fn check(cfg: &RunConfig, machine: Option<Machine>) -> crate::Result<PreflightView> {
    let machine = machine.unwrap_or_else(budget::probe_machine);
    let host = machine.host.clone();
    let core = crate::preflight::PreflightReport::build_for(cfg, Marking::Plain, None, Some(machine))?;
    let spec = ModelSpec::from_dir(&cfg.model.path)?;
    let tok = super::model::tokenizer(&cfg.model.path)?;
    let (ds, stats, found) = (&core.dataset, &core.stats, &core.untrained_tokens);
    let mut checks = Vec::new();

    if ds.template.starts_with("none") {
        checks.push(Check::new(Level::Ok, "Raw text: no chat template involved."));
    } else if tok.chat_template().is_some() {
        checks.push(Check::new(Level::Ok, format!("Rendered with {}.", crate::data::template_words(&ds.template))));
    } else {
        checks.push(Check::new(
            Level::Warn,
            format!(
                "The model ships no chat template; using {}. Chat with the result through the same template.",
                crate::data::template_words(&ds.template)
            ),
        ));
    }
    for f in &core.tokenizer_checks {
        let level = match f.level {
            data_preflight::Level::Info => Level::Info,
            data_preflight::Level::Warning => Level::Warn,
        };
        checks.push(Check::new(level, f.message.clone()));
    }
    if stats.truncated_rows > 0 {
        checks.push(Check::new(
            Level::Warn,
            format!("{} rows are longer than max_seq_len {} and are truncated.", stats.truncated_rows, ds.max_seq_len),
        ));
    }
    if ds.rows_skipped > 0 {
        checks.push(Check::new(Level::Warn, format!("{} rows are skipped (reasons in the Dataset panel).", ds.rows_skipped)));
    }
    // Reasons the run cannot start, but the untrained-token refusal and the device's: the dialog
    // offers the fix and the CPU for those.
    let refusal = found.refusal().map(|e| e.to_string());
    let cuda_refusal = core.device.refusal.clone();
    for reason in core.verdict.reasons.iter().filter(|r| Some(*r) != refusal.as_ref() && Some(*r) != cuda_refusal.as_ref()) {
        checks.push(Check::new(Level::Block, reason.clone()));
    }
    if !cfg.output.run_name.is_empty() && cfg.output.dir.join(&cfg.output.run_name).join(STATUS_FILE).exists() {
        checks.push(Check::new(
            Level::Block,
            format!(
                "output.run_name: {} already holds a run. Resume it from the Runs panel or pick another name.",
                cfg.output.dir.join(&cfg.output.run_name).display()
            ),
        ));
    }
    let device = device_line(&core.device);
    if !cfg.dataset.packing && stats.padding_fraction > 0.3 {
        checks.push(Check::new(
            Level::Info,
            format!(
                "{:.0}% of the tokens in a batch are padding; dataset.packing would spend that compute on data.",
                100.0 * stats.padding_fraction
            ),
        ));
    }

    // Held-out rows are not trained on: the epochs are over the rest.
    let held_out = matches!(cfg.dataset.eval_split, Some(crate::config::EvalSplit::Fraction(_)));
    let train_rows = if held_out { ds.rows_used.saturating_sub(ds.eval_rows) } else { ds.rows_used };
    if let Some(line) = many_epochs(core.total_steps, stats.steps_per_epoch as u64, train_rows, ds.eval_rows > 0) {
        checks.push(Check::new(Level::Warn, line));
    }

    // A token only the template writes counts as used in every row.
    let untrained_used: Vec<UntrainedUse> = found
        .tokens
        .iter()
        .filter(|t| t.used())
        .map(|t| UntrainedUse { id: t.id, text: t.text.clone(), rows: if t.in_template { ds.rows_used } else { t.data_rows } })
        .collect();
    // The report's plan target and token rows (`crate::prepare`), drawn as the budget panel does.
    let token_rows = crate::prepare::fixed_token_rows(found);
    let target = &core.plan.target;
    let b = budget::view(&spec, cfg, target, host.as_ref(), token_rows);
    if b.fits == Some(false) {
        let input = crate::prepare::plan_input(cfg, token_rows);
        let fixes: Vec<String> = crate::engine::plan::suggestions(&spec, &input, target).into_iter().map(|s| s.change).collect();
        let (line, _) = budget::verdict(&b);
        let advice = if fixes.is_empty() {
            "see the memory budget on the Hyperparameters page".to_string()
        } else {
            format!("to fit: {}", fixes.join("; or "))
        };
        checks.push(Check::new(Level::Warn, format!("{line}; {advice}.")));
    }

    Ok(PreflightView {
        model: spec.summary(),
        data: format!(
            "{} rows used of {} ({} skipped, {} truncated), {} trained tokens{}",
            ds.rows_used,
            ds.rows_total,
            ds.rows_skipped,
            stats.truncated_rows,
            stats.trained_tokens,
            match (ds.eval_rows, held_out) {
                (0, _) => String::new(),
                (n, true) => format!("; {n} of them held out to evaluate on"),
                (n, false) => format!("; {n} rows of the evaluation file to evaluate on"),
            }
        ),
        steps: format!(
            "{} optimizer steps ({} per epoch), {} sequences each, learning rate {:.2e}",
            core.total_steps,
            stats.steps_per_epoch.max(1),
            cfg.train.batch_size * cfg.train.grad_accum,
            cfg.optim.lr
        ),
        device,
        checks,
        untrained: found.tokens.iter().map(|t| (t.id, t.text.clone())).collect(),
        untrained_used,
        budget: Some(b),
        cuda_refusal,
    })
}

/// The dialog's Device row: the card or the CPU, then what chose it and its cap after middle
/// dots. The card's description has its parentheses and a reason may have its own, so wrapping
/// either in more read as "CPU (auto: no usable GPU (… (libcuda.so) …))".
pub fn device_line(d: &crate::device::DeviceCheck) -> String {
    if d.refusal.is_some() {
        return format!("{}: the CUDA engine cannot start on it", d.device);
    }
    let mut parts = vec![d.device.clone()];
    if d.requested == DeviceChoice::Auto {
        parts.push("train.device = auto".into());
    }
    if let Some(note) = &d.note {
        parts.push(note.clone());
    }
    if let (Some(c), Some("cuda")) = (d.memory_cap_bytes, d.trains_on.as_deref()) {
        parts.push(format!("capped at {}", crate::util::fmt_bytes(c)));
    }
    parts.join(" · ")
}

/// From this many passes over the data on, a run mostly learns its rows by heart.
const MANY_EPOCHS: f64 = 5.0;

/// The warning for a run that repeats a small dataset of `rows` training rows many times, or
/// `None`. With evaluation rows (`evaluates`) the evaluation loss will show the overfitting, so
/// the advice points at it rather than at holding rows out.
pub fn many_epochs(total_steps: u64, steps_per_epoch: u64, rows: usize, evaluates: bool) -> Option<String> {
    let epochs = total_steps as f64 / steps_per_epoch.max(1) as f64;
    (epochs >= MANY_EPOCHS).then(|| {
        let three = 3 * steps_per_epoch.max(1);
        if evaluates {
            format!(
                "{total_steps} steps are about {epochs:.0} epochs over {rows} rows: the model will learn these rows by heart. Watch \
                 the evaluation loss: when it rises while the training loss falls, the best checkpoint is the one to keep. About \
                 {three} steps make 3 epochs."
            )
        } else {
            format!(
                "{total_steps} steps are about {epochs:.0} epochs over {rows} rows: the model will learn these rows by heart, and the \
                 training loss falling toward 0 will not say how it does on anything else. About {three} steps make 3 epochs; or \
                 hold out rows (Evaluation rows on the Dataset page, dataset.eval_split) to see an evaluation loss."
            )
        }
    })
}

#[derive(Debug, Default)]
pub struct PreflightState {
    pub open: bool,
    pub key: u64,
    pub report: Load<PreflightView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn crafted(used: bool) -> PreflightView {
        PreflightView {
            model: "llama".into(),
            data: "10 rows".into(),
            steps: "5 steps".into(),
            device: "CPU".into(),
            checks: vec![Check::new(Level::Ok, "Chat template: model.")],
            untrained: (1579..1587).map(|i| (i, format!("<|reserved_special_token_{}|>", i - 1579))).collect(),
            untrained_used: if used {
                vec![UntrainedUse { id: 1390, text: "<|reserved_special_token_0|>".into(), rows: 3 }]
            } else {
                vec![]
            },
            budget: None,
            cuda_refusal: None,
        }
    }

    #[test]
    fn unused_untrained_rows_do_not_stop_a_run() {
        let r = crafted(false);
        assert_eq!(verdict(&r, false), Verdict::Ready);
        let l = untrained_lines(&r, false);
        assert!(l[0].1.contains("8 token rows") && l[0].1.contains("left alone"), "{l:?}");
        assert!(
            l[0].1.contains("1579 <|reserved_special_token_0|>, ") && l[0].1.contains("1586 <|reserved_special_token_7|>"),
            "each row is named: {l:?}"
        );
    }

    #[test]
    fn used_untrained_rows_need_the_fix() {
        let r = crafted(true);
        assert_eq!(verdict(&r, false), Verdict::NeedsFix);
        assert_eq!(verdict(&r, true), Verdict::Ready);
        let off = untrained_lines(&r, false);
        assert!(off[0].1.contains("1390 <|reserved_special_token_0|> (in 3 rows)"), "{off:?}");
        assert_eq!(off[1].0, Level::Block);
        let on = untrained_lines(&r, true);
        assert_eq!(on[1].0, Level::Ok);
        assert!(on[1].1.contains("mean of the trained rows"));
    }

    #[test]
    fn a_card_that_cannot_run_offers_the_cpu() {
        let mut r = crafted(false);
        r.cuda_refusal = Some("train.device is auto and found Tesla T4 (compute capability 7.5, 15 GiB), but ...".into());
        assert!(matches!(verdict(&r, false), Verdict::CpuOffered(w) if w.contains("Tesla T4")));
        r.checks.push(Check::new(Level::Block, "output.run_name: taken"));
        assert_eq!(verdict(&r, false), Verdict::Blocked("output.run_name: taken".into()), "what the CPU cannot fix comes first");
    }

    #[test]
    fn many_epochs_over_few_rows_are_warned_about() {
        // The run: 600 steps of 8 sequences over 95 rows.
        let w = many_epochs(600, 12, 95, false).unwrap();
        assert!(w.starts_with("600 steps are about 50 epochs over 95 rows") && w.contains("About 36 steps make 3 epochs"), "{w}");
        assert!(w.contains("dataset.eval_split"), "{w}");
        assert_eq!(many_epochs(60, 44, 350, false), None, "the demo's run: 1.4 epochs");
        assert!(many_epochs(220, 44, 350, false).is_some(), "5 epochs");
        let with_eval = many_epochs(600, 12, 85, true).unwrap();
        assert!(with_eval.contains("Watch the evaluation loss") && !with_eval.contains("hold out"), "{with_eval}");
    }

    /// The deepest nesting of parentheses in `s`.
    fn paren_depth(s: &str) -> usize {
        let (mut depth, mut max) = (0usize, 0usize);
        for c in s.chars() {
            match c {
                '(' => {
                    depth += 1;
                    max = max.max(depth);
                }
                ')' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        max
    }

    #[test]
    fn the_device_line_nests_no_parentheses() {
        let base = crate::device::DeviceCheck {
            requested: DeviceChoice::Auto,
            card_profile: None,
            memory_cap_bytes: None,
            trains_on: Some("cpu".into()),
            device: "CPU".into(),
            note: Some("no usable GPU: the CUDA driver is too old or incomplete for this build (CUDA 13 is required)".into()),
            refusal: None,
        };
        let cpu = device_line(&base);
        assert_eq!(
            cpu,
            "CPU · train.device = auto · no usable GPU: the CUDA driver is too old or incomplete for this build (CUDA 13 is required)"
        );
        let card = crate::device::DeviceCheck {
            trains_on: Some("cuda".into()),
            device: "NVIDIA H100 (compute capability 9.0, 80 GiB)".into(),
            note: None,
            memory_cap_bytes: Some(24 << 30),
            ..base.clone()
        };
        assert_eq!(device_line(&card), "NVIDIA H100 (compute capability 9.0, 80 GiB) · train.device = auto · capped at 24.00 GiB");
        let chosen = crate::device::DeviceCheck { requested: DeviceChoice::Cuda, memory_cap_bytes: None, ..card };
        assert_eq!(device_line(&chosen), "NVIDIA H100 (compute capability 9.0, 80 GiB)");
        for line in [cpu, device_line(&chosen)] {
            assert!(paren_depth(&line) <= 1, "{line}");
        }
    }

    #[test]
    fn a_blocking_check_wins() {
        let mut r = crafted(true);
        r.checks.push(Check::new(Level::Block, "output.run_name: taken"));
        assert_eq!(verdict(&r, true), Verdict::Blocked("output.run_name: taken".into()));
    }
}
