//! A disk in memory for the log, with a disk's crash semantics: what was synced survives a power
//! cut, what was only written may not. Open a log on it with [`crate::log::Log::open_with_backend`];
//! tests, simulations and fuzz targets use it to run the real log at memory speed and to cut the
//! power at any moment.

use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// How the writes made since the last completed sync fare when the power goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerCut {
    /// None of them reached the platter.
    Drop,
    /// A random subset did (a disk may reorder writes between barriers), and the last of those
    /// was torn part way; `seed` picks which.
    Tear {
        /// Seeds the choice of surviving writes and of the tear.
        seed: u64,
    },
}

/// One write since the last sync: bytes at an offset, or a change of length.
#[derive(Debug)]
enum Pending {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Platter {
    /// What survives a power cut: the image as of the last completed sync.
    durable: Vec<u8>,
    /// What a reader sees now: the durable image and every write since.
    current: Vec<u8>,
    pending: Vec<Pending>,
    syncs: u64,
    /// The sync (counted from 1) during which the power goes, and how.
    armed: Option<(u64, PowerCut)>,
    dark: bool,
}

impl Platter {
    /// The power goes now: the durable image keeps what `cut` lets through, nothing more is
    /// answered.
    fn cut(&mut self, cut: PowerCut) {
        let pending = std::mem::take(&mut self.pending);
        if let PowerCut::Tear { seed } = cut {
            let mut rng = SmallRng::seed_from_u64(seed);
            let kept: Vec<Pending> = pending.into_iter().filter(|_| rng.random_bool(0.5)).collect();
            let count = kept.len();
            for (i, write) in kept.into_iter().enumerate() {
                match write {
                    Pending::Write { offset, mut bytes } => {
                        if i + 1 == count && !bytes.is_empty() {
                            bytes.truncate(rng.random_range(0..bytes.len()));
                        }
                        write_at(&mut self.durable, offset, &bytes);
                    }
                    Pending::SetLen(len) => resize(&mut self.durable, len),
                }
            }
        }
        self.current.clone_from(&self.durable);
        self.dark = true;
    }
}

/// A disk in memory. Clones share it: keep one to look at the disk while a log writes to another.
#[derive(Debug, Clone, Default)]
pub struct MemoryDisk(Arc<Mutex<Platter>>);

impl MemoryDisk {
    /// An empty disk.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A disk holding `image`, all of it durable (a disk powered up again).
    #[must_use]
    pub fn from_image(image: Vec<u8>) -> Self {
        Self(Arc::new(Mutex::new(Platter { current: image.clone(), durable: image, ..Platter::default() })))
    }

    /// Arms a power cut: the `sync`th sync (counted from 1 over the disk's life) never
    /// completes, the writes since the one before fare as `cut` says, and the disk answers
    /// nothing more.
    #[must_use]
    pub fn with_power_cut_at(self, sync: u64, cut: PowerCut) -> Self {
        self.0.lock().armed = Some((sync, cut));
        self
    }

    /// The power goes now. Returns the disk as it powers up again: what was synced, and what
    /// `cut` lets through of the rest. This disk answers nothing more.
    #[must_use]
    pub fn cut_power(&self, cut: PowerCut) -> Self {
        {
            let mut platter = self.0.lock();
            if !platter.dark {
                platter.cut(cut);
            }
        }
        self.survivor()
    }

    /// The disk as it powers up again after a cut (armed or not) that already happened; while the
    /// power is on, what a cut that dropped every unsynced write would leave.
    #[must_use]
    pub fn survivor(&self) -> Self {
        Self::from_image(self.image())
    }

    /// The durable bytes: what a [`MemoryDisk::from_image`] of them would hold.
    #[must_use]
    pub fn image(&self) -> Vec<u8> {
        self.0.lock().durable.clone()
    }

    /// Whether the power has gone.
    #[must_use]
    pub fn is_dark(&self) -> bool {
        self.0.lock().dark
    }

    /// Syncs completed or attempted so far.
    #[must_use]
    pub fn syncs(&self) -> u64 {
        self.0.lock().syncs
    }
}

fn dark() -> std::io::Error {
    std::io::Error::other("the disk lost power")
}

fn usize_of(value: u64) -> Result<usize, std::io::Error> {
    usize::try_from(value).map_err(|_| std::io::Error::other("offset beyond this machine's memory"))
}

fn resize(image: &mut Vec<u8>, len: u64) {
    image.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
}

fn write_at(image: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    let end = start.saturating_add(bytes.len());
    if image.len() < end {
        image.resize(end, 0);
    }
    image[start..end].copy_from_slice(bytes);
}

impl redb::StorageBackend for MemoryDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        let platter = self.0.lock();
        if platter.dark {
            return Err(dark());
        }
        Ok(platter.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let platter = self.0.lock();
        if platter.dark {
            return Err(dark());
        }
        let start = usize_of(offset)?;
        let bytes = start.checked_add(out.len()).and_then(|end| platter.current.get(start..end));
        let bytes = bytes.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end"))?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut platter = self.0.lock();
        if platter.dark {
            return Err(dark());
        }
        usize_of(len)?;
        resize(&mut platter.current, len);
        platter.pending.push(Pending::SetLen(len));
        Ok(())
    }

    fn write(&self, offset: u64, bytes: &[u8]) -> Result<(), std::io::Error> {
        let mut platter = self.0.lock();
        if platter.dark {
            return Err(dark());
        }
        usize_of(offset)?.checked_add(bytes.len()).ok_or_else(|| std::io::Error::other("write past the end"))?;
        write_at(&mut platter.current, offset, bytes);
        platter.pending.push(Pending::Write { offset, bytes: bytes.to_vec() });
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut platter = self.0.lock();
        if platter.dark {
            return Err(dark());
        }
        platter.syncs += 1;
        if let Some((at, cut)) = platter.armed {
            if platter.syncs >= at {
                // The power goes during this sync: it never completes.
                platter.cut(cut);
                return Err(dark());
            }
        }
        // The writes since the last sync reach the platter (cheaper than copying the image).
        let Platter { durable, pending, .. } = &mut *platter;
        for write in pending.drain(..) {
            match write {
                Pending::Write { offset, bytes } => write_at(durable, offset, &bytes),
                Pending::SetLen(len) => resize(durable, len),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use redb::StorageBackend;

    use super::*;

    fn read_all(disk: &MemoryDisk) -> Vec<u8> {
        let mut out = vec![0; usize::try_from(disk.len().expect("powered")).expect("small")];
        disk.read(0, &mut out).expect("powered");
        out
    }

    #[test]
    fn only_synced_writes_survive_a_cut_that_drops_the_rest() {
        let disk = MemoryDisk::new();
        disk.write(0, b"synced").expect("powered");
        disk.sync_data().expect("powered");
        disk.write(6, b" lost").expect("powered");
        assert_eq!(read_all(&disk), b"synced lost");
        let after = disk.cut_power(PowerCut::Drop);
        assert!(disk.is_dark() && disk.read(0, &mut [0; 1]).is_err(), "a dark disk answers nothing");
        assert_eq!(read_all(&after), b"synced");
    }

    #[test]
    fn an_armed_cut_fails_its_sync_and_may_tear_the_last_write() {
        let mut torn = 0;
        for seed in 0..64 {
            let disk = MemoryDisk::new().with_power_cut_at(2, PowerCut::Tear { seed });
            disk.write(0, &[1; 8]).expect("powered");
            disk.sync_data().expect("the first sync completes");
            disk.write(8, &[2; 8]).expect("powered");
            disk.sync_data().expect_err("the second sync never completes");
            let image = read_all(&disk.survivor());
            assert_eq!(image[..8], [1; 8], "seed {seed}: synced bytes survive");
            assert!(image.len() <= 16 && image[8..].iter().all(|&b| b == 2), "seed {seed}: {image:?}");
            torn += usize::from(image.len() > 8 && image.len() < 16);
        }
        assert!(torn > 0, "some seeds keep part of the unsynced write");
    }

    #[test]
    fn reads_past_the_end_and_absurd_offsets_are_errors() {
        let disk = MemoryDisk::from_image(vec![7; 4]);
        assert!(disk.read(2, &mut [0; 4]).is_err());
        assert!(disk.read(u64::MAX, &mut [0; 1]).is_err());
        assert_eq!(read_all(&disk), [7; 4]);
    }
}
