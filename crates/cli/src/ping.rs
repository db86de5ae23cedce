//! `blockrep cluster ping`: dial a node's QUIC endpoint with this node's certificate and ask
//! the coordinator behind it for the node list: checks the address, the certificates and
//! the protocol in one go.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use blockrep_api::proto::{self, ClusterRequest, cluster_request, cluster_response};
use blockrep_tls::{NodeTls, TlsFiles};
use blockrep_transport::endpoint::ClusterEndpoint;

use crate::render::Output;
use crate::stdout::sayln;

pub async fn ping(
    address: SocketAddr,
    node: &str,
    tls_dir: &Path,
    no_certificate: bool,
    out: &Output,
) -> anyhow::Result<()> {
    let files = TlsFiles::in_dir(tls_dir);
    let tls = if no_certificate {
        NodeTls::danger_without_certificate(&files.ca_cert)?
    } else {
        NodeTls::load(&files)?
    };
    let endpoint = ClusterEndpoint::client_only(&tls, Default::default())?;
    let request = ClusterRequest {
        request: Some(cluster_request::Request::ListNodes(
            proto::ListNodesRequest {},
        )),
        scope: None,
        leader_term: 0,
    };
    let started = std::time::Instant::now();
    let response = endpoint
        .call(address, node, &request)
        .await
        .with_context(|| format!("ping {address}"))?;
    let elapsed = started.elapsed();
    let detail = match response.response {
        Some(cluster_response::Response::Nodes(nodes)) => {
            format!("{} node(s) known", nodes.nodes.len())
        }
        Some(cluster_response::Response::Error(e)) => {
            format!("answered ({}): {}", e.code, e.message)
        }
        _ => "answered".into(),
    };
    if out.json {
        sayln!(
            "{}",
            serde_json::json!({ "address": address, "ok": true, "round_trip_ms": elapsed.as_secs_f64() * 1000.0, "detail": detail })
        );
    } else {
        sayln!(
            "{address}: TLS and protocol ok in {:.1} ms; {detail}",
            elapsed.as_secs_f64() * 1000.0
        );
    }
    endpoint.close();
    Ok(())
}

pub async fn link_test(
    address: SocketAddr,
    tls_dir: &Path,
    node: &str,
    seconds: u64,
    settings: blockrep_transport::TransportSettings,
    out: &Output,
) -> anyhow::Result<()> {
    let tls = NodeTls::load(&TlsFiles::in_dir(tls_dir))?;
    let endpoint = ClusterEndpoint::client_only(&tls, settings)?;
    let result = blockrep_transport::link_test::run(
        &endpoint,
        address,
        node,
        std::time::Duration::from_secs(seconds),
    )
    .await
    .with_context(|| format!("link test to {address}"))?;
    if out.json {
        sayln!(
            "{}",
            serde_json::json!({
                "address": address,
                "bytes": result.bytes,
                "seconds": result.elapsed.as_secs_f64(),
                "megabytes_per_second": result.megabytes_per_second(),
            })
        );
    } else {
        sayln!(
            "{address}: {:.0} MB/s ({} MB in {:.2} s)",
            result.megabytes_per_second(),
            result.bytes / 1_000_000,
            result.elapsed.as_secs_f64()
        );
    }
    endpoint.close();
    Ok(())
}
