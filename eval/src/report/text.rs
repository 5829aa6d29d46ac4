//! The report's tables, built once with the files' strings as they are, and written for a terminal
//! ([`Report::text`]) or as Markdown ([`Report::markdown`]); the HTML page lays out the same tables. Each writer
//! escapes the strings for where they go: a model name is someone else's text, and a terminal obeys escape
//! sequences as a browser obeys tags.

use std::collections::BTreeSet;
use std::fmt::Write;

use super::Report;
use super::html::escape;
use super::stats::{Mean, PairwiseStats, Record, Tally};

/// A table: a title, a header, and rows of cells; the first column is a label, the others numbers.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Whether the last row sums the others (shown in bold on the page).
    pub total: bool,
}

/// A fraction as a percentage, or "-" for none.
pub(super) fn percent(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_string(), |x| format!("{:.1}%", 100.0 * x))
}

fn score(m: Option<&Mean>) -> String {
    m.and_then(Mean::value)
        .map_or_else(|| "-".to_string(), |x| format!("{x:.2}"))
}

fn record_row(label: &str, r: &Record) -> Vec<String> {
    let mut row = tally_row(label, &r.tally);
    row.push(r.interval.map_or_else(
        || "-".to_string(),
        |i| format!("[{}, {}]", percent(Some(i.low)), percent(Some(i.high))),
    ));
    row
}

fn tally_row(label: &str, t: &Tally) -> Vec<String> {
    vec![
        label.to_string(),
        t.wins.to_string(),
        t.ties.to_string(),
        t.losses.to_string(),
        t.errors.to_string(),
        percent(t.win_rate()),
        percent(t.adjusted_win_rate()),
    ]
}

impl Report {
    /// The interval's header, e.g. "95% interval".
    pub(super) fn interval_name(&self) -> String {
        format!("{:.0}% interval", 100.0 * self.bootstrap.level)
    }

    /// One line per fact a reader needs to read the tables right.
    pub(super) fn preamble(&self) -> Vec<String> {
        vec![
            format!("judge: {}", if self.judges.is_empty() { "-".to_string() } else { self.judges.join(", ") }),
            "pairwise: each match judged in both orders; a win needs both orders to agree, a disagreement is a \
             tie, an unparseable verdict in either order is an error, left out"
                .to_string(),
            "adjusted win rate = (W + T/2) / (W + T + L), the headline; win rate = W / (W + T + L)".to_string(),
            format!(
                "{}: bootstrap over questions (a question's turns together), {} rounds, seed {}",
                self.interval_name(),
                self.bootstrap.rounds,
                self.bootstrap.seed
            ),
        ]
    }

    /// The report's tables, in reading order.
    pub(super) fn tables(&self) -> Vec<Table> {
        let mut out: Vec<Table> = self.pairwise.iter().flat_map(|p| self.pair_tables(p)).collect();
        out.extend(self.score_tables());
        out
    }

    /// A pair's record by category (with the interval) and by turn.
    pub(super) fn pair_tables(&self, p: &PairwiseStats) -> [Table; 2] {
        let header = |first: &str, interval: Option<String>| {
            let mut h: Vec<String> = [first, "W", "T", "L", "errors", "win rate", "adjusted"]
                .map(String::from)
                .to_vec();
            h.extend(interval);
            h
        };
        let mut rows: Vec<Vec<String>> = p.by_category.iter().map(|(c, r)| record_row(c, r)).collect();
        rows.push(record_row("all", &p.overall));
        [
            Table {
                title: format!("{} vs {}: by category", p.model, p.opponent),
                header: header("category", Some(self.interval_name())),
                rows,
                total: true,
            },
            Table {
                title: format!("{} vs {}: by turn", p.model, p.opponent),
                header: header("turn", None),
                rows: p
                    .by_turn
                    .iter()
                    .map(|(t, r)| tally_row(&t.to_string(), r))
                    .collect(),
                total: false,
            },
        ]
    }

    /// Every turn any model was graded on.
    pub(super) fn graded_turns(&self) -> BTreeSet<u32> {
        self.scores
            .iter()
            .flat_map(|s| s.by_turn.keys().copied())
            .collect()
    }

    /// The single-answer grades: every model by turn, then each model by category.
    pub(super) fn score_tables(&self) -> Vec<Table> {
        if self.scores.is_empty() {
            return Vec::new();
        }
        let turns = self.graded_turns();
        let turn_names = || turns.iter().map(|t| format!("turn {t}"));
        let mut header = vec!["model".to_string()];
        header.extend(turn_names());
        header.extend(["all turns".to_string(), "unparsed".to_string()]);
        let rows = self
            .scores
            .iter()
            .map(|s| {
                let mut row = vec![s.model.clone()];
                row.extend(turns.iter().map(|t| score(s.by_turn.get(t))));
                row.extend([score(Some(&s.overall)), s.unparsed.to_string()]);
                row
            })
            .collect();
        let mut out = vec![Table {
            title: "single-answer grades (1 to 10; unparsed grades left out)".to_string(),
            header,
            rows,
            total: false,
        }];
        for s in &self.scores {
            let mut header = vec!["category".to_string()];
            header.extend(turn_names());
            header.push("all turns".to_string());
            let rows = s
                .by_category
                .iter()
                .map(|(c, m)| {
                    let by_turn = s.by_category_turn.get(c);
                    let mut row = vec![c.clone()];
                    row.extend(turns.iter().map(|t| score(by_turn.and_then(|b| b.get(t)))));
                    row.push(score(Some(m)));
                    row
                })
                .collect();
            out.push(Table {
                title: format!("{}: grades by category", s.model),
                header,
                rows,
                total: false,
            });
        }
        out
    }

    /// The report as aligned tables for a terminal.
    pub fn text(&self) -> String {
        let mut out = String::from("camelid eval report\n");
        for line in self.preamble() {
            out.push_str(&terminal_safe(&line));
            out.push('\n');
        }
        for t in self.tables() {
            let _ = write!(out, "\n{}\n", terminal_safe(&t.title));
            let cells: Vec<Vec<String>> = std::iter::once(&t.header)
                .chain(&t.rows)
                .map(|r| r.iter().map(|c| terminal_safe(c)).collect())
                .collect();
            let columns = cells.iter().map(Vec::len).max().unwrap_or(0);
            let widths: Vec<usize> = (0..columns)
                .map(|i| {
                    cells
                        .iter()
                        .filter_map(|r| r.get(i))
                        .map(|c| c.chars().count())
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            for row in &cells {
                let mut line = String::new();
                for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                    let _ = match i {
                        0 => write!(line, "{cell:<w$}"),
                        _ => write!(line, "  {cell:>w$}"),
                    };
                }
                out.push_str(line.trim_end());
                out.push('\n');
            }
        }
        out
    }

    /// The report as Markdown: headings and pipe tables.
    pub fn markdown(&self) -> String {
        let mut out = String::from("# camelid eval report\n\n");
        for line in self.preamble() {
            let _ = writeln!(out, "- {}", markdown_safe(&line));
        }
        for t in self.tables() {
            let _ = write!(out, "\n## {}\n\n", markdown_safe(&t.title));
            let row = |cells: &[String]| {
                let cells: Vec<String> = cells.iter().map(|c| markdown_safe(c)).collect();
                format!("| {} |\n", cells.join(" | "))
            };
            out.push_str(&row(&t.header));
            let align: Vec<&str> = (0..t.header.len())
                .map(|i| if i == 0 { ":--" } else { "--:" })
                .collect();
            let _ = writeln!(out, "|{}|", align.join("|"));
            for r in &t.rows {
                out.push_str(&row(r));
            }
        }
        out
    }
}

/// `s` with every character a terminal could act on (control characters, escape sequences' ESC, and the bidi
/// controls that reorder what is shown) replaced by U+FFFD.
pub(super) fn terminal_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            let bidi =
                matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi { '\u{fffd}' } else { c }
        })
        .collect()
}

/// `s` as literal text in a Markdown table cell or heading: HTML escaped (Markdown passes tags through) and
/// Markdown's own punctuation backslash-escaped.
pub(super) fn markdown_safe(s: &str) -> String {
    let mut out = String::new();
    for c in escape(&terminal_safe(s)).chars() {
        if matches!(c, '\\' | '`' | '*' | '_' | '[' | ']' | '|' | '~') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_and_markdown_text_is_inert() {
        assert_eq!(
            terminal_safe("a\u{1b}[31mb\nc\u{202e}d"),
            "a\u{fffd}[31mb\u{fffd}c\u{fffd}d"
        );
        assert_eq!(markdown_safe("<b>|x_y"), "&lt;b&gt;\\|x\\_y");
    }
}
