//! The report as one self-contained HTML page ([`Report::html`]): inline CSS and inline SVG charts, no script,
//! font or image from anywhere, so the file can be mailed, archived with the run, or opened offline, and shows
//! the same thing in ten years. Every string from the files is escaped, and the page's Content-Security-Policy
//! forbids scripts outright, a second wall should an escape ever be missed.

use std::fmt::Write;

use super::Report;
use super::stats::{PairwiseStats, ScoreStats};
use super::text::{Table, percent};

/// `s` as HTML text or a quoted attribute value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A chart label cut to fit its column; the whole name is in the row's tooltip.
fn label(s: &str) -> String {
    const MAX: usize = 24;
    if s.chars().count() <= MAX {
        escape(s)
    } else {
        escape(&format!("{}…", s.chars().take(MAX - 1).collect::<String>()))
    }
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:60rem;\
padding:0 1rem;color:#222}h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2.5rem;border-bottom:1px solid #ddd}\
h3{font-size:1rem;margin-bottom:.3rem}ul.notes{color:#555;font-size:.9rem}\
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.9rem}\
th,td{padding:.2rem .6rem;border-bottom:1px solid #eee;text-align:right;font-variant-numeric:tabular-nums}\
th:first-child,td:first-child{text-align:left}tr.total td{font-weight:600}\
figure{margin:1rem 0}figcaption{color:#555;font-size:.85rem}svg{max-width:100%;height:auto}\
svg text{font-size:12px;fill:#333}.bar{fill:#4e79a7}.bar.all{fill:#2b4c7e}.w{fill:#59a14f}.t{fill:#bab0ac}\
.l{fill:#e15759}.whisker{stroke:#111;stroke-width:1.5}.half{stroke:#888;stroke-dasharray:4 3}.axis{stroke:#bbb}\
.legend span{display:inline-block;width:.8rem;height:.8rem;margin:0 .3rem 0 1rem;vertical-align:middle}";

const TURN_COLORS: [&str; 4] = ["#4e79a7", "#f28e2b", "#76b7b2", "#b07aa1"];

/// The page's chart geometry: a label column, then the plot.
const LABEL_W: f64 = 190.0;
const PLOT_W: f64 = 420.0;
const TOP: f64 = 8.0;
const AXIS_H: f64 = 26.0;

fn x(v: f64, max: f64) -> f64 {
    LABEL_W + PLOT_W * (v / max).clamp(0.0, 1.0)
}

/// An SVG of `rows` rows of `row_h` pixels, with an axis from 0 to `max` ticked at `ticks` and labelled by
/// `tick_label`; `body` draws the rows.
fn chart(
    rows: usize,
    row_h: f64,
    max: f64,
    ticks: &[f64],
    tick_label: impl Fn(f64) -> String,
    title: &str,
    body: &str,
) -> String {
    let plot_h = rows as f64 * row_h;
    let (w, h) = (LABEL_W + PLOT_W + 30.0, TOP + plot_h + AXIS_H);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w:.0} {h:.0}" width="{w:.0}" height="{h:.0}" role="img" aria-label="{}">"#,
        escape(title)
    );
    let axis_y = TOP + plot_h;
    let _ = write!(
        s,
        r#"<line class="axis" x1="{LABEL_W}" y1="{axis_y:.1}" x2="{:.1}" y2="{axis_y:.1}"/>"#,
        LABEL_W + PLOT_W
    );
    for t in ticks {
        let tx = x(*t, max);
        let _ = write!(
            s,
            r#"<line class="axis" x1="{tx:.1}" y1="{TOP}" x2="{tx:.1}" y2="{:.1}"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            axis_y + 4.0,
            axis_y + 18.0,
            tick_label(*t)
        );
    }
    s.push_str(body);
    s.push_str("</svg>");
    s
}

/// A row's label, right-aligned in the label column, with the whole text as its tooltip.
fn row_label(name: &str, y: f64, row_h: f64) -> String {
    format!(
        r#"<text x="{:.1}" y="{:.1}" text-anchor="end"><title>{}</title>{}</text>"#,
        LABEL_W - 8.0,
        y + row_h / 2.0 + 4.0,
        escape(name),
        label(name)
    )
}

/// The pair's rows: each category, then all of them.
fn pair_rows(p: &PairwiseStats) -> Vec<(&str, &super::Record)> {
    let mut rows: Vec<_> = p.by_category.iter().map(|(c, r)| (c.as_str(), r)).collect();
    rows.push(("all", &p.overall));
    rows
}

/// Adjusted win rate per category as bars, the interval as whiskers, and 0.5 (as good as the opponent) as a
/// dashed line.
fn win_rate_chart(p: &PairwiseStats, interval_name: &str) -> String {
    const ROW_H: f64 = 26.0;
    let rows = pair_rows(p);
    let mut body = String::new();
    for (i, (name, r)) in rows.iter().enumerate() {
        let y = TOP + i as f64 * ROW_H;
        body.push_str(&row_label(name, y, ROW_H));
        let Some(rate) = r.tally.adjusted_win_rate() else {
            let _ = write!(
                body,
                r#"<text x="{:.1}" y="{:.1}">no verdict</text>"#,
                LABEL_W + 6.0,
                y + 17.0
            );
            continue;
        };
        let interval = r.interval.map_or_else(String::new, |i| {
            format!(
                ", {interval_name} [{}, {}]",
                percent(Some(i.low)),
                percent(Some(i.high))
            )
        });
        let _ = write!(
            body,
            r#"<rect class="bar{}" x="{LABEL_W}" y="{:.1}" width="{:.1}" height="{:.1}"><title>{}: adjusted win rate {}{} (W {} T {} L {})</title></rect>"#,
            if *name == "all" && i + 1 == rows.len() {
                " all"
            } else {
                ""
            },
            y + 5.0,
            x(rate, 1.0) - LABEL_W,
            ROW_H - 10.0,
            escape(name),
            percent(Some(rate)),
            interval,
            r.tally.wins,
            r.tally.ties,
            r.tally.losses,
        );
        if let Some(i) = r.interval {
            let (x1, x2, cy) = (x(i.low, 1.0), x(i.high, 1.0), y + ROW_H / 2.0);
            let _ = write!(
                body,
                r#"<line class="whisker" x1="{x1:.1}" y1="{cy:.1}" x2="{x2:.1}" y2="{cy:.1}"/><line class="whisker" x1="{x1:.1}" y1="{:.1}" x2="{x1:.1}" y2="{:.1}"/><line class="whisker" x1="{x2:.1}" y1="{:.1}" x2="{x2:.1}" y2="{:.1}"/>"#,
                cy - 5.0,
                cy + 5.0,
                cy - 5.0,
                cy + 5.0
            );
        }
    }
    let half = x(0.5, 1.0);
    let _ = write!(
        body,
        r#"<line class="half" x1="{half:.1}" y1="{TOP}" x2="{half:.1}" y2="{:.1}"/>"#,
        TOP + rows.len() as f64 * ROW_H
    );
    let title = format!("{} vs {}: adjusted win rate by category", p.model, p.opponent);
    chart(
        rows.len(),
        ROW_H,
        1.0,
        &[0.0, 0.25, 0.5, 0.75, 1.0],
        |t| percent(Some(t)),
        &title,
        &body,
    )
}

/// Wins, ties and losses per category as one bar split in proportion, errors in the tooltip.
fn outcome_chart(p: &PairwiseStats) -> String {
    const ROW_H: f64 = 26.0;
    let rows = pair_rows(p);
    let mut body = String::new();
    for (i, (name, r)) in rows.iter().enumerate() {
        let y = TOP + i as f64 * ROW_H;
        body.push_str(&row_label(name, y, ROW_H));
        let t = r.tally;
        let n = f64::from(t.decided());
        if n == 0.0 {
            continue;
        }
        let mut from = 0.0;
        for (class, count, word) in [
            ("w", t.wins, "wins"),
            ("t", t.ties, "ties"),
            ("l", t.losses, "losses"),
        ] {
            let share = f64::from(count) / n;
            let _ = write!(
                body,
                r#"<rect class="{class}" x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}"><title>{}: {count} {word} of {} ({} errors left out)</title></rect>"#,
                x(from, 1.0),
                y + 5.0,
                PLOT_W * share,
                ROW_H - 10.0,
                escape(name),
                t.decided(),
                t.errors
            );
            from += share;
        }
    }
    let title = format!("{} vs {}: wins, ties and losses by category", p.model, p.opponent);
    chart(
        rows.len(),
        ROW_H,
        1.0,
        &[0.0, 0.25, 0.5, 0.75, 1.0],
        |t| percent(Some(t)),
        &title,
        &body,
    )
}

/// A model's mean grade per category, one bar per turn, and over all categories last.
fn score_chart(s: &ScoreStats, turns: &[u32]) -> String {
    let bar_h = 10.0;
    let row_h = 10.0 + bar_h * turns.len().max(1) as f64;
    let mut rows: Vec<(&str, Vec<Option<f64>>)> = s
        .by_category_turn
        .iter()
        .map(|(c, by_turn)| {
            (
                c.as_str(),
                turns
                    .iter()
                    .map(|t| by_turn.get(t).and_then(|m| m.value()))
                    .collect(),
            )
        })
        .collect();
    rows.push((
        "all",
        turns
            .iter()
            .map(|t| s.by_turn.get(t).and_then(|m| m.value()))
            .collect(),
    ));
    let mut body = String::new();
    for (i, (name, means)) in rows.iter().enumerate() {
        let y = TOP + i as f64 * row_h;
        body.push_str(&row_label(name, y, row_h));
        for (k, (turn, mean)) in turns.iter().zip(means).enumerate() {
            let Some(mean) = mean else { continue };
            let color = TURN_COLORS
                .get(k % TURN_COLORS.len())
                .copied()
                .unwrap_or("#4e79a7");
            let _ = write!(
                body,
                r#"<rect fill="{color}" x="{LABEL_W}" y="{:.1}" width="{:.1}" height="{:.1}"><title>{}, turn {turn}: {mean:.2}</title></rect>"#,
                y + 5.0 + bar_h * k as f64,
                x(*mean, 10.0) - LABEL_W,
                bar_h - 1.0,
                escape(name),
            );
        }
    }
    let title = format!("{}: mean grade by category and turn", s.model);
    let ticks = [0.0, 2.0, 4.0, 6.0, 8.0, 10.0];
    chart(
        rows.len(),
        row_h,
        10.0,
        &ticks,
        |t| format!("{t:.0}"),
        &title,
        &body,
    )
}

fn table_html(out: &mut String, t: &Table) {
    let _ = write!(out, "<h3>{}</h3>\n<table>\n<thead><tr>", escape(&t.title));
    for h in &t.header {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for (i, r) in t.rows.iter().enumerate() {
        out.push_str(if t.total && i + 1 == t.rows.len() {
            "<tr class=\"total\">"
        } else {
            "<tr>"
        });
        for c in r {
            let _ = write!(out, "<td>{}</td>", escape(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
}

fn figure(out: &mut String, svg: &str, caption: &str) {
    let _ = write!(
        out,
        "<figure>\n{svg}\n<figcaption>{}</figcaption>\n</figure>\n",
        escape(caption)
    );
}

impl Report {
    /// The report as one self-contained HTML page.
    pub fn html(&self) -> String {
        let mut out = format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>camelid eval report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
             <h1>camelid eval report</h1>\n<ul class=\"notes\">\n"
        );
        for line in self.preamble() {
            let _ = writeln!(out, "<li>{}</li>", escape(&line));
        }
        out.push_str("</ul>\n");
        let interval = self.interval_name();
        for p in &self.pairwise {
            let _ = writeln!(
                out,
                "<section>\n<h2>{} vs {}</h2>",
                escape(&p.model),
                escape(&p.opponent)
            );
            let caption = format!(
                "Adjusted win rate of {} against {} by category, whiskers the {interval}; the dashed line is 0.5, \
                 as good as the opponent.",
                p.model, p.opponent
            );
            figure(&mut out, &win_rate_chart(p, &interval), &caption);
            figure(
                &mut out,
                &outcome_chart(p),
                "Wins, ties and losses by category, as shares of the verdicts.",
            );
            out.push_str(
                "<p class=\"legend\"><span style=\"background:#59a14f\"></span>wins\
                 <span style=\"background:#bab0ac\"></span>ties<span style=\"background:#e15759\"></span>losses</p>\n",
            );
            for t in self.pair_tables(p) {
                table_html(&mut out, &t);
            }
            out.push_str("</section>\n");
        }
        let tables = self.score_tables();
        if !tables.is_empty() {
            out.push_str("<section>\n<h2>Single-answer grades</h2>\n");
            let turns: Vec<u32> = self.graded_turns().into_iter().collect();
            for s in &self.scores {
                let caption = format!(
                    "Mean grade (1 to 10) of {} by category, one bar per turn.",
                    s.model
                );
                figure(&mut out, &score_chart(s, &turns), &caption);
            }
            out.push_str("<p class=\"legend\">");
            for (k, t) in turns.iter().enumerate() {
                let color = TURN_COLORS
                    .get(k % TURN_COLORS.len())
                    .copied()
                    .unwrap_or("#4e79a7");
                let _ = write!(out, "<span style=\"background:{color}\"></span>turn {t}");
            }
            out.push_str("</p>\n");
            for t in &tables {
                table_html(&mut out, t);
            }
            out.push_str("</section>\n");
        }
        out.push_str("</body>\n</html>\n");
        out
    }
}
