//! The only place errors become HTTP: OpenAI's error shape
//! `{"error": {"message", "type", "param", "code"}}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use retune_engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("the server is overloaded; retry shortly")]
    Overloaded,
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::BadRequest(_) => ("invalid_request_error", "invalid_request"),
            Self::Unauthorized(_) => ("authentication_error", "invalid_api_key"),
            Self::NotFound(_) => ("invalid_request_error", "model_not_found"),
            Self::TooLarge(_) => ("invalid_request_error", "request_too_large"),
            Self::Conflict(_) => ("invalid_request_error", "conflict"),
            Self::Forbidden(_) => ("permission_error", "forbidden"),
            Self::Overloaded => ("rate_limit_error", "overloaded"),
            Self::Unavailable(_) => ("server_error", "unavailable"),
            Self::Internal(_) => ("server_error", "internal_error"),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let (kind, code) = self.kind();
        let mut resp = HttpResponse::build(self.status_code());
        if matches!(self, Self::Overloaded) {
            resp.insert_header(("Retry-After", "1"));
        }
        resp.json(serde_json::json!({"error": {"message": self.to_string(), "type": kind, "param": null, "code": code}}))
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Overloaded(_) => Self::Overloaded,
            EngineError::PromptTooLong { .. }
            | EngineError::EmptyPrompt
            | EngineError::InvalidRequest(_)
            | EngineError::Template(_) => Self::BadRequest(e.to_string()),
            EngineError::ShutDown => Self::Unavailable(e.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<retune_adapters::RegistryError> for ApiError {
    fn from(e: retune_adapters::RegistryError) -> Self {
        use retune_adapters::RegistryError as R;
        match e {
            R::NotFound(_) => Self::NotFound(e.to_string()),
            R::Conflict { .. } => Self::Conflict(e.to_string()),
            R::Forbidden(_) => Self::Forbidden(e.to_string()),
            R::TooLarge(_) => Self::TooLarge(e.to_string()),
            R::Rejected(_) | R::Adapter(_) => Self::BadRequest(e.to_string()),
            R::Db(_) | R::Io(_) => Self::Internal(e.to_string()),
        }
    }
}
