//! The training monitor: progress with ETA, loss (raw and smoothed), learning rate, gradient
//! norm, throughput and memory as plots, the GPU's telemetry beside the loss (utilization, memory
//! ours and others', temperature, power, SM clock) with throttle warnings, the session's log, and
//! the run's failure when there is one. It draws `state::training`'s view model.

use eframe::egui::{self, Color32, RichText, Ui};
use egui_plot::{HLine, Legend, Line, MarkerShape, Plot, PlotPoints, Points};

use crate::session::LoadedInfo;
use crate::session::checkpoint::StepMetrics;
use crate::util::fmt_bytes;

use crate::app::msg::Action;
use crate::app::state::AppState;
use crate::app::state::training::{GpuCurves, Phase, curves, gpu_curves, memory_axis, memory_lines, progress, throttling_now};
use crate::app::widgets;

/// The evaluation loss, in the loss plot and the best's label.
const EVAL_COLOR: Color32 = Color32::from_rgb(230, 120, 40);

fn small_plot(ui: &mut Ui, id: &str, title: &str, points: Vec<[f64; 2]>, color: Color32, hlines: &[(&str, f64, Color32)], width: f32) {
    ui.vertical(|ui| {
        ui.set_width(width);
        ui.small(title);
        if !hlines.is_empty() {
            // Several lines: a key above the plot says which is which. An in-plot legend covered
            // the measured curve in a plot this small (seen in a real window under Xvfb).
            ui.horizontal_wrapped(|ui| {
                ui.spacing_mut().item_spacing.x = 8.0;
                ui.small(RichText::new("— measured").color(color));
                for (name, _, c) in hlines {
                    ui.small(RichText::new(format!("— {name}")).color(*c));
                }
            });
        }
        let plot =
            widgets::value_y_axis(widgets::count_x_axis(Plot::new(id), "")).height(120.0).width(width).allow_scroll(false).show_x(true);
        plot.show(ui, |p| {
            p.line(Line::new(title, PlotPoints::from(points)).color(color));
            for (name, y, c) in hlines {
                p.hline(HLine::new(*name, *y).color(*c));
            }
        });
    });
}

/// One GPU telemetry plot: a title, its lines (name, points, colour) and reference lines, against
/// seconds into the run.
fn gpu_plot(ui: &mut Ui, id: &str, title: &str, lines: Vec<(&str, Vec<[f64; 2]>, Color32)>, refs: &[(&str, f64)], width: f32, height: f32) {
    ui.small(title);
    widgets::value_y_axis(widgets::count_x_axis(Plot::new(id), "")).height(height).width(width).allow_scroll(false).show_x(true).show(
        ui,
        |p| {
            for (name, points, color) in lines {
                p.line(Line::new(name, PlotPoints::from(points)).color(color));
            }
            for (name, y) in refs {
                p.hline(HLine::new(*name, *y).color(Color32::GRAY));
            }
        },
    );
}

/// Utilization, memory (ours and other processes'), temperature and power, and the SM clock.
fn gpu_column(ui: &mut Ui, g: &GpuCurves, width: f32, height: f32) {
    let h = ((height - 4.0 * 22.0) / 4.0).max(40.0);
    let util = Color32::from_rgb(90, 180, 110);
    gpu_plot(ui, "gpu-util", "GPU utilization (%)", vec![("utilization", g.utilization_pct.clone(), util)], &[("100%", 100.0)], width, h);
    let total: Vec<(&str, f64)> = g.memory_total_gib.map(|t| ("card", t)).into_iter().collect();
    gpu_plot(
        ui,
        "gpu-mem",
        "GPU memory (GiB): ours, other processes",
        vec![
            ("ours", g.memory_ours.clone(), Color32::from_rgb(160, 110, 200)),
            ("other processes", g.memory_others.clone(), Color32::from_gray(140)),
        ],
        &total,
        width,
        h,
    );
    gpu_plot(
        ui,
        "gpu-heat",
        "Temperature (°C) and power (W)",
        vec![("°C", g.temperature_c.clone(), Color32::from_rgb(230, 120, 90)), ("W", g.power_w.clone(), Color32::from_rgb(220, 160, 60))],
        &g.power_limit_w.map(|w| ("power limit", w)).into_iter().collect::<Vec<_>>(),
        width,
        h,
    );
    gpu_plot(
        ui,
        "gpu-clock",
        "SM clock (MHz)",
        vec![("SM clock", g.sm_clock_mhz.clone(), Color32::from_rgb(120, 190, 200))],
        &g.sm_clock_max_mhz.map(|m| ("top clock", m)).into_iter().collect::<Vec<_>>(),
        width,
        h,
    );
}

pub fn ui(ui: &mut Ui, state: &mut AppState, actions: &mut Vec<Action>) {
    let t = &mut state.training;
    ui.horizontal(|ui| {
        ui.heading("Training");
        if let Some(v) = &t.viewing {
            ui.label(RichText::new(format!("viewing {} ({})", v.name, v.status)).strong());
            if ui.button("Back to the live run").clicked() {
                actions.push(Action::BackToLive);
            }
        } else {
            ui.label(RichText::new(t.phase.label()).strong());
            if let Some(d) = t.run_dir() {
                ui.weak(d.display().to_string());
                // Paused or ended, the run answers as of its newest checkpoint.
                let chat_ready = matches!(t.phase, Phase::Paused | Phase::Done | Phase::Stopped) && t.last_checkpoint.is_some();
                if chat_ready && ui.button("Chat with it").on_hover_text("try the model as of its newest checkpoint").clicked() {
                    actions.push(Action::ChatWith(d.to_path_buf()));
                }
            }
        }
    });
    let (metrics, loaded): (&[StepMetrics], Option<&LoadedInfo>) = match &t.viewing {
        Some(v) => (&v.metrics, None),
        None => (&t.metrics, t.loaded.as_deref()),
    };
    if t.viewing.is_none() {
        if let Some(f) = &t.failure {
            widgets::error_box(ui, &f.message);
            if let (Some(dir), Some(_)) = (&f.run_dir, &f.last_checkpoint)
                && ui.button("Resume from the last checkpoint").clicked()
            {
                actions.push(Action::ResumeRun(dir.clone()));
            }
        }
        if t.phase == Phase::Idle {
            ui.label("Press Start (Ctrl+Enter) to check the run and begin training; its curves appear here.");
        }
        if t.phase == Phase::Loading {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label(t.log.back().cloned().unwrap_or_default());
            });
        }
    }
    let total_steps = loaded.map(|l| l.total_steps).or(t.viewing.as_ref().map(|v| v.total_steps));
    let p = progress(metrics, total_steps, if t.viewing.is_some() { Phase::Done } else { t.phase });
    ui.add(egui::ProgressBar::new(p.fraction).text(p.text).desired_height(18.0));
    ui.add_space(4.0);

    let log_height = 130.0;
    // The samples of the run shown: the live one's, or the past one's from its samples.jsonl.
    let shown_samples = t.viewing.as_ref().map_or(&t.samples, |v| &v.samples);
    let samples_height = if shown_samples.is_empty() { 0.0 } else { 160.0 };
    // The live run's GPU, beside the loss (a past run's telemetry is not kept).
    let gpu = if t.viewing.is_none() { t.gpu.as_slice() } else { &[] };
    for w in t.gpu_warnings.iter().filter(|_| !gpu.is_empty()) {
        widgets::warning_line(ui, w);
    }
    if metrics.is_empty() {
        // No axes around nothing: the plots appear with the first step.
        ui.add_space(8.0);
        ui.weak("The loss, learning rate, gradient norm, throughput and memory are plotted here from the first step on.");
        ui.add_space(8.0);
    } else {
        let c = curves(metrics, t.smoothing);
        let (mem_title, mem_total) = memory_axis(loaded);
        let plan = if t.viewing.is_none() { t.plan.as_ref() } else { None };
        let plan_height = if plan.is_some() { 30.0 } else { 0.0 };
        let avail = ui.available_height() - 120.0 - log_height - 70.0 - plan_height - samples_height;
        let best = c.best_eval.map(|[step, loss]| {
            let dir = match &t.viewing {
                Some(v) => Some(v.dir.as_path()),
                None => t.run_dir(),
            };
            let hover = match dir.map(|d| crate::session::checkpoint::step_dir(d, step as u64)) {
                Some(k) => format!("Its checkpoint is kept, a PEFT adapter you can export: {}", k.display()),
                None => "Its checkpoint is kept.".into(),
            };
            (format!("best eval loss {loss:.4} at step {step}"), hover)
        });
        ui.horizontal(|ui| {
            ui.strong("Loss");
            ui.add(egui::Slider::new(&mut t.smoothing, 0.0..=0.99).text("smoothing"));
            if let Some((text, hover)) = best {
                ui.label(RichText::new(text).color(EVAL_COLOR)).on_hover_text(hover);
            }
            if let Some(now) = throttling_now(gpu) {
                ui.label(RichText::new(format!("GPU {now}")).color(ui.visuals().warn_fg_color));
            }
        });
        let loss_height = avail.max(140.0);
        let eval_empty = c.eval_loss.is_empty();
        let loss_plot = |ui: &mut Ui, width: f32| {
            widgets::value_y_axis(widgets::count_x_axis(Plot::new("loss"), "step"))
                .height(loss_height)
                .width(width)
                .legend(Legend::default())
                .allow_scroll(false)
                .show(ui, |pl| {
                    pl.line(Line::new("loss", PlotPoints::from(c.loss.clone())).color(Color32::from_rgba_unmultiplied(100, 150, 220, 110)));
                    pl.line(
                        Line::new("smoothed", PlotPoints::from(c.loss_smooth.clone())).color(Color32::from_rgb(60, 140, 240)).width(2.5),
                    );
                    if !eval_empty {
                        // Few points (one per evaluation): a line through markers, so a single one shows.
                        pl.line(Line::new("eval loss", PlotPoints::from(c.eval_loss.clone())).color(EVAL_COLOR).width(2.0));
                        pl.points(Points::new("eval loss", PlotPoints::from(c.eval_loss.clone())).color(EVAL_COLOR).radius(3.5));
                    }
                    if let Some(b) = c.best_eval {
                        pl.points(
                            Points::new("best eval", PlotPoints::from(vec![b]))
                                .color(EVAL_COLOR)
                                .shape(MarkerShape::Diamond)
                                .radius(7.0)
                                .filled(false),
                        );
                    }
                });
        };
        if gpu.is_empty() {
            loss_plot(ui, ui.available_width());
        } else {
            let g = gpu_curves(gpu);
            ui.horizontal_top(|ui| {
                let gap = ui.spacing().item_spacing.x;
                let side = (ui.available_width() * 0.34).clamp(160.0, 420.0);
                loss_plot(ui, ui.available_width() - side - gap);
                ui.vertical(|ui| gpu_column(ui, &g, side, loss_height));
            });
        }
        let w = ((ui.available_width() - 3.0 * ui.spacing().item_spacing.x) / 4.0).max(80.0);
        ui.horizontal(|ui| {
            small_plot(ui, "lr", "Learning rate", c.lr, Color32::from_rgb(220, 160, 60), &[], w);
            small_plot(ui, "grad-norm", "Gradient norm", c.grad_norm, Color32::from_rgb(200, 90, 90), &[], w);
            small_plot(ui, "tok-s", "Tokens / s", c.tokens_per_s, Color32::from_rgb(90, 180, 110), &[], w);
            small_plot(
                ui,
                "memory",
                &format!("{mem_title} (GiB)"),
                c.memory,
                Color32::from_rgb(160, 110, 200),
                &memory_lines(mem_total, plan),
                w,
            );
        });
        if let Some(p) = plan {
            // The plan's bar with the newest measurement on the same scale.
            let measured = metrics.last().and_then(|m| m.memory_bytes);
            ui.horizontal(|ui| {
                ui.strong("Memory");
                ui.label(format!(
                    "plan {}{}",
                    fmt_bytes(p.peak_bytes),
                    measured.map(|m| format!(" · measured {}", fmt_bytes(m))).unwrap_or_default()
                ))
                .on_hover_text(if p.on_gpu {
                    "Measured: used on the card, from the driver (other processes included)."
                } else {
                    "Measured: the process's resident memory, which also holds the mapped model file, the tokenizer and this window."
                });
                widgets::memory_bar(ui, p, measured);
            });
        }
    }
    if samples_height > 0.0 {
        let view = match &mut t.viewing {
            Some(v) => &mut v.samples,
            None => &mut t.samples,
        };
        samples(ui, view, samples_height);
    }
    // A past run shows its own log; the live one stays with the live run.
    let log: Vec<&String> = match &t.viewing {
        Some(v) => v.log.iter().collect(),
        None => t.log.iter().collect(),
    };
    // The header's id must not follow its text: the scroll area's id (and with it the offset
    // that keeps the newest line in view) hangs below it, and the count changes every step.
    egui::CollapsingHeader::new(format!("Log ({} lines)", log.len())).id_salt("log-header").default_open(true).show(ui, |ui| {
        egui::ScrollArea::vertical().id_salt("log").max_height(log_height).stick_to_bottom(true).auto_shrink([false, true]).show(
            ui,
            |ui| {
                for line in log {
                    ui.monospace(line);
                }
            },
        );
    });
}

/// The sample prompts' answers: one row per prompt at the chosen step (the newest by default),
/// with a step picker to read the earlier ones.
fn samples(ui: &mut Ui, t: &mut crate::app::state::training::SamplesView, height: f32) {
    let steps = t.steps();
    egui::CollapsingHeader::new("Samples").id_salt("samples-header").default_open(true).show(ui, |ui| {
        ui.horizontal(|ui| {
            ui.label("Answers at step");
            let shown = t.step.map_or_else(|| format!("{} (newest)", steps.last().copied().unwrap_or(0)), |s| s.to_string());
            egui::ComboBox::from_id_salt("sample-step").selected_text(shown).show_ui(ui, |ui| {
                ui.selectable_value(&mut t.step, None, "newest");
                for &s in steps.iter().rev() {
                    ui.selectable_value(&mut t.step, Some(s), s.to_string());
                }
            });
            ui.weak("greedy answers of the weights being trained; every one is in samples.jsonl in the run folder");
            if let Some(secs) = t.last_secs {
                ui.weak(format!("· answered in {secs:.1} s, not counted in the elapsed time or the ETA"));
            }
        });
        egui::ScrollArea::vertical().id_salt("samples").max_height(height - 40.0).auto_shrink([false, true]).show(ui, |ui| {
            for r in t.rows() {
                // One line per prompt, so the answers stay in view: a dataset row's prompt is the
                // whole rendered conversation (its template's markers read as noise); in full on hover.
                ui.horizontal(|ui| {
                    ui.strong(format!("step {}", r.step));
                    ui.add(egui::Label::new(RichText::new(r.prompt_line()).italics()).truncate()).on_hover_text(r.prompt.trim());
                });
                ui.label(if r.completion.is_empty() { "(empty answer)".to_string() } else { r.completion.clone() });
                ui.separator();
            }
        });
    });
}
