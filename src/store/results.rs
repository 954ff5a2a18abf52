//! The `job_results` collection: what makes a redelivered job not run twice.
//!
//! One document per `job_id`. A consumer first *claims* the job (owner + lease); once the tool has
//! run, it stores the reply there *before* publishing it. A delivery of a job that already has a
//! reply gets that reply again and the MCP server is not called; a delivery of a job another live
//! consumer holds waits. A job that goes to a delay queue (a retry, a wait for its token) keeps
//! its claim and takes it back when it returns, so no copy of it can run in between. A claim
//! whose lease ran out (its consumer died mid-call) can be taken over. Documents expire after
//! `worker.results_ttl_secs` (TTL index), which bounds how late a duplicate is still recognised.
//!
//! Claims and completions are group-committed ([`super::batch`]): the jobs of one moment share
//! one `update` command of many statements, so the round trips per job fall as load rises.

use chrono::{DateTime, Utc};
use mongodb::Database;
use mongodb::bson::{Bson, Document, doc};

use super::StoreError;
use super::batch::Batcher;
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

/// The outcome of one claim statement before a duplicate is looked into.
#[derive(Clone)]
enum Claimed {
    Run,
    /// The document exists and did not match: it has a reply, or someone else's live claim.
    Taken,
}

#[derive(Clone)]
pub struct ResultStore {
    db: Database,
    claims: Batcher<Document, Claimed>,
    completions: Batcher<Document, ()>,
}

impl ResultStore {
    pub(super) fn new(db: &Database) -> Self {
        let claims = {
            let db = db.clone();
            Batcher::spawn(move |statements| {
                let db = db.clone();
                async move { claim_all(&db, statements).await }
            })
        };
        let completions = {
            let db = db.clone();
            Batcher::spawn(move |statements| {
                let db = db.clone();
                async move { complete_all(&db, statements).await }
            })
        };
        Self { db: db.clone(), claims, completions }
    }

    /// Claims `job_id` for `owner` until `lease_until`, unless it has a reply or someone else's
    /// live claim. `owner` names one delivery, not a process: two deliveries of the same job in
    /// one process must not both run it. A job back from a delay queue presents the owner it
    /// had (`returning`), and so takes its own claim back even while the lease runs.
    #[tracing::instrument(skip_all)]
    pub async fn claim(
        &self,
        job_id: &str,
        owner: &str,
        returning: bool,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<Claim, StoreError> {
        let statement = |taking: Document| {
            let mut q = doc! { "_id": job_id, "reply": { "$exists": false } };
            q.extend(taking);
            doc! {
                "q": q,
                "u": {
                    "$set": { "owner": owner, "lease_until": bson_date(lease_until) },
                    "$setOnInsert": { "created_at": bson_date(now), "expires_at": bson_date(expires_at) },
                },
                "upsert": true,
            }
        };
        // Two filters rather than one `$or`: MongoDB-wire servers without an index-aware `$or`
        // (SecantusDB) would scan the collection for every claim.
        let lapsed = doc! { "lease_until": { "$lte": bson_date(now) } };
        let own = doc! { "owner": owner };
        let mut claimed = self.claims.submit(statement(if returning { own } else { lapsed.clone() })).await?;
        if returning && matches!(claimed, Claimed::Taken) {
            // Its claim is gone (taken over after the lease ran out): it may still be free.
            claimed = self.claims.submit(statement(lapsed)).await?;
        }
        match claimed {
            Claimed::Run => Ok(Claim::Run),
            Claimed::Taken => {
                let existing = self.db.collection::<Document>(COLLECTION).find_one(doc! { "_id": job_id }).await?;
                Ok(match existing.as_ref().and_then(|d| d.get_str("reply").ok()) {
                    Some(reply) => Claim::Done(reply.as_bytes().to_vec()),
                    None => Claim::Busy,
                })
            }
        }
    }

    /// Stores the job's reply (a claim by `owner` must exist). From now on the job is done.
    #[tracing::instrument(skip_all)]
    pub async fn complete(&self, job_id: &str, owner: &str, reply: &[u8]) -> Result<(), StoreError> {
        let reply = String::from_utf8_lossy(reply).into_owned();
        let statement = doc! {
            "q": { "_id": job_id, "owner": owner },
            "u": { "$set": { "reply": reply }, "$unset": { "lease_until": "" } },
        };
        self.completions.submit(statement).await
    }
}

/// Runs claim statements as one `update` command. A statement matched or upserted: the claim
/// is taken. A duplicate-key error: the document exists and did not match.
async fn claim_all(db: &Database, statements: Vec<Document>) -> Vec<Result<Claimed, StoreError>> {
    let count = statements.len();
    let response = match update(db, statements).await {
        Ok(response) => response,
        Err(e) => return vec![Err(e); count],
    };
    let mut outcomes: Vec<Result<Claimed, StoreError>> = (0..count).map(|_| Ok(Claimed::Run)).collect();
    for (index, code, message) in write_errors(&response) {
        if let Some(outcome) = outcomes.get_mut(index) {
            *outcome = if code == DUPLICATE_KEY { Ok(Claimed::Taken) } else { Err(StoreError::Rejected(message)) };
        }
    }
    outcomes
}

async fn complete_all(db: &Database, statements: Vec<Document>) -> Vec<Result<(), StoreError>> {
    let count = statements.len();
    let response = match update(db, statements).await {
        Ok(response) => response,
        Err(e) => return vec![Err(e); count],
    };
    let mut outcomes: Vec<Result<(), StoreError>> = (0..count).map(|_| Ok(())).collect();
    for (index, _, message) in write_errors(&response) {
        if let Some(outcome) = outcomes.get_mut(index) {
            *outcome = Err(StoreError::Rejected(message));
        }
    }
    outcomes
}

/// One unordered `update` command: a failing statement does not stop the others.
async fn update(db: &Database, statements: Vec<Document>) -> Result<Document, StoreError> {
    let command = doc! { "update": COLLECTION, "updates": statements, "ordered": false };
    Ok(db.run_command(command).await?)
}

/// The statement index, code and message of each write error in an `update` response.
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
