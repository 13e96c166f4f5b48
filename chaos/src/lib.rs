//! The one test harness of BitClone: real `bitclone` processes (a node, a
//! cluster of N; restart, kill, pause), throwaway Garage and Postgres
//! servers, generated trees compared by BLAKE3, and a scrubbed environment.
//! The node tests, the storage tests, the benches and the chaos harness all
//! use it. A harness fails loudly, at the line that broke: it panics rather
//! than returning errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cluster;
pub mod env;
pub mod jobs;
pub mod node;
pub mod oracle;
pub mod report;
pub mod run;
pub mod sandbox;
pub mod schedule;
pub mod servers;
pub mod tree;

pub use cluster::TestCluster;
pub use env::{bin, clean_command, dev_certs, seed};
pub use node::{http_get, issue_token, signal, tail, try_http_get, HttpReply, TestNode};
pub use tree::{
    assert_same_tree, edit_small_files, file_url, flip_in_files, generate_small_files,
    generate_tree, random_bytes, tempdir_for_many_files, tree_digest,
};
