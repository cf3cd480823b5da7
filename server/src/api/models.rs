//! `GET /v1/models`: the base model and the tenant's live adapters.

use super::Data;
use crate::errors::ApiError;
use crate::extract::Tenant;
use actix_web::HttpResponse;
use serde::Serialize;

/// `GET /v1/models`: the base model and the tenant's live adapters.
#[derive(Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub owned_by: String,
    /// The live version serving an adapter's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

pub(crate) async fn list(state: Data, Tenant(t): Tenant) -> Result<HttpResponse, ApiError> {
    let t = t.as_str();
    let mut data = vec![ModelCard {
        id: state.settings.model.id.clone(),
        object: "model",
        owned_by: "retune".into(),
        version: None,
    }];
    if let Some(aliases) = &state.aliases {
        for (name, st) in aliases.snapshot().of_tenant(t) {
            if let Some(live) = st.live {
                data.push(ModelCard {
                    id: name.to_string(),
                    object: "model",
                    owned_by: t.to_string(),
                    version: Some(live.to_string()),
                });
            }
        }
    }
    Ok(HttpResponse::Ok().json(ModelList {
        object: "list",
        data,
    }))
}
