//! Training images kept where a backend computes, and batches cut from them there: beside the
//! [`Backend`] trait (memory and kernels), not in it. A GPU keeps a dataset's bytes on the
//! device and crops, flips and normalises each batch there from a plan drawn on the host, so no
//! pixel crosses the bus per step; the CPU builds its batches on a loader thread instead.

use super::Backend;

/// What to cut for one batch: per image `[index, top, left, flip]` into a dataset of
/// `side x side` images, crops of the image padded by `pad` (padding reads as 0), then
/// `(v / 255 - mean) / std` per channel, written NHWC.
#[derive(Clone, Copy, Debug)]
pub struct CropPlan<'a> {
    pub items: &'a [[u32; 4]],
    pub side: usize,
    pub pad: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

pub trait DeviceBatches: Backend {
    /// A dataset's image bytes (`[n, 3, side, side]`, u8) on the device.
    type Pixels: Send + Sync;
    /// Copies a dataset's image bytes to the device, once, when this backend builds training
    /// batches there; `None` when a host thread should build them ahead of the step (the CPU).
    fn upload_pixels(&self, bytes: &[u8]) -> Option<Self::Pixels>;
    /// Writes the normalised NHWC pixels of `plan` into `x`, exactly as the host's
    /// `data::transform::write_image` does.
    fn crop_flip(&self, pixels: &Self::Pixels, plan: &CropPlan, x: &mut Self::Buf);
}
