//! TensorBoard event files: TFRecord-framed `Event` protobufs with scalar summaries, the subset
//! `tensorboard --logdir` reads for scalar charts. Written on the caller's thread so that every
//! I/O error (disk full, folder gone) comes back as an error the run reports; the crate we used
//! before wrote from its own thread and panicked on such errors.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.TIME.HOST` and writes the file-version record.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let now = wall_time();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now as u64));
        let mut w = Self {
            out: BufWriter::new(File::create(&path)?),
            path,
        };
        // Event { wall_time = 1 (double), file_version = 3 (string) }
        let mut event = Vec::new();
        field_f64(&mut event, 1, now);
        field_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One scalar: Event { wall_time = 1, step = 2, summary = 5 { value = 1 { tag = 1,
    /// simple_value = 2 } } }.
    pub fn scalar(&mut self, tag: &str, value: f32, step: i64) -> std::io::Result<()> {
        let mut v = Vec::new();
        field_bytes(&mut v, 1, tag.as_bytes());
        key(&mut v, 2, 5);
        v.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::new();
        field_bytes(&mut summary, 1, &v);
        let mut event = Vec::new();
        field_f64(&mut event, 1, wall_time());
        key(&mut event, 2, 0);
        varint(&mut event, step as u64);
        field_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// TFRecord framing: length, masked CRC-32C of the length, data, masked CRC-32C of the data.
    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc(data).to_le_bytes())
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u64, wire: u64) {
    varint(out, (field << 3) | wire);
}

fn field_f64(out: &mut Vec<u8>, field: u64, v: f64) {
    key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn field_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}
