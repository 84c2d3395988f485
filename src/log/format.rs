//! The on-disk frame format: a fixed header, then rkyv bytes. This format is an API: a change is
//! a new [`FORMAT_VERSION`] and a new golden fixture under `tests/fixtures`.
//!
//! ```text
//! offset  size  field
//!      0     4  magic            b"CDLF"
//!      4     2  format version   u16 little-endian (1)
//!      6     2  flags            u16 little-endian (0; reserved, any other value is refused)
//!      8     4  body length      u32 little-endian, bytes after the header
//!     12     4  body CRC32C      u32 little-endian (Castagnoli)
//!     16     n  body             rkyv archive of `Frame` (little-endian, unaligned, 32-bit offsets)
//! ```
//!
//! Reading checks the header (magic, version, length, checksum) before rkyv's validation runs,
//! and only the validated rkyv access is ever used on stored bytes.

use rkyv::rancor;

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"CDLF";
/// The frame format this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes before the rkyv body.
pub const HEADER_LEN: usize = 16;
/// Largest body a frame may declare (64 MiB): a header claiming more is corrupt.
pub const BODY_LEN_MAX: usize = 64 << 20;

const _: () = assert!(HEADER_LEN == MAGIC.len() + 2 + 2 + 4 + 4);

/// One event in the log.
#[derive(Debug, Clone, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Record {
    /// Unique id of this event.
    pub id: u64,
    /// The stream (aggregate) the event belongs to, such as an order id.
    pub stream: u64,
    /// Position in its stream, from 1, contiguous; assigned by the log writer.
    pub version: u32,
    /// What happened: application-defined below [`KIND_RESERVED_MIN`], the engine's above.
    pub kind: u16,
    /// Index of the stage that wrote it ([`STAGE_INGRESS`] for submitted messages).
    pub stage: u16,
    /// Attempts made (dead letters); 0 otherwise.
    pub attempts: u32,
    /// For a dead letter: the kind of the original event. 0 otherwise.
    pub cause_kind: u16,
    /// When it was recorded: microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// Id shared by every event descending from one submitted message.
    pub correlation: u64,
    /// Id of the event whose handling produced this one (0 for a submitted message).
    pub causation: u64,
    /// Application bytes.
    pub payload: Vec<u8>,
    /// Free text (a dead letter's reason); empty otherwise.
    pub note: String,
}

/// Kinds from here up belong to the engine.
pub const KIND_RESERVED_MIN: u16 = 0xFF00;
/// An event the engine dead-lettered: `stage`, `attempts`, `note` tell why, `cause_kind` and
/// `payload` hold the original event.
pub const KIND_DEAD_LETTER: u16 = 0xFF01;
/// A dead letter was redriven: `causation` is the dead letter's id, `stage` the stage the event
/// was sent to, `cause_kind` and `payload` the event sent (which may differ from the original:
/// the application decides where a redrive starts). Events that follow carry this record's id.
pub const KIND_REDRIVEN: u16 = 0xFF02;
/// A dead letter was purged: `causation` is its id. It stays in the log, out of the list.
pub const KIND_PURGED: u16 = 0xFF03;
/// The work of submitted messages has finished: `payload` holds the ids of their ingress records,
/// little-endian `u64`s. Written on [`ENGINE_STREAM`] by the engine's completion tracking.
pub const KIND_COMPLETED: u16 = 0xFF04;
/// The engine's own stream (completion records); no application stream may use it.
pub const ENGINE_STREAM: u64 = u64::MAX;

/// The ingress record ids a [`KIND_COMPLETED`] record's payload lists (a torn tail is ignored).
pub fn completed_ids(payload: &[u8]) -> impl Iterator<Item = u64> + '_ {
    payload.chunks_exact(8).map(|bytes| u64::from_le_bytes(bytes.try_into().expect("chunks of eight")))
}

/// `Record::stage` of a message recorded at ingress.
pub const STAGE_INGRESS: u16 = u16::MAX;

/// What a stored value holds: consecutive records of the log.
#[derive(Debug, Clone, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Frame {
    /// The frame's key in the frames table: a stored frame under another key is misplaced.
    pub seq: u64,
    /// The records, in log order.
    pub records: Vec<Record>,
}

/// Bytes of an encoded frame besides its records: the header and the archived frame's root.
pub(crate) const FRAME_FIXED_BYTES: usize = HEADER_LEN + std::mem::size_of::<ArchivedFrame>();

/// At most the bytes `record` adds to an encoded frame: its archived fixed part and its payload
/// and note bytes (exact, but for a note short enough for rkyv to inline: then a few bytes over).
/// The archive is unaligned, so nothing pads them.
#[inline]
pub(crate) fn encoded_len(record: &Record) -> usize {
    std::mem::size_of::<ArchivedRecord>() + record.payload.len() + record.note.len()
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer bytes than a header.
    #[error("frame is truncated: {len} bytes, a header alone is {HEADER_LEN}")]
    TooShort {
        /// Bytes present.
        len: usize,
    },
    /// The first bytes are not [`MAGIC`].
    #[error("not a conduit log frame (magic {found:02x?})")]
    BadMagic {
        /// The bytes found instead.
        found: [u8; 4],
    },
    /// Written by a format this build does not read.
    #[error("frame format version {found} is not supported (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// Flags this build does not know are set.
    #[error("frame flags {found:#06x} are not supported (this build knows none)")]
    UnsupportedFlags {
        /// The flags found.
        found: u16,
    },
    /// The declared body length disagrees with the bytes present.
    #[error("frame body is {actual} bytes but its header declares {declared}")]
    Length {
        /// From the header.
        declared: usize,
        /// Present.
        actual: usize,
    },
    /// The body's checksum does not match the header's.
    #[error("frame checksum mismatch: header says {expected:08x}, body has {actual:08x}")]
    Checksum {
        /// From the header.
        expected: u32,
        /// Computed.
        actual: u32,
    },
    /// The checksum matched but rkyv validation failed (a bug, or a forged checksum).
    #[error("frame body is not a valid archive: {0}")]
    Invalid(String),
    /// The frame's own sequence number disagrees with where it was stored.
    #[error("frame stored under key {key} says it is frame {found}")]
    Misplaced {
        /// Where it was stored.
        key: u64,
        /// What it says.
        found: u64,
    },
}

/// Encodes `frame` into `out` (cleared first): header, then rkyv body.
///
/// # Panics
/// If serialization fails, which for these plain types only happens when memory runs out.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>) {
    encode_sealed(frame, out);
}

/// Encodes any of the log's archived values (frames, checkpoints, stream heads) into `out`
/// (cleared first) behind the frame header, so every stored value is checked the same way.
pub(crate) fn encode_sealed<T>(value: &T, out: &mut Vec<u8>)
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<Vec<u8>, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>,
    >,
{
    out.clear();
    out.extend_from_slice(&[0; HEADER_LEN]);
    // The archive is position-independent (relative pointers, no alignment with `unaligned`),
    // so it is serialized straight after the header into the reused buffer.
    let mut buffer = std::mem::take(out);
    buffer = rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, buffer)
        .expect("serializing plain owned data into a Vec cannot fail");
    *out = buffer;
    let body = &out[HEADER_LEN..];
    let len = u32::try_from(body.len()).expect("stored values are sized far below 4 GiB");
    let crc = crc32c::crc32c(body);
    out[0..4].copy_from_slice(&MAGIC);
    out[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[6..8].copy_from_slice(&0u16.to_le_bytes());
    out[8..12].copy_from_slice(&len.to_le_bytes());
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    debug_assert!(check_header(out).is_ok(), "a stored value must read back as written");
}

/// Checks the header and checksum; returns the body.
pub fn check_header(bytes: &[u8]) -> Result<&[u8], FrameError> {
    if bytes.len() < HEADER_LEN {
        return Err(FrameError::TooShort { len: bytes.len() });
    }
    let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != FORMAT_VERSION {
        return Err(FrameError::UnsupportedVersion { found: version });
    }
    let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
    if flags != 0 {
        return Err(FrameError::UnsupportedFlags { found: flags });
    }
    let declared = word(8) as usize;
    let body = &bytes[HEADER_LEN..];
    if declared > BODY_LEN_MAX || declared != body.len() {
        return Err(FrameError::Length { declared, actual: body.len() });
    }
    let expected = word(12);
    let actual = crc32c::crc32c(body);
    if expected != actual {
        return Err(FrameError::Checksum { expected, actual });
    }
    Ok(body)
}

/// Validates a stored frame completely and gives zero-copy access to it.
pub fn decode_frame(bytes: &[u8]) -> Result<&ArchivedFrame, FrameError> {
    let body = check_header(bytes)?;
    rkyv::access::<ArchivedFrame, rancor::Error>(body).map_err(|e| FrameError::Invalid(e.to_string()))
}

/// Validates a frame stored under `key` and copies its records out.
pub fn decode_frame_owned(key: u64, bytes: &[u8]) -> Result<Frame, FrameError> {
    let archived = decode_frame(bytes)?;
    let frame: Frame =
        rkyv::deserialize::<Frame, rancor::Error>(archived).map_err(|e| FrameError::Invalid(e.to_string()))?;
    if frame.seq != key {
        return Err(FrameError::Misplaced { key, found: frame.seq });
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer closes frames on `encoded_len`: exact for records without a note or with one
    /// too long to inline, a few bytes over otherwise, never under.
    #[test]
    fn a_frames_encoded_length_is_what_its_records_say() {
        let mut encoded = Vec::new();
        for (count, payload, note) in [(0, 0, 0), (1, 0, 0), (3, 17, 0), (1_000, 20, 0), (5, 3, 40), (7, 1, 3)] {
            let record =
                Record { id: 9, stream: 4, payload: vec![7; payload], note: "n".repeat(note), ..Record::default() };
            let frame = Frame { seq: 1, records: vec![record.clone(); count] };
            encode_frame(&frame, &mut encoded);
            let predicted = FRAME_FIXED_BYTES + count * encoded_len(&record);
            if note == 0 || note > rkyv::string::repr::INLINE_CAPACITY {
                assert_eq!(encoded.len(), predicted, "{count} records of {payload} bytes, a note of {note}");
            } else {
                assert!(encoded.len() <= predicted && predicted - encoded.len() <= count * note);
            }
        }
    }

    fn sample() -> Frame {
        Frame {
            seq: 7,
            records: vec![
                Record { id: 1, stream: 10, version: 1, kind: 1, payload: vec![1, 2, 3], ..Record::default() },
                Record {
                    id: 2,
                    stream: 10,
                    version: 2,
                    kind: KIND_DEAD_LETTER,
                    note: "retries_exhausted: down".into(),
                    ..Record::default()
                },
            ],
        }
    }

    /// A stored value of `body` behind a header its own fields make valid.
    fn sealed(body: &[u8]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u16.to_le_bytes());
        bytes.extend_from_slice(&u32::try_from(body.len()).expect("small").to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn the_header_check_is_exact_about_lengths() {
        assert_eq!(check_header(&sealed(b"")), Ok(&b""[..]), "a header alone is a value with an empty body");
        assert_eq!(check_header(&sealed(b"")[..HEADER_LEN - 1]), Err(FrameError::TooShort { len: HEADER_LEN - 1 }));
        let largest = vec![7u8; BODY_LEN_MAX];
        assert_eq!(check_header(&sealed(&largest)).map(<[u8]>::len), Ok(BODY_LEN_MAX), "the largest body is accepted");
        let over = vec![7u8; BODY_LEN_MAX + 1];
        let error = check_header(&sealed(&over)).expect_err("a body over the limit is refused");
        assert_eq!(error, FrameError::Length { declared: BODY_LEN_MAX + 1, actual: BODY_LEN_MAX + 1 });
    }

    #[test]
    fn a_completion_record_lists_its_ids_and_a_torn_tail_is_ignored() {
        let mut payload = crate::journal::completion_record(&[3, 9]).payload;
        assert_eq!(completed_ids(&payload).collect::<Vec<_>>(), [3, 9]);
        payload.extend_from_slice(&[1, 2, 3]);
        assert_eq!(completed_ids(&payload).collect::<Vec<_>>(), [3, 9]);
        assert_eq!(completed_ids(&[]).count(), 0);
    }

    #[test]
    fn a_frame_round_trips() {
        let mut bytes = Vec::new();
        encode_frame(&sample(), &mut bytes);
        assert_eq!(&bytes[..4], b"CDLF");
        assert_eq!(decode_frame_owned(7, &bytes), Ok(sample()));
        let archived = decode_frame(&bytes).expect("valid");
        assert_eq!(archived.records.len(), 2);
        assert_eq!(archived.records[1].note.as_str(), "retries_exhausted: down");
    }

    #[test]
    fn every_single_byte_flip_is_caught() {
        let mut bytes = Vec::new();
        encode_frame(&sample(), &mut bytes);
        for at in 0..bytes.len() {
            let mut corrupt = bytes.clone();
            corrupt[at] ^= 0x5A;
            assert!(decode_frame_owned(7, &corrupt).is_err(), "flip at byte {at} went unnoticed");
        }
    }

    #[test]
    fn every_truncation_is_caught() {
        let mut bytes = Vec::new();
        encode_frame(&sample(), &mut bytes);
        for len in 0..bytes.len() {
            assert!(decode_frame(&bytes[..len]).is_err(), "truncation to {len} went unnoticed");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode_frame(&longer), Err(FrameError::Length { .. })));
    }

    #[test]
    fn a_frame_under_the_wrong_key_is_misplaced() {
        let mut bytes = Vec::new();
        encode_frame(&sample(), &mut bytes);
        assert_eq!(decode_frame_owned(8, &bytes), Err(FrameError::Misplaced { key: 8, found: 7 }));
    }

    #[test]
    fn a_forged_checksum_still_meets_rkyv_validation() {
        let mut bytes = Vec::new();
        encode_frame(&sample(), &mut bytes);
        let body_len = bytes.len() - HEADER_LEN;
        // Garbage body with a correct checksum: validation, not luck, must refuse it.
        for fill in [0x00u8, 0xFF, 0x7F] {
            let mut forged = bytes[..HEADER_LEN].to_vec();
            forged.extend(std::iter::repeat_n(fill, body_len));
            let crc = crc32c::crc32c(&forged[HEADER_LEN..]);
            forged[12..16].copy_from_slice(&crc.to_le_bytes());
            let decoded = decode_frame_owned(7, &forged);
            assert!(decoded.is_err(), "a body of {fill:#04x} bytes passed validation: {decoded:?}");
        }
    }
}
