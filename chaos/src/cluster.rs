//! Real `bitclone node` processes forming a Raft cluster over mutual TLS.
//! Every node binds its own ports (port 0) on first start; a restart reuses
//! the ports it got, so its members' addresses stay valid.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::net::Ipv4Addr;

use crate::env::{bin, dev_certs_with};
use crate::node::TestNode;

/// Real `bitclone node` processes forming a Raft cluster over mutual TLS.
pub struct TestCluster {
    /// The `bitclone` binary the nodes run.
    pub bin: PathBuf,
    /// Nodes that run another binary than `bin` (a rolling upgrade).
    pub builds: BTreeMap<u64, PathBuf>,
    pub dir: PathBuf,
    pub nodes: BTreeMap<u64, TestNode>,
    pub ports: BTreeMap<u64, (u16, u16)>,
    /// Extra environment for every node.
    pub env: Vec<(String, String)>,
    /// Every node on a loopback address of its own ([`node_ip`]) rather
    /// than all on 127.0.0.1: what firewall rules between nodes need.
    pub own_ips: bool,
}

/// The loopback address of node `id` in a cluster with `own_ips`:
/// 127.0.0.(10 + id).
pub fn node_ip(id: u64) -> Ipv4Addr {
    let last = u8::try_from(10 + id).expect("node ids up to 245 have an address");
    Ipv4Addr::new(127, 0, 0, last)
}

impl TestCluster {
    /// Certificates for `max_nodes`, node 1 bootstraps, 2..=n join one by one.
    pub fn start(dir: &Path, n: u64, max_nodes: u64) -> TestCluster {
        Self::start_with_env(dir, n, max_nodes, &[])
    }

    pub fn start_with_env(dir: &Path, n: u64, max_nodes: u64, env: &[(&str, &str)]) -> TestCluster {
        Self::start_with_bin(bin(), dir, n, max_nodes, env)
    }

    /// Like `start_with_env`, with another binary (a bench's `--bitclone`).
    pub fn start_with_bin(
        bin: &Path,
        dir: &Path,
        n: u64,
        max_nodes: u64,
        env: &[(&str, &str)],
    ) -> TestCluster {
        Self::start_opts(bin, dir, n, max_nodes, env, false)
    }

    /// Like `start_with_bin`; with `own_ips` each node listens on
    /// [`node_ip`] (its certificate names that address too).
    pub fn start_opts(
        bin: &Path,
        dir: &Path,
        n: u64,
        max_nodes: u64,
        env: &[(&str, &str)],
        own_ips: bool,
    ) -> TestCluster {
        let sans: Vec<String> = match own_ips {
            true => (1..=max_nodes).map(|id| node_ip(id).to_string()).collect(),
            false => Vec::new(),
        };
        dev_certs_with(bin, &dir.join("certs"), max_nodes, &sans);
        let mut c = TestCluster {
            bin: bin.to_path_buf(),
            builds: BTreeMap::new(),
            dir: dir.to_path_buf(),
            nodes: BTreeMap::new(),
            ports: BTreeMap::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            own_ips,
        };
        c.start_node(1, &["--bootstrap".to_string()]);
        c.wait_voters(1, 1);
        for id in 2..=n {
            c.join(id);
        }
        c
    }

    pub fn join(&mut self, id: u64) {
        let seed = self.nodes.values().next().unwrap().endpoint.clone();
        self.start_node(id, &["--join".to_string(), seed]);
        let voters = self.nodes.len();
        self.wait_voters(id, voters);
    }

    /// Starts node `id`. On its first start it binds its own ports (port
    /// 0), learnt from `node.addr` and from its entry among the members; a
    /// restart reuses them.
    pub fn start_node(&mut self, id: u64, extra: &[String]) {
        let (api, peer) = self.ports.get(&id).copied().unwrap_or((0, 0));
        let ip = self.ip(id);
        let mut args = vec![
            "--node-id".to_string(),
            id.to_string(),
            "--peer-listen".to_string(),
            format!("{ip}:{peer}"),
            "--certs".to_string(),
            self.dir.join("certs").display().to_string(),
        ];
        args.extend_from_slice(extra);
        let mut env: Vec<(&str, &str)> = vec![("BITCLONE_SHUTDOWN_GRACE", "5s")];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let node = TestNode::spawn_bin(
            self.build_of(id),
            &self.node_dir(id),
            &format!("{ip}:{api}"),
            &args,
            &env,
        );
        self.nodes.insert(id, node);
        if self.ports.contains_key(&id) {
            return;
        }
        // A node serves once it bootstrapped or joined; its own entry among
        // the members (with the peer address it bound) follows shortly.
        let port = |addr: &str| addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        let mut learnt = None;
        self.wait_for(&format!("node {id}'s own addresses"), 30, |c| {
            learnt = c.status(id).and_then(|s| {
                let me = s["members"]
                    .as_array()?
                    .iter()
                    .find(|m| m["id"] == id)?
                    .clone();
                Some((
                    port(me["api_addr"].as_str()?)?,
                    port(me["peer_addr"].as_str()?)?,
                ))
            });
            learnt.is_some()
        });
        if let Some(ports) = learnt {
            self.ports.insert(id, ports);
        }
    }

    /// The address node `id` listens on.
    pub fn ip(&self, id: u64) -> Ipv4Addr {
        match self.own_ips {
            true => node_ip(id),
            false => Ipv4Addr::LOCALHOST,
        }
    }

    /// Node `id`'s data directory.
    pub fn node_dir(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    pub fn node(&self, id: u64) -> &TestNode {
        &self.nodes[&id]
    }

    pub fn status(&self, id: u64) -> Option<serde_json::Value> {
        let out = self
            .nodes
            .get(&id)?
            .cli_within(&["--json", "cluster", "status"], Duration::from_secs(30))?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Does node `via` see node `id` among the voters?
    pub fn is_voter(&self, via: u64, id: u64) -> bool {
        self.status(via).is_some_and(|s| {
            s["members"]
                .as_array()
                .is_some_and(|ms| ms.iter().any(|m| m["id"] == id && m["voter"] == true))
        })
    }

    pub fn leader(&self, via: u64) -> Option<u64> {
        self.status(via).and_then(|s| s["leader"].as_u64())
    }

    /// Polls `f` every 50 ms until it holds, for at most `secs` seconds.
    pub fn wait_for(&self, what: &str, secs: u64, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_voters(&self, via: u64, voters: usize) {
        self.wait_for(
            &format!("{voters} voters and a leader seen by node {via}"),
            60,
            |c| {
                c.status(via).is_some_and(|s| {
                    s["leader"].as_u64().is_some()
                        && s["members"]
                            .as_array()
                            .map(|m| m.iter().filter(|m| m["voter"] == true).count())
                            == Some(voters)
                })
            },
        );
    }

    /// node → number of shard replicas it holds, as `via` sees the layout.
    pub fn shard_load(&self, via: u64) -> BTreeMap<u64, usize> {
        let mut load = BTreeMap::new();
        if let Some(s) = self.status(via) {
            for shard in s["shards"].as_array().unwrap() {
                for r in shard["replicas"].as_array().unwrap() {
                    *load.entry(r.as_u64().unwrap()).or_insert(0) += 1;
                }
            }
        }
        load
    }

    pub fn kill9(&mut self, id: u64) {
        self.nodes.remove(&id).unwrap().kill9();
    }

    /// The binary node `id` runs (or runs when it starts next).
    pub fn build_of(&self, id: u64) -> &Path {
        self.builds.get(&id).unwrap_or(&self.bin)
    }
}
