fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/blockrep/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure().compile_protos(&[proto], &["../../proto"])?;
    Ok(())
}
