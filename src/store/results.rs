//! `job_results` and `job_replies`: what makes a redelivered job not run twice.
//!
//! A consumer first *claims* the `job_id` (a `job_results` document: owner + lease); once the
//! tool has run, it records the reply in `job_replies` *before* publishing it. A delivery of a
//! job that already has a reply gets that reply again and the MCP server is not called; a
//! delivery of a job another live consumer holds waits. A job that goes to a delay queue (a
//! retry, a wait for its token) keeps its claim and takes it back when it returns, so no copy of
//! it can run in between. A claim whose lease ran out (its consumer died mid-call) can be taken
//! over. Documents expire after `worker.results_ttl_secs` (TTL indexes), which bounds how late a
//! duplicate is still recognised.
//!
//! The common case costs two *inserts*: the claim of a new `job_id`, and its reply. They are
//! group-committed ([`super::batch`]): the jobs of one moment share one `insert` command, so the
//! round trips per job fall as load rises. Only a duplicate key (a job seen before) takes the
//! slower path of finds and conditional updates.
//!
//! Both documents carry the call's fingerprint (`call`: a digest of user, tool and arguments), so
//! a `job_id` reused for another call is told apart from a redelivery. Documents written before
//! the fingerprint existed have none and match any call; they are gone after the TTL.

use chrono::{DateTime, Utc};
use mongodb::Database;
use mongodb::bson::{Bson, Document, doc};

use super::batch::Batcher;
use super::tokens::bson_date;
use super::{DUPLICATE_KEY, StoreError, is_duplicate_key};

const CLAIMS: &str = "job_results";
const REPLIES: &str = "job_replies";

/// What a delivery may do with its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claim {
    /// This consumer holds the job: run it.
    Run,
    /// The job already ran; this is its reply, to publish again.
    Done(Vec<u8>),
    /// Another consumer is running it right now.
    Busy,
    /// The `job_id` was claimed for another call (another user, tool or arguments): this
    /// delivery must neither run nor see that call's reply.
    Conflict,
}

#[derive(Clone)]
pub(crate) struct ResultStore {
    db: Database,
    claims: Batcher<Document, Inserted>,
    replies: Batcher<Document, Inserted>,
}

/// What became of one inserted document.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Inserted {
    Yes,
    /// A document with that `_id` exists already.
    Duplicate,
}

impl ResultStore {
    pub(super) fn new(db: &Database) -> Self {
        let inserter = |collection: &'static str| {
            let db = db.clone();
            Batcher::spawn(move |documents| {
                let db = db.clone();
                async move { insert_all(&db, collection, documents).await }
            })
        };
        Self { db: db.clone(), claims: inserter(CLAIMS), replies: inserter(REPLIES) }
    }

    /// Claims `job_id` for `owner` until `lease_until`, unless it has a reply or someone else's
    /// live claim. `owner` names one delivery, not a process: two deliveries of the same job in
    /// one process must not both run it. A job back from a delay queue presents the owner it
    /// had (`returning`), and so takes its own claim back even while the lease runs. `call` is
    /// the job's fingerprint: a claim or reply of the same id for another call is a conflict.
    #[allow(clippy::too_many_arguments)]
    #[tracing::instrument(skip_all)]
    pub(crate) async fn claim(
        &self,
        job_id: &str,
        call: &str,
        owner: &str,
        returning: bool,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<Claim, StoreError> {
        if !returning {
            let claim = doc! {
                "_id": job_id, "call": call, "owner": owner, "lease_until": bson_date(lease_until),
                "created_at": bson_date(now), "expires_at": bson_date(expires_at),
            };
            if self.claims.submit(claim).await? == Inserted::Yes {
                return Ok(Claim::Run);
            }
        }
        // Seen before: answered already, held by someone, or ours to take (back).
        if let Some(done) = self.replayed(job_id, call).await? {
            return Ok(done);
        }
        let claims = self.db.collection::<Document>(CLAIMS);
        let take = |taking: Document| {
            // `$in` with null also matches a claim written before fingerprints existed.
            let mut filter = doc! { "_id": job_id, "call": { "$in": [call, Bson::Null] } };
            filter.extend(taking);
            let update = doc! {
                "$set": { "call": call, "owner": owner, "lease_until": bson_date(lease_until) },
                "$setOnInsert": { "created_at": bson_date(now), "expires_at": bson_date(expires_at) },
            };
            claims.update_one(filter, update).upsert(true)
        };
        // Its own claim first, then one whose lease ran out; two filters, not an `$or`, which
        // some MongoDB-wire servers (SecantusDB) answer with a collection scan.
        let mut taken = false;
        if returning {
            taken = taken_or_held(take(doc! { "owner": owner }).await)?;
        }
        if !taken {
            taken = taken_or_held(take(doc! { "lease_until": { "$lte": bson_date(now) } }).await)?;
        }
        if !taken {
            // Held by a live consumer: of this call, or of another one under the same id.
            let existing = claims.find_one(doc! { "_id": job_id }).projection(doc! { "call": 1 }).await?;
            let theirs = existing.as_ref().and_then(|d| d.get_str("call").ok());
            return Ok(if theirs.is_some_and(|theirs| theirs != call) { Claim::Conflict } else { Claim::Busy });
        }
        // The claim was taken over: its last holder may have recorded a reply meanwhile.
        Ok(self.replayed(job_id, call).await?.unwrap_or(Claim::Run))
    }

    /// Records the job's reply for `call`. From now on the job is done; the first reply
    /// recorded stays.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn complete(
        &self,
        job_id: &str,
        call: &str,
        reply: &[u8],
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let reply = String::from_utf8_lossy(reply).into_owned();
        let document = doc! {
            "_id": job_id, "call": call, "reply": reply,
            "created_at": bson_date(now), "expires_at": bson_date(expires_at),
        };
        self.replies.submit(document).await.map(|_| ())
    }

    /// The recorded reply of `job_id` as this delivery may see it: `Done` for the same call,
    /// `Conflict` for another; `None` when there is no reply yet.
    async fn replayed(&self, job_id: &str, call: &str) -> Result<Option<Claim>, StoreError> {
        let Some(found) = self.db.collection::<Document>(REPLIES).find_one(doc! { "_id": job_id }).await? else {
            return Ok(None);
        };
        if found.get_str("call").is_ok_and(|theirs| theirs != call) {
            return Ok(Some(Claim::Conflict));
        }
        Ok(found.get_str("reply").ok().map(|reply| Claim::Done(reply.as_bytes().to_vec())))
    }
}

/// Whether a conditional upsert took the claim (`true`) or found it held (a duplicate key).
fn taken_or_held(result: Result<mongodb::results::UpdateResult, mongodb::error::Error>) -> Result<bool, StoreError> {
    match result {
        Ok(_) => Ok(true),
        Err(e) if is_duplicate_key(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Inserts `documents` with one unordered `insert` command: a duplicate does not stop the others.
async fn insert_all(db: &Database, collection: &str, documents: Vec<Document>) -> Vec<Result<Inserted, StoreError>> {
    let count = documents.len();
    let command = doc! { "insert": collection, "documents": documents, "ordered": false };
    let response = match db.run_command(command).await {
        Ok(response) => response,
        Err(e) => return vec![Err(e.into()); count],
    };
    let mut outcomes: Vec<Result<Inserted, StoreError>> = vec![Ok(Inserted::Yes); count];
    for (index, code, message) in write_errors(&response) {
        if let Some(outcome) = outcomes.get_mut(index) {
            *outcome = if code == DUPLICATE_KEY { Ok(Inserted::Duplicate) } else { Err(StoreError::Rejected(message)) };
        }
    }
    outcomes
}

/// The statement index, code and message of each write error in a write command's response.
fn write_errors(response: &Document) -> Vec<(usize, i32, String)> {
    let Ok(errors) = response.get_array("writeErrors") else { return Vec::new() };
    errors
        .iter()
        .filter_map(Bson::as_document)
        .map(|error| {
            let index = error.get("index").and_then(integer).unwrap_or(usize::MAX);
            let code = error.get("code").and_then(integer).and_then(|c| i32::try_from(c).ok()).unwrap_or(0);
            let message = error.get_str("errmsg").unwrap_or("write error").to_owned();
            (index, code, message)
        })
        .collect()
}

fn integer(value: &Bson) -> Option<usize> {
    match value {
        Bson::Int32(n) => usize::try_from(*n).ok(),
        Bson::Int64(n) => usize::try_from(*n).ok(),
        Bson::Double(n) if *n >= 0.0 => Some(*n as usize),
        _ => None,
    }
}
