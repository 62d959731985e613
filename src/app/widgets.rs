//! Small pieces every panel uses: a config field row (label with its tooltip, the widget tied to
//! the label for screen readers and tests, the problem marked in place), path fields and message
//! boxes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use eframe::egui::{self, Color32, RichText, Stroke, Ui};

use super::Action;
use super::hyper;

/// Something a worker is producing.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Load<T> {
    #[default]
    Empty,
    Loading,
    Ready(T),
    Failed(String),
}

impl<T> Load<T> {
    pub fn ready(&self) -> Option<&T> {
        match self {
            Load::Ready(v) => Some(v),
            _ => None,
        }
    }

    pub fn is_loading(&self) -> bool {
        matches!(self, Load::Loading)
    }
}

/// Problems by dotted field name (`lora.r`), as `RunConfig::problems` names them.
pub type Problems = BTreeMap<String, Vec<String>>;

/// One row of a two-column grid: the field's label (tooltip: what it does and its default) and
/// the widget `add` draws. A field with a problem gets a red outline and the message beside it.
pub fn field(ui: &mut Ui, problems: &Problems, key: &str, add: impl FnOnce(&mut Ui) -> egui::Response) -> egui::Response {
    let doc = hyper::doc(key);
    let tip = hyper::tooltip(key);
    let label = ui.label(doc.label).on_hover_text(&tip);
    let msgs = problems.get(key);
    let inner = ui.horizontal(|ui| {
        if msgs.is_some() {
            let red = ui.visuals().error_fg_color;
            let w = &mut ui.visuals_mut().widgets;
            for v in [&mut w.inactive, &mut w.hovered, &mut w.active] {
                v.bg_stroke = Stroke::new(1.5, red);
            }
        }
        let r = add(ui).labelled_by(label.id).on_hover_text(&tip);
        if let Some(msgs) = msgs {
            let red = ui.visuals().error_fg_color;
            ui.add(egui::Label::new(RichText::new(format!("⚠ {}", msgs.join("; "))).color(red)).wrap());
        }
        r
    });
    inner.inner
}

/// A number field: integers step by `speed`; floats show `fmt` and accept any float typed in.
/// No clamping: an out-of-range value stays visible and is marked, rather than silently fixed.
pub fn drag_usize(value: &mut usize, speed: f64) -> egui::DragValue<'_> {
    egui::DragValue::new(value).speed(speed)
}

pub fn drag_u64(value: &mut u64, speed: f64) -> egui::DragValue<'_> {
    egui::DragValue::new(value).speed(speed)
}

#[derive(Debug, Clone, Copy)]
pub enum Fmt {
    /// Up to 4 decimals.
    Plain,
    /// `2.00e-4`, for learning rates and epsilons that span decades.
    Sci,
}

pub fn drag_f64(value: &mut f64, fmt: Fmt) -> egui::DragValue<'_> {
    // Dragging moves by about 1% of the value, so a learning rate and a beta both feel right.
    let speed = (value.abs() * 0.01).max(1e-6);
    let d = egui::DragValue::new(value).speed(speed).custom_parser(|s| s.trim().parse::<f64>().ok());
    match fmt {
        Fmt::Plain => d.max_decimals(4),
        Fmt::Sci => d.custom_formatter(|v, _| format!("{v:.2e}")),
    }
}

/// A drop-down over the values of a config enum.
pub fn combo<T: PartialEq + Copy>(ui: &mut Ui, id: &str, value: &mut T, options: &[(T, &str)]) -> egui::Response {
    let current = options.iter().find(|(v, _)| v == value).map(|(_, l)| *l).unwrap_or("?");
    let r = egui::ComboBox::from_id_salt(id).selected_text(current).show_ui(ui, |ui| {
        for (v, l) in options {
            ui.selectable_value(value, *v, *l);
        }
    });
    r.response
}

/// A text field bound to a path, with a "Browse…" button that opens a chooser on a worker.
pub fn path_field(ui: &mut Ui, problems: &Problems, key: &str, path: &mut PathBuf, browse: Option<Action>, actions: &mut Vec<Action>) {
    field(ui, problems, key, |ui| {
        let mut text = path.display().to_string();
        let r = ui.add(egui::TextEdit::singleline(&mut text).desired_width(path_width(ui)).hint_text("type a path or use Browse…"));
        if r.changed() {
            *path = PathBuf::from(text.trim());
        }
        if let Some(a) = browse
            && ui.button("Browse…").clicked()
        {
            actions.push(a);
        }
        r
    });
}

/// Wide enough for a real path, leaving room for the buttons beside it in narrow columns.
fn path_width(ui: &Ui) -> f32 {
    (ui.available_width() - 150.0).clamp(160.0, 460.0)
}

/// A path that may be absent (an adapter to continue from): empty text means none.
pub fn optional_path_field(
    ui: &mut Ui,
    problems: &Problems,
    key: &str,
    path: &mut Option<PathBuf>,
    browse: Action,
    actions: &mut Vec<Action>,
) {
    field(ui, problems, key, |ui| {
        let mut text = path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let r = ui.add(egui::TextEdit::singleline(&mut text).desired_width(path_width(ui)).hint_text("none"));
        if r.changed() {
            *path = if text.trim().is_empty() { None } else { Some(PathBuf::from(text.trim())) };
        }
        if ui.button("Browse…").clicked() {
            actions.push(browse);
        }
        if path.is_some() && ui.button("Clear").clicked() {
            *path = None;
        }
        r
    });
}

/// A framed red message: a failure the person must read (wrapped, selectable for copying).
pub fn error_box(ui: &mut Ui, text: &str) {
    let red = ui.visuals().error_fg_color;
    egui::Frame::group(ui.style()).stroke(Stroke::new(1.0, red)).show(ui, |ui| {
        ui.add(egui::Label::new(RichText::new(text).color(red)).wrap().selectable(true));
    });
}

pub fn warning_line(ui: &mut Ui, text: &str) {
    let c = ui.visuals().warn_fg_color;
    ui.add(egui::Label::new(RichText::new(format!("⚠ {text}")).color(c)).wrap());
}

pub fn ok_line(ui: &mut Ui, text: &str) {
    ui.add(egui::Label::new(RichText::new(format!("✔ {text}")).color(ok_color(ui))).wrap());
}

/// Green that reads on both themes.
pub fn ok_color(ui: &Ui) -> Color32 {
    if ui.visuals().dark_mode { Color32::from_rgb(110, 200, 120) } else { Color32::from_rgb(30, 130, 50) }
}
