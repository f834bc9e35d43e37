//! A gRPC application (tonic) for tests of the proxy's gRPC paths.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status};
use ward_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use ward_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svidRequest, X509svidResponse,
};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A gRPC application for proxy tests: a SPIFFE Workload API server that echoes.
/// `FetchJWTSVID` answers with the audiences joined as the SPIFFE ID and, as the hint, the
/// verified peer ID the proxy passed in `x-ward-peer-id`; `ValidateJWTSVID` counts its calls
/// and is unimplemented; `FetchX509Bundles` streams a counter every 100 ms.
#[derive(Debug, Clone, Default)]
pub struct EchoApi {
    /// Calls of `ValidateJWTSVID` that reached the application.
    pub validate_calls: Arc<AtomicUsize>,
}

fn peer_of<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-ward-peer-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for EchoApi {
    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let peer = peer_of(&req);
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: req.get_ref().audience.join(","),
                svid: "not-a-jwt".into(),
                // The peer ID the backend proxy verified, as the application received it.
                hint: peer,
            }],
        }))
    }

    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        _req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("echo: FetchJWTBundles"))
    }

    async fn validate_jwtsvid(
        &self,
        _req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.validate_calls.fetch_add(1, Ordering::SeqCst);
        Err(Status::unimplemented("echo: ValidateJWTSVID"))
    }

    type FetchX509SVIDStream = BoxStream<X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        _req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        Err(Status::unimplemented("echo: FetchX509SVID"))
    }

    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;

    /// One message every 100 ms, forever, with `counter` = 0, 1, 2, ... in the bundles map.
    async fn fetch_x509_bundles(
        &self,
        _req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let stream = futures::stream::unfold(0u64, |n| async move {
            if n > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let msg = X509BundlesResponse {
                crl: Vec::new(),
                bundles: HashMap::from([("counter".to_owned(), n.to_string().into_bytes())]),
            };
            Some((Ok(msg), n + 1))
        });
        Ok(Response::new(
            Box::pin(stream) as Self::FetchX509BundlesStream
        ))
    }
}

/// Serves `api` on a loopback port (HTTP/2, plaintext).
pub async fn start_grpc_app(api: EchoApi) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(api))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l))
            .await
            .unwrap();
    });
    addr
}
