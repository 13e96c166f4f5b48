//! `bitclone-chaos`: the failover harness. Starts a cluster of real
//! `bitclone node` processes, runs SDK clients against it while a seeded
//! schedule of faults plays, heals, checks the oracle's invariants and
//! writes a report (JSON, Markdown, SVG).
//!
//! ```text
//! bitclone-chaos [--smoke | --long] [--seed S] [--schedule FILE]
//!                [--nodes N] [--clients C] [--cycles K] [--out DIR]
//!                [--no-sandbox] [--op-interval-ms MS]
//! bitclone-chaos --upgrade-from OLD_BITCLONE [--seed S] [--out DIR]
//! ```
//!
//! `--upgrade-from` plays a rolling upgrade instead of faults: the nodes
//! start on the older binary, are drained, stopped and started on this
//! build one at a time (the highest id first), then one is rolled back;
//! the workload runs throughout and no clone job may fail
//! (`make upgrade-test`).
//!
//! As root it re-executes itself in network and mount namespaces of its
//! own (the sandbox) and plays the network and disk nemeses too; without
//! root (or with `--no-sandbox`) the process and membership faults only.
//! Without Garage and Postgres there are no clone jobs and no lease-holder
//! kills. The report says what was left out.

use std::path::PathBuf;
use std::process::ExitCode;

use bitclone_chaos::run::{playable, run, watch_signals, RunOptions};
use bitclone_chaos::sandbox;
use bitclone_chaos::schedule::{self, every_nemesis, Schedule, Timing};
use bitclone_chaos::servers::{Garage, PgServer};

fn main() -> ExitCode {
    match main_inner() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bitclone-chaos: {e}");
            ExitCode::from(2)
        }
    }
}

fn main_inner() -> Result<ExitCode, String> {
    let mut args = std::env::args().skip(1);
    let (mut long, mut seed, mut schedule_file) = (false, None::<u64>, None::<PathBuf>);
    let (mut nodes, mut clients, mut cycles) = (None::<u64>, 3u32, 100usize);
    let (mut out, mut no_sandbox, mut interval) = (None::<PathBuf>, false, None::<u64>);
    let mut previous = None::<PathBuf>;
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--smoke" => long = false,
            "--long" => long = true,
            "--seed" => {
                seed = Some(
                    value("--seed")?
                        .parse()
                        .map_err(|e| format!("--seed: {e}"))?,
                )
            }
            "--schedule" => schedule_file = Some(value("--schedule")?.into()),
            "--nodes" => {
                nodes = Some(
                    value("--nodes")?
                        .parse()
                        .map_err(|e| format!("--nodes: {e}"))?,
                )
            }
            "--clients" => {
                clients = value("--clients")?
                    .parse()
                    .map_err(|e| format!("--clients: {e}"))?
            }
            "--cycles" => {
                cycles = value("--cycles")?
                    .parse()
                    .map_err(|e| format!("--cycles: {e}"))?
            }
            "--out" => out = Some(value("--out")?.into()),
            "--no-sandbox" => no_sandbox = true,
            "--upgrade-from" => previous = Some(value("--upgrade-from")?.into()),
            "--op-interval-ms" => {
                interval = Some(
                    value("--op-interval-ms")?
                        .parse()
                        .map_err(|e| format!("--op-interval-ms: {e}"))?,
                )
            }
            "-h" | "--help" => {
                println!("usage: bitclone-chaos [--smoke | --long] [--seed S] [--schedule FILE] [--nodes N] [--clients C] [--cycles K] [--out DIR] [--no-sandbox] [--op-interval-ms MS] [--upgrade-from OLD_BITCLONE]");
                return Ok(ExitCode::SUCCESS);
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    let mut notes = Vec::new();
    let sandboxed = if sandbox::inside() {
        true
    } else if previous.is_some() {
        // An upgrade replaces processes; it needs no namespaces.
        false
    } else if no_sandbox {
        notes.push("Run with --no-sandbox: process and membership faults only.".to_string());
        false
    } else if !sandbox::is_root() {
        notes.push(
            "Not run as root: no namespaces, so process and membership faults only.".to_string(),
        );
        false
    } else if !sandbox::missing_tools().is_empty() {
        notes.push(format!(
            "Missing {} (scripts/install-deps.sh installs them): process and membership faults only.",
            sandbox::missing_tools().join(", ")
        ));
        false
    } else {
        // Replaced by the same program inside its namespaces.
        let e = sandbox::reexec_inside();
        return Err(format!("entering the sandbox (unshare): {e}"));
    };
    let seed = seed.unwrap_or_else(rand::random);
    let jobs = Garage::available() && PgServer::available();
    let kinds: Vec<_> = every_nemesis()
        .into_iter()
        .filter(|n| playable(n, sandboxed, jobs, previous.is_some()))
        .collect();
    let left_out: Vec<String> = every_nemesis()
        .iter()
        .filter(|n| !playable(n, sandboxed, jobs, previous.is_some()))
        .map(|n| n.name())
        .collect();
    let (timing, nodes) = if long {
        (
            Timing {
                min_fault_ms: 3_000,
                max_fault_ms: 12_000,
                quiet_ms: 5_000,
            },
            nodes.unwrap_or(5),
        )
    } else {
        (
            Timing {
                min_fault_ms: 3_000,
                max_fault_ms: 4_000,
                quiet_ms: 4_000,
            },
            nodes.unwrap_or(3),
        )
    };
    if let Some(p) = &previous {
        if !jobs {
            return Err(
                "an upgrade run needs Garage and Postgres for its clone jobs \
                 (scripts/install-garage.sh, scripts/install-deps.sh)"
                    .into(),
            );
        }
        if !p.is_file() {
            return Err(format!("--upgrade-from {}: no such file", p.display()));
        }
    }
    let upgrade_timing = Timing {
        min_fault_ms: 2_000,
        max_fault_ms: 2_000,
        quiet_ms: 12_000,
    };
    let schedule: Schedule = match &schedule_file {
        Some(f) => {
            let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))?
        }
        None if previous.is_some() => schedule::upgrade(seed, nodes, upgrade_timing),
        None if long => schedule::long(seed, &kinds, cycles, timing),
        None => schedule::smoke(seed, &kinds, timing),
    };
    if let Some(bad) = schedule
        .faults
        .iter()
        .find(|f| !playable(&f.nemesis, sandboxed, jobs, previous.is_some()))
    {
        return Err(format!(
            "the schedule holds {}, which this harness cannot play here",
            bad.nemesis.name()
        ));
    }
    let out = out.unwrap_or_else(|| std::env::temp_dir().join(format!("bitclone-chaos-{seed}")));
    if out.exists() {
        return Err(format!("{} exists: pick another --out", out.display()));
    }
    println!(
        "bitclone-chaos: seed {} ({} faults, {} nodes, {} clients{}), out {}",
        schedule.seed,
        schedule.faults.len(),
        nodes,
        clients,
        if sandboxed { ", in its namespaces" } else { "" },
        out.display()
    );
    if let Some(p) = &previous {
        notes.push(format!(
            "A rolling upgrade from {} to this build ({}), and one node rolled back: \
             every node drained (as a pod's preStop does), stopped with SIGTERM and started \
             on the other build.",
            p.display(),
            env!("CARGO_PKG_VERSION")
        ));
    } else if !left_out.is_empty() {
        notes.push(format!("Not played here: {}.", left_out.join(", ")));
    }
    notes.push(
        "Nodes run with the defaults: Raft heartbeat 50 ms, election timeout 200 to 400 ms \
         (openraft 0.9 has no pre-vote: a follower first waits out the leader's lease of \
         election_timeout_max, so a dead leader is replaced 600 to 800 ms after its last \
         heartbeat), job lease 5 s."
            .to_string(),
    );
    watch_signals();
    // A Ctrl-C reaches the harness alone; it stops the nodes itself.
    bitclone_chaos::node::own_process_groups();
    let upgrading = previous.is_some();
    let outcome = run(&RunOptions {
        nodes,
        clients,
        schedule,
        quiet_ms: if upgrading {
            upgrade_timing.quiet_ms
        } else {
            timing.quiet_ms
        },
        heal_bound_ms: 30_000,
        dir: out.clone(),
        sandbox: sandboxed,
        // Each client at most 10 operations a second (5 in the long run).
        op_interval_ms: interval.unwrap_or(if long { 200 } else { 100 }),
        notes,
        previous,
    });
    for v in &outcome.verdicts {
        println!(
            "{} {}",
            if v.holds { "holds " } else { "BROKEN" },
            v.invariant
        );
        for c in &v.counterexamples {
            println!("    {c}");
        }
    }
    println!(
        "{} operations; report: {}",
        outcome.ops,
        outcome.report_md.display()
    );
    Ok(if outcome.interrupted {
        ExitCode::from(130)
    } else if outcome.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
