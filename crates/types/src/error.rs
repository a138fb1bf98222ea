//! The JSON body of every API error.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `{"error": "...", "causes": ["...", ...]}`: the message and its cause chain.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ApiErrorBody {
    pub error: String,
    #[serde(default)]
    pub causes: Vec<String>,
}
