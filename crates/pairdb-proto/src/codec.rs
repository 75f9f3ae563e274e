//! The codec of every generated client and server: prost's, except that a message that does not
//! decode is the caller's error — INVALID_ARGUMENT with a `pairdb.common.v1.ErrorDetail` (reason
//! MALFORMED_REQUEST) — where prost's codec answers INTERNAL with no detail.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

use crate::status::{Reason, status};

/// prost encoding, strict decoding errors.
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self { _types: PhantomData }
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder { _type: PhantomData }
    }
}

/// Decodes `U`; a decoding error is INVALID_ARGUMENT / MALFORMED_REQUEST.
#[derive(Debug, Clone)]
pub struct StrictDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|error| malformed(&error))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

fn malformed(error: &prost::DecodeError) -> Status {
    status(Reason::MalformedRequest, format!("malformed protobuf message: {error}"), &[])
}
