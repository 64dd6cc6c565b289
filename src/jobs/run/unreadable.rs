//! A stored job whose parameters cannot be read: it fails alone, with why, when it
//! would run (and no request can create one).

use sqlx::SqliteConnection;

use super::{Admission, Planning, Run};
use crate::domain::job_spec::Unreadable;
use crate::domain::plan::{MetaOp, Plan};
use crate::error::{Error, Result};

impl Unreadable {
    fn error(&self) -> Error {
        Error::Internal(format!(
            "the job's stored {} parameters cannot be read ({}): {}",
            self.kind, self.error, self.params
        ))
    }
}

impl Run for Unreadable {
    const PLAN_AT_ACCEPT: bool = true;

    async fn admit(&mut self, _: &mut SqliteConnection) -> Result<Admission> {
        Err(self.error())
    }

    async fn plan(&self, _: &mut Planning<'_>) -> Result<Plan> {
        Err(self.error())
    }

    /// What the request flagged is unknown: nothing is put back.
    async fn unwind(&self, _: &mut SqliteConnection, _: bool) -> Result<Vec<MetaOp>> {
        Ok(Vec::new())
    }
}
