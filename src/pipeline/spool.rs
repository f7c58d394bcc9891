//! The spool file's writer. Writing a file from async code goes through a blocking thread;
//! doing that per network chunk (16 KiB or so) costs a thread hand-off, two futex calls and a
//! context switch per chunk, more than the copy itself. Here the chunks are gathered (shared,
//! not copied) into batches of [`BATCH_BYTES`] and each batch is written in one hand-off, while
//! the next one arrives.

use std::io::Write;

use bytes::Bytes;
use tokio::task::JoinHandle;

/// Bytes gathered before they are written: a few hand-offs per MiB, and at most two batches
/// (one writing, one gathering) held per download.
pub const BATCH_BYTES: usize = 128 << 10;

/// Writes a download's chunks to its spool file in batches.
#[derive(Debug)]
pub struct SpoolWriter {
    /// The file, while no batch is being written.
    file: Option<std::fs::File>,
    /// The batch being written; it gives the file back.
    writing: Option<JoinHandle<std::io::Result<(std::fs::File, u64)>>>,
    /// Chunks gathered for the next batch.
    pending: Vec<Bytes>,
    pending_len: usize,
    /// Bytes whose write has completed: another handle on the file reads them.
    written: u64,
}

impl SpoolWriter {
    /// A writer at the start of `file`.
    pub fn new(file: std::fs::File) -> Self {
        Self { file: Some(file), writing: None, pending: Vec::new(), pending_len: 0, written: 0 }
    }

    /// Bytes written so far (readable by another handle on the file).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Adds the next chunk; a full batch waits for the previous one's write, then starts its own.
    ///
    /// # Errors
    /// The previous batch could not be written.
    pub async fn push(&mut self, chunk: Bytes) -> std::io::Result<()> {
        self.pending_len += chunk.len();
        self.pending.push(chunk);
        if self.pending_len >= BATCH_BYTES {
            self.start_batch().await?;
        }
        Ok(())
    }

    /// Writes everything gathered and waits for it: [`SpoolWriter::written`] is then every byte
    /// pushed.
    ///
    /// # Errors
    /// A batch could not be written.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        self.start_batch().await?;
        self.settle().await
    }

    /// Waits for the batch being written, if any.
    async fn settle(&mut self) -> std::io::Result<()> {
        if let Some(writing) = self.writing.take() {
            let (file, n) = writing.await.map_err(std::io::Error::other)??;
            self.file = Some(file);
            self.written += n;
        }
        Ok(())
    }

    async fn start_batch(&mut self) -> std::io::Result<()> {
        self.settle().await?;
        if self.pending.is_empty() {
            return Ok(());
        }
        let Some(mut file) = self.file.take() else {
            return Err(std::io::Error::other("the spool file was lost by an earlier failed write"));
        };
        let batch = std::mem::take(&mut self.pending);
        self.pending_len = 0;
        self.writing = Some(tokio::task::spawn_blocking(move || {
            let mut n = 0;
            for chunk in &batch {
                file.write_all(chunk)?;
                n += chunk.len() as u64;
            }
            Ok((file, n))
        }));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chunks_land_in_order_and_written_counts_what_another_handle_reads() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut writer = SpoolWriter::new(file.reopen().unwrap());
        let mut expected = Vec::new();
        for i in 0..200u32 {
            let chunk: Vec<u8> = (0..(3000 + i * 7)).map(|j| (i + j) as u8).collect();
            expected.extend_from_slice(&chunk);
            writer.push(Bytes::from(chunk)).await.unwrap();
            let on_disk = std::fs::read(file.path()).unwrap();
            assert!(on_disk.len() as u64 >= writer.written(), "written never runs ahead of the file");
        }
        writer.flush().await.unwrap();
        assert_eq!(writer.written(), expected.len() as u64);
        assert!(std::fs::read(file.path()).unwrap() == expected);
    }
}
