//! Placeholder until the S3 transfer module lands (being written now).
use std::path::Path;

use crate::envelope::Transfer;

pub struct Transfers {
    _client: aws_sdk_s3::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{0}")]
    Job(String),
    #[error("{0}")]
    Agent(String),
}

impl Transfers {
    pub fn new(client: aws_sdk_s3::Client) -> Transfers {
        Transfers { _client: client }
    }

    pub async fn download_inputs(
        &self,
        _inputs: &[Transfer],
        _work_dir: &Path,
    ) -> Result<(), TransferError> {
        Err(TransferError::Agent("not built yet".into()))
    }

    pub async fn upload_outputs(
        &self,
        _outputs: &[Transfer],
        _work_dir: &Path,
    ) -> Result<usize, TransferError> {
        Err(TransferError::Agent("not built yet".into()))
    }
}
