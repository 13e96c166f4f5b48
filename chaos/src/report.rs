//! A run's report: the figures computed from the clients' records (worst
//! client unavailability per fault, the CockroachDB failover figure), a
//! plot of operations and failures per second with the fault windows
//! shaded (SVG, written here), and the Markdown around it. Plain code.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::oracle::{Op, Outcome, Verdict};
use crate::schedule::{Fault, Schedule};

/// One fault's effect on the clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FaultFigure {
    pub fault: String,
    pub start_ms: u64,
    pub end_ms: u64,
    /// The longest time, from the fault's start until `quiet_ms` after its
    /// end, in which no client operation was acknowledged.
    pub worst_unavailability_ms: u64,
    /// Time to heal: from the fault's end to the first acknowledged put
    /// invoked after it (`None`: none was).
    pub heal_ms: Option<u64>,
}

/// The longest stretch of `[from, to]` with no acknowledged operation
/// completing in it.
pub fn unavailability(history: &[Op], from: u64, to: u64) -> u64 {
    let mut done: Vec<u64> = history
        .iter()
        .filter(|o| o.outcome == Outcome::Ok && (from..=to).contains(&o.completed_ms))
        .map(|o| o.completed_ms)
        .collect();
    done.sort_unstable();
    let mut last = from;
    let mut worst = 0;
    for t in done.into_iter().chain([to]) {
        worst = worst.max(t.saturating_sub(last));
        last = t;
    }
    worst
}

/// Each fault's worst client unavailability, counted until `quiet_ms`
/// after it ends.
pub fn fault_figures(history: &[Op], schedule: &Schedule, quiet_ms: u64) -> Vec<FaultFigure> {
    schedule
        .faults
        .iter()
        .map(|f: &Fault| FaultFigure {
            fault: f.nemesis.name(),
            start_ms: f.start_ms,
            end_ms: f.end_ms,
            worst_unavailability_ms: unavailability(history, f.start_ms, f.end_ms + quiet_ms),
            heal_ms: first_put_from(history, f.end_ms),
        })
        .collect()
}

/// Milliseconds from `t` to the completion of the first acknowledged put
/// invoked at or after it.
fn first_put_from(history: &[Op], t: u64) -> Option<u64> {
    history
        .iter()
        .filter(|o| {
            matches!(o.kind, crate::oracle::OpKind::Put { .. })
                && o.outcome == Outcome::Ok
                && o.invoked_ms >= t
        })
        .map(|o| o.completed_ms - t)
        .min()
}

/// Per nemesis: how many ran, the worst unavailability among them and the
/// worst time to heal (`None` if one never healed).
pub fn by_nemesis(figures: &[FaultFigure]) -> BTreeMap<String, (usize, u64, Option<u64>)> {
    let mut m: BTreeMap<String, (usize, u64, Option<u64>)> = BTreeMap::new();
    for f in figures {
        let e = m.entry(f.fault.clone()).or_insert((0, 0, Some(0)));
        e.0 += 1;
        e.1 = e.1.max(f.worst_unavailability_ms);
        e.2 = match (e.2, f.heal_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    m
}

/// For each fault of `nemesis` (by name): milliseconds from its start to
/// the first acknowledged put invoked after it (`None`: none was).
pub fn first_write_after(history: &[Op], schedule: &Schedule, nemesis: &str) -> Vec<Option<u64>> {
    schedule
        .faults
        .iter()
        .filter(|f| f.nemesis.name() == nemesis)
        .map(|f| first_put_from(history, f.start_ms))
        .collect()
}

/// The median and the largest of `v` (`None` when empty).
pub fn p50_max(v: &[u64]) -> Option<(u64, u64)> {
    let mut v = v.to_vec();
    v.sort_unstable();
    Some((*v.get(v.len().checked_sub(1)? / 2)?, *v.last()?))
}

/// Acknowledged and failed-or-unknown operations per second.
pub fn per_second(history: &[Op]) -> Vec<(u64, u64)> {
    let end = history.iter().map(|o| o.completed_ms).max().unwrap_or(0) / 1000;
    let mut v = vec![(0u64, 0u64); end as usize + 1];
    for o in history {
        let s = &mut v[(o.completed_ms / 1000) as usize];
        if o.outcome == Outcome::Ok {
            s.0 += 1;
        } else {
            s.1 += 1;
        }
    }
    v
}

/// The plot: operations (green) and failures (red) per second, fault
/// windows shaded and named.
pub fn svg(history: &[Op], schedule: &Schedule) -> String {
    const W: f64 = 960.0;
    const H: f64 = 300.0;
    const PAD: f64 = 40.0;
    let series = per_second(history);
    let seconds = (series.len() as u64)
        .max(schedule.end_ms() / 1000 + 1)
        .max(1) as f64;
    let top = series
        .iter()
        .map(|(a, b)| (*a).max(*b))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let x = |s: f64| PAD + s / seconds * (W - 2.0 * PAD);
    let y = |v: f64| H - PAD - v / top * (H - 2.0 * PAD);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="10">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    for f in &schedule.faults {
        let (a, b) = (x(f.start_ms as f64 / 1000.0), x(f.end_ms as f64 / 1000.0));
        let _ = writeln!(
            out,
            r##"<rect x="{a:.1}" y="{PAD}" width="{:.1}" height="{:.1}" fill="#f4c542" fill-opacity="0.25"><title>{}</title></rect>"##,
            (b - a).max(1.0),
            H - 2.0 * PAD,
            f.nemesis.name()
        );
        let _ = writeln!(
            out,
            r##"<text x="{a:.1}" y="{:.1}" fill="#806000" transform="rotate(-30 {a:.1} {:.1})">{}</text>"##,
            PAD - 4.0,
            PAD - 4.0,
            f.nemesis.name()
        );
    }
    for (color, pick) in [("#2a9d3a", 0usize), ("#d62828", 1)] {
        let points: Vec<String> = series
            .iter()
            .enumerate()
            .map(|(s, v)| {
                let v = if pick == 0 { v.0 } else { v.1 };
                format!("{:.1},{:.1}", x(s as f64 + 0.5), y(v as f64))
            })
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            points.join(" ")
        );
    }
    // Axes and their labels.
    let _ = writeln!(
        out,
        r#"<line x1="{PAD}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{b}" stroke="black"/>"#,
        b = H - PAD,
        r = W - PAD
    );
    let _ = writeln!(
        out,
        r#"<text x="{PAD}" y="{:.1}">0 s</text><text x="{:.1}" y="{:.1}" text-anchor="end">{seconds:.0} s</text><text x="4" y="{:.1}">{top:.0}/s</text>"#,
        H - PAD + 14.0,
        W - PAD,
        H - PAD + 14.0,
        PAD + 4.0
    );
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" fill="#2a9d3a">acknowledged ops/s</text><text x="{:.1}" y="{:.1}" fill="#d62828">failed or unknown ops/s</text>"##,
        W / 2.0 - 120.0,
        H - 8.0,
        W / 2.0 + 20.0,
        H - 8.0
    );
    out.push_str("</svg>\n");
    out
}

/// The Markdown report.
pub fn markdown(
    title: &str,
    schedule: &Schedule,
    verdicts: &[Verdict],
    figures: &[FaultFigure],
    failover: &[(String, Vec<Option<u64>>)],
    notes: &[String],
    plot_file: &str,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# {title}\n");
    let _ = writeln!(
        md,
        "Seed {} ({} faults); replay with `bitclone-chaos --seed {} --schedule schedule.json`.\n",
        schedule.seed,
        schedule.faults.len(),
        schedule.seed
    );
    for n in notes {
        let _ = writeln!(md, "- {n}");
    }
    if !notes.is_empty() {
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "## Invariants\n\n| invariant | verdict | violations |\n|---|---|---|"
    );
    for v in verdicts {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            v.invariant,
            if v.holds { "holds" } else { "**BROKEN**" },
            v.violations
        );
    }
    for v in verdicts.iter().filter(|v| !v.holds) {
        let _ = writeln!(md, "\n{}:\n", v.invariant);
        for c in &v.counterexamples {
            let _ = writeln!(md, "- {c}");
        }
    }
    let _ = writeln!(
        md,
        "\n## Faults\n\n![operations and failures per second]({plot_file})\n\nPer nemesis, the longest time no client operation was acknowledged (from the fault's start to the quiet time after it) and the worst time to heal (from the fault's end to the first acknowledged put invoked after it).\n\n| nemesis | runs | worst client unavailability | worst time to heal |\n|---|---|---|---|"
    );
    for (name, (runs, worst, heal)) in by_nemesis(figures) {
        let heal = heal.map_or("never".to_string(), |h| {
            format!("{:.2} s", h as f64 / 1000.0)
        });
        let _ = writeln!(
            md,
            "| {name} | {runs} | {:.1} s | {heal} |",
            worst as f64 / 1000.0
        );
    }
    if !failover.is_empty() {
        let _ = writeln!(
            md,
            "\n## Failover\n\nFrom the kill to the first acknowledged put invoked after it; for a lease holder's kill also from the kill to its job's success on another node.\n\n| fault | runs | p50 | max | never |\n|---|---|---|---|---|"
        );
        for (name, times) in failover {
            let done: Vec<u64> = times.iter().flatten().copied().collect();
            let never = times.len() - done.len();
            match p50_max(&done) {
                Some((p50, max)) => {
                    let _ = writeln!(
                        md,
                        "| {name} | {} | {:.2} s | {:.2} s | {never} |",
                        times.len(),
                        p50 as f64 / 1000.0,
                        max as f64 / 1000.0
                    );
                }
                None => {
                    let _ = writeln!(md, "| {name} | {} | - | - | {never} |", times.len());
                }
            }
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::OpKind;
    use crate::schedule::{every_nemesis, smoke, Nemesis, Timing};

    fn status(at: u64, ok: bool) -> Op {
        Op {
            client: 1,
            invoked_ms: at.saturating_sub(5),
            completed_ms: at,
            kind: OpKind::Status { leader: Some(1) },
            outcome: if ok {
                Outcome::Ok
            } else {
                Outcome::Unknown("deadline".into())
            },
        }
    }

    #[test]
    fn unavailability_is_the_longest_stretch_without_an_acknowledgement() {
        // Acknowledged every 100 ms, except from 1000 to 3500 ms.
        let h: Vec<Op> = (0..60)
            .map(|i| i * 100)
            .map(|t| status(t, !(1001..3500).contains(&t)))
            .collect();
        assert_eq!(unavailability(&h, 500, 5000), 2500);
        // Nothing acknowledged at all: the whole window.
        assert_eq!(unavailability(&h, 1100, 3400), 2300);
        // Up to the window's end after the last acknowledgement.
        assert_eq!(unavailability(&h, 5800, 7000), 1100);
    }

    #[test]
    fn figures_per_nemesis_keep_the_worst() {
        let s = Schedule {
            seed: 1,
            faults: vec![
                Fault {
                    nemesis: Nemesis::KillLeader,
                    start_ms: 1000,
                    end_ms: 1500,
                },
                Fault {
                    nemesis: Nemesis::KillLeader,
                    start_ms: 4000,
                    end_ms: 4500,
                },
            ],
        };
        let h: Vec<Op> = (0..60)
            .map(|i| i * 100)
            .map(|t| status(t, !(1001..1800).contains(&t) && !(4001..4300).contains(&t)))
            .collect();
        let f = fault_figures(&h, &s, 1000);
        // Statuses are not writes: no put, no failover figure.
        assert_eq!(first_write_after(&h, &s, "kill-leader"), [None, None]);
        let mut h = h;
        for at in [1700, 1900, 4400] {
            h.push(Op {
                client: 2,
                invoked_ms: at,
                completed_ms: at + 50,
                kind: OpKind::Put {
                    dataset: "d".into(),
                    digest: "x".into(),
                    snapshot: Some("s".into()),
                },
                outcome: Outcome::Ok,
            });
        }
        assert_eq!(
            first_write_after(&h, &s, "kill-leader"),
            [Some(750), Some(450)]
        );
        assert_eq!(p50_max(&[750, 450]), Some((450, 750)));
        assert_eq!(p50_max(&[3, 1, 2]), Some((2, 3)));
        assert_eq!(p50_max(&[]), None);
        assert_eq!(f[0].worst_unavailability_ms, 800);
        assert_eq!(f[1].worst_unavailability_ms, 300);
        assert_eq!(by_nemesis(&f)["kill-leader"], (2, 800, None));
        // Healed: the first put invoked after each end (1500, 4500).
        let g = fault_figures(&h, &s, 1000);
        assert_eq!(g[0].heal_ms, Some(250));
        assert_eq!(g[1].heal_ms, None, "no put after the second");
        assert_eq!(by_nemesis(&g[..1])["kill-leader"], (1, 750, Some(250)));
        assert_eq!(by_nemesis(&g)["kill-leader"].2, None);
    }

    #[test]
    fn the_plot_and_the_markdown_show_faults_and_verdicts() {
        let s = smoke(
            3,
            &every_nemesis(),
            Timing {
                min_fault_ms: 1000,
                max_fault_ms: 2000,
                quiet_ms: 1000,
            },
        );
        let h: Vec<Op> = (0..400).map(|i| status(i * 100, i % 7 != 0)).collect();
        let svg = svg(&h, &s);
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<title>").count(), s.faults.len());
        assert_eq!(svg.matches("<polyline").count(), 2);
        let verdicts = crate::oracle::check(&h, &Default::default(), 1000);
        let md = markdown(
            "smoke",
            &s,
            &verdicts,
            &fault_figures(&h, &s, 1000),
            &[(
                "kill-leader".to_string(),
                first_write_after(&h, &s, "kill-leader"),
            )],
            &["process faults only".into()],
            "plot.svg",
        );
        assert!(md.contains("| kill-leader | 1 |"), "{md}");
        assert!(md.contains("**BROKEN**"), "{md}");
        assert!(md.contains("--seed 3"), "{md}");
        assert!(md.contains("| kill-leader | 1 | - | - | 1 |"), "{md}");
    }
}
