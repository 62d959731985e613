//! Hyperparameters: one documented row per `RunConfig` field (labels and help from
//! `app::fields`), grouped as a person thinks about a run (LoRA, optimisation, schedule, sequence
//! and batch, memory, output). Problems are drawn next to the field that has them; the first one
//! is also why Start is disabled. The memory budget sits beside the fields it depends on.

use eframe::egui::{self, Ui};

use crate::config::{ByteSize, CheckpointPolicy, DeviceChoice, Quantization, RunConfig, ScheduleKind, Target};

use crate::app::fields::Problems;
use crate::app::msg::{Action, Pick};
use crate::app::state::AppState;
use crate::app::widgets::{self, Fmt, combo, drag_f64, drag_u64, drag_usize, field};

/// Below this width the groups stack in one column: two columns of half of it would cut the
/// budget bar and the path fields off at the right.
const TWO_COLUMNS_MIN_WIDTH: f32 = 1000.0;

/// The page, with `budget` drawn after every field it follows (the memory budget is another
/// panel: the caller composes it in, so this one does not import it).
pub fn ui(ui: &mut Ui, state: &mut AppState, actions: &mut Vec<Action>, budget: impl FnOnce(&mut Ui, &mut AppState, &mut Vec<Action>)) {
    let problems = state.problems();
    ui.heading("Hyperparameters");
    ui.add(egui::Label::new("Hover a name for what it does and its default. Invalid values are marked where they are.").wrap());
    ui.add_space(6.0);
    let two_columns = ui.available_width() >= TWO_COLUMNS_MIN_WIDTH;
    let epochs = crate::app::state::memory::epochs_of_step_limit(state);
    egui::ScrollArea::vertical().auto_shrink([false, false]).show(ui, |ui| {
        if two_columns {
            ui.columns(2, |cols| {
                let (left, right) = cols.split_at_mut(1);
                training_groups(&mut left[0], &problems, &mut state.config, epochs);
                resource_groups(&mut right[0], &problems, state, actions, budget);
            });
        } else {
            training_groups(ui, &problems, &mut state.config, epochs);
            resource_groups(ui, &problems, state, actions, budget);
        }
    });
}

/// What the run learns and how: LoRA, optimisation, schedule.
/// `epochs`: the passes the step limit makes, when known.
fn training_groups(ui: &mut Ui, problems: &Problems, c: &mut RunConfig, epochs: Option<f64>) {
    group(ui, "LoRA", "hp-lora", |ui| lora_fields(ui, problems, c));
    group(ui, "Optimisation", "hp-optim", |ui| optim_fields(ui, problems, c));
    group(ui, "Schedule", "hp-schedule", |ui| schedule_fields(ui, problems, c, epochs));
    group(ui, "Samples during training", "hp-samples", |ui| sample_fields(ui, problems, c));
}

fn sample_fields(ui: &mut Ui, p: &Problems, c: &mut RunConfig) {
    field(ui, p, "samples.every", |ui| {
        ui.add(
            drag_u64(&mut c.samples.every, 0.5)
                .custom_formatter(|v, _| if v == 0.0 { "off".into() } else { format!("{v} steps") })
                .custom_parser(|t| {
                    let t = t.trim().trim_end_matches("steps").trim();
                    if t.starts_with("off") { Some(0.0) } else { t.parse::<f64>().ok() }
                }),
        )
    });
    ui.end_row();
    let on = c.samples.every > 0;
    field(ui, p, "samples.prompts", |ui| {
        // One prompt per line; the lines are split as typed (an empty line is a problem shown
        // here, so Enter can start the next prompt).
        let mut text = c.samples.prompts.join("\n");
        let r = ui.add_enabled(
            on,
            egui::TextEdit::multiline(&mut text).desired_rows(2).desired_width(300.0).hint_text("empty: the first rows of the data"),
        );
        if r.changed() {
            c.samples.prompts = if text.is_empty() { Vec::new() } else { text.split('\n').map(str::to_string).collect() };
        }
        r
    });
    ui.end_row();
    field(ui, p, "samples.count", |ui| {
        ui.add_enabled(on && c.samples.prompts.is_empty(), drag_usize(&mut c.samples.count, 0.1).suffix(" rows"))
    });
    ui.end_row();
    field(ui, p, "samples.max_new_tokens", |ui| ui.add_enabled(on, drag_usize(&mut c.samples.max_new_tokens, 0.5).suffix(" tokens")));
    ui.end_row();
}

/// What it costs and where it goes: sequence and batch, memory with its budget, output.
fn resource_groups(
    ui: &mut Ui,
    problems: &Problems,
    state: &mut AppState,
    actions: &mut Vec<Action>,
    budget: impl FnOnce(&mut Ui, &mut AppState, &mut Vec<Action>),
) {
    group(ui, "Sequence and batch", "hp-batch", |ui| batch_fields(ui, problems, &mut state.config));
    group(ui, "Memory", "hp-memory", |ui| memory_fields(ui, problems, &mut state.config));
    // Drawn after every field it follows, so a dragged value shows in the same frame.
    ui.group(|ui| {
        ui.set_width(ui.available_width());
        ui.strong("Memory budget");
        budget(ui, state, actions);
    });
    ui.add_space(6.0);
    group(ui, "Output", "hp-output", |ui| output_fields(ui, problems, &mut state.config, actions));
}

fn group(ui: &mut Ui, title: &str, id: &str, body: impl FnOnce(&mut Ui)) {
    ui.group(|ui| {
        ui.set_width(ui.available_width());
        ui.strong(title);
        egui::Grid::new(id).num_columns(2).spacing([12.0, 6.0]).show(ui, body);
    });
    ui.add_space(6.0);
}

fn lora_fields(ui: &mut Ui, p: &Problems, c: &mut RunConfig) {
    field(ui, p, "lora.r", |ui| ui.add(drag_usize(&mut c.lora.r, 0.2)));
    ui.end_row();
    field(ui, p, "lora.alpha", |ui| ui.add(drag_f64(&mut c.lora.alpha, Fmt::Plain)));
    ui.end_row();
    field(ui, p, "lora.dropout", |ui| ui.add(drag_f64(&mut c.lora.dropout, Fmt::Plain).speed(0.005)));
    ui.end_row();
    field(ui, p, "lora.targets", |ui| {
        let mut resp: Option<egui::Response> = None;
        ui.horizontal_wrapped(|ui| {
            for t in Target::ALL {
                let mut on = c.lora.targets.contains(&t);
                let r = ui.checkbox(&mut on, t.short());
                if r.changed() {
                    if on {
                        c.lora.targets.push(t);
                        // Keep the canonical order so the saved TOML reads the same every time.
                        c.lora.targets.sort();
                    } else {
                        c.lora.targets.retain(|x| *x != t);
                    }
                }
                resp = Some(match resp.take() {
                    Some(acc) => acc.union(r),
                    None => r,
                });
            }
        });
        resp.unwrap_or_else(|| ui.label(""))
    });
    ui.end_row();
    field(ui, p, "lora.rslora", |ui| ui.checkbox(&mut c.lora.rslora, "α/√r"));
    ui.end_row();
    ui.label("");
    let scale = c.lora.scale();
    ui.weak(if scale.is_finite() { format!("adapter scale: {scale:.3}") } else { "adapter scale: –".into() });
    ui.end_row();
}

fn optim_fields(ui: &mut Ui, p: &Problems, c: &mut RunConfig) {
    field(ui, p, "optim.lr", |ui| ui.add(drag_f64(&mut c.optim.lr, Fmt::Sci)));
    ui.end_row();
    field(ui, p, "optim.beta1", |ui| ui.add(drag_f64(&mut c.optim.beta1, Fmt::Plain).speed(0.001)));
    ui.end_row();
    field(ui, p, "optim.beta2", |ui| ui.add(drag_f64(&mut c.optim.beta2, Fmt::Plain).speed(0.0001)));
    ui.end_row();
    field(ui, p, "optim.eps", |ui| ui.add(drag_f64(&mut c.optim.eps, Fmt::Sci)));
    ui.end_row();
    field(ui, p, "optim.weight_decay", |ui| ui.add(drag_f64(&mut c.optim.weight_decay, Fmt::Plain).speed(0.0005)));
    ui.end_row();
    field(ui, p, "optim.max_grad_norm", |ui| ui.add(drag_f64(&mut c.optim.max_grad_norm, Fmt::Plain).speed(0.01)));
    ui.end_row();
}

fn schedule_fields(ui: &mut Ui, p: &Problems, c: &mut RunConfig, epochs: Option<f64>) {
    field(ui, p, "schedule.kind", |ui| {
        combo(
            ui,
            "schedule.kind",
            &mut c.schedule.kind,
            &[(ScheduleKind::Linear, "linear"), (ScheduleKind::Cosine, "cosine"), (ScheduleKind::Constant, "constant")],
        )
    });
    ui.end_row();
    field(ui, p, "schedule.warmup_steps", |ui| ui.add(drag_u64(&mut c.schedule.warmup_steps, 0.2)));
    ui.end_row();
    field(ui, p, "schedule.warmup_ratio", |ui| ui.add(drag_f64(&mut c.schedule.warmup_ratio, Fmt::Plain).speed(0.005)));
    ui.end_row();
    field(ui, p, "train.max_steps", |ui| {
        let mut limited = c.train.max_steps.is_some();
        let r = ui.checkbox(&mut limited, "limit");
        if r.changed() {
            c.train.max_steps = if limited { Some(100) } else { None };
        }
        if let Some(s) = c.train.max_steps.as_mut() {
            return ui.add(drag_u64(s, 1.0).suffix(" steps"));
        }
        r
    });
    ui.end_row();
    field(ui, p, "train.epochs", |ui| match (c.train.max_steps, epochs) {
        (None, _) => ui.add(drag_f64(&mut c.train.epochs, Fmt::Plain).speed(0.05)),
        // The step limit decides: say how many passes it makes, not the unused setting.
        (Some(_), Some(e)) => ui.weak(format!("≈ {e:.1}, from the step limit")),
        (Some(_), None) => ui.weak("set by the step limit"),
    });
    ui.end_row();
    field(ui, p, "train.save_every", |ui| {
        // 0 is "off" on screen, not "every 0 steps"; typing "off" (or 0) turns it off.
        ui.add(
            drag_u64(&mut c.train.save_every, 0.5)
                .custom_formatter(|v, _| if v == 0.0 { "off (final adapter only)".into() } else { format!("{v} steps") })
                .custom_parser(|t| {
                    let t = t.trim().trim_end_matches("steps").trim();
                    if t.starts_with("off") { Some(0.0) } else { t.parse::<f64>().ok() }
                }),
        )
    });
    ui.end_row();
    // Evaluation needs rows to evaluate on (Dataset page): without them these do nothing.
    let evaluates = c.dataset.eval_split.is_some();
    field(ui, p, "train.eval_every", |ui| {
        ui.add_enabled(
            evaluates,
            drag_u64(&mut c.train.eval_every, 0.5)
                .custom_formatter(|v, _| if v == 0.0 { "auto (10 times a run)".into() } else { format!("{v} steps") })
                .custom_parser(|t| {
                    let t = t.trim().trim_end_matches("steps").trim();
                    if t.starts_with("auto") { Some(0.0) } else { t.parse::<f64>().ok() }
                }),
        )
        .on_disabled_hover_text("Choose evaluation rows on the Dataset page first.")
    });
    ui.end_row();
    field(ui, p, "train.keep_only_best", |ui| {
        ui.add_enabled(evaluates, egui::Checkbox::new(&mut c.train.keep_only_best, "and the newest, to resume from"))
            .on_disabled_hover_text("Choose evaluation rows on the Dataset page first.")
    });
    ui.end_row();
}

fn batch_fields(ui: &mut Ui, p: &Problems, c: &mut RunConfig) {
    field(ui, p, "train.max_seq_len", |ui| ui.add(drag_usize(&mut c.train.max_seq_len, 8.0).suffix(" tokens")));
    ui.end_row();
    field(ui, p, "train.batch_size", |ui| ui.add(drag_usize(&mut c.train.batch_size, 0.1)));
    ui.end_row();
    field(ui, p, "train.grad_accum", |ui| ui.add(drag_usize(&mut c.train.grad_accum, 0.1)));
    ui.end_row();
    ui.label("");
    ui.weak(format!("effective batch: {} sequences per step", c.train.batch_size * c.train.grad_accum));
    ui.end_row();
    field(ui, p, "train.seed", |ui| ui.add(drag_u64(&mut c.train.seed, 1.0)));
    ui.end_row();
}

fn memory_fields(ui: &mut Ui, p: &Problems, c: &mut RunConfig) {
    field(ui, p, "model.quantization", |ui| {
        combo(
            ui,
            "model.quantization",
            &mut c.model.quantization,
            &[(Quantization::Nf4, "NF4 (QLoRA)"), (Quantization::Bf16, "16-bit (LoRA)")],
        )
    });
    ui.end_row();
    field(ui, p, "memory.checkpointing", |ui| {
        combo(
            ui,
            "memory.checkpointing",
            &mut c.memory.checkpointing,
            &[
                (CheckpointPolicy::Auto, "auto"),
                (CheckpointPolicy::None, "none (keep all)"),
                (CheckpointPolicy::Layer, "layer"),
                (CheckpointPolicy::Offload, "offload to host"),
            ],
        )
    });
    ui.end_row();
    field(ui, p, "memory.gpu_mem", |ui| {
        let mut capped = c.memory.gpu_mem.is_some();
        let r = ui.checkbox(&mut capped, "cap");
        if r.changed() {
            c.memory.gpu_mem = capped.then_some(ByteSize(24 << 30));
        }
        if let Some(cap) = c.memory.gpu_mem.as_mut() {
            let mut gib = cap.bytes() as f64 / (1u64 << 30) as f64;
            let d = ui.add(egui::DragValue::new(&mut gib).speed(0.25).range(1.0..=1024.0).max_decimals(2).suffix(" GiB"));
            if d.changed() {
                *cap = ByteSize((gib * (1u64 << 30) as f64).round() as u64);
            }
            return d;
        }
        r
    });
    ui.end_row();
    field(ui, p, "train.device", |ui| {
        combo(
            ui,
            "train.device",
            &mut c.train.device,
            &[(DeviceChoice::Auto, "auto"), (DeviceChoice::Cpu, "CPU"), (DeviceChoice::Cuda, "CUDA GPU")],
        )
    });
    ui.end_row();
}

fn output_fields(ui: &mut Ui, p: &Problems, c: &mut RunConfig, actions: &mut Vec<Action>) {
    widgets::path_field(ui, p, "output.dir", &mut c.output.dir, Some(Action::Pick(Pick::OutputFolder)), actions);
    ui.end_row();
    field(ui, p, "output.run_name", |ui| {
        ui.add(egui::TextEdit::singleline(&mut c.output.run_name).hint_text("automatic").desired_width(240.0))
    });
    ui.end_row();
}
