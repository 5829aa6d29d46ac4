//! A worker that answers every request at once with one token, for measuring the gateway's own overhead
//! (`bench/serve_speed.py`). Not a model: it only speaks the worker protocol.
//!
//!     cargo run --release -p camelid-gateway --example instant_worker -- 127.0.0.1:50199

use std::pin::Pin;

use camelid_proto::v1;
use camelid_proto::v1::worker_server::{Worker, WorkerServer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

struct Instant;

type Events = Pin<Box<dyn Stream<Item = Result<v1::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for Instant {
    type GenerateStream = Events;

    async fn generate(&self, _: Request<v1::GenerateRequest>) -> Result<Response<Events>, Status> {
        let events = camelid_proto::whole_answer("ok", 1, v1::FinishReason::Length)
            .into_iter()
            .map(Ok);
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn health(&self, _: Request<v1::HealthRequest>) -> Result<Response<v1::HealthResponse>, Status> {
        Ok(Response::new(camelid_proto::ready_and_idle()))
    }

    async fn model_info(
        &self,
        _: Request<v1::ModelInfoRequest>,
    ) -> Result<Response<v1::ModelInfoResponse>, Status> {
        Ok(Response::new(v1::ModelInfoResponse {
            name: "instant".into(),
            ..Default::default()
        }))
    }

    async fn load_adapter(
        &self,
        _: Request<v1::LoadAdapterRequest>,
    ) -> Result<Response<v1::LoadAdapterResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn unload_adapter(
        &self,
        _: Request<v1::UnloadAdapterRequest>,
    ) -> Result<Response<v1::UnloadAdapterResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50199".into())
        .parse()?;
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(WorkerServer::new(Instant))
        .serve(addr)
        .await?;
    Ok(())
}
