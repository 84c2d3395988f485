//! Aggregate snapshots: a stream's folded state saved at a version, so that loading it reads
//! only the records after that version, and a stream whose early history retention removed can
//! still be loaded whole.
//!
//! One row per stream in the `snapshots` table (the latest snapshot; an older one never
//! replaces a newer), sealed like every other row (magic, length, CRC32C, validated rkyv). A
//! stream with a snapshot keeps its head when retention removes all its records, so its
//! versions go on from where they were.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::checkpoint::decode;
use super::error::storage;
use super::read::Aggregate;
use super::{existing, LogError};

/// The latest snapshot of each stream.
pub(crate) const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");

/// An aggregate that can be saved and restored.
pub trait Snapshot: Aggregate + Sized {
    /// Appends the state's bytes to `out`.
    fn encode(&self, out: &mut Vec<u8>);
    /// The state from bytes [`encode`](Self::encode) wrote; `None` if they do not make one.
    fn decode(bytes: &[u8]) -> Option<Self>;
}

/// One stream's snapshot row.
#[derive(Debug, Clone, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct SnapshotRow {
    pub(crate) version: u32,
    pub(crate) state: Vec<u8>,
}

/// The snapshot row of `stream`, if it has one.
pub(crate) fn read(db: &redb::Database, stream: u64) -> Result<Option<SnapshotRow>, LogError> {
    let txn = db.begin_read().map_err(storage)?;
    let Some(table) = existing(&txn, SNAPSHOTS)? else { return Ok(None) };
    let Some(value) = table.get(stream).map_err(storage)? else { return Ok(None) };
    decode::<SnapshotRow>("snapshots", stream, value.value()).map(Some)
}

/// Saves `stream`'s snapshot at `version` in `txn`, unless the one saved is newer.
pub(crate) fn write(
    txn: &redb::WriteTransaction,
    stream: u64,
    version: u32,
    state: Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Result<(), LogError> {
    let mut table = txn.open_table(SNAPSHOTS).map_err(storage)?;
    if let Some(saved) = table.get(stream).map_err(storage)? {
        let saved: SnapshotRow = decode("snapshots", stream, saved.value())?;
        if saved.version > version {
            return Ok(());
        }
    }
    super::format::encode_sealed(&SnapshotRow { version, state }, scratch);
    table.insert(stream, scratch.as_slice()).map_err(storage)?;
    Ok(())
}
