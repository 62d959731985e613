//! The Dataset panel: the file, its record format (detected, or overridden with a column
//! mapping), the chat template, a preview of rendered examples with the trained span marked, a
//! token-length histogram against `max_seq_len`, and every skipped row with its reason. It draws
//! the `DatasetView` a worker produced (`state::dataset::prepare_view`).

use eframe::egui::{self, Color32, RichText, Ui, text::LayoutJob};
use egui_plot::{Bar, BarChart, Legend, Plot, VLine};

use std::path::PathBuf;

use crate::config::{DatasetFormat, EvalSplit, LongRows, RunConfig, TrainOn};

use crate::app::fields::Problems;
use crate::app::jobs::Load;
use crate::app::msg::{Action, Pick};
use crate::app::state::AppState;
use crate::app::state::dataset::{DatasetView, Segment, SpanKind, format_name, held_out_problem, summary};
use crate::app::widgets::{self, Fmt, combo, drag_f64, field};

pub fn ui(ui: &mut Ui, state: &mut AppState, actions: &mut Vec<Action>) {
    let problems = state.problems();
    ui.heading("Dataset");
    egui::ScrollArea::vertical().auto_shrink([false, false]).show(ui, |ui| {
        let view = state.dataset.view.ready().cloned();
        let detected = view.as_ref().map(|v| v.format);
        let columns = view.as_ref().map(|v| v.columns.clone()).unwrap_or_default();
        let templates = template_choices(state);
        let c = &mut state.config;
        egui::Grid::new("dataset-grid").num_columns(2).spacing([12.0, 6.0]).show(ui, |ui| {
            widgets::path_field(ui, &problems, "dataset.path", &mut c.dataset.path, Some(Action::Pick(Pick::DatasetFile)), actions);
            ui.end_row();
            let auto = match detected {
                Some(f) if c.dataset.format == DatasetFormat::Auto => format!("auto (detected: {})", format_name(f)),
                _ => "auto".to_string(),
            };
            field(ui, &problems, "dataset.format", |ui| {
                combo(
                    ui,
                    "dataset.format",
                    &mut c.dataset.format,
                    &[
                        (DatasetFormat::Auto, auto.as_str()),
                        (DatasetFormat::Alpaca, "Alpaca"),
                        (DatasetFormat::Sharegpt, "ShareGPT"),
                        (DatasetFormat::Messages, "messages (OpenAI)"),
                        (DatasetFormat::Text, "raw text"),
                        (DatasetFormat::Columns, "column mapping"),
                    ],
                )
            });
            ui.end_row();
            if c.dataset.format == DatasetFormat::Columns {
                column_fields(ui, &problems, c, &columns);
            }
            field(ui, &problems, "dataset.template", |ui| {
                let r = egui::ComboBox::from_id_salt("dataset.template").selected_text(c.dataset.template.clone()).show_ui(ui, |ui| {
                    for t in &templates {
                        ui.selectable_value(&mut c.dataset.template, t.clone(), t);
                    }
                });
                r.response
            });
            ui.end_row();
            field(ui, &problems, "dataset.train_on", |ui| {
                combo(
                    ui,
                    "dataset.train_on",
                    &mut c.dataset.train_on,
                    &[(TrainOn::Responses, "responses only"), (TrainOn::All, "all tokens")],
                )
            });
            ui.end_row();
            field(ui, &problems, "dataset.packing", |ui| ui.checkbox(&mut c.dataset.packing, "pack examples"));
            ui.end_row();
            field(ui, &problems, "dataset.long_rows", |ui| {
                combo(ui, "dataset.long_rows", &mut c.dataset.long_rows, &[(LongRows::Truncate, "truncate"), (LongRows::Drop, "drop")])
            });
            ui.end_row();
            field(ui, &problems, "dataset.max_bad_fraction", |ui| {
                ui.add(drag_f64(&mut c.dataset.max_bad_fraction, Fmt::Plain).speed(0.005))
            });
            ui.end_row();
            field(ui, &problems, "dataset.eval_split", |ui| eval_split_ui(ui, &mut c.dataset.eval_split, actions));
            ui.end_row();
            field(ui, &problems, "dataset.fix_untrained_tokens", |ui| {
                ui.checkbox(&mut c.dataset.fix_untrained_tokens, "start them at the mean and train them")
            });
            ui.end_row();
        });
        ui.separator();
        match &state.dataset.view {
            Load::Empty => {
                ui.weak("Choose a model and a dataset file to see the preview.");
            }
            Load::Loading => {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label("Reading and tokenizing the dataset…");
                });
            }
            // The reason is at the field it belongs to, above: said once.
            Load::Failed(_) => {
                ui.weak("No preview: the dataset could not be read (the reason is at the Dataset file field).");
            }
            Load::Ready(v) => {
                let v = v.clone();
                report_ui(ui, &v, &mut state.dataset.preview_index);
            }
        }
    });
}

/// No evaluation, a fraction of the rows, or a file: the choice, then the value it needs.
fn eval_split_ui(ui: &mut Ui, split: &mut Option<EvalSplit>, actions: &mut Vec<Action>) -> egui::Response {
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        None,
        Fraction,
        File,
    }
    let kind = match split {
        None => Kind::None,
        Some(EvalSplit::Fraction(_)) => Kind::Fraction,
        Some(EvalSplit::File(_)) => Kind::File,
    };
    let mut chosen = kind;
    let mut r = combo(
        ui,
        "dataset.eval_split",
        &mut chosen,
        &[(Kind::None, "none"), (Kind::Fraction, "hold out a fraction"), (Kind::File, "a file of its own")],
    );
    if chosen != kind {
        *split = match chosen {
            Kind::None => None,
            // A tenth is the usual first choice; the field below changes it.
            Kind::Fraction => Some(EvalSplit::Fraction(0.1)),
            Kind::File => Some(EvalSplit::File(PathBuf::new())),
        };
    }
    match split {
        Some(EvalSplit::Fraction(f)) => {
            r = r.union(ui.add(drag_f64(f, Fmt::Plain).speed(0.005)));
            ui.weak("of the rows");
        }
        Some(EvalSplit::File(p)) => {
            let mut text = p.display().to_string();
            let t = ui.add(egui::TextEdit::singleline(&mut text).desired_width(240.0).hint_text("type a path or use Browse…"));
            if t.changed() {
                *p = PathBuf::from(text.trim());
            }
            r = r.union(t);
            if ui.button("Browse…").clicked() {
                actions.push(Action::Pick(Pick::EvalFile));
            }
        }
        None => {}
    }
    r
}

fn template_choices(state: &AppState) -> Vec<String> {
    let mut t = vec!["auto".to_string()];
    if let Some(info) = state.model.info.ready() {
        t.extend(info.named_templates.iter().cloned());
    }
    t.extend(crate::model::chat_template::BUILTIN_NAMES.map(String::from));
    if !t.contains(&state.config.dataset.template) {
        t.push(state.config.dataset.template.clone());
    }
    t
}

fn column_fields(ui: &mut Ui, problems: &Problems, c: &mut RunConfig, columns: &[String]) {
    field(ui, problems, "dataset.columns.prompt", |ui| {
        let mut acc: Option<egui::Response> = None;
        ui.horizontal_wrapped(|ui| {
            for col in columns {
                let mut on = c.dataset.columns.prompt.contains(col);
                let r = ui.checkbox(&mut on, col);
                if r.changed() {
                    if on {
                        c.dataset.columns.prompt.push(col.clone());
                    } else {
                        c.dataset.columns.prompt.retain(|x| x != col);
                    }
                }
                acc = Some(match acc.take() {
                    Some(a) => a.union(r),
                    None => r,
                });
            }
        });
        acc.unwrap_or_else(|| ui.weak("no columns found"))
    });
    ui.end_row();
    field(ui, problems, "dataset.columns.response", |ui| {
        let shown = if c.dataset.columns.response.is_empty() { "choose…".to_string() } else { c.dataset.columns.response.clone() };
        egui::ComboBox::from_id_salt("dataset.columns.response")
            .selected_text(shown)
            .show_ui(ui, |ui| {
                for col in columns {
                    ui.selectable_value(&mut c.dataset.columns.response, col.clone(), col);
                }
            })
            .response
    });
    ui.end_row();
    field(ui, problems, "dataset.columns.system", |ui| {
        let shown = c.dataset.columns.system.clone().unwrap_or_else(|| "none".into());
        egui::ComboBox::from_id_salt("dataset.columns.system")
            .selected_text(shown)
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut c.dataset.columns.system, None, "none");
                for col in columns {
                    ui.selectable_value(&mut c.dataset.columns.system, Some(col.clone()), col);
                }
            })
            .response
    });
    ui.end_row();
}

fn report_ui(ui: &mut Ui, v: &DatasetView, preview_index: &mut usize) {
    ui.add(egui::Label::new(summary(v)).wrap());
    if let Some(why) = held_out_problem(v) {
        widgets::warning_line(ui, &why);
    }
    ui.weak(format!("Rendered with {} · trained: {}", crate::data::template_words(&v.template), v.mask));
    ui.add_space(6.0);
    ui.columns(2, |cols| {
        cols[0].strong("Token lengths");
        histogram_plot(&mut cols[0], v);
        cols[1].strong(format!("Skipped rows ({})", v.skipped.len()));
        if v.skipped.is_empty() {
            widgets::ok_line(&mut cols[1], "every row is usable");
        } else {
            egui::ScrollArea::vertical().id_salt("skipped").max_height(200.0).show(&mut cols[1], |ui| {
                egui::Grid::new("skipped-grid").num_columns(2).striped(true).show(ui, |ui| {
                    for s in &v.skipped {
                        ui.monospace(s.place(&v.file_kind));
                        ui.add(egui::Label::new(&s.reason).wrap());
                        ui.end_row();
                    }
                });
            });
        }
    });
    ui.add_space(6.0);
    ui.horizontal(|ui| {
        ui.strong("Preview");
        if v.previews.is_empty() {
            ui.weak("no row could be rendered");
            return;
        }
        *preview_index = (*preview_index).min(v.previews.len() - 1);
        if ui.add_enabled(*preview_index > 0, egui::Button::new("◀")).on_hover_text("previous example").clicked() {
            *preview_index -= 1;
        }
        let p = &v.previews[*preview_index];
        ui.label(format!("row {} · {} tokens, {} trained", p.row, p.tokens, p.trained));
        if ui.add_enabled(*preview_index + 1 < v.previews.len(), egui::Button::new("▶")).on_hover_text("next example").clicked() {
            *preview_index += 1;
        }
    });
    if let Some(p) = v.previews.get(*preview_index) {
        legend(ui);
        egui::Frame::group(ui.style()).show(ui, |ui| {
            ui.set_width(ui.available_width());
            ui.add(egui::Label::new(preview_job(ui, &p.segments)).wrap());
        });
    }
}

fn legend(ui: &mut Ui) {
    ui.horizontal(|ui| {
        let (t, c) = span_colors(ui);
        ui.label(RichText::new(" trained (in the loss) ").background_color(t));
        ui.label(RichText::new(" prompt (read, not learned) ").weak());
        ui.label(RichText::new(" cut (past max sequence length) ").strikethrough().color(c));
    });
}

fn span_colors(ui: &Ui) -> (Color32, Color32) {
    if ui.visuals().dark_mode {
        (Color32::from_rgb(30, 80, 45), Color32::from_rgb(220, 110, 100))
    } else {
        (Color32::from_rgb(190, 235, 195), Color32::from_rgb(180, 40, 30))
    }
}

fn preview_job(ui: &Ui, segments: &[Segment]) -> LayoutJob {
    let mut job = LayoutJob::default();
    let font = egui::TextStyle::Monospace.resolve(ui.style());
    let (trained_bg, cut_fg) = span_colors(ui);
    for s in segments {
        let mut fmt = egui::TextFormat { font_id: font.clone(), color: ui.visuals().weak_text_color(), ..Default::default() };
        match s.kind {
            SpanKind::Prompt => {}
            SpanKind::Trained => {
                fmt.color = ui.visuals().strong_text_color();
                fmt.background = trained_bg;
            }
            SpanKind::Cut => {
                fmt.color = cut_fg;
                fmt.strikethrough = egui::Stroke::new(1.0, cut_fg);
            }
        }
        job.append(&s.text, 0.0, fmt);
    }
    job
}

fn histogram_plot(ui: &mut Ui, v: &DatasetView) {
    let h = &v.lengths.histogram;
    let width = h.width as f64;
    let bars: Vec<Bar> =
        h.counts.iter().enumerate().map(|(i, &n)| Bar::new((i as f64 + 0.5) * width, n as f64).width(width * 0.95)).collect();
    let max_len = v.max_seq_len as f64;
    Plot::new("length-histogram")
        .height(200.0)
        .allow_scroll(false)
        .allow_zoom(false)
        .allow_drag(false)
        .x_axis_label("tokens per row")
        .y_axis_label("rows")
        .legend(Legend::default())
        .show(ui, |p| {
            p.bar_chart(BarChart::new("rows", bars));
            p.vline(VLine::new(format!("max_seq_len = {}", v.max_seq_len), max_len).color(Color32::from_rgb(230, 120, 60)).width(2.0));
        });
}
