//! The gRPC edge of the client KV API (`pairdb.kv.v1.KvService`): takes the `authorization` metadata,
//! hands the message to [`KvApi`] and turns its error into a status (the one place for gRPC).

use pairdb_proto::kv::v1 as pb;
use pairdb_proto::kv::v1::kv_service_server::KvService;
use tonic::{Request, Response, Status};

use crate::admission::Client;
use crate::error::RouterError;
use crate::kv_api::KvApi;

#[derive(Debug, Clone)]
pub struct GrpcKvApi {
    api: KvApi,
}

impl GrpcKvApi {
    pub fn new(api: KvApi) -> Self {
        Self { api }
    }
}

impl GrpcKvApi {
    /// The client the admission middleware let through (or, without it, the headers' identity).
    fn client<T>(&self, request: &Request<T>) -> Result<Client, Status> {
        if let Some(client) = request.extensions().get::<Client>() {
            return Ok(client.clone());
        }
        let authorization = request.metadata().get("authorization").and_then(|value| value.to_str().ok());
        self.api.identify(authorization).map_err(RouterError::into_status)
    }
}

#[tonic::async_trait]
impl KvService for GrpcKvApi {
    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let client = self.client(&request)?;
        let ack = self.api.put(&client, request.into_inner()).await.map_err(RouterError::into_status)?;
        Ok(Response::new(pb::PutResponse { ack: Some(ack) }))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let client = self.client(&request)?;
        let response = self.api.get(&client, request.into_inner()).await.map_err(RouterError::into_status)?;
        Ok(Response::new(response))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let client = self.client(&request)?;
        let ack = self.api.delete(&client, request.into_inner()).await.map_err(RouterError::into_status)?;
        Ok(Response::new(pb::DeleteResponse { ack: Some(ack) }))
    }

    async fn get_many(
        &self,
        request: Request<pb::GetManyRequest>,
    ) -> Result<Response<pb::GetManyResponse>, Status> {
        let client = self.client(&request)?;
        let response =
            self.api.get_many(&client, request.into_inner()).await.map_err(RouterError::into_status)?;
        Ok(Response::new(response))
    }
}
