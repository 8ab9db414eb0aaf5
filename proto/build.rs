//! Generates the tonic/prost code. `protoc` comes from the protoc-bin-vendored crate unless
//! `PROTOC` names one, so a fresh machine needs no system package for it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=proto/tcpkit.proto");
    tonic_prost_build::configure().compile_protos(&["proto/tcpkit.proto"], &["proto"])?;
    Ok(())
}
