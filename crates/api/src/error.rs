//! Every API error becomes `{"code": ..., "error": ..., "causes": [...]}` with a status code chosen
//! here, in one place.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferry_agent::{error_chain, AgentError, ErrorClass};
use ferry_types::ApiErrorBody;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ApiErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ApiErrorBody {
                code: ferry_types::code_for_status(status.as_u16()).into(),
                error: error.into(),
                causes: vec![],
            },
        }
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> ApiError {
        let status = match e.class() {
            ErrorClass::BadRequest => StatusCode::BAD_REQUEST,
            ErrorClass::NotFound => StatusCode::NOT_FOUND,
            ErrorClass::Conflict => StatusCode::CONFLICT,
            ErrorClass::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorClass::BadGateway => StatusCode::BAD_GATEWAY,
            ErrorClass::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = ?e, "request failed");
        }
        let body = match &e {
            AgentError::Invalid(v) => ApiErrorBody {
                code: e.code().into(),
                error: "Invalid input".into(),
                causes: v
                    .0
                    .iter()
                    .map(|i| format!("{}: {}", i.field, i.reason))
                    .collect(),
            },
            _ => {
                let mut chain = error_chain(&e);
                ApiErrorBody {
                    code: e.code().into(),
                    error: chain.remove(0),
                    causes: chain,
                }
            }
        };
        ApiError { status, body }
    }
}

fn rejection(status: StatusCode, what: &str, e: &(dyn std::error::Error + 'static)) -> ApiError {
    let mut chain = error_chain(e);
    chain.dedup();
    ApiError {
        status,
        body: ApiErrorBody {
            code: ferry_types::code_for_status(status.as_u16()).into(),
            error: format!("Invalid {what}"),
            causes: chain,
        },
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> ApiError {
        let status = match e {
            JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        rejection(status, "JSON body", &e)
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> ApiError {
        rejection(StatusCode::BAD_REQUEST, "query", &e)
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> ApiError {
        rejection(StatusCode::BAD_REQUEST, "path", &e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// `Json` whose rejections are our JSON errors.
#[derive(axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// `Query` whose rejections are our JSON errors.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// `Path` whose rejections are our JSON errors.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

pub type ApiResult<T> = Result<T, ApiError>;

/// An optional JSON body: empty is `None`, anything else must parse.
pub fn optional_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<Option<T>> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(None);
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| ApiError {
            status: StatusCode::BAD_REQUEST,
            body: ApiErrorBody {
                code: "invalid".into(),
                error: "Invalid JSON body".into(),
                causes: vec![e.to_string()],
            },
        })
}
