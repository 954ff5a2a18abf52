//! Names a holder of claims and leases in shared state (the worker's job claims, the refresher's
//! token leases): the process id, to find the holder in `ps` and in logs, and a random part,
//! because process ids repeat across hosts and restarts.

/// A new owner id, unique to the caller that asked for it.
pub(crate) fn new_owner_id() -> String {
    format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple())
}
