//! Finding where a chunked body ends while it streams through unchanged: the fast path relays
//! chunked bodies as they are (no re-chunking), so it only has to know where the last chunk
//! and the trailers end. A byte-at-a-time state machine, so a body split anywhere across reads
//! scans the same (the tests try every split point).

/// Finds where a chunked body ends while it streams through unchanged.
#[derive(Default)]
pub(crate) struct ChunkScanner {
    state: Chunk,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum Chunk {
    /// Reading the chunk size (hex); `digits` so far.
    #[default]
    SizeStart,
    Size {
        size: u64,
        digits: u8,
    },
    /// A chunk extension, up to the line's CR.
    Ext {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: a trailer line or the final CRLF.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl ChunkScanner {
    /// Scans `bytes`: how many belong to the body, and whether the body ends there.
    pub(crate) fn scan(&mut self, bytes: &[u8]) -> Result<(usize, bool), &'static str> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                Chunk::Data { left } => {
                    let take = (left as usize).min(bytes.len() - i);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data { left }
                    };
                    continue;
                }
                Chunk::SizeStart => match hex(b) {
                    Some(d) => Chunk::Size { size: d, digits: 1 },
                    None => return Err("malformed chunk size"),
                },
                Chunk::Size { size, digits } => match (hex(b), b) {
                    (Some(_), _) if digits >= 15 => return Err("chunk too large"),
                    (Some(d), _) => Chunk::Size {
                        size: size * 16 + d,
                        digits: digits + 1,
                    },
                    (None, b';' | b' ' | b'\t') => Chunk::Ext { size },
                    (None, b'\r') => Chunk::SizeLf { size },
                    _ => return Err("malformed chunk size"),
                },
                Chunk::Ext { size } => match b {
                    b'\r' => Chunk::SizeLf { size },
                    b'\n' => return Err("malformed chunk extension"),
                    _ => Chunk::Ext { size },
                },
                Chunk::SizeLf { size } => match (b, size) {
                    (b'\n', 0) => Chunk::TrailerStart,
                    (b'\n', left) => Chunk::Data { left },
                    _ => return Err("malformed chunk size line"),
                },
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => Chunk::SizeStart,
                Chunk::DataCr | Chunk::DataLf => return Err("chunk data not followed by CRLF"),
                Chunk::TrailerStart if b == b'\r' => Chunk::EndLf,
                // A bare LF ends a line for a lenient client (RFC 9112 §2.2 allows it) but not
                // here: the two would disagree on where the body ends (found by the `chunked`
                // fuzz target). Refused, as it is in the chunk-size line.
                Chunk::TrailerStart | Chunk::Trailer if b == b'\n' => {
                    return Err("bare LF in a chunked trailer")
                }
                Chunk::TrailerStart | Chunk::Trailer if b != b'\r' => Chunk::Trailer,
                Chunk::Trailer => Chunk::TrailerLf,
                Chunk::TrailerLf if b == b'\n' => Chunk::TrailerStart,
                Chunk::EndLf if b == b'\n' => Chunk::Done,
                Chunk::TrailerStart | Chunk::TrailerLf | Chunk::EndLf => {
                    return Err("malformed chunked trailer")
                }
                Chunk::Done => return Ok((i, true)),
            };
            i += 1;
            if self.state == Chunk::Done {
                return Ok((i, true));
            }
        }
        Ok((i, self.state == Chunk::Done))
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

/// Scans `parts` in order, as reads deliver them: (bytes of the body, whether it ended).
/// For the tests and the fuzz target's properties.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn scan_parts(parts: &[&[u8]]) -> Result<(usize, bool), &'static str> {
    let mut s = ChunkScanner::default();
    let mut total = 0;
    for p in parts {
        let (n, done) = s.scan(p)?;
        total += n;
        if done {
            return Ok((total, true));
        }
    }
    Ok((total, false))
}

#[cfg(test)]
mod tests {
    use super::scan_parts as scan_all;

    #[test]
    fn chunked_end_is_found_across_any_split() {
        let body: &[u8] =
            b"5;ext=1\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 0..body.len() {
            let (a, b) = body.split_at(split);
            assert_eq!(scan_all(&[a, b]), Ok((end, true)), "split at {split}");
        }
        // Byte by byte.
        let parts: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(scan_all(&parts), Ok((end, true)));
        assert_eq!(scan_all(&[b"0\r\n\r\n"]), Ok((5, true)));
        assert_eq!(scan_all(&[b"3\r\nab"]), Ok((5, false)));
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"5\nhello",
            b"ffffffffffffffffff\r\n",
            b"0\r\n\rX",
            // Bare LF in the trailer section (a lenient client ends the body earlier).
            b"0\r\n\n",
            b"0\r\nx-t: 1\n\r\n",
        ] {
            assert!(
                scan_all(&[bad]).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
