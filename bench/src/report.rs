//! The Markdown report of a bench profile and its chart: a table step × tool
//! (seconds, files/s, ratio to the baseline tool, peak RSS) and a grouped
//! horizontal bar chart of the seconds, an SVG written as text here, so the
//! report needs no plotting crate and renders wherever Markdown does.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

/// One tool's figures for one step.
#[derive(Clone, Debug)]
pub struct Measure {
    pub seconds: f64,
    /// Files in the tree the step worked on: files/s = files / seconds.
    pub files: u64,
    /// Peak RSS of the process the step ran (the CLI, restic, rsync, cp) and
    /// its children, in bytes.
    pub peak_rss: Option<u64>,
    /// Peak RSS of the largest bitclone node during the step, in bytes.
    pub node_rss: Option<u64>,
}

impl Measure {
    pub fn files_per_s(&self) -> Option<f64> {
        if self.seconds > 0.0 && self.seconds.is_finite() {
            Some(self.files as f64 / self.seconds)
        } else {
            None
        }
    }
}

/// A tool's figures: one entry per step of the report, `None` where the tool
/// has no such step (cp has no incremental mode).
pub struct ToolRow {
    pub tool: String,
    pub steps: Vec<Option<Measure>>,
}

pub struct Report {
    /// File stem: `<name>.md` and `<name>.svg`.
    pub name: String,
    pub title: String,
    pub steps: Vec<String>,
    pub tools: Vec<ToolRow>,
    /// The tool whose files/s the ratios are taken against.
    pub baseline: String,
    /// Lines under the table: what was measured and how.
    pub notes: Vec<String>,
}

const COLUMNS: usize = 7;

impl Report {
    /// The report of the `large` profile, from its JSON result.
    pub fn from_large(v: &Value) -> Report {
        let files = v["dataset"]["files"].as_u64().unwrap_or(0);
        let bytes = v["dataset"]["bytes"].as_u64().unwrap_or(0);
        let m = |s: &Value| {
            s.as_f64().map(|seconds| Measure {
                seconds,
                files,
                peak_rss: None,
                node_rss: None,
            })
        };
        let mut tools = vec![
            ToolRow {
                tool: "bitclone (1 node)".to_string(),
                steps: vec![
                    m(&v["cold"]["seconds"]),
                    m(&v["incremental"]["seconds"]),
                    m(&v["restore"]["seconds"]),
                ],
            },
            ToolRow {
                tool: "cp -r + sync".to_string(),
                steps: vec![m(&v["cp_sync_seconds"]), None, None],
            },
        ];
        if !v["restic"].is_null() {
            tools.push(ToolRow {
                tool: "restic".to_string(),
                steps: vec![
                    m(&v["restic"]["cold_seconds"]),
                    m(&v["restic"]["incremental_seconds"]),
                    None,
                ],
            });
        }
        let mut notes = vec![
            "Seconds of bitclone and restic end when the command does; cp's include a `sync` \
             (bitclone's own is in the JSON as `sync_after_seconds`)."
                .to_string(),
        ];
        if let Some(rss) = v["node_peak_rss_bytes"].as_u64() {
            notes.push(format!(
                "bitclone node peak RSS over the whole run: {}.",
                fmt_bytes(rss)
            ));
        }
        if v["restore"].is_null() {
            notes.push("No restore step: run with --verify.".to_string());
        }
        if v["restic"].is_null() {
            notes.push("restic not run: pass --restic (and install it).".to_string());
        }
        Report {
            name: "large".to_string(),
            title: format!(
                "large: {} in {} files, seconds per step",
                fmt_bytes(bytes),
                thousands(files)
            ),
            steps: ["cold put", "incremental put", "restore"]
                .into_iter()
                .map(String::from)
                .collect(),
            tools,
            baseline: "restic".to_string(),
            notes,
        }
    }

    /// files/s of `m` over the baseline's at the same step.
    fn ratio(&self, step: usize, m: &Measure) -> Option<f64> {
        let base = self
            .tools
            .iter()
            .find(|t| t.tool == self.baseline)?
            .steps
            .get(step)?
            .as_ref()?
            .files_per_s()?;
        let rate = m.files_per_s()?;
        if base > 0.0 {
            Some(rate / base)
        } else {
            None
        }
    }

    fn header(&self) -> [String; COLUMNS] {
        [
            "step".to_string(),
            "tool".to_string(),
            "seconds".to_string(),
            "files/s".to_string(),
            format!("× {}", self.baseline),
            "peak RSS".to_string(),
            "node peak RSS".to_string(),
        ]
    }

    fn rows(&self) -> Vec<[String; COLUMNS]> {
        let mut rows = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            for t in &self.tools {
                rows.push(match t.steps.get(i).and_then(Option::as_ref) {
                    Some(m) => [
                        step.clone(),
                        t.tool.clone(),
                        fmt_secs(m.seconds),
                        m.files_per_s()
                            .map_or_else(dash, |r| thousands(r.round() as u64)),
                        self.ratio(i, m).map_or_else(dash, |r| format!("{r:.2}")),
                        m.peak_rss.map_or_else(dash, fmt_bytes),
                        m.node_rss.map_or_else(dash, fmt_bytes),
                    ],
                    None => [
                        step.clone(),
                        t.tool.clone(),
                        "n/a".to_string(),
                        "n/a".to_string(),
                        dash(),
                        dash(),
                        dash(),
                    ],
                });
            }
        }
        rows
    }

    /// The report: title, chart (linked, `svg_name` beside the Markdown),
    /// table and notes.
    pub fn markdown(&self, svg_name: &str) -> String {
        let mut s = format!("# {}\n\n![{}]({svg_name})\n\n", self.title, self.title);
        s.push_str(&md_row(&self.header()));
        s.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: |\n");
        for row in self.rows() {
            s.push_str(&md_row(&row));
        }
        s.push_str(&format!(
            "\nfiles/s: files in the tree ÷ seconds. × {b}: files/s over {b}'s at the same \
             step (above 1: faster than {b}).\n\n",
            b = self.baseline
        ));
        for note in &self.notes {
            s.push_str(&format!("- {note}\n"));
        }
        s
    }

    /// The table as aligned plain text (for stderr).
    pub fn text_table(&self) -> String {
        let mut all = vec![self.header()];
        all.extend(self.rows());
        let mut widths = [0usize; COLUMNS];
        for row in &all {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut s = format!("{}\n", self.title);
        for (k, row) in all.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .zip(widths)
                .enumerate()
                .map(|(j, (cell, w))| {
                    // Names to the left, numbers to the right.
                    if j < 2 {
                        format!("{cell:<w$}")
                    } else {
                        format!("{cell:>w$}")
                    }
                })
                .collect();
            s.push_str(cells.join("  ").trim_end());
            s.push('\n');
            if k == 0 {
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                s.push_str(&rule.join("  "));
                s.push('\n');
            }
        }
        s
    }

    /// The chart of the seconds: one group per step, one bar per tool.
    pub fn chart(&self) -> String {
        let series: Vec<Series> = self
            .tools
            .iter()
            .map(|t| Series {
                name: t.tool.clone(),
                values: t
                    .steps
                    .iter()
                    .map(|m| m.as_ref().map(|m| m.seconds))
                    .collect(),
            })
            .collect();
        svg_chart(&self.title, &self.steps, &series)
    }

    pub fn md_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.md", self.name))
    }

    /// Writes `<dir>/<name>.md` and `<dir>/<name>.svg`; returns the Markdown's path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let svg_name = format!("{}.svg", self.name);
        let svg = dir.join(&svg_name);
        fs::write(&svg, self.chart()).with_context(|| format!("write {}", svg.display()))?;
        let md = self.md_path(dir);
        fs::write(&md, self.markdown(&svg_name))
            .with_context(|| format!("write {}", md.display()))?;
        Ok(md)
    }
}

fn dash() -> String {
    "-".to_string()
}

fn md_row(cells: &[String]) -> String {
    let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
    format!("| {} |\n", cells.join(" | "))
}

/// Seconds with three significant digits or so.
pub fn fmt_secs(s: f64) -> String {
    if s >= 100.0 {
        format!("{s:.0}")
    } else if s >= 10.0 {
        format!("{s:.1}")
    } else {
        format!("{s:.2}")
    }
}

pub fn fmt_bytes(b: u64) -> String {
    let mib = b as f64 / (1u64 << 20) as f64;
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.1} MiB")
    }
}

/// 1234567 → "1,234,567".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let head = match digits.len() % 3 {
        0 => 3,
        r => r,
    };
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    out.push_str(&digits[..head.min(digits.len())]);
    let mut i = head;
    while i + 3 <= digits.len() {
        out.push(',');
        out.push_str(&digits[i..i + 3]);
        i += 3;
    }
    out
}

// ------------------------------------------------------------------ chart

/// A tool's bars: its seconds at each step (`None`: no such step).
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

const WIDTH: f64 = 800.0;
/// Left of the plot: the step labels.
const LEFT: f64 = 140.0;
/// Right of the plot: room for the value past the longest bar.
const RIGHT: f64 = 70.0;
/// Above the plot: the title.
const TOP: f64 = 48.0;
const BAR: f64 = 16.0;
const BAR_GAP: f64 = 4.0;
const GROUP_GAP: f64 = 16.0;
/// Below the plot: tick labels and the axis caption.
const AXIS: f64 = 44.0;
const LEGEND_X: f64 = 16.0;
const LEGEND_ROW: f64 = 22.0;
/// Okabe–Ito: told apart by colour-blind readers too.
const COLORS: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
];

/// A grouped horizontal bar chart as standalone SVG: one group per step,
/// one bar per series, bar length proportional to the value (seconds), the
/// value printed past the bar ("n/a" where a series has none), an x axis
/// from 0 with ticks, and a legend.
pub fn svg_chart(title: &str, steps: &[String], series: &[Series]) -> String {
    let plot_w = WIDTH - LEFT - RIGHT;
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let (tick, end) = axis_scale(max);
    let group_h = series.len().max(1) as f64 * (BAR + BAR_GAP) + GROUP_GAP;
    let plot_h = steps.len().max(1) as f64 * group_h;
    let bottom = TOP + plot_h;
    let legend = legend_layout(series);
    let legend_rows = legend.last().map_or(0, |&(_, row)| row + 1);
    let legend_top = bottom + AXIS;
    let height = legend_top + legend_rows as f64 * LEGEND_ROW + 8.0;

    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {WIDTH} {height:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    );
    s.push_str("<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n");
    s.push_str(&format!(
        "<text x=\"{:.1}\" y=\"26\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        WIDTH / 2.0,
        esc(title)
    ));

    // Grid lines and tick labels; at most a handful (axis_scale).
    let ticks = (end / tick).round() as u32;
    let decimals = tick_decimals(tick);
    for k in 0..=ticks {
        let v = f64::from(k) * tick;
        let x = LEFT + v / end * plot_w;
        s.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{bottom:.1}\" stroke=\"#dddddd\"/>\n"
        ));
        s.push_str(&format!(
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{v:.decimals$}</text>\n",
            bottom + 16.0
        ));
    }
    s.push_str(&format!(
        "<line x1=\"{LEFT}\" y1=\"{bottom:.1}\" x2=\"{:.1}\" y2=\"{bottom:.1}\" stroke=\"#333333\"/>\n",
        LEFT + plot_w
    ));
    s.push_str(&format!(
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{bottom:.1}\" stroke=\"#333333\"/>\n"
    ));
    s.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#333333\">seconds (shorter is faster)</text>\n",
        LEFT + plot_w / 2.0,
        bottom + 34.0
    ));

    for (g, step) in steps.iter().enumerate() {
        let gy = TOP + g as f64 * group_h + GROUP_GAP / 2.0;
        let mid = gy + (group_h - GROUP_GAP) / 2.0;
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{mid:.1}\" text-anchor=\"end\" dominant-baseline=\"middle\" font-weight=\"bold\">{}</text>\n",
            LEFT - 8.0,
            esc(step)
        ));
        for (k, se) in series.iter().enumerate() {
            let y = gy + k as f64 * (BAR + BAR_GAP);
            let cy = y + BAR / 2.0;
            let color = COLORS[k % COLORS.len()];
            match se.values.get(g).copied().flatten().filter(|v| v.is_finite()) {
                Some(v) => {
                    let w = v.clamp(0.0, end) / end * plot_w;
                    s.push_str(&format!(
                        "<rect class=\"bar\" x=\"{LEFT}\" y=\"{y:.1}\" width=\"{w:.2}\" height=\"{BAR}\" fill=\"{color}\"><title>{} ({}): {} s</title></rect>\n",
                        esc(&se.name),
                        esc(step),
                        fmt_secs(v)
                    ));
                    s.push_str(&format!(
                        "<text x=\"{:.1}\" y=\"{cy:.1}\" dominant-baseline=\"middle\">{} s</text>\n",
                        LEFT + w + 4.0,
                        fmt_secs(v)
                    ));
                }
                None => s.push_str(&format!(
                    "<text x=\"{:.1}\" y=\"{cy:.1}\" dominant-baseline=\"middle\" fill=\"#666666\">n/a</text>\n",
                    LEFT + 4.0
                )),
            }
        }
    }

    for (&(x, row), (k, se)) in legend.iter().zip(series.iter().enumerate()) {
        let y = legend_top + row as f64 * LEGEND_ROW;
        let color = COLORS[k % COLORS.len()];
        s.push_str(&format!(
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"12\" height=\"12\" fill=\"{color}\"/>\n"
        ));
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" dominant-baseline=\"middle\">{}</text>\n",
            x + 18.0,
            y + 6.0,
            esc(&se.name)
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// The tick step (1, 2 or 5 × 10^k, for about five ticks) and the axis end
/// (a whole number of ticks, at least `max`).
fn axis_scale(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (0.2, 1.0);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let tick = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|t| *t >= raw)
        .unwrap_or(10.0 * mag);
    let n = (max / tick).ceil().max(1.0);
    (tick, n * tick)
}

/// Decimals that show a tick step exactly: 0 for 1 and up, 1 for 0.2, 2 for 0.05.
fn tick_decimals(tick: f64) -> usize {
    if tick >= 1.0 {
        0
    } else {
        (-tick.log10()).ceil().clamp(0.0, 6.0) as usize
    }
}

/// Legend entries left to right, wrapping: (x, row) of each series.
fn legend_layout(series: &[Series]) -> Vec<(f64, usize)> {
    let mut out = Vec::with_capacity(series.len());
    let (mut x, mut row) = (LEGEND_X, 0usize);
    for se in series {
        // Swatch, gap, text at about 7 px a character, spacing.
        let w = 12.0 + 6.0 + 7.0 * se.name.chars().count() as f64 + 18.0;
        if x + w > WIDTH - LEGEND_X && x > LEGEND_X {
            x = LEGEND_X;
            row += 1;
        }
        out.push((x, row));
        x += w;
    }
    out
}

/// Text and attribute values for XML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps() -> Vec<String> {
        ["cold put", "incremental put", "restore"]
            .into_iter()
            .map(String::from)
            .collect()
    }

    fn series() -> Vec<Series> {
        vec![
            Series {
                name: "bitclone (1 node)".to_string(),
                values: vec![Some(1.0), Some(2.0), Some(0.5)],
            },
            Series {
                name: "restic".to_string(),
                values: vec![Some(4.0), None, Some(3.0)],
            },
            Series {
                name: "cp <-r>".to_string(),
                values: vec![Some(8.0), None, None],
            },
        ]
    }

    /// Tags open and close in order; self-closing ones stand alone.
    fn balanced(svg: &str) -> bool {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            let Some(j) = rest[i..].find('>') else {
                return false;
            };
            let tag = &rest[i + 1..i + j];
            rest = &rest[i + j + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                if stack.pop().as_deref() != Some(name.trim()) {
                    return false;
                }
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap_or("").to_string());
            }
        }
        stack.is_empty()
    }

    fn bar_widths(svg: &str) -> Vec<f64> {
        svg.split("<rect class=\"bar\"")
            .skip(1)
            .map(|s| {
                let w = s.split("width=\"").nth(1).unwrap();
                w[..w.find('"').unwrap()].parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn chart_is_well_formed_and_labelled() {
        let svg = svg_chart("many-files: 100,000 files", &steps(), &series());
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.ends_with("</svg>\n"));
        assert!(balanced(&svg), "unbalanced tags:\n{svg}");
        for label in [
            "many-files: 100,000 files",
            "cold put",
            "incremental put",
            "restore",
        ] {
            assert!(svg.contains(label), "missing {label}");
        }
        assert!(svg.contains("bitclone (1 node)"));
        assert!(svg.contains("restic"));
        // Escaped, never raw.
        assert!(svg.contains("cp &lt;-r&gt;"));
        assert!(!svg.contains("cp <-r>"));
        assert_eq!(svg.matches(">n/a<").count(), 3);
        assert!(!svg.contains("NaN"));
        assert!(!svg.contains("inf"));
        // Ticks 0, 2, 4, 6, 8 for a longest value of 8.
        for t in ["<text x=\"140.0\"", ">0<", ">2<", ">4<", ">6<", ">8<"] {
            assert!(svg.contains(t), "missing tick {t}");
        }
    }

    #[test]
    fn bar_widths_are_proportional() {
        let svg = svg_chart("t", &steps(), &series());
        // Bars in drawing order: step by step, series by series.
        let w = bar_widths(&svg);
        assert_eq!(w.len(), 6);
        let values = [1.0, 4.0, 8.0, 2.0, 0.5, 3.0];
        for (width, value) in w.iter().zip(values) {
            let expected = w[0] * value;
            assert!(
                (width - expected).abs() < 0.05,
                "width {width} for {value}, expected {expected}"
            );
        }
        // The longest bar spans the plot: the axis ends at the largest value.
        assert!((w[2] - (WIDTH - LEFT - RIGHT)).abs() < 0.01);
    }

    #[test]
    fn chart_without_values() {
        let empty = vec![Series {
            name: "x".to_string(),
            values: vec![None],
        }];
        let svg = svg_chart("nothing", &["cold put".to_string()], &empty);
        assert!(balanced(&svg));
        assert!(svg.contains(">n/a<"));
        assert!(!svg.contains("NaN"));
        let svg = svg_chart("none", &[], &[]);
        assert!(balanced(&svg));
    }

    #[test]
    fn axis_ticks() {
        let near = |max: f64, tick: f64, end: f64| {
            let (t, e) = axis_scale(max);
            assert!(
                (t - tick).abs() < 1e-9 * tick && (e - end).abs() < 1e-9 * end,
                "axis_scale({max}) = ({t}, {e}), expected ({tick}, {end})"
            );
        };
        near(8.0, 2.0, 8.0);
        near(9.0, 2.0, 10.0);
        near(0.7, 0.2, 0.8);
        near(0.0, 0.2, 1.0);
        near(f64::NAN, 0.2, 1.0);
        near(1234.0, 500.0, 1500.0);
        assert_eq!(tick_decimals(0.2), 1);
        assert_eq!(tick_decimals(0.05), 2);
        assert_eq!(tick_decimals(500.0), 0);
    }

    #[test]
    fn thousands_groups() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    fn m(seconds: f64, files: u64) -> Option<Measure> {
        Some(Measure {
            seconds,
            files,
            peak_rss: Some(3 << 20),
            node_rss: None,
        })
    }

    #[test]
    fn table_ratios_and_markdown() {
        let r = Report {
            name: "many-files".to_string(),
            title: "many-files: 1,000 files".to_string(),
            steps: steps(),
            tools: vec![
                ToolRow {
                    tool: "bitclone (1 node)".to_string(),
                    steps: vec![m(5.0, 1000), m(1.0, 1000), m(2.0, 1000)],
                },
                ToolRow {
                    tool: "restic".to_string(),
                    steps: vec![m(10.0, 1000), m(4.0, 1000), None],
                },
                ToolRow {
                    tool: "cp -r".to_string(),
                    steps: vec![m(20.0, 1000), None, m(1.0, 1000)],
                },
            ],
            baseline: "restic".to_string(),
            notes: vec!["a note".to_string()],
        };
        let rows = r.rows();
        assert_eq!(rows.len(), 9);
        // bitclone cold: 200 files/s vs restic's 100.
        assert_eq!(rows[0][3], "200");
        assert_eq!(rows[0][4], "2.00");
        assert_eq!(rows[0][5], "3.0 MiB");
        assert_eq!(rows[1][4], "1.00");
        assert_eq!(rows[2][4], "0.50");
        // cp has no incremental step; restic no restore, so no ratio there.
        assert_eq!(rows[5][2], "n/a");
        assert_eq!(rows[6][4], "-");
        let md = r.markdown("many-files.svg");
        assert!(md.starts_with("# many-files: 1,000 files\n"));
        assert!(md.contains("![many-files: 1,000 files](many-files.svg)"));
        assert!(md
            .contains("| step | tool | seconds | files/s | × restic | peak RSS | node peak RSS |"));
        assert!(md.contains("| cold put | bitclone (1 node) | 5.00 | 200 | 2.00 | 3.0 MiB | - |"));
        assert!(md.contains("- a note\n"));
        let text = r.text_table();
        assert_eq!(text.lines().count(), 2 + 1 + 9);
        assert!(balanced(&r.chart()));
    }

    #[test]
    fn large_report_from_json() {
        let v = serde_json::json!({
            "dataset": {"bytes": 1u64 << 30, "files": 2000},
            "cp_sync_seconds": 4.0,
            "cold": {"seconds": 2.0},
            "incremental": {"seconds": 0.5},
            "restic": {"cold_seconds": 8.0, "incremental_seconds": 1.0},
            "restore": null,
            "node_peak_rss_bytes": 200u64 << 20,
        });
        let r = Report::from_large(&v);
        assert_eq!(r.tools.len(), 3);
        assert!(r.title.contains("2,000 files"));
        let rows = r.rows();
        assert_eq!(rows[0][4], "4.00");
        assert!(r.notes.iter().any(|n| n.contains("200.0 MiB")));
        assert!(r.notes.iter().any(|n| n.contains("--verify")));
    }
}
