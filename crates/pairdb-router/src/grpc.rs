//! The gRPC edge of the client KV API (`pairdb.kv.v1.KvService`): takes the `authorization` metadata,
//! hands the message to [`Front`] and turns its error into a status (the one place for gRPC).

use pairdb_proto::kv::v1 as pb;
use pairdb_proto::kv::v1::kv_service_server::KvService;
use tonic::{Request, Response, Status};

use crate::error::RouterError;
use crate::front::Front;

#[derive(Debug, Clone)]
pub struct KvApi {
    front: Front,
}

impl KvApi {
    pub fn new(front: Front) -> Self {
        Self { front }
    }
}

fn authorization<T>(request: &Request<T>) -> Option<String> {
    request.metadata().get("authorization").and_then(|value| value.to_str().ok()).map(str::to_owned)
}

#[tonic::async_trait]
impl KvService for KvApi {
    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let auth = authorization(&request);
        let ack =
            self.front.put(auth.as_deref(), request.into_inner()).await.map_err(RouterError::into_status)?;
        Ok(Response::new(pb::PutResponse { ack: Some(ack) }))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let auth = authorization(&request);
        let response =
            self.front.get(auth.as_deref(), request.into_inner()).await.map_err(RouterError::into_status)?;
        Ok(Response::new(response))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let auth = authorization(&request);
        let ack = self
            .front
            .delete(auth.as_deref(), request.into_inner())
            .await
            .map_err(RouterError::into_status)?;
        Ok(Response::new(pb::DeleteResponse { ack: Some(ack) }))
    }

    async fn get_many(
        &self,
        request: Request<pb::GetManyRequest>,
    ) -> Result<Response<pb::GetManyResponse>, Status> {
        let auth = authorization(&request);
        let response = self
            .front
            .get_many(auth.as_deref(), request.into_inner())
            .await
            .map_err(RouterError::into_status)?;
        Ok(Response::new(response))
    }
}
