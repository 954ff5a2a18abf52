//! The `job_results` collection: what makes a redelivered job not run twice.
//!
//! One document per `job_id`. A consumer first *claims* the job (owner + lease); once the tool has
//! run, it stores the reply there *before* publishing it. A delivery of a job that already has a
//! reply gets that reply again and the MCP server is not called; a delivery of a job another live
//! consumer holds waits. A job that goes to a delay queue (a retry, a wait for its token) keeps
//! its claim and takes it back when it returns, so no copy of it can run in between. A claim whose lease ran out (its consumer died mid-call) can be taken
//! over. Documents expire after `worker.results_ttl_secs` (TTL index), which bounds how late a
//! duplicate is still recognised.

use chrono::{DateTime, Utc};
use mongodb::Collection;
use mongodb::bson::{Document, doc};
use mongodb::options::ReturnDocument;

use super::StoreError;
use super::tokens::bson_date;

const COLLECTION: &str = "job_results";
const DUPLICATE_KEY: i32 = 11000;

/// What a delivery may do with its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This consumer holds the job: run it.
    Run,
    /// The job already ran; this is its reply, to publish again.
    Done(Vec<u8>),
    /// Another consumer is running it right now.
    Busy,
}

#[derive(Clone)]
pub struct ResultStore {
    collection: Collection<Document>,
}

impl ResultStore {
    pub(super) fn new(db: &mongodb::Database) -> Self {
        Self { collection: db.collection(COLLECTION) }
    }

    /// Claims `job_id` for `owner` until `lease_until`, unless it has a reply or someone else's
    /// live claim. `owner` names one delivery, not a process: two deliveries of the same job in
    /// one process must not both run it. A job back from a delay queue presents the owner it
    /// had, and so takes its own claim back even while the lease runs.
    #[tracing::instrument(skip_all)]
    pub async fn claim(
        &self,
        job_id: &str,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<Claim, StoreError> {
        let filter = doc! {
            "_id": job_id,
            "reply": { "$exists": false },
            "$or": [{ "lease_until": { "$lte": bson_date(now) } }, { "owner": owner }],
        };
        let update = doc! {
            "$set": { "owner": owner, "lease_until": bson_date(lease_until) },
            "$setOnInsert": { "created_at": bson_date(now), "expires_at": bson_date(expires_at) },
        };
        match self
            .collection
            .find_one_and_update(filter, update)
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await
        {
            Ok(_) => Ok(Claim::Run),
            // The document exists but did not match: it has a reply, or someone else's live claim.
            Err(e) if is_duplicate_key(&e) => {
                let existing = self.collection.find_one(doc! { "_id": job_id }).await?;
                Ok(match existing.as_ref().and_then(|d| d.get_str("reply").ok()) {
                    Some(reply) => Claim::Done(reply.as_bytes().to_vec()),
                    None => Claim::Busy,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Stores the job's reply (a claim by `owner` must exist). From now on the job is done.
    #[tracing::instrument(skip_all)]
    pub async fn complete(&self, job_id: &str, owner: &str, reply: &[u8]) -> Result<(), StoreError> {
        let reply = String::from_utf8_lossy(reply).into_owned();
        self.collection
            .update_one(
                doc! { "_id": job_id, "owner": owner },
                doc! { "$set": { "reply": reply }, "$unset": { "lease_until": "" } },
            )
            .await?;
        Ok(())
    }
}

fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match &*error.kind {
        ErrorKind::Write(WriteFailure::WriteError(e)) => e.code == DUPLICATE_KEY,
        ErrorKind::Command(e) => e.code == DUPLICATE_KEY,
        _ => false,
    }
}
