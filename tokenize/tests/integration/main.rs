//! The integration test binary of the tokenize crate: known answers from public vectors, the
//! messy identifiers of `shared/data/messy`, and property tests. One module per area.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests state their expectations with expect()

mod data;

mod known_answers;
mod messy;
mod properties;
