//! Requests parsed into domain types ("parse, don't validate"), and the one conversion of
//! API errors into gRPC statuses.

use std::path::PathBuf;

use blockrep_core::{CacheMode, NameError, VolumeName};

use crate::proto;

/// `AddVolume`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddVolume {
    pub name: VolumeName,
    pub path: PathBuf,
    pub cache: CacheMode,
    pub project: ProjectId,
}

impl TryFrom<proto::AddVolumeRequest> for AddVolume {
    type Error = ApiError;
    fn try_from(req: proto::AddVolumeRequest) -> Result<Self, ApiError> {
        let name = VolumeName::try_from(req.name).map_err(ApiError::BadName)?;
        if req.path.is_empty() {
            return Err(ApiError::InvalidArgument("path is empty".into()));
        }
        let path = PathBuf::from(req.path);
        if !path.is_absolute() {
            return Err(ApiError::InvalidArgument(format!(
                "path {} is not absolute",
                path.display()
            )));
        }
        let cache = if req.cache_mode.is_empty() {
            CacheMode::default()
        } else {
            req.cache_mode
                .parse()
                .map_err(|e: blockrep_core::UnknownCacheMode| {
                    ApiError::InvalidArgument(e.to_string())
                })?
        };
        let project = ProjectId::or_default(req.project_id)?;
        Ok(Self {
            name,
            path,
            cache,
            project,
        })
    }
}

/// The default project's id, as records of it keep it (and as records from before projects
/// existed read).
pub fn default_project() -> String {
    ProjectId::DEFAULT.to_owned()
}

/// A project (the REST API's tenant): what volumes, pairs, groups, jobs and API tokens
/// belong to. 1 to 64 bytes of letters, digits, `-` and `_`; `default` unless given.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProjectId(String);

impl ProjectId {
    pub const DEFAULT: &str = "default";

    /// A project as a request names it: the default one when it names none.
    pub fn or_default(text: String) -> Result<Self, ApiError> {
        if text.is_empty() {
            Ok(Self::default())
        } else {
            Self::try_from(text).map_err(ApiError::InvalidArgument)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ProjectId {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl std::fmt::Display for ProjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for ProjectId {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let valid = !text.is_empty()
            && text.len() <= 64
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if valid {
            Ok(Self(text))
        } else {
            Err(format!(
                "project id {text:?}: 1 to 64 letters, digits, '-' or '_'"
            ))
        }
    }
}

impl std::str::FromStr for ProjectId {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Self::try_from(text.to_owned())
    }
}

/// Every error the control API answers with. Messages name the rule that was broken; each
/// kind carries the EVS API's status code ([`ApiError::code`]).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("volume name: {0}")]
    BadName(NameError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("no volume {0:?} (give a volume id or name)")]
    VolumeNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// The REST API's request carried no token, or one that is unknown or revoked.
    #[error("{0}")]
    Unauthenticated(String),
    /// The token is valid, but not for what the request names (another project).
    #[error("{0}")]
    Forbidden(String),
    /// A call of the seed API that blockrep does not serve.
    #[error("{0}")]
    NotImplemented(String),
}

/// A pair status change the table refuses is the coordinator's bug, not the caller's.
impl From<blockrep_core::replication::IllegalPairStatus> for ApiError {
    fn from(e: blockrep_core::replication::IllegalPairStatus) -> Self {
        ApiError::Internal(e.to_string())
    }
}

/// The gRPC metadata key that carries the EVS status code of a refusal.
pub const CODE_METADATA: &str = "blockrep-code";

impl ApiError {
    /// The EVS API's status code: 400 bad request, 401 unauthorized, 403 forbidden,
    /// 404 not found, 409 conflict, 501 not implemented, 503 unavailable, 500 internal.
    pub fn code(&self) -> u32 {
        match self {
            ApiError::BadName(_) | ApiError::InvalidArgument(_) => 400,
            ApiError::Unauthenticated(_) => 401,
            ApiError::Forbidden(_) => 403,
            ApiError::NotImplemented(_) => 501,
            ApiError::VolumeNotFound(_) | ApiError::NotFound(_) => 404,
            ApiError::AlreadyExists(_) | ApiError::FailedPrecondition(_) => 409,
            ApiError::Unavailable(_) => 503,
            ApiError::Internal(_) => 500,
        }
    }

    /// The error a code and message from another daemon stand for.
    pub fn from_code(code: u32, message: String) -> Self {
        match code {
            400 => ApiError::InvalidArgument(message),
            404 => ApiError::NotFound(message),
            401 => ApiError::Unauthenticated(message),
            403 => ApiError::Forbidden(message),
            409 => ApiError::FailedPrecondition(message),
            501 => ApiError::NotImplemented(message),
            503 => ApiError::Unavailable(message),
            _ => ApiError::Internal(message),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let message = e.to_string();
        let code = e.code();
        let mut status = match e {
            ApiError::BadName(_) | ApiError::InvalidArgument(_) => {
                tonic::Status::invalid_argument(message)
            }
            ApiError::VolumeNotFound(_) | ApiError::NotFound(_) => {
                tonic::Status::not_found(message)
            }
            ApiError::AlreadyExists(_) => tonic::Status::already_exists(message),
            ApiError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            ApiError::Unavailable(_) => tonic::Status::unavailable(message),
            ApiError::Internal(_) => tonic::Status::internal(message),
            ApiError::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            ApiError::Forbidden(_) => tonic::Status::permission_denied(message),
            ApiError::NotImplemented(_) => tonic::Status::unimplemented(message),
        };
        if let Ok(value) = code.to_string().parse() {
            status.metadata_mut().insert(CODE_METADATA, value);
        }
        status
    }
}

impl From<ApiError> for crate::proto::ClusterError {
    fn from(e: ApiError) -> Self {
        crate::proto::ClusterError {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

impl From<crate::proto::ClusterError> for ApiError {
    fn from(e: crate::proto::ClusterError) -> Self {
        ApiError::from_code(e.code, e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_volume_is_validated() {
        let req = |name: &str, path: &str, cache: &str| proto::AddVolumeRequest {
            name: name.into(),
            path: path.into(),
            cache_mode: cache.into(),
            project_id: String::new(),
        };
        let ok = AddVolume::try_from(req("v1", "/dev/loop0", ""));
        assert_eq!(
            ok.unwrap(),
            AddVolume {
                name: "v1".parse().unwrap(),
                path: "/dev/loop0".into(),
                cache: CacheMode::Direct,
                project: ProjectId::default(),
            }
        );
        let wb = AddVolume::try_from(req("v1", "/dev/loop0", "writeback")).unwrap();
        assert_eq!(wb.cache, CacheMode::Writeback);
        let bad_cache = AddVolume::try_from(req("v1", "/dev/loop0", "none"));
        assert!(
            matches!(bad_cache, Err(ApiError::InvalidArgument(m)) if m.contains("not one of: direct, writeback"))
        );
        let relative = AddVolume::try_from(req("v1", "disk.img", ""));
        assert!(
            matches!(relative, Err(ApiError::InvalidArgument(m)) if m.contains("not absolute"))
        );
        let bad = AddVolume::try_from(req("a b", "/x", ""));
        let status = tonic::Status::from(bad.unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("volume name:"),
            "{}",
            status.message()
        );
    }
}
