//! The ONE place where errors become gRPC statuses. Messages carry the whole error chain, so a
//! caller sees what failed and why; the code says what kind of failure it was.

use tonic::{Code, Status};

use crate::{images::ImageError, instance::InstanceError, store::StoreError};

/// Renders an error with its sources: `a: b: c`.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    crate::instance::anyhow_chain(err)
}

impl From<InstanceError> for Status {
    fn from(e: InstanceError) -> Self {
        let code = match &e {
            InstanceError::Invalid(_) => Code::InvalidArgument,
            InstanceError::NotFound(_) => Code::NotFound,
            InstanceError::AlreadyExists(_) => Code::AlreadyExists,
            InstanceError::WrongState { .. } => Code::FailedPrecondition,
            InstanceError::ImageNotFound(_) => Code::NotFound,
            InstanceError::Image { source, .. } => return image_status(source, chain(&e)),
            InstanceError::Runtime { .. } => Code::Internal,
            InstanceError::Network { .. } => Code::Internal,
            InstanceError::Store(_) => Code::Internal,
            InstanceError::NotConnected(_) => Code::Unavailable,
            InstanceError::Logs { .. } => Code::Internal,
            InstanceError::ShuttingDown => Code::Unavailable,
            InstanceError::Timeout(_) => Code::DeadlineExceeded,
        };
        Status::new(code, chain(&e))
    }
}

impl From<crate::pool::PoolError> for Status {
    fn from(e: crate::pool::PoolError) -> Self {
        use crate::pool::PoolError as P;
        let code = match &e {
            P::Invalid(_) => Code::InvalidArgument,
            P::OverBudget { .. } => Code::FailedPrecondition,
            P::ImageNotFound(_) => Code::NotFound,
            P::Image { source, .. } => return image_status(source, chain(&e)),
            P::Targets(_) => Code::Internal,
            P::ShuttingDown => Code::Unavailable,
        };
        Status::new(code, chain(&e))
    }
}

fn image_status(e: &ImageError, message: String) -> Status {
    let code = match e {
        ImageError::NotFound(_) => Code::NotFound,
        ImageError::Invalid(_) => Code::InvalidArgument,
        ImageError::InUse(_) => Code::FailedPrecondition,
        ImageError::Pull { .. } => Code::Unavailable,
        ImageError::Cache(_) => Code::Internal,
    };
    Status::new(code, message)
}

impl From<ImageError> for Status {
    fn from(e: ImageError) -> Self {
        let msg = chain(&e);
        image_status(&e, msg)
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        Status::internal(chain(&e))
    }
}

impl From<crate::model::InvalidRequest> for Status {
    fn from(e: crate::model::InvalidRequest) -> Self {
        Status::invalid_argument(e.0)
    }
}

/// An I/O error while streaming.
pub fn io(e: std::io::Error) -> Status {
    Status::internal(format!("Reading the instance's logs failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        let s: Status = InstanceError::AlreadyExists("a".into()).into();
        assert_eq!(s.code(), Code::AlreadyExists);
        assert_eq!(
            s.message(),
            "Instance \"a\" already exists with a different spec"
        );
        let s: Status = InstanceError::Image {
            reference: "r".into(),
            source: ImageError::Pull {
                reference: "r".into(),
                source: "connection refused".into(),
            },
        }
        .into();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.message(),
            "Image \"r\" is unavailable: Pulling image r failed: connection refused"
        );
    }
}
