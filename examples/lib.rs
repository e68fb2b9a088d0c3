//! distlock's runnable examples, a package of their own so that running one compiles only
//! distlock and the crates the examples use. From the repository root:
//!
//! ```sh
//! cargo run --example quickstart    # then job_scheduler, leader_election, db_update, fenced_store
//! ```
