//! The stages a job goes through, one file each, in the order they run: [`download`] the
//! audio, [`store`] it in S3, record it in the [`catalog`], and, after the completion event,
//! [`cleanup`] the generation service's temporary file. [`transfer`] overlaps the first two for
//! files larger than one multipart part; [`commit`] keeps the object and its document in
//! agreement while a new take replaces the old one.

pub mod catalog;
pub mod cleanup;
pub mod commit;
pub mod download;
pub mod spool;
pub mod store;
pub mod transfer;
