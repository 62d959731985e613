//! The Dataset panel: the file, its record format (detected, or overridden with a column
//! mapping), the chat template, a preview of rendered examples with the trained span marked, a
//! token-length histogram against `max_seq_len`, and every skipped row with its reason.
//! `prepare_view` runs on a worker with the same code the session uses (`prepare_dataset`), so
//! what the preview shows is what training sees.

use std::path::PathBuf;

use eframe::egui::{self, Color32, RichText, Ui, text::LayoutJob};
use egui_plot::{Bar, BarChart, Legend, Plot, VLine};

use crate::config::{DatasetFormat, RunConfig, TrainOn};
use crate::data::encode::Encoder;
use crate::data::preflight::LengthStats;
use crate::data::{IGNORE_INDEX, LongRows, SkippedRow, format, prepare_dataset, read};

use super::widgets::{self, Fmt, Load, combo, drag_f64, field};
use super::{Action, AppState};

/// Rendered examples kept for the preview.
const PREVIEW_ROWS: usize = 12;
/// Records looked at for column names.
const COLUMN_SCAN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Prompt, system turn, template scaffolding: read, not learned.
    Prompt,
    /// Contributes to the loss.
    Trained,
    /// Past `max_seq_len`: cut off before training.
    Cut,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub text: String,
    pub kind: SpanKind,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    /// The row in the file (1-based, as an editor shows it).
    pub row: usize,
    pub tokens: usize,
    pub trained: usize,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatasetView {
    pub path: PathBuf,
    pub file_kind: String,
    pub format: DatasetFormat,
    pub template: String,
    pub mask: String,
    /// Column names of the first records, for the mapping menus.
    pub columns: Vec<String>,
    pub rows_total: usize,
    pub rows_used: usize,
    pub skipped: Vec<SkippedRow>,
    pub truncated_rows: usize,
    pub trained_tokens: usize,
    pub total_tokens: usize,
    pub max_seq_len: usize,
    /// Token counts per used row before truncation (the data module's statistics and histogram).
    pub lengths: LengthStats,
    pub previews: Vec<Preview>,
}

#[derive(Debug, Default)]
pub struct DatasetState {
    pub view: Load<DatasetView>,
    /// Which preview is shown.
    pub preview_index: usize,
}

/// Read and encode the dataset as training would, and render the first rows for the preview.
pub fn prepare_view(cfg: &RunConfig) -> crate::Result<DatasetView> {
    let tok = super::jobs::tokenizer(&cfg.model.path)?;
    let max = cfg.train.max_seq_len;
    let (_, records) = read::read_records(&cfg.dataset.path)?;
    let mut columns: Vec<String> = Vec::new();
    for r in records.iter().take(COLUMN_SCAN) {
        if let Ok(serde_json::Value::Object(m)) = &r.value {
            for k in m.keys() {
                if !columns.contains(k) {
                    columns.push(k.clone());
                }
            }
        }
    }
    let prepared = prepare_dataset(&cfg.dataset, &tok, max)?;
    let report = prepared.report;
    // Raw text renders no template (as in training), so a model whose template does not compile
    // still previews a text dataset.
    let template =
        if report.format == crate::config::DatasetFormat::Text { None } else { Some(tok.resolve_template(&cfg.dataset.template)?) };
    let encoder = Encoder { tok: &tok, template: template.as_ref(), train_on: cfg.dataset.train_on };
    let mut previews = Vec::new();
    for rec in &records {
        if previews.len() >= PREVIEW_ROWS {
            break;
        }
        let Ok(value) = &rec.value else { continue };
        let Ok(sample) = format::to_sample(report.format, &cfg.dataset.columns, value) else { continue };
        let Ok(enc) = encoder.encode(&sample, true) else { continue };
        let Some(text) = enc.text else { continue };
        let is_text = matches!(sample, format::Sample::Text(_));
        let crate::model::tokenizer::Encoded { ids, offsets } = tok.encode_with_offsets(&text, false)?;
        // Raw text gets BOS in front (and EOS behind) outside the text, so its body starts one
        // token later; every body token is trained.
        let (labels, keep) = if is_text {
            (ids.iter().map(|&t| t as i32).collect::<Vec<_>>(), max.saturating_sub(1))
        } else if ids.len() == enc.labels.len() {
            (enc.labels.clone(), max)
        } else {
            continue;
        };
        let trained = labels.iter().take(keep).skip(1).filter(|&&l| l != IGNORE_INDEX).count();
        previews.push(Preview { row: rec.row, tokens: enc.input_ids.len(), trained, segments: segments(&text, &offsets, &labels, keep) });
    }
    Ok(DatasetView {
        path: cfg.dataset.path.clone(),
        file_kind: report.file_kind.clone(),
        format: report.format,
        template: report.template.clone(),
        mask: format!("{:?}", report.mask),
        columns,
        rows_total: report.rows_total,
        rows_used: report.rows_used,
        skipped: report.rows_skipped.clone(),
        truncated_rows: report.truncated_rows,
        trained_tokens: report.trained_tokens,
        total_tokens: report.total_tokens,
        max_seq_len: report.max_seq_len,
        lengths: LengthStats::of(&report.lengths.iter().map(|l| l.original_tokens).collect::<Vec<_>>(), report.max_seq_len),
        previews,
    })
}

/// Split `text` into runs of prompt, trained and cut-off text from each token's byte range and
/// label. Tokens past `keep` are cut; bytes no token covers take the kind of the text before them.
pub fn segments(text: &str, offsets: &[(usize, usize)], labels: &[i32], keep: usize) -> Vec<Segment> {
    let n = text.len();
    let mut kind: Vec<Option<SpanKind>> = vec![None; n];
    for (i, &(a, b)) in offsets.iter().enumerate() {
        let k = if i >= keep {
            SpanKind::Cut
        } else if labels.get(i).is_some_and(|&l| l != IGNORE_INDEX) {
            SpanKind::Trained
        } else {
            SpanKind::Prompt
        };
        for slot in kind.iter_mut().take(b.min(n)).skip(a.min(n)) {
            *slot = Some(k);
        }
    }
    let mut out: Vec<Segment> = Vec::new();
    let mut last = SpanKind::Prompt;
    for (i, ch) in text.char_indices() {
        let k = kind[i].unwrap_or(last);
        last = k;
        match out.last_mut() {
            Some(s) if s.kind == k => s.text.push(ch),
            _ => out.push(Segment { text: ch.to_string(), kind: k }),
        }
    }
    out
}

/// The one-line summary above the preview.
pub fn summary(v: &DatasetView) -> String {
    let frac = if v.total_tokens == 0 { 0.0 } else { 100.0 * v.trained_tokens as f64 / v.total_tokens as f64 };
    format!(
        "{} {} rows: {} used, {} skipped, {} truncated to {} tokens · {} tokens, {} trained ({frac:.0}%) · per row: median {}, p95 {}, max {}",
        v.rows_total,
        v.file_kind,
        v.rows_used,
        v.skipped.len(),
        v.truncated_rows,
        v.max_seq_len,
        v.total_tokens,
        v.trained_tokens,
        v.lengths.p50,
        v.lengths.p95,
        v.lengths.max
    )
}

pub fn format_name(f: DatasetFormat) -> &'static str {
    match f {
        DatasetFormat::Auto => "auto",
        DatasetFormat::Alpaca => "Alpaca",
        DatasetFormat::Sharegpt => "ShareGPT",
        DatasetFormat::Messages => "messages (OpenAI)",
        DatasetFormat::Text => "raw text",
        DatasetFormat::Columns => "column mapping",
    }
}

pub fn ui(ui: &mut Ui, state: &mut AppState, actions: &mut Vec<Action>) {
    let problems = super::hyper::problem_map(state);
    ui.heading("Dataset");
    egui::ScrollArea::vertical().auto_shrink([false, false]).show(ui, |ui| {
        let view = state.dataset.view.ready().cloned();
        let detected = view.as_ref().map(|v| v.format);
        let columns = view.as_ref().map(|v| v.columns.clone()).unwrap_or_default();
        let templates = template_choices(state);
        let c = &mut state.config;
        egui::Grid::new("dataset-grid").num_columns(2).spacing([12.0, 6.0]).show(ui, |ui| {
            widgets::path_field(
                ui,
                &problems,
                "dataset.path",
                &mut c.dataset.path,
                Some(Action::Pick(super::jobs::Pick::DatasetFile)),
                actions,
            );
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
            Load::Failed(e) => widgets::error_box(ui, e),
            Load::Ready(v) => {
                let v = v.clone();
                report_ui(ui, &v, &mut state.dataset.preview_index);
            }
        }
    });
}

fn template_choices(state: &AppState) -> Vec<String> {
    let mut t = vec!["auto".to_string()];
    if let Some(info) = state.model.info.ready() {
        t.extend(info.named_templates.iter().cloned());
    }
    t.extend(["llama-3", "chatml", "alpaca", "mistral"].map(String::from));
    if !t.contains(&state.config.dataset.template) {
        t.push(state.config.dataset.template.clone());
    }
    t
}

fn column_fields(ui: &mut Ui, problems: &widgets::Problems, c: &mut RunConfig, columns: &[String]) {
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
    ui.label(summary(v));
    ui.weak(format!("template: {} · trained spans from: {}", v.template, v.mask));
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
                        ui.monospace(format!("row {}", s.row));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_follow_labels_and_cut() {
        // "ab cd ef": tokens "ab", " cd", " ef"; the second is trained, the third is past keep.
        let text = "ab cd ef";
        let offsets = [(0, 2), (2, 5), (5, 8)];
        let labels = [IGNORE_INDEX, 7, 8];
        let s = segments(text, &offsets, &labels, 2);
        let kinds: Vec<(&str, SpanKind)> = s.iter().map(|x| (x.text.as_str(), x.kind)).collect();
        assert_eq!(kinds, vec![("ab", SpanKind::Prompt), (" cd", SpanKind::Trained), (" ef", SpanKind::Cut)]);
    }

    #[test]
    fn segments_keep_multibyte_text_whole() {
        let text = "é→ok";
        let offsets = [(0, 2), (2, 5), (5, 7)];
        let labels = [IGNORE_INDEX, IGNORE_INDEX, 3];
        let s = segments(text, &offsets, &labels, 10);
        assert_eq!(s.iter().map(|x| x.text.as_str()).collect::<String>(), text);
        assert_eq!(s.last().unwrap().kind, SpanKind::Trained);
    }
}
