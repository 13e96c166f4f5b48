//! The harness's sandbox when it runs as root: fresh network and mount
//! namespaces (`unshare --net --mount`) that it and everything it starts
//! live in. Nodes listen on loopback addresses of their own (127.0.0.x)
//! inside it; network faults are nftables tables and a `tc` qdisc on that
//! namespace's `lo`, full disks are tmpfs mounts in that mount namespace.
//! Nothing reaches the host: when the last process of the namespaces
//! exits, the kernel removes the rules, the qdisc and the mounts with
//! them; [`Sandbox`]'s `Drop` removes them before that too.
//!
//! The rules themselves ([`nft_table`]) are plain text from plain data,
//! tested without root.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Set in the environment of the harness once it runs inside its sandbox.
pub const INSIDE: &str = "BITCLONE_CHAOS_SANDBOX";

/// Does this process run as root (uid 0)?
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next().map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Already inside the sandbox (re-executed by [`reexec_inside`])? The
/// variable alone is not trusted: the network namespace must also differ
/// from init's, so that nothing here ever touches the host's.
pub fn inside() -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    std::env::var_os(INSIDE).is_some() && ns("self").is_some() && ns("self") != ns("1")
}

/// What the sandbox needs on PATH and is missing.
pub fn missing_tools() -> Vec<&'static str> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["unshare", "ip", "nft", "tc", "mount", "umount", "df"]
        .into_iter()
        .filter(|t| !std::env::split_paths(&path).any(|d| d.join(t).is_file()))
        .collect()
}

/// Replaces this process with itself run in new network and mount
/// namespaces (the same arguments, [`INSIDE`] set). Returns only on error.
pub fn reexec_inside() -> std::io::Error {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return e,
    };
    Command::new("unshare")
        .args(["--net", "--mount", "--propagation", "private", "--"])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(INSIDE, "1")
        .exec()
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{program} {}: {e}", args.join(" ")))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| format!("{program}: writing its input: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// An nftables table (family `inet`) dropping every packet from `a` to
/// `b` for each `(a, b)` of `drops`, and `percent` of the packets from or
/// to `ip` for each `(ip, percent)` of `loss`. Loopback traffic passes the
/// output hook once, so one chain sees all of it. Every rule counts what
/// it dropped ([`dropped_packets`] reads it back).
pub fn nft_table(name: &str, drops: &[(Ipv4Addr, Ipv4Addr)], loss: &[(Ipv4Addr, u8)]) -> String {
    let mut t = format!(
        "table inet {name} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n"
    );
    for (a, b) in drops {
        t.push_str(&format!("    ip saddr {a} ip daddr {b} counter drop\n"));
    }
    for (ip, percent) in loss {
        for dir in ["saddr", "daddr"] {
            t.push_str(&format!(
                "    ip {dir} {ip} numgen random mod 100 < {percent} counter drop\n"
            ));
        }
    }
    t.push_str("  }\n}\n");
    t
}

/// The packets dropped by the rules of a table as `nft list table` prints
/// it (the sum of its counters).
pub fn dropped_packets(listing: &str) -> u64 {
    let words: Vec<&str> = listing.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "packets")
        .filter_map(|w| w[1].parse::<u64>().ok())
        .sum()
}

/// The `tc` commands that limit the packets each address of `limits` sends
/// on `lo` to its rate (kbit/s): an htb qdisc whose default class is left
/// unlimited in practice, one class per limited address and a u32 filter
/// on the source address. Empty `limits`: just the deletion of the qdisc.
pub fn tc_commands(limits: &BTreeMap<Ipv4Addr, u32>) -> Vec<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut cmds = vec![s(&["qdisc", "del", "dev", "lo", "root"])];
    if limits.is_empty() {
        return cmds;
    }
    cmds.push(s(&[
        "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "1",
    ]));
    cmds.push(s(&[
        "class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", "rate", "40gbit",
    ]));
    for (i, (ip, kbit)) in limits.iter().enumerate() {
        let class = format!("1:{:x}", i + 2);
        let rate = format!("{kbit}kbit");
        cmds.push(s(&[
            "class", "add", "dev", "lo", "parent", "1:", "classid", &class, "htb", "rate", &rate,
            "ceil", &rate,
        ]));
        let src = format!("{ip}/32");
        cmds.push(s(&[
            "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "src", &src, "flowid", &class,
        ]));
    }
    cmds
}

/// The faults in place inside the sandbox, removed on drop.
#[derive(Default)]
pub struct Sandbox {
    tables: BTreeSet<String>,
    limits: BTreeMap<Ipv4Addr, u32>,
    /// tmpfs mounts and the size (MiB) each was mounted with.
    mounts: BTreeMap<PathBuf, u64>,
}

impl Sandbox {
    /// Inside fresh namespaces: brings `lo` up.
    pub fn new() -> Result<Sandbox, String> {
        run("ip", &["link", "set", "lo", "up"], None)?;
        Ok(Sandbox::default())
    }

    /// Adds table `name` (see [`nft_table`]).
    pub fn add_table(
        &mut self,
        name: &str,
        drops: &[(Ipv4Addr, Ipv4Addr)],
        loss: &[(Ipv4Addr, u8)],
    ) -> Result<(), String> {
        run("nft", &["-f", "-"], Some(&nft_table(name, drops, loss)))?;
        self.tables.insert(name.to_string());
        Ok(())
    }

    /// Removes table `name`; returns the packets its rules dropped.
    pub fn remove_table(&mut self, name: &str) -> Result<u64, String> {
        let out = Command::new("nft")
            .args(["list", "table", "inet", name])
            .output()
            .map_err(|e| format!("nft list table: {e}"))?;
        run("nft", &["delete", "table", "inet", name], None)?;
        self.tables.remove(name);
        Ok(dropped_packets(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Limits what `ip` sends to `kbit` kbit/s (`None`: lifts its limit).
    pub fn limit(&mut self, ip: Ipv4Addr, kbit: Option<u32>) -> Result<(), String> {
        let mut limits = self.limits.clone();
        match kbit {
            Some(k) => limits.insert(ip, k),
            None => limits.remove(&ip),
        };
        // The qdisc is rebuilt whole; until that succeeds `self.limits` (what
        // `Drop` cleans up) keeps every address limited before or now.
        self.limits.extend(limits.iter().map(|(k, v)| (*k, *v)));
        for (i, c) in tc_commands(&limits).iter().enumerate() {
            let args: Vec<&str> = c.iter().map(String::as_str).collect();
            // Deleting a qdisc that is not there fails; that is fine.
            match run("tc", &args, None) {
                Err(_) if i == 0 => {}
                other => other?,
            }
        }
        self.limits = limits;
        Ok(())
    }

    /// Mounts a tmpfs of `mib` MiB on `dir` (made if missing).
    pub fn mount_tmpfs(&mut self, dir: &Path, mib: u64) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.to_string_lossy();
        run(
            "mount",
            &["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs", &path],
            None,
        )?;
        self.mounts.insert(dir.to_path_buf(), mib);
        Ok(())
    }

    /// Fills the tmpfs on `dir`: shrinks it to what it holds plus
    /// `headroom_mib`, so that the next writes find the disk full.
    pub fn fill(&self, dir: &Path, headroom_mib: u64) -> Result<(), String> {
        let used = used_bytes(dir)?;
        let size = used + (headroom_mib << 20);
        remount(dir, &format!("size={size}"))
    }

    /// Gives the tmpfs on `dir` its mounted size back.
    pub fn unfill(&self, dir: &Path) -> Result<(), String> {
        let mib = self
            .mounts
            .get(dir)
            .ok_or_else(|| format!("{} is not a tmpfs of the sandbox", dir.display()))?;
        remount(dir, &format!("size={mib}m"))
    }
}

fn remount(dir: &Path, size: &str) -> Result<(), String> {
    let path = dir.to_string_lossy();
    run(
        "mount",
        &["-o", &format!("remount,{size}"), "tmpfs", &path],
        None,
    )
}

/// Bytes in use on the file system holding `dir` (from `df`).
fn used_bytes(dir: &Path) -> Result<u64, String> {
    let out = Command::new("df")
        .args(["-B1", "--output=used"])
        .arg(dir)
        .output()
        .map_err(|e| format!("df: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("df {}: no size in its output", dir.display()))
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for t in std::mem::take(&mut self.tables) {
            let _ = run("nft", &["delete", "table", "inet", &t], None);
        }
        if !self.limits.is_empty() {
            let _ = run("tc", &["qdisc", "del", "dev", "lo", "root"], None);
        }
        // Lazily: a node that is still shutting down may hold files open.
        for dir in self.mounts.keys().rev() {
            let _ = run("umount", &["-l", &dir.to_string_lossy()], None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_nft_table_drops_the_links_and_the_loss_it_is_given() {
        let a = Ipv4Addr::new(127, 0, 0, 11);
        let b = Ipv4Addr::new(127, 0, 0, 12);
        let t = nft_table("chaos_3", &[(a, b)], &[(b, 20)]);
        assert!(t.starts_with("table inet chaos_3 {"), "{t}");
        assert!(t.contains("type filter hook output priority 0; policy accept;"));
        assert!(
            t.contains("ip saddr 127.0.0.11 ip daddr 127.0.0.12 counter drop"),
            "{t}"
        );
        assert!(
            !t.contains("ip saddr 127.0.0.12 ip daddr 127.0.0.11"),
            "one way"
        );
        assert!(t.contains("ip saddr 127.0.0.12 numgen random mod 100 < 20 counter drop"));
        assert!(t.contains("ip daddr 127.0.0.12 numgen random mod 100 < 20 counter drop"));
        assert_eq!(t.matches('{').count(), t.matches('}').count());
    }

    #[test]
    fn the_dropped_packets_are_the_sum_of_a_tables_counters() {
        let listing = "table inet bitclone_chaos_2 {\n\tchain out {\n\t\ttype filter hook output priority filter; policy accept;\n\t\tip saddr 127.0.0.11 ip daddr 127.0.0.12 counter packets 12 bytes 2048 drop\n\t\tip saddr 127.0.0.12 ip daddr 127.0.0.11 counter packets 30 bytes 9000 drop\n\t}\n}\n";
        assert_eq!(dropped_packets(listing), 42);
        assert_eq!(dropped_packets(""), 0);
    }

    #[test]
    fn tc_limits_each_address_in_a_class_of_its_own() {
        let mut limits = BTreeMap::new();
        assert_eq!(tc_commands(&limits).len(), 1, "only the deletion");
        limits.insert(Ipv4Addr::new(127, 0, 0, 12), 8_000);
        limits.insert(Ipv4Addr::new(127, 0, 0, 13), 500);
        let cmds: Vec<String> = tc_commands(&limits).iter().map(|c| c.join(" ")).collect();
        assert_eq!(cmds[0], "qdisc del dev lo root");
        assert!(cmds.contains(
            &"class add dev lo parent 1: classid 1:2 htb rate 8000kbit ceil 8000kbit".into()
        ));
        assert!(cmds.contains(
            &"filter add dev lo parent 1: protocol ip prio 1 u32 match ip src 127.0.0.13/32 flowid 1:3"
                .into()
        ));
        assert_eq!(cmds.len(), 3 + 2 * 2);
    }
}
