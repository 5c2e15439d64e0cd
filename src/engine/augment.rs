//! The plan of a batch cut on a device ([`super::BatchOps::crop_flip`]): a GPU keeps a
//! dataset's bytes on the device and crops, flips and normalises each batch there from a plan
//! drawn on the host, so no pixel crosses the bus per step; the CPU builds its batches on a
//! loader thread instead.

/// What to cut for one batch: per image `[index, top, left, flip]` into a dataset of
/// `side x side` images, crops of the image padded by `pad` (padding reads as 0), then
/// `(v / 255 - mean) / std` per channel, written NHWC.
#[derive(Clone, Copy, Debug)]
pub struct CropPlan<'a> {
    pub items: &'a [[u32; 4]],
    pub side: usize,
    pub pad: usize,
    /// The padding reflects the image (PyTorch's `reflect`) instead of reading as 0.
    pub reflect: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl CropPlan<'_> {
    /// How many values the batch it cuts holds: every image's pixels, a value for each
    /// channel the plan normalises.
    pub fn output_len(&self) -> usize {
        self.items.len() * self.side * self.side * self.mean.len()
    }
}
