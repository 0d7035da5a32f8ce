//! Reading the files Palisade is pointed at (config, rule sets, schemas, IP lists): a leaf
//! module every layer may use.

use std::path::Path;

/// Largest file Palisade reads as text (config, rule sets, schemas, IP lists).
pub const MAX_TEXT_FILE: u64 = 64 * 1024 * 1024;

/// Reads a text file Palisade was pointed at: regular files only (a FIFO or device would
/// block or never end), at most `limit` bytes, UTF-8.
pub fn read_text_file(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    let not_regular = || Error::new(ErrorKind::InvalidInput, "not a regular file");
    // Checked before opening: opening a FIFO for reading blocks until a writer comes.
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(not_regular());
    }
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {} MiB", limit / (1024 * 1024)),
        ));
    }
    String::from_utf8(bytes).map_err(|_| Error::new(ErrorKind::InvalidData, "not UTF-8 text"))
}
