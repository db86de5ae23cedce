//! The REST API's tokens: made here, kept only as their SHA-256, one project each; and the
//! authentication of a request's token.

use blockrep_api::model::ProjectId;
use blockrep_api::token;

use super::*;
use crate::records::TokenRecord;

const MAX_TOKEN_NAME_BYTES: usize = 64;

impl Coordinator {
    /// A new token for a project: its secret is in the answer and nowhere else.
    pub fn create_api_token(
        &self,
        req: proto::CreateApiTokenRequest,
    ) -> Result<proto::CreatedApiToken, ApiError> {
        let project = ProjectId::try_from(req.project_id).map_err(ApiError::InvalidArgument)?;
        if req.name.len() > MAX_TOKEN_NAME_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "token name is {} bytes; the limit is {MAX_TOKEN_NAME_BYTES}",
                req.name.len()
            )));
        }
        let secret = token::new_secret().map_err(ApiError::Internal)?;
        let mut state = self.lock();
        if !req.name.is_empty()
            && let Some(same) = state.tokens.values().find(|t| t.name == req.name)
        {
            return Err(ApiError::AlreadyExists(format!(
                "a token named {:?} exists already (id {})",
                req.name, same.id
            )));
        }
        let record = TokenRecord {
            id: format!("tok-{}", JobId::random()),
            name: req.name,
            project: project.to_string(),
            sha256: token::sha256(&secret),
            created_at: now_text(),
            revoked_at: None,
        };
        self.commit_into(&mut state, &[Change::PutToken(record.clone())])?;
        tracing::info!(token = %record.id, project = %record.project, "API token created");
        Ok(proto::CreatedApiToken {
            token: Some(token_view(&record)),
            secret,
        })
    }

    pub fn list_api_tokens(&self) -> proto::ListApiTokensResponse {
        let state = self.lock();
        proto::ListApiTokensResponse {
            tokens: state.tokens.values().map(token_view).collect(),
        }
    }

    /// Revokes a token (by id or name) at once; revoking it again changes nothing.
    pub fn revoke_api_token(&self, reference: &str) -> Result<proto::ApiToken, ApiError> {
        let mut state = self.lock();
        let found: Vec<&TokenRecord> = state
            .tokens
            .values()
            .filter(|t| t.id == reference || (!t.name.is_empty() && t.name == reference))
            .collect();
        let mut record = match found.as_slice() {
            [one] => (*one).clone(),
            [] => return Err(ApiError::NotFound(format!("no API token {reference:?}"))),
            _ => {
                return Err(ApiError::InvalidArgument(format!(
                    "{} tokens match {reference:?}; give the token id",
                    found.len()
                )));
            }
        };
        if record.revoked_at.is_none() {
            record.revoked_at = Some(now_text());
            self.commit_into(&mut state, &[Change::PutToken(record.clone())])?;
            tracing::info!(token = %record.id, project = %record.project, "API token revoked");
        }
        Ok(token_view(&record))
    }

    /// The project a REST request acts for: its token's, which must be the one its path
    /// names. 401 for a token that is unknown or revoked, 403 for another project's path.
    pub(super) fn authenticate(&self, scope: &proto::ApiScope) -> Result<String, ApiError> {
        let state = self.lock();
        let token = state
            .tokens
            .values()
            .find(|t| t.revoked_at.is_none() && t.sha256 == scope.token_sha256)
            .ok_or_else(|| {
                ApiError::Unauthenticated(
                    "the X-Auth-Token is not valid: unknown or revoked".into(),
                )
            })?;
        if token.project != scope.project_id {
            return Err(ApiError::Forbidden(format!(
                "the token is not for project {:?}",
                scope.project_id
            )));
        }
        Ok(token.project.clone())
    }
}

fn token_view(t: &TokenRecord) -> proto::ApiToken {
    proto::ApiToken {
        id: t.id.clone(),
        name: t.name.clone(),
        project_id: t.project.clone(),
        created_at: t.created_at.clone(),
        revoked_at: t.revoked_at.clone().unwrap_or_default(),
    }
}
