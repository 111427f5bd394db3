#![allow(clippy::result_large_err)]
//! openraft's own storage conformance suite against the sled log store and state machine.

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use tandem_meta::log_store::LogStore;
use tandem_meta::state_machine::StateMachine;
use tandem_meta::TypeConfig;
use tandem_types::NodeId;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        let log = LogStore::open(&db, dir.path())?;
        let sm = StateMachine::open(&db, dir.path())?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(SledBuilder)
}
