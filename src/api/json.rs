//! The JSON body extractor of the API: [`JsonBody`].
//!
//! axum's own `Json` answers refusals in plain text; this one answers with
//! problem documents and tells the cases apart: a body over
//! `API_MAX_BODY_BYTES` is 413, a body that is not JSON by its content
//! type 415, malformed JSON 400, and JSON of the wrong shape (unknown
//! field, wrong type, missing field) 422. An empty body means "all
//! defaults", so `POST …/runs` with no body starts an incremental run.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use super::problem::Problem;

/// A JSON body, or `T::default()` when the body is empty.
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let essence = v
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                essence == "application/json" || essence.ends_with("+json")
            });
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::too_large("the request body is larger than the server accepts")
            } else {
                Problem::bad_request("the request body could not be read")
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        // A missing content type is tolerated (curl -d sends a form type,
        // which is refused, but hand-written clients often send none).
        if json_type == Some(false) {
            return Err(Problem::unsupported_media_type(
                "send the body as application/json",
            ));
        }
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        match deserialize_whole(&mut de) {
            Ok(v) => Ok(Self(v)),
            Err(e) if e.is_data() => Err(Problem::invalid(e.to_string())),
            Err(e) => Err(Problem::bad_request(format!("malformed JSON: {e}"))),
        }
    }
}

/// Deserializes one value and insists nothing but whitespace follows.
fn deserialize_whole<T: DeserializeOwned>(
    de: &mut serde_json::Deserializer<serde_json::de::SliceRead<'_>>,
) -> Result<T, serde_json::Error> {
    let v = T::deserialize(&mut *de)?;
    de.end()?;
    Ok(v)
}
