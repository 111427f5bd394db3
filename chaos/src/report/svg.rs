//! The timeline picture of a run: one dot per operation at (invoke time, latency) in a lane per
//! workload, the faults as shaded bands behind them and as labelled bars in a strip on top, the
//! cluster's elections and failovers as vertical lines. A storage engineer should see at a glance
//! when the cluster stalled, what was being done to it then, and how fast it came back.
//!
//! Written by hand as a self-contained SVG string (no fonts, scripts or stylesheets from
//! elsewhere), and [`html_page`] puts it in a page with a table of key figures. Pure: strings
//! out; the caller writes the files.
//!
//! Output is bounded: `ok` dots are thinned to one per 2-pixel square of the plot (a
//! hidden dot under another adds nothing), so 200,000 operations stay well under a few MB;
//! `fail` and `info` dots are all kept (only exact duplicates in position are merged) and drawn
//! on top, since they are what a reader looks for.

use std::collections::HashSet;
use std::fmt::{self, Write};

use crate::history::{Fault, Mark, MarkKind, Nanos, Op, Outcome, Timeline, Workload};
use crate::report::stats::fault_stop;

const WIDTH_PX: f64 = 1400.0;
/// Room on the left for the latency tick labels and the lane names.
const PLOT_LEFT_PX: f64 = 92.0;
const PLOT_RIGHT_PX: f64 = WIDTH_PX - 28.0;
const PANEL_HEIGHT_PX: f64 = 150.0;
/// Above each lane: its name and counts.
const PANEL_HEADER_PX: f64 = 22.0;
const FAULT_ROW_PX: f64 = 17.0;
const FAULT_BAR_PX: f64 = 13.0;
/// Past these, further labels are dropped (the bar or line stays, with a tooltip): a picture
/// whose top is all labels shows nothing.
const FAULT_ROWS_MAX: usize = 8;
const MARK_ROW_PX: f64 = 13.0;
const MARK_ROWS_MAX: usize = 6;
const FAULT_LABEL_CHARS_MAX: usize = 60;
const MARK_LABEL_CHARS_MAX: usize = 48;
/// Horizontal space kept between two labels in one row.
const LABEL_GAP_PX: f64 = 8.0;

/// The latency axis (log scale): from well under a local round trip to past any client timeout.
const LATENCY_MS_MIN: f64 = 0.1;
const LATENCY_MS_MAX: f64 = 60_000.0;
const LATENCY_TICKS_MS: [(f64, &str); 5] =
    [(1.0, "1 ms"), (10.0, "10 ms"), (100.0, "100 ms"), (1e3, "1 s"), (1e4, "10 s")];

/// `ok` dots are kept one per square of this side (they are drawn as squares that size).
const OK_CELL_PX: f64 = 2.0;
const OUTCOME_DOT_RADIUS_PX: f64 = 2.6;

const COLOR_OK: &str = "#3a6fb0";
const COLOR_FAIL: &str = "#d62728";
const COLOR_INFO: &str = "#ff8c00";
const COLOR_ELECTION: &str = "#7b2cbf";
const COLOR_FAILOVER: &str = "#00796b";
const COLOR_PHASE: &str = "#888888";
const COLOR_TEXT: &str = "#222222";
const COLOR_MUTED: &str = "#666666";
const COLOR_GRID: &str = "#e4e4e4";
/// Fault kinds, in order of first appearance. None is red, orange or the dots' blue, nor the
/// marks' violet and teal, so a band never reads as an outcome or an event.
const FAULT_PALETTE: [&str; 8] =
    ["#e6b800", "#e377c2", "#8c564b", "#2ca02c", "#17becf", "#bcbd22", "#9e9ac8", "#7f7f7f"];

/// A white outline under text, so a line or dot crossing a label does not make it unreadable.
const HALO: &str = "stroke=\"#ffffff\" stroke-width=\"3\" stroke-linejoin=\"round\" paint-order=\"stroke\"";
const FONT_PX: f64 = 11.0;
/// Average advance of a sans-serif glyph per pixel of font size, to place labels without a
/// font: a little generous, so estimated widths rarely fall short.
const CHAR_WIDTH_EM: f64 = 0.6;

/// The whole picture of a run. `title` and `subtitle` (seed, transport, nodes, verdict) go at
/// the top; all text is escaped.
pub fn timeline_svg(t: &Timeline, title: &str, subtitle: &str) -> String {
    let end_ns = run_end(t);
    let x = XScale { end_ns };
    let kinds = fault_kinds(&t.faults);
    let marks = marks_to_draw(t);
    let lanes: Vec<Workload> = Workload::ALL.into_iter().filter(|w| t.ops.iter().any(|op| op.workload == *w)).collect();

    let mut out = String::new();
    // Vertical layout, top to bottom: title, legend, fault strip, mark labels, lanes, x axis.
    let legend = legend_items(&kinds);
    let legend_top = 62.0;
    let legend_rows = layout_legend(&legend);
    let legend_bottom = legend_top + legend_rows.len() as f64 * 18.0;
    let fault_top = legend_bottom + 14.0;
    let fault_rows = place_faults(t, &x);
    let fault_row_count = fault_rows.iter().map(|f| f.row + 1).max().unwrap_or(0);
    let fault_bottom = fault_top + fault_row_count.max(1) as f64 * FAULT_ROW_PX;
    let mark_top = fault_bottom + 8.0;
    let mark_labels = place_marks(&marks, &x);
    let mark_row_count = mark_labels.iter().filter_map(|m| m.row).map(|r| r + 1).max().unwrap_or(0);
    let lanes_top = mark_top + mark_row_count as f64 * MARK_ROW_PX + 4.0;
    let lane_count = lanes.len().max(1);
    let lane_top = |i: usize| lanes_top + i as f64 * (PANEL_HEADER_PX + PANEL_HEIGHT_PX) + PANEL_HEADER_PX;
    let lanes_bottom = lane_top(lane_count - 1) + PANEL_HEIGHT_PX;
    let height = lanes_bottom + 46.0;

    put(
        &mut out,
        format_args!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
             font-family=\"sans-serif\" font-size=\"{FONT_PX}\" fill=\"{COLOR_TEXT}\">\n",
            w = WIDTH_PX,
            h = height
        ),
    );
    put(&mut out, format_args!("<title>{}</title>\n", escape(title)));
    put(&mut out, format_args!("<rect width=\"{WIDTH_PX}\" height=\"{height}\" fill=\"#ffffff\"/>\n"));
    put(
        &mut out,
        format_args!(
            "<text x=\"{PLOT_LEFT_PX}\" y=\"26\" font-size=\"18\" font-weight=\"bold\">{}</text>\n",
            escape(title)
        ),
    );
    put(
        &mut out,
        format_args!(
            "<text x=\"{PLOT_LEFT_PX}\" y=\"46\" font-size=\"12\" fill=\"{COLOR_MUTED}\">{}</text>\n",
            escape(subtitle)
        ),
    );
    draw_legend(&mut out, &legend, &legend_rows, legend_top);

    // Lane backgrounds, then the fault bands over all of them, behind everything else.
    for i in 0..lane_count {
        put(
            &mut out,
            format_args!(
                "<rect x=\"{PLOT_LEFT_PX}\" y=\"{}\" width=\"{}\" height=\"{PANEL_HEIGHT_PX}\" fill=\"#fbfbfb\" \
                 stroke=\"#cccccc\"/>\n",
                lane_top(i),
                PLOT_RIGHT_PX - PLOT_LEFT_PX
            ),
        );
    }
    // One group per kind, translucent as a whole: faults of one kind that overlap do not
    // darken each other, so only as many layers stack as there are kinds.
    out.push_str("<g class=\"fault-bands\">\n");
    for kind in &kinds {
        put(&mut out, format_args!("<g opacity=\"0.17\" fill=\"{}\">\n", kind_color(&kinds, kind)));
        for f in t.faults.iter().filter(|f| &f.kind == kind) {
            let (x0, x1) = (x.at(f.start), x.at(fault_stop(t, f.start, f.stop)));
            put(
                &mut out,
                format_args!(
                    "<rect class=\"band\" x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\"><title>{}</title></rect>\n",
                    lane_top(0),
                    (x1 - x0).max(1.5),
                    lanes_bottom - lane_top(0),
                    escape(&fault_label(f))
                ),
            );
        }
        out.push_str("</g>\n");
    }
    out.push_str("</g>\n");

    draw_grid(&mut out, &x, (0..lane_count).map(lane_top), lanes_bottom);

    for (i, w) in lanes.iter().enumerate() {
        draw_ok_dots(&mut out, t, *w, &x, lane_top(i));
    }
    draw_mark_lines(&mut out, &marks, &mark_labels, &x, mark_top, lanes_bottom);
    // Info under fail: a fail is the firmer statement and should never be hidden by an info.
    for (i, w) in lanes.iter().enumerate() {
        draw_outcome_dots(&mut out, t, *w, Outcome::Info, &x, lane_top(i));
        draw_outcome_dots(&mut out, t, *w, Outcome::Fail, &x, lane_top(i));
    }

    draw_fault_strip(&mut out, t, &kinds, &fault_rows, fault_top);
    draw_mark_labels(&mut out, &marks, &mark_labels, mark_top);

    for (i, w) in lanes.iter().enumerate() {
        draw_lane_header(&mut out, t, *w, lane_top(i));
    }
    if lanes.is_empty() {
        put(
            &mut out,
            format_args!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"{COLOR_MUTED}\">no operations</text>\n",
                (PLOT_LEFT_PX + PLOT_RIGHT_PX) / 2.0,
                lane_top(0) + PANEL_HEIGHT_PX / 2.0
            ),
        );
    }
    draw_x_axis(&mut out, &x, lanes_bottom);
    out.push_str("</svg>\n");
    out
}

/// A self-contained page: the title, a table of key figures (see
/// [`crate::report::stats::Figures::summary_rows`]), then the picture, inline.
pub fn html_page(svg: &str, title: &str, summary_rows: &[(String, String)]) -> String {
    let mut out = String::new();
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    put(&mut out, format_args!("<title>{}</title>\n", escape(title)));
    out.push_str(
        "<style>\nbody { font-family: sans-serif; margin: 16px 24px; color: #222; }\n\
         h1 { font-size: 20px; margin: 0 0 10px; }\n\
         table { border-collapse: collapse; margin: 0 0 16px; font-size: 13px; }\n\
         th, td { padding: 3px 12px 3px 0; border-bottom: 1px solid #e0e0e0; text-align: left; vertical-align: top; }\n\
         th { color: #555; font-weight: normal; white-space: nowrap; }\n\
         .picture { overflow-x: auto; }\n</style>\n</head>\n<body>\n",
    );
    put(&mut out, format_args!("<h1>{}</h1>\n<table>\n", escape(title)));
    for (what, value) in summary_rows {
        put(&mut out, format_args!("<tr><th>{}</th><td>{}</td></tr>\n", escape(what), escape(value)));
    }
    out.push_str("</table>\n<div class=\"picture\">\n");
    out.push_str(svg);
    out.push_str("</div>\n</body>\n</html>\n");
    out
}

/// Appends formatted text; writing to a `String` cannot fail.
fn put(out: &mut String, args: fmt::Arguments) {
    out.write_fmt(args).expect("writing to a String cannot fail");
}

/// Escapes text for XML content and attribute values alike.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0 at all.
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn truncate(s: &str, chars_max: usize) -> String {
    if s.chars().count() <= chars_max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(chars_max - 1).collect();
        t.push('…');
        t
    }
}

fn text_width_px(s: &str, font_px: f64) -> f64 {
    s.chars().count() as f64 * font_px * CHAR_WIDTH_EM
}

/// The time axis runs to the run's end, or further if a record says something happened later.
fn run_end(t: &Timeline) -> Nanos {
    let ops = t.ops.iter().map(|op| op.invoke).max().unwrap_or(0);
    let faults = t.faults.iter().map(|f| fault_stop(t, f.start, f.stop)).max().unwrap_or(0);
    let marks = t.marks.iter().map(|m| m.time).max().unwrap_or(0);
    t.end.max(t.heal).max(ops).max(faults).max(marks).max(1)
}

struct XScale {
    end_ns: Nanos,
}

impl XScale {
    fn at(&self, ns: Nanos) -> f64 {
        let f = (ns as f64 / self.end_ns as f64).clamp(0.0, 1.0);
        PLOT_LEFT_PX + f * (PLOT_RIGHT_PX - PLOT_LEFT_PX)
    }
}

/// The height in a lane of a latency, log scale, clamped to the axis.
fn latency_y(lane_top: f64, latency_ns: Nanos) -> f64 {
    let ms = (latency_ns as f64 / 1e6).clamp(LATENCY_MS_MIN, LATENCY_MS_MAX);
    let f = (ms.log10() - LATENCY_MS_MIN.log10()) / (LATENCY_MS_MAX.log10() - LATENCY_MS_MIN.log10());
    lane_top + PANEL_HEIGHT_PX * (1.0 - f)
}

fn fault_kinds(faults: &[Fault]) -> Vec<String> {
    let mut kinds: Vec<String> = Vec::new();
    for f in faults {
        if !kinds.contains(&f.kind) {
            kinds.push(f.kind.clone());
        }
    }
    kinds
}

fn kind_color(kinds: &[String], kind: &str) -> &'static str {
    let i = kinds.iter().position(|k| k == kind).unwrap_or(0);
    FAULT_PALETTE[i % FAULT_PALETTE.len()]
}

fn fault_label(f: &Fault) -> String {
    if f.target.is_empty() {
        f.kind.clone()
    } else {
        format!("{} · {}", f.kind, f.target)
    }
}

/// The marks as recorded; a record without phase marks still gets its phase lines, from the
/// timeline's own `faults_start` and `heal`, since the split is what the figures are about.
fn marks_to_draw(t: &Timeline) -> Vec<Mark> {
    let mut marks = t.marks.clone();
    if !marks.iter().any(|m| m.kind == MarkKind::Phase) && t.heal > 0 {
        marks.push(Mark { time: t.faults_start, kind: MarkKind::Phase, label: "faults begin".into() });
        marks.push(Mark { time: t.heal, kind: MarkKind::Phase, label: "heal".into() });
    }
    marks.sort_by_key(|m| m.time);
    marks
}

fn mark_color(kind: MarkKind) -> &'static str {
    match kind {
        MarkKind::Election => COLOR_ELECTION,
        MarkKind::Failover => COLOR_FAILOVER,
        MarkKind::Phase => COLOR_PHASE,
    }
}

/// Assigns each interval (in pixels) the first row where it clears what is already there, or
/// `None` when all `rows_max` rows are taken at that spot.
fn pack_rows(intervals: &[(f64, f64)], rows_max: usize) -> Vec<Option<usize>> {
    let mut order: Vec<usize> = (0..intervals.len()).collect();
    order.sort_by(|&a, &b| intervals[a].0.total_cmp(&intervals[b].0));
    let mut row_ends: Vec<f64> = Vec::new();
    let mut rows = vec![None; intervals.len()];
    for i in order {
        let (start, end) = intervals[i];
        let row = match row_ends.iter().position(|&e| e + LABEL_GAP_PX <= start) {
            Some(r) => Some(r),
            None if row_ends.len() < rows_max => {
                row_ends.push(f64::NEG_INFINITY);
                Some(row_ends.len() - 1)
            }
            None => None,
        };
        if let Some(r) = row {
            row_ends[r] = end;
        }
        rows[i] = row;
    }
    rows
}

/// Where a fault's bar goes in the strip, and whether its label fits there.
struct FaultPlace {
    row: usize,
    x0: f64,
    x1: f64,
    /// Where the label starts, and which way it runs (`false`: ends there, at the right edge).
    label: Option<(f64, bool)>,
}

fn place_faults(t: &Timeline, x: &XScale) -> Vec<FaultPlace> {
    let mut spans = Vec::new();
    let mut occupied = Vec::new();
    for f in &t.faults {
        let x0 = x.at(f.start);
        let x1 = x.at(fault_stop(t, f.start, f.stop)).max(x0 + 2.0);
        let w = text_width_px(&truncate(&fault_label(f), FAULT_LABEL_CHARS_MAX), FONT_PX - 0.5);
        // The label starts in the bar; near the right edge it ends there instead.
        let (label_x, forward) = if x0 + 3.0 + w <= PLOT_RIGHT_PX { (x0 + 3.0, true) } else { (x1 - 3.0, false) };
        let (l0, l1) = if forward { (label_x, label_x + w) } else { (label_x - w, label_x) };
        spans.push((x0, x1, label_x, forward));
        occupied.push((x0.min(l0), x1.max(l1)));
    }
    let rows = pack_rows(&occupied, FAULT_ROWS_MAX);
    // Faults that found no row with room for a label share one more row, as thin bars.
    spans
        .into_iter()
        .zip(rows)
        .map(|((x0, x1, label_x, forward), row)| match row {
            Some(row) => FaultPlace { row, x0, x1, label: Some((label_x, forward)) },
            None => FaultPlace { row: FAULT_ROWS_MAX, x0, x1, label: None },
        })
        .collect()
}

fn draw_fault_strip(out: &mut String, t: &Timeline, kinds: &[String], places: &[FaultPlace], top: f64) {
    put(
        out,
        format_args!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-weight=\"bold\" fill=\"{COLOR_MUTED}\">faults</text>\n",
            PLOT_LEFT_PX - 8.0,
            top + FAULT_BAR_PX - 2.0
        ),
    );
    if t.faults.is_empty() {
        put(
            out,
            format_args!(
                "<text x=\"{PLOT_LEFT_PX}\" y=\"{:.1}\" fill=\"{COLOR_MUTED}\">none injected</text>\n",
                top + FAULT_BAR_PX - 2.0
            ),
        );
        return;
    }
    out.push_str("<g class=\"fault-strip\">\n");
    let overflow = places.iter().filter(|p| p.label.is_none()).count();
    if overflow > 0 {
        put(
            out,
            format_args!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\" fill=\"{COLOR_MUTED}\">+{overflow} more</text>\n",
                PLOT_LEFT_PX - 8.0,
                top + FAULT_ROWS_MAX as f64 * FAULT_ROW_PX + FAULT_BAR_PX - 3.0
            ),
        );
    }
    for (f, p) in t.faults.iter().zip(places) {
        let y = top + p.row as f64 * FAULT_ROW_PX;
        let color = kind_color(kinds, &f.kind);
        let label = fault_label(f);
        if p.label.is_none() {
            put(
                out,
                format_args!(
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"5\" fill=\"{color}\" fill-opacity=\"0.6\">\
                     <title>{}</title></rect>\n",
                    p.x0,
                    y + 4.0,
                    p.x1 - p.x0,
                    escape(&label)
                ),
            );
            continue;
        }
        put(
            out,
            format_args!(
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{FAULT_BAR_PX}\" rx=\"2\" fill=\"{color}\" \
                 fill-opacity=\"0.45\" stroke=\"{color}\"><title>{}</title></rect>\n",
                p.x0,
                p.x1 - p.x0,
                escape(&label)
            ),
        );
        if let Some((lx, forward)) = p.label {
            let shown = truncate(&label, FAULT_LABEL_CHARS_MAX);
            let (kind, rest) = match shown.split_once(" · ") {
                Some((k, r)) => (k.to_string(), format!("\u{a0}{r}")),
                None => (shown.clone(), String::new()),
            };
            put(
                out,
                format_args!(
                    "<text x=\"{lx:.1}\" y=\"{:.1}\" font-size=\"{}\" text-anchor=\"{}\"><tspan font-weight=\"bold\">{}</tspan>{}</text>\n",
                    y + FAULT_BAR_PX - 3.0,
                    FONT_PX - 0.5,
                    if forward { "start" } else { "end" },
                    escape(&kind),
                    escape(&rest)
                ),
            );
        }
    }
    out.push_str("</g>\n");
}

/// Where a mark's label goes: its row in the label strip, if one is free, and its anchor.
struct MarkPlace {
    row: Option<usize>,
    label_x: f64,
    forward: bool,
}

fn place_marks(marks: &[Mark], x: &XScale) -> Vec<MarkPlace> {
    let mut places = Vec::new();
    let mut occupied = Vec::new();
    for m in marks {
        let mx = x.at(m.time);
        let w = text_width_px(&truncate(&m.label, MARK_LABEL_CHARS_MAX), FONT_PX - 1.0);
        let forward = mx + 3.0 + w <= PLOT_RIGHT_PX;
        let label_x = if forward { mx + 3.0 } else { mx - 3.0 };
        occupied.push(if forward { (mx, label_x + w) } else { (label_x - w, mx) });
        places.push(MarkPlace { row: None, label_x, forward });
    }
    for (p, row) in places.iter_mut().zip(pack_rows(&occupied, MARK_ROWS_MAX)) {
        p.row = row;
    }
    places
}

fn draw_mark_lines(out: &mut String, marks: &[Mark], places: &[MarkPlace], x: &XScale, top: f64, bottom: f64) {
    out.push_str("<g class=\"marks\">\n");
    for (m, p) in marks.iter().zip(places) {
        let mx = x.at(m.time);
        // A labelled line starts at its label, so the eye can follow one to the other.
        let y0 = p.row.map_or(top, |r| top + r as f64 * MARK_ROW_PX + 1.0);
        let dash = if m.kind == MarkKind::Phase { " stroke-dasharray=\"5 3\"" } else { "" };
        put(
            out,
            format_args!(
                "<line x1=\"{mx:.1}\" y1=\"{y0:.1}\" x2=\"{mx:.1}\" y2=\"{bottom:.1}\" stroke=\"{}\" stroke-width=\"1.2\" \
                 stroke-opacity=\"0.85\"{dash}><title>{}</title></line>\n",
                mark_color(m.kind),
                escape(&m.label)
            ),
        );
    }
    out.push_str("</g>\n");
}

fn draw_mark_labels(out: &mut String, marks: &[Mark], places: &[MarkPlace], top: f64) {
    if places.iter().any(|p| p.row.is_some()) {
        put(
            out,
            format_args!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-weight=\"bold\" fill=\"{COLOR_MUTED}\">events</text>\n",
                PLOT_LEFT_PX - 8.0,
                top + MARK_ROW_PX - 3.0
            ),
        );
    }
    for (m, p) in marks.iter().zip(places) {
        let Some(row) = p.row else { continue };
        put(
            out,
            format_args!(
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"{}\" fill=\"{}\" text-anchor=\"{}\" {HALO}>{}</text>\n",
                p.label_x,
                top + row as f64 * MARK_ROW_PX + MARK_ROW_PX - 3.0,
                FONT_PX - 1.0,
                mark_color(m.kind),
                if p.forward { "start" } else { "end" },
                escape(&truncate(&m.label, MARK_LABEL_CHARS_MAX))
            ),
        );
    }
}

/// The x ticks: a round step giving at most about a dozen of them.
fn time_step_s(end_s: f64) -> f64 {
    const STEPS_S: [f64; 16] =
        [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0];
    STEPS_S.into_iter().find(|s| end_s / s <= 14.0).unwrap_or_else(|| (end_s / 14.0 / 600.0).ceil() * 600.0)
}

fn format_seconds(s: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{s:.0}")
    } else if step >= 0.1 {
        format!("{s:.1}")
    } else {
        format!("{s:.2}")
    }
}

fn draw_grid(out: &mut String, x: &XScale, lane_tops: impl Iterator<Item = f64>, bottom: f64) {
    out.push_str(&format!("<g stroke=\"{COLOR_GRID}\" stroke-width=\"1\">\n"));
    let mut first_top = None;
    for top in lane_tops {
        first_top.get_or_insert(top);
        for (ms, _) in LATENCY_TICKS_MS {
            let y = latency_y(top, (ms * 1e6) as Nanos);
            put(
                out,
                format_args!("<line x1=\"{PLOT_LEFT_PX}\" y1=\"{y:.1}\" x2=\"{PLOT_RIGHT_PX}\" y2=\"{y:.1}\"/>\n"),
            );
        }
    }
    let top = first_top.unwrap_or(bottom);
    let end_s = x.end_ns as f64 / 1e9;
    let step = time_step_s(end_s);
    let mut i = 1;
    while step * i as f64 <= end_s {
        let px = x.at((step * i as f64 * 1e9) as Nanos);
        put(out, format_args!("<line x1=\"{px:.1}\" y1=\"{top:.1}\" x2=\"{px:.1}\" y2=\"{bottom:.1}\"/>\n"));
        i += 1;
    }
    out.push_str("</g>\n");
}

fn draw_x_axis(out: &mut String, x: &XScale, bottom: f64) {
    let end_s = x.end_ns as f64 / 1e9;
    let step = time_step_s(end_s);
    out.push_str(&format!("<g fill=\"{COLOR_TEXT}\" text-anchor=\"middle\">\n"));
    let mut i = 0;
    while step * i as f64 <= end_s + 1e-9 {
        let s = step * i as f64;
        let px = x.at((s * 1e9) as Nanos);
        put(
            out,
            format_args!(
                "<line x1=\"{px:.1}\" y1=\"{bottom:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"{COLOR_TEXT}\"/>\
                 <text x=\"{px:.1}\" y=\"{:.1}\">{}</text>\n",
                bottom + 5.0,
                bottom + 17.0,
                format_seconds(s, step)
            ),
        );
        i += 1;
    }
    put(
        out,
        format_args!(
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{COLOR_MUTED}\">seconds since start</text>\n",
            (PLOT_LEFT_PX + PLOT_RIGHT_PX) / 2.0,
            bottom + 36.0
        ),
    );
    out.push_str("</g>\n");
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The lane's name and counts above it, and its latency ticks on the left.
fn draw_lane_header(out: &mut String, t: &Timeline, w: Workload, top: f64) {
    let (mut ok, mut fail, mut info) = (0u64, 0u64, 0u64);
    for op in t.ops.iter().filter(|op| op.workload == w) {
        match op.outcome {
            Outcome::Ok { .. } => ok += 1,
            Outcome::Fail => fail += 1,
            Outcome::Info => info += 1,
        }
    }
    put(
        out,
        format_args!(
            "<text x=\"{PLOT_LEFT_PX}\" y=\"{:.1}\" {HALO}><tspan font-weight=\"bold\" font-size=\"13\">{}</tspan>\
             <tspan fill=\"{COLOR_MUTED}\" dx=\"10\">{} ops:</tspan><tspan fill=\"{COLOR_OK}\" dx=\"6\">{} ok</tspan>\
             <tspan fill=\"{COLOR_FAIL}\" dx=\"8\">{} fail</tspan><tspan fill=\"{COLOR_INFO}\" dx=\"8\">{} info</tspan></text>\n",
            top - 6.0,
            w.name(),
            thousands(ok + fail + info),
            thousands(ok),
            thousands(fail),
            thousands(info)
        ),
    );
    let mid = top + PANEL_HEIGHT_PX / 2.0;
    put(
        out,
        format_args!(
            "<text x=\"18\" y=\"{mid:.1}\" transform=\"rotate(-90 18 {mid:.1})\" text-anchor=\"middle\" \
             font-size=\"10\" fill=\"{COLOR_MUTED}\">latency (log)</text>\n"
        ),
    );
    out.push_str(&format!("<g text-anchor=\"end\" font-size=\"10\" fill=\"{COLOR_MUTED}\">\n"));
    for (ms, label) in LATENCY_TICKS_MS {
        let y = latency_y(top, (ms * 1e6) as Nanos);
        put(out, format_args!("<text x=\"{:.1}\" y=\"{:.1}\">{label}</text>\n", PLOT_LEFT_PX - 6.0, y + 3.5));
    }
    out.push_str("</g>\n");
}

fn lane_ops(t: &Timeline, w: Workload) -> impl Iterator<Item = &Op> {
    t.ops.iter().filter(move |op| op.workload == w)
}

/// The `ok` dots of one lane, one per occupied cell, as a single path of small squares: a
/// `<circle>` each would take three times the bytes for the same picture.
fn draw_ok_dots(out: &mut String, t: &Timeline, w: Workload, x: &XScale, top: f64) {
    let cols = ((PLOT_RIGHT_PX - PLOT_LEFT_PX) / OK_CELL_PX).floor() as i64;
    let rows = (PANEL_HEIGHT_PX / OK_CELL_PX).floor() as i64;
    let mut seen: HashSet<(i64, i64)> = HashSet::new();
    let mut d = String::new();
    for op in lane_ops(t, w).filter(|op| op.is_ok()) {
        let col = (((x.at(op.invoke) - PLOT_LEFT_PX) / OK_CELL_PX) as i64).clamp(0, cols - 1);
        let row = (((latency_y(top, op.latency_ns()) - top) / OK_CELL_PX) as i64).clamp(0, rows - 1);
        if seen.insert((col, row)) {
            let (px, py) = (PLOT_LEFT_PX + col as f64 * OK_CELL_PX, top + row as f64 * OK_CELL_PX);
            put(&mut d, format_args!("M{px} {py}h{OK_CELL_PX}v{OK_CELL_PX}h-{OK_CELL_PX}z"));
        }
    }
    if !d.is_empty() {
        put(out, format_args!("<path class=\"ok-dots\" fill=\"{COLOR_OK}\" fill-opacity=\"0.75\" d=\"{d}\"/>\n"));
    }
}

/// Every `fail` or `info` dot of one lane, as circles with a white rim so neighbours stay apart.
fn draw_outcome_dots(out: &mut String, t: &Timeline, w: Workload, outcome: Outcome, x: &XScale, top: f64) {
    let (class, color) = match outcome {
        Outcome::Fail => ("fail-dots", COLOR_FAIL),
        _ => ("info-dots", COLOR_INFO),
    };
    let mut seen: HashSet<(i64, i64)> = HashSet::new();
    let mut dots = String::new();
    for op in lane_ops(t, w).filter(|op| op.outcome == outcome) {
        let (cx, cy) = (x.at(op.invoke), latency_y(top, op.latency_ns()));
        // Same spot to a tenth of a pixel: drawing it twice shows nothing more.
        if seen.insert(((cx * 10.0).round() as i64, (cy * 10.0).round() as i64)) {
            put(&mut dots, format_args!("<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"{OUTCOME_DOT_RADIUS_PX}\"/>\n"));
        }
    }
    if !dots.is_empty() {
        put(
            out,
            format_args!(
                "<g class=\"{class}\" fill=\"{color}\" stroke=\"#ffffff\" stroke-width=\"0.6\">\n{dots}</g>\n"
            ),
        );
    }
}

enum Swatch {
    Square(&'static str),
    Dot(&'static str),
    Band(&'static str),
    Line(&'static str, bool),
    Heading,
}

struct LegendItem {
    swatch: Swatch,
    text: String,
}

fn legend_items(kinds: &[String]) -> Vec<LegendItem> {
    let item = |swatch, text: &str| LegendItem { swatch, text: text.to_string() };
    let mut items = vec![
        item(Swatch::Heading, "ops"),
        item(Swatch::Square(COLOR_OK), "ok"),
        item(Swatch::Dot(COLOR_FAIL), "fail"),
        item(Swatch::Dot(COLOR_INFO), "info (unknown)"),
        item(Swatch::Heading, "events"),
        item(Swatch::Line(COLOR_ELECTION, false), "election"),
        item(Swatch::Line(COLOR_FAILOVER, false), "failover"),
        item(Swatch::Line(COLOR_PHASE, true), "phase"),
    ];
    if !kinds.is_empty() {
        items.push(item(Swatch::Heading, "faults"));
        for k in kinds {
            items.push(item(Swatch::Band(kind_color(kinds, k)), &truncate(k, 40)));
        }
    }
    items
}

fn legend_item_width(i: &LegendItem) -> f64 {
    match i.swatch {
        Swatch::Heading => text_width_px(&i.text, FONT_PX) + 14.0,
        _ => 18.0 + text_width_px(&i.text, FONT_PX) + 16.0,
    }
}

/// Splits the legend into lines that fit the width; each line is a list of (item, x).
fn layout_legend(items: &[LegendItem]) -> Vec<Vec<(usize, f64)>> {
    let mut lines: Vec<Vec<(usize, f64)>> = vec![Vec::new()];
    let mut x = PLOT_LEFT_PX;
    for (i, item) in items.iter().enumerate() {
        let w = legend_item_width(item);
        let line = lines.last_mut().expect("there is always a line");
        if x + w > PLOT_RIGHT_PX && !line.is_empty() {
            lines.push(Vec::new());
            x = PLOT_LEFT_PX;
        }
        lines.last_mut().expect("there is always a line").push((i, x));
        x += w;
    }
    lines
}

fn draw_legend(out: &mut String, items: &[LegendItem], lines: &[Vec<(usize, f64)>], top: f64) {
    out.push_str("<g class=\"legend\">\n");
    for (n, line) in lines.iter().enumerate() {
        let y = top + n as f64 * 18.0 + 9.0;
        for &(i, x) in line {
            let item = &items[i];
            let text_x = x + 18.0;
            match item.swatch {
                Swatch::Heading => {
                    put(
                        out,
                        format_args!(
                            "<text x=\"{x:.1}\" y=\"{:.1}\" font-weight=\"bold\" fill=\"{COLOR_MUTED}\">{}</text>\n",
                            y + 4.0,
                            escape(&item.text)
                        ),
                    );
                    continue;
                }
                Swatch::Square(c) => put(
                    out,
                    format_args!("<rect x=\"{:.1}\" y=\"{:.1}\" width=\"8\" height=\"8\" fill=\"{c}\"/>\n", x + 3.0, y - 4.0),
                ),
                Swatch::Dot(c) => put(
                    out,
                    format_args!("<circle cx=\"{:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"{c}\"/>\n", x + 7.0),
                ),
                Swatch::Band(c) => put(
                    out,
                    format_args!(
                        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"14\" height=\"12\" fill=\"{c}\" fill-opacity=\"0.45\" \
                         stroke=\"{c}\"/>\n",
                        y - 6.0
                    ),
                ),
                Swatch::Line(c, dashed) => put(
                    out,
                    format_args!(
                        "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{c}\" stroke-width=\"2\"{}/>\n",
                        x + 7.0,
                        y - 7.0,
                        x + 7.0,
                        y + 7.0,
                        if dashed { " stroke-dasharray=\"4 2\"" } else { "" }
                    ),
                ),
            }
            put(out, format_args!("<text x=\"{text_x:.1}\" y=\"{:.1}\">{}</text>\n", y + 4.0, escape(&item.text)));
        }
    }
    out.push_str("</g>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Call;

    const MS: Nanos = 1_000_000;
    const S: Nanos = 1_000_000_000;

    fn op(id: u64, workload: Workload, outcome: Outcome, invoke: Nanos, latency: Nanos) -> Op {
        Op {
            id,
            process: id % 8,
            workload,
            key: "vol0/1".into(),
            call: Call::Write { value: id + 1 },
            outcome,
            invoke,
            complete: invoke + latency,
            node: id % 3 + 1,
            error: None,
        }
    }

    /// `n` ops over a 60 s run, every `fail_every`-th a fail and the one after it an info,
    /// with latencies spread over the whole axis so the thinning has work to do.
    fn run(n: u64, fail_every: u64) -> Timeline {
        let mut ops = Vec::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..n {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let workload = Workload::ALL[(i % 4) as usize];
            let outcome = match i % fail_every {
                0 => Outcome::Fail,
                1 => Outcome::Info,
                _ => Outcome::Ok { read: None },
            };
            let latency = 50_000 + seed % (20 * S) / (1 + seed % 1000);
            ops.push(op(i, workload, outcome, i * (60 * S) / n, latency));
        }
        Timeline {
            ops,
            faults: vec![
                Fault {
                    kind: "partition-leader".into(),
                    target: "{1} | {2,3}".into(),
                    start: 10 * S,
                    stop: Some(20 * S),
                },
                Fault { kind: "packet-loss".into(), target: "node 3".into(), start: 15 * S, stop: None },
            ],
            marks: vec![
                Mark { time: 12 * S, kind: MarkKind::Election, label: "node 2 leads (term 3)".into() },
                Mark { time: 16 * S, kind: MarkKind::Failover, label: "vol0: primary 1 -> 2 (epoch 4)".into() },
            ],
            faults_start: 10 * S,
            heal: 40 * S,
            end: 60 * S,
        }
    }

    /// Checks that tags nest: every element opened is closed, in order. Enough to catch a
    /// missing `/>` or a stray `<` from unescaped text.
    fn assert_balanced(svg: &str) {
        let mut stack: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let close = rest[open..].find('>').expect("a tag is closed") + open;
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "a '<' inside a tag: {tag}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop(), Some(name), "closing {name}");
            } else if !tag.ends_with('/') && !tag.starts_with('!') && !tag.starts_with('?') {
                stack.push(tag.split_whitespace().next().expect("a tag has a name"));
            }
            rest = &rest[close + 1..];
        }
        assert!(stack.is_empty(), "left open: {stack:?}");
    }

    /// The circles in the groups of one class.
    fn dots(svg: &str, class: &str) -> usize {
        svg.split(&format!("<g class=\"{class}\""))
            .skip(1)
            .map(|g| g[..g.find("</g>").expect("group closed")].matches("<circle").count())
            .sum()
    }

    #[test]
    fn the_picture_is_well_formed_with_a_band_per_fault_and_every_fail_and_info() {
        let t = run(2_000, 50);
        let svg = timeline_svg(&t, "run 7", "seed 7");
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_balanced(&svg);
        assert_eq!(svg.matches("<rect class=\"band\"").count(), t.faults.len());
        let fails = t.ops.iter().filter(|op| op.outcome == Outcome::Fail).count();
        let infos = t.ops.iter().filter(|op| op.outcome == Outcome::Info).count();
        assert_eq!((fails, infos), (40, 40));
        assert_eq!(dots(&svg, "fail-dots"), fails);
        assert_eq!(dots(&svg, "info-dots"), infos);
        for w in Workload::ALL {
            assert!(svg.contains(&format!("font-size=\"13\">{}</tspan>", w.name())), "a lane for {}", w.name());
        }
        for label in ["partition-leader", "{1} | {2,3}", "node 2 leads (term 3)", "vol0: primary 1 -&gt; 2 (epoch 4)"] {
            assert!(svg.contains(label), "{label}");
        }
        // No phase marks recorded: the faults' start and the heal are drawn anyway.
        assert!(svg.contains(">faults begin</text>") && svg.contains(">heal</text>"));
    }

    #[test]
    fn lanes_only_for_workloads_present_and_an_empty_run_still_draws() {
        let t = Timeline {
            ops: vec![op(0, Workload::Meta, Outcome::Ok { read: None }, S, MS)],
            end: 2 * S,
            ..Timeline::default()
        };
        let svg = timeline_svg(&t, "t", "s");
        assert_balanced(&svg);
        assert!(svg.contains(">meta</tspan>"));
        assert!(!svg.contains(">register</tspan>"));
        assert_eq!(svg.matches("class=\"ok-dots\"").count(), 1);
        assert!(svg.contains("none injected"));

        let empty = timeline_svg(&Timeline::default(), "empty", "");
        assert_balanced(&empty);
        assert!(empty.contains("no operations"));
    }

    #[test]
    fn text_is_escaped() {
        let mut t = run(100, 10);
        t.faults[0].target = "<script>alert('x')</script> & \"more\"".into();
        t.marks[0].label = "a <b> & c".into();
        let svg = timeline_svg(&t, "title <&>", "sub \"quoted\" 'single'\u{1}");
        assert_balanced(&svg);
        assert!(!svg.contains("<script>") && !svg.contains("<b>"));
        assert!(svg.contains("&lt;script&gt;alert(&apos;x&apos;)&lt;/script&gt; &amp; &quot;more&quot;"));
        assert!(svg.contains("title &lt;&amp;&gt;"));
        assert!(svg.contains("sub &quot;quoted&quot; &apos;single&apos; "));
        assert!(svg.contains("a &lt;b&gt; &amp; c"));

        let rows = vec![("p99 <during>".to_string(), "1 & 2".to_string())];
        let page = html_page(&svg, "run <1>", &rows);
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains("<title>run &lt;1&gt;</title>"));
        assert!(page.contains("<tr><th>p99 &lt;during&gt;</th><td>1 &amp; 2</td></tr>"));
        assert!(page.contains(&svg));
        assert_balanced(page.trim_start_matches("<!DOCTYPE html>").replace("<meta charset=\"utf-8\">", "").as_str());
    }

    #[test]
    fn two_hundred_thousand_ops_stay_small() {
        let t = run(200_000, 10);
        let svg = timeline_svg(&t, "big", "200k ops");
        assert_balanced(&svg);
        assert!(svg.len() < 5_000_000, "{} bytes", svg.len());
        // Fail and info (a fifth of all ops here) are thinned only where they coincide.
        assert!(dots(&svg, "fail-dots") > 1_000);
    }

    #[test]
    fn many_overlapping_faults_keep_every_bar_and_band_but_cap_the_label_rows() {
        let mut t = run(100, 10);
        t.faults = (0..30)
            .map(|i| Fault {
                kind: format!("kind-{}", i % 3),
                target: format!("node {i}"),
                start: i * S,
                stop: Some((i + 20) * S),
            })
            .collect();
        let svg = timeline_svg(&t, "t", "s");
        assert_balanced(&svg);
        assert_eq!(svg.matches("<rect class=\"band\"").count(), 30);
        let strip = &svg[svg.find("<g class=\"fault-strip\">").expect("strip")..];
        let strip = &strip[..strip.find("</g>").expect("closed")];
        assert_eq!(strip.matches("<rect").count(), 30);
        let rows: HashSet<&str> =
            strip.split("<rect ").skip(1).map(|r| r.split('"').nth(3).expect("a y attribute")).collect();
        // The labelled rows and one for the rest.
        assert_eq!(rows.len(), FAULT_ROWS_MAX + 1);
        assert!(strip.contains(&format!("+{} more</text>", 30 - strip.matches("<tspan").count())));
        let labels = strip.matches("<text").count();
        assert!((FAULT_ROWS_MAX..30).contains(&labels), "{labels} labels");
    }

    #[test]
    fn rows_pack_first_fit_up_to_the_cap() {
        let rows = pack_rows(&[(0.0, 100.0), (50.0, 120.0), (110.0, 200.0), (60.0, 70.0), (300.0, 310.0)], 2);
        assert_eq!(rows, vec![Some(0), Some(1), Some(0), None, Some(0)]);
    }

    #[test]
    fn latency_axis_is_log_and_clamped() {
        let top = 100.0;
        assert_eq!(latency_y(top, 0), top + PANEL_HEIGHT_PX);
        assert_eq!(latency_y(top, 3600 * S), top);
        let decade = latency_y(top, MS) - latency_y(top, 10 * MS);
        assert!((decade - (latency_y(top, 100 * MS) - latency_y(top, S))).abs() < 1e-9);
        assert_eq!(time_step_s(60.0), 5.0);
        assert_eq!(time_step_s(600.0), 60.0);
        assert_eq!(time_step_s(0.5), 0.05);
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(12), "12");
    }
}
