fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "../../proto/blockrep/v1/agent.proto",
        "../../proto/blockrep/v1/cluster.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["../../proto"])?;
    Ok(())
}
