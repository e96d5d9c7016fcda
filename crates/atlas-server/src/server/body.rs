//! Request bodies that are JSON, or multipart/form-data with a JSON part named `request` and
//! file parts (images, safetensors) beside it.

use super::error::{json_rejection, ApiError, ApiResult};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, StatusCode};
use axum::Json;
use serde_json::Value;

/// A file part: its filename and its bytes.
pub struct FilePart {
    pub filename: String,
    pub bytes: Vec<u8>,
}

pub struct Body {
    pub json: Value,
    pub files: Vec<FilePart>,
}

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ctype = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if ctype.starts_with("multipart/form-data") {
            let mp = Multipart::from_request(req, state)
                .await
                .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
            return multipart(mp).await;
        }
        let Json(json) = Json::<Value>::from_request(req, state)
            .await
            .map_err(json_rejection)?;
        Ok(Body {
            json,
            files: Vec::new(),
        })
    }
}

async fn multipart(mut mp: Multipart) -> ApiResult<Body> {
    let mut json = None;
    let mut files = Vec::new();
    let bad = |e: axum::extract::multipart::MultipartError| {
        let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, format!("multipart body: {}", e.body_text()))
    };
    while let Some(field) = mp.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or("").to_string();
        let filename = field.file_name().map(str::to_string);
        let bytes = field.bytes().await.map_err(bad)?;
        match filename {
            Some(filename) => files.push(FilePart {
                filename,
                bytes: bytes.to_vec(),
            }),
            None if name == "request" && json.is_some() => {
                return Err(ApiError::bad(
                    "multipart part \"request\" is given twice: send one",
                ))
            }
            None if name == "request" => {
                json = Some(serde_json::from_slice(&bytes).map_err(|e| {
                    ApiError::bad(format!("multipart part \"request\" is not valid JSON: {e}"))
                })?)
            }
            None => {
                return Err(ApiError::bad(format!(
                    "unexpected multipart field {name:?}: send a JSON part named \"request\" and file parts"
                )))
            }
        }
    }
    Ok(Body {
        json: json.unwrap_or_else(|| Value::Object(Default::default())),
        files,
    })
}

/// A JSON value as a request type; on failure the message names the field that was wrong.
pub fn parse<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> ApiResult<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let at = e.path().to_string();
        let inner = e.into_inner();
        match at.as_str() {
            "." => ApiError::bad(format!("invalid {what}: {inner}")),
            _ => ApiError::bad(format!("invalid {what}: at {at}: {inner}")),
        }
    })
}
