fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "bitclone/v1/bitclone.proto",
            "bitclone/internal/v1/peer.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
