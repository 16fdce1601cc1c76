//! The shared test data (`shared/data`, beside the repository) and the one JSON loader.

use std::path::PathBuf;

use serde::de::DeserializeOwned;

/// `shared/data`, from this crate's folder (`/work/main/tokenize` → `/work/shared/data`).
const DATA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data");

/// The path of a file under `shared/data`.
pub fn path(relative: &str) -> PathBuf {
    PathBuf::from(DATA_DIR).join(relative)
}

/// Reads and deserializes a JSON file under `shared/data`.
pub fn load_json<T: DeserializeOwned>(relative: &str) -> T {
    let path = path(relative);
    let bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

/// Decodes a hex string of a vector file.
pub fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap_or_else(|e| panic!("bad hex {s:?}: {e}"))
}
