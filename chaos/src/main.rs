//! `bitclone-chaos`: the failover harness (real node processes, faults,
//! invariant checks, a report). Not built yet; it says so instead of
//! pretending to test anything.

fn main() -> std::process::ExitCode {
    eprintln!(
        "bitclone-chaos: the failover harness is not built yet; the failover tests are in node/tests/cluster*.rs (see chaos/README.md)"
    );
    std::process::ExitCode::from(2)
}
