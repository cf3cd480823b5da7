//! The only place errors become HTTP: OpenAI's error shape
//! `{"error": {"message", "type", "param", "code"}}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use retune_engine::{EngineError, ErrorKind, GenError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// A bad value of one request field (OpenAI's `param`).
    #[error("`{param}`: {message}")]
    InvalidParam { param: String, message: String },
    /// Not a model: a completion, feedback, ...
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Conflict(String),
    /// Well-formed content that cannot be used (an adapter's values or shapes): 422.
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("the server is overloaded; retry shortly")]
    Overloaded,
    #[error("{0}")]
    Unavailable(String),
    /// The adapter version could not be served; the detail is logged, not shown.
    #[error("adapter unavailable: {0}")]
    Adapter(String),
    /// A server fault; the detail is logged with the request id, never shown.
    #[error("internal error: {0}")]
    Internal(String),
    /// The client left before the answer (nobody reads this; logged as 499).
    #[error("the client closed the connection")]
    ClientGone,
}

impl ApiError {
    /// `error.type` and `error.code` of the OpenAI shape.
    pub fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::BadRequest(_) => ("invalid_request_error", "invalid_request"),
            Self::InvalidParam { .. } => ("invalid_request_error", "invalid_value"),
            Self::Missing(_) => ("invalid_request_error", "not_found"),
            Self::Unauthorized(_) => ("authentication_error", "invalid_api_key"),
            Self::NotFound(_) => ("invalid_request_error", "model_not_found"),
            Self::TooLarge(_) => ("invalid_request_error", "request_too_large"),
            Self::Conflict(_) => ("invalid_request_error", "conflict"),
            Self::Unprocessable(_) => ("invalid_request_error", "invalid_adapter"),
            Self::Forbidden(_) => ("permission_error", "forbidden"),
            Self::Overloaded => ("rate_limit_error", "overloaded"),
            Self::Unavailable(_) => ("server_error", "unavailable"),
            Self::Adapter(_) => ("server_error", "adapter_unavailable"),
            Self::Internal(_) => ("server_error", "internal_error"),
            Self::ClientGone => ("invalid_request_error", "client_closed_request"),
        }
    }

    /// Detail that is for the log only (its text may name files or internals).
    pub fn hidden_detail(&self) -> Option<&str> {
        match self {
            Self::Adapter(d) | Self::Internal(d) => Some(d),
            _ => None,
        }
    }

    /// What a client may read.
    pub fn public_message(&self, request_id: Option<&str>) -> String {
        let rid = request_id
            .map(|r| format!(" (request id {r})"))
            .unwrap_or_default();
        match self {
            Self::Adapter(_) => format!("the adapter could not be served{rid}"),
            Self::Internal(_) => format!("internal server error{rid}"),
            other => other.to_string(),
        }
    }

    /// The OpenAI error object.
    pub fn body(&self, request_id: Option<&str>) -> serde_json::Value {
        let (kind, code) = self.kind();
        let param = match self {
            Self::InvalidParam { param, .. } => Some(param.as_str()),
            _ => None,
        };
        serde_json::json!({"error": {"message": self.public_message(request_id), "type": kind, "param": param, "code": code}})
    }

    /// The response, with the request id in the message of a server fault.
    pub fn response(&self, request_id: Option<&str>) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        if matches!(self, Self::Overloaded | Self::Unavailable(_)) {
            resp.insert_header(("Retry-After", "1"));
        }
        resp.json(self.body(request_id))
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::InvalidParam { .. } => StatusCode::BAD_REQUEST,
            Self::Missing(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) | Self::Adapter(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            // nginx's "client closed request"
            Self::ClientGone => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        }
    }

    /// Without the request id; the request middleware answers server faults
    /// again with it (and logs their detail).
    fn error_response(&self) -> HttpResponse {
        self.response(None)
    }
}

impl From<GenError> for ApiError {
    fn from(e: GenError) -> Self {
        match e.kind {
            ErrorKind::Client => match e.param {
                Some(param) => Self::InvalidParam {
                    param,
                    message: e.message,
                },
                None => Self::BadRequest(e.message),
            },
            ErrorKind::Adapter => Self::Adapter(e.message),
            ErrorKind::Capacity => Self::Overloaded,
            // the engine's words go to the log (they may name internals)
            ErrorKind::Unavailable => {
                tracing::warn!(detail = %e.message, "generation unavailable");
                Self::Unavailable("the server is shutting down or restarting; retry shortly".into())
            }
            ErrorKind::AdapterUnavailable => {
                tracing::warn!(detail = %e.message, "adapter store unavailable");
                Self::Unavailable(
                    "the adapter's files cannot be fetched right now; retry shortly".into(),
                )
            }
            ErrorKind::Internal => Self::Internal(e.message),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        GenError::from(e).into()
    }
}

impl From<retune_registry::RegistryError> for ApiError {
    fn from(e: retune_registry::RegistryError) -> Self {
        use retune_registry::RegistryError as R;
        match e {
            R::NotFound(_) => Self::NotFound(e.to_string()),
            R::Conflict { .. } | R::LeaseLost(_) => Self::Conflict(e.to_string()),
            R::Forbidden(_) => Self::Forbidden(e.to_string()),
            R::TooLarge(_) => Self::TooLarge(e.to_string()),
            R::Rejected(_) => Self::BadRequest(e.to_string()),
            R::Invalid(_) | R::Adapter(_) => Self::Unprocessable(e.to_string()),
            // nothing was written: the client retries (503 with Retry-After)
            R::Unavailable(_) => Self::Unavailable(e.to_string()),
            R::Db(_) | R::Io(_) | R::Schema(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<retune_datasets::DataError> for ApiError {
    fn from(e: retune_datasets::DataError) -> Self {
        use retune_datasets::DataError as D;
        match e {
            D::NotFound(what) => Self::Missing(format!("{what} does not exist")),
            D::Invalid { field, reason } => Self::InvalidParam {
                param: field,
                message: reason,
            },
            // nothing was written: the client retries (503 with Retry-After)
            D::Unavailable(_) => Self::Unavailable(e.to_string()),
            D::Db(_) | D::Schema(_) => Self::Internal(e.to_string()),
        }
    }
}
