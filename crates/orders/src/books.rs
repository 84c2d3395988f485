//! The payment provider's own books: an append-only file of the effects it made (charges and
//! refunds), each written before the provider answers. They belong to the provider, not to the
//! pipeline that calls it: a pipeline killed between a charge and its own record of it restarts
//! against books that remember the charge, exactly as a real provider would.
//!
//! The file is written with `write(2)` and not synced: the books outlive the caller's process
//! (any kill), which is what they model; a power cut of the shop's machine is modelled in process
//! by a provider object that outlives the cut (`crates/orders/tests/power_loss.rs`).
//!
//! The books are bounded like the provider's idempotency window: when the file holds
//! `segment_entries` entries it becomes `PATH.old` (replacing the one before it) and a new file
//! starts with the running totals, so opening reads at most two segments, never the whole history.
//!
//! Each entry is 40 bytes, little-endian: kind (1 byte), 3 zero bytes, the key's generation
//! (u32), three u64 fields, a CRC-32C of the first 32 bytes, 4 zero bytes.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// One fact in the provider's books.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// The running totals when a segment starts.
    Totals { charged_cents: u64, refunded_cents: u64, double_charges: u64 },
    /// A charge under a key the order had no live charge for.
    Charge { order: u64, generation: u32, amount_cents: u64 },
    /// A charge under another key while the order held a live charge: the customer paid twice.
    DoubleCharge { order: u64, generation: u32, amount_cents: u64 },
    /// The refund of the order's charge of `generation`.
    Refund { order: u64, generation: u32, amount_cents: u64 },
}

const ENTRY_BYTES: usize = 40;
const KIND_TOTALS: u8 = 1;
const KIND_CHARGE: u8 = 2;
const KIND_DOUBLE: u8 = 3;
const KIND_REFUND: u8 = 4;

impl Entry {
    fn encode(self) -> [u8; ENTRY_BYTES] {
        let (kind, generation, a, b, c) = match self {
            Self::Totals { charged_cents, refunded_cents, double_charges } => {
                (KIND_TOTALS, 0, charged_cents, refunded_cents, double_charges)
            }
            Self::Charge { order, generation, amount_cents } => (KIND_CHARGE, generation, order, amount_cents, 0),
            Self::DoubleCharge { order, generation, amount_cents } => (KIND_DOUBLE, generation, order, amount_cents, 0),
            Self::Refund { order, generation, amount_cents } => (KIND_REFUND, generation, order, amount_cents, 0),
        };
        let mut bytes = [0u8; ENTRY_BYTES];
        bytes[0] = kind;
        bytes[4..8].copy_from_slice(&generation.to_le_bytes());
        bytes[8..16].copy_from_slice(&a.to_le_bytes());
        bytes[16..24].copy_from_slice(&b.to_le_bytes());
        bytes[24..32].copy_from_slice(&c.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..32]);
        bytes[32..36].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    fn decode(bytes: &[u8; ENTRY_BYTES]) -> Result<Self, &'static str> {
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let stored = u32::from_le_bytes(bytes[32..36].try_into().expect("4 bytes"));
        if stored != crc32c::crc32c(&bytes[..32]) {
            return Err("checksum mismatch");
        }
        if bytes[1..4] != [0; 3] || bytes[36..] != [0; 4] {
            return Err("reserved bytes are not zero");
        }
        let generation = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        let (a, b, c) = (word(8), word(16), word(24));
        let effect = |kind: u8| {
            if c != 0 {
                return Err("an effect entry with a third field");
            }
            Ok(match kind {
                KIND_CHARGE => Self::Charge { order: a, generation, amount_cents: b },
                KIND_DOUBLE => Self::DoubleCharge { order: a, generation, amount_cents: b },
                _ => Self::Refund { order: a, generation, amount_cents: b },
            })
        };
        match bytes[0] {
            KIND_TOTALS if generation == 0 => {
                Ok(Self::Totals { charged_cents: a, refunded_cents: b, double_charges: c })
            }
            KIND_TOTALS => Err("a totals entry with a generation"),
            kind @ (KIND_CHARGE | KIND_DOUBLE | KIND_REFUND) => effect(kind),
            _ => Err("unknown entry kind"),
        }
    }
}

/// The provider's books could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BooksError {
    /// Reading or writing the file failed.
    #[error("payment provider's books {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// An entry that is not what the provider wrote: nothing is trusted after it.
    #[error("payment provider's books {path}: entry at byte {offset}: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where the entry starts.
        offset: u64,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Running sums over every entry ever written, the removed segments included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) charged_cents: u64,
    pub(crate) refunded_cents: u64,
    pub(crate) double_charges: u64,
}

impl Totals {
    fn add(&mut self, entry: Entry) {
        match entry {
            Entry::Totals { charged_cents, refunded_cents, double_charges } => {
                *self = Self { charged_cents, refunded_cents, double_charges };
            }
            Entry::Charge { amount_cents, .. } => self.charged_cents += amount_cents,
            Entry::DoubleCharge { amount_cents, .. } => {
                self.charged_cents += amount_cents;
                self.double_charges += 1;
            }
            Entry::Refund { amount_cents, .. } => self.refunded_cents += amount_cents,
        }
    }

    fn entry(self) -> Entry {
        Entry::Totals {
            charged_cents: self.charged_cents,
            refunded_cents: self.refunded_cents,
            double_charges: self.double_charges,
        }
    }
}

/// The open books: the current segment, appended to.
#[derive(Debug)]
pub(crate) struct BooksFile {
    path: PathBuf,
    file: File,
    entries: u64,
    segment_entries: u64,
    totals: Totals,
    /// A write failed part way: the file may end in a partial entry, so nothing more is written.
    broken: bool,
}

fn old_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".old");
    PathBuf::from(name)
}

impl BooksFile {
    /// Opens (or creates) the books at `path`, handing every charge and refund of the kept
    /// segments, oldest first, to `replay`. A partial entry at the end of the current segment (a
    /// write the provider never answered) is cut off.
    pub(crate) fn open(path: &Path, segment_entries: u64, mut replay: impl FnMut(Entry)) -> Result<Self, BooksError> {
        let io = |source| BooksError::Io { path: path.to_owned(), source };
        let mut totals = Totals::default();
        // Each segment opens with the running totals (the current one's repeat what the old one
        // ended with), so adding every entry in order leaves the totals of all ever written.
        let mut each = |entry: Entry| {
            totals.add(entry);
            if !matches!(entry, Entry::Totals { .. }) {
                replay(entry);
            }
        };
        let old = old_path(path);
        if old.exists() {
            read_segment(&old, false, &mut each)?;
        }
        let file = OpenOptions::new().read(true).create(true).append(true).open(path).map_err(io)?;
        let kept = read_segment(path, true, &mut each)?;
        let entries = kept / ENTRY_BYTES as u64;
        file.set_len(kept).map_err(io)?;
        let mut books = Self {
            path: path.to_owned(),
            file,
            entries,
            segment_entries: segment_entries.max(2),
            totals,
            broken: false,
        };
        if entries == 0 {
            books.write(totals.entry())?;
        }
        Ok(books)
    }

    /// The running totals over every entry ever written.
    pub(crate) fn totals(&self) -> Totals {
        self.totals
    }

    /// Writes `entry` (starting a new segment first when this one is full).
    pub(crate) fn append(&mut self, entry: Entry) -> Result<(), BooksError> {
        if self.broken {
            return Err(BooksError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("an earlier write failed; the books take no more entries"),
            });
        }
        if self.entries >= self.segment_entries {
            self.rotate()?;
        }
        self.write(entry)?;
        self.totals.add(entry);
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), BooksError> {
        let io = |source| BooksError::Io { path: self.path.clone(), source };
        std::fs::rename(&self.path, old_path(&self.path)).map_err(io)?;
        self.file = OpenOptions::new().create(true).append(true).open(&self.path).map_err(io)?;
        self.entries = 0;
        self.write(self.totals.entry())
    }

    fn write(&mut self, entry: Entry) -> Result<(), BooksError> {
        if let Err(source) = self.file.write_all(&entry.encode()) {
            self.broken = true;
            return Err(BooksError::Io { path: self.path.clone(), source });
        }
        self.entries += 1;
        Ok(())
    }
}

/// Reads the entries of one segment file; returns the bytes of whole entries. A partial entry
/// at the end is an error unless `tail_may_tear` (the current segment).
fn read_segment(path: &Path, tail_may_tear: bool, mut each: impl FnMut(Entry)) -> Result<u64, BooksError> {
    let io = |source| BooksError::Io { path: path.to_owned(), source };
    let mut bytes = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io)?;
    let whole = bytes.len() / ENTRY_BYTES * ENTRY_BYTES;
    if whole != bytes.len() && !tail_may_tear {
        return Err(BooksError::Corrupt { path: path.to_owned(), offset: whole as u64, why: "a partial entry" });
    }
    for (index, chunk) in bytes[..whole].chunks_exact(ENTRY_BYTES).enumerate() {
        let offset = (index * ENTRY_BYTES) as u64;
        let entry = Entry::decode(chunk.try_into().expect("chunks of ENTRY_BYTES"))
            .map_err(|why| BooksError::Corrupt { path: path.to_owned(), offset, why })?;
        if (index == 0) != matches!(entry, Entry::Totals { .. }) {
            let why = if index == 0 { "a segment must start with its totals" } else { "totals inside a segment" };
            return Err(BooksError::Corrupt { path: path.to_owned(), offset, why });
        }
        each(entry);
    }
    Ok(whole as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(order: u64) -> Entry {
        Entry::Charge { order, generation: 0, amount_cents: 100 }
    }

    fn reopen(path: &Path, segment: u64) -> (BooksFile, Vec<Entry>) {
        let mut seen = Vec::new();
        let books = BooksFile::open(path, segment, |e| seen.push(e)).expect("opens");
        (books, seen)
    }

    #[test]
    fn entries_round_trip_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("books");
        let (mut books, seen) = reopen(&path, 100);
        assert_eq!(seen, []);
        let written = [
            charge(1),
            Entry::DoubleCharge { order: 1, generation: 1, amount_cents: 100 },
            Entry::Refund { order: 1, generation: 0, amount_cents: 100 },
        ];
        for entry in written {
            books.append(entry).expect("appends");
        }
        drop(books);
        let (books, seen) = reopen(&path, 100);
        assert_eq!(seen, written);
        assert_eq!(books.totals, Totals { charged_cents: 200, refunded_cents: 100, double_charges: 1 });
    }

    #[test]
    fn segments_rotate_and_keep_the_totals_of_what_they_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("books");
        let (mut books, _) = reopen(&path, 4);
        for order in 0..20 {
            books.append(charge(order)).expect("appends");
        }
        drop(books);
        let (books, seen) = reopen(&path, 4);
        assert_eq!(books.totals.charged_cents, 2_000, "totals carried over from dropped segments");
        let orders: Vec<u64> =
            seen.iter().map(|e| if let Entry::Charge { order, .. } = e { *order } else { u64::MAX }).collect();
        assert!(orders.len() <= 8 && orders.ends_with(&[18, 19]), "two segments at most: {orders:?}");
    }

    #[test]
    fn a_torn_tail_is_cut_and_a_bad_entry_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("books");
        let (mut books, _) = reopen(&path, 100);
        books.append(charge(7)).expect("appends");
        drop(books);
        let mut file = OpenOptions::new().append(true).open(&path).expect("opens");
        file.write_all(&charge(8).encode()[..13]).expect("writes a torn entry");
        drop(file);
        let (mut books, seen) = reopen(&path, 100);
        assert_eq!(seen, [charge(7)], "the torn entry was never answered");
        books.append(charge(9)).expect("appends after the cut");
        drop(books);
        assert_eq!(reopen(&path, 100).1, [charge(7), charge(9)]);

        let mut bytes = std::fs::read(&path).expect("reads");
        bytes[ENTRY_BYTES + 9] ^= 1;
        std::fs::write(&path, bytes).expect("writes");
        let error = BooksFile::open(&path, 100, |_| {}).expect_err("a flipped bit is refused");
        assert!(matches!(error, BooksError::Corrupt { offset: 40, why: "checksum mismatch", .. }), "{error}");
    }
}
