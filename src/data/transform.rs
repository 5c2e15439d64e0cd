//! The seed's transforms, producing NHWC float batches for the engine:
//! train: RandomCrop(32, padding=4, zero fill) -> RandomHorizontalFlip(0.5) -> ToTensor ->
//! Normalize(mean, std); test: ToTensor -> Normalize.
//!
//! Randomness is drawn per batch from a stream keyed by (seed, epoch, batch), so any batch of
//! any epoch can be rebuilt exactly: a resumed run sees the same images as an unbroken one.

use super::cifar::{IMAGE_BYTES, Images};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const STD: [f32; 3] = [0.2023, 0.1994, 0.2010];
pub const SIDE: usize = 32;

/// Training-time augmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Zero padding before the random 32x32 crop (0: no crop).
    pub crop_pad: usize,
    pub flip: bool,
    /// With `flip`: each image is mirrored in every other epoch (at random in the first,
    /// then the opposite of its previous epoch) instead of by a coin each time, so short runs
    /// see every image both ways equally often (Keller Jordan's airbench, "alternating flip").
    #[serde(default)]
    pub alternate_flip: bool,
    /// Side of a square cut out of each training image after the crop and flip, centred
    /// anywhere on the image and clipped at its edges (Cutout, DeVries & Taylor 2017): its
    /// pixels become 0 after normalising, the mean colour. 0: none.
    #[serde(default)]
    pub cutout: usize,
}

impl Augment {
    pub const SEED: Augment = Augment {
        crop_pad: 4,
        flip: true,
        alternate_flip: false,
        cutout: 0,
    };
    pub const NONE: Augment = Augment {
        crop_pad: 0,
        flip: false,
        alternate_flip: false,
        cutout: 0,
    };
}

/// Mixes `parts` into one well-spread seed (SplitMix64 steps).
pub fn stream_seed(parts: &[u64]) -> u64 {
    let mut z = 0x9E37_79B9_7F4A_7C15u64;
    for &p in parts {
        z = z.wrapping_add(p).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

/// Value of one stored byte after ToTensor and Normalize, channel `c`.
#[inline]
pub fn normalize(v: u8, c: usize) -> f32 {
    (v as f32 / 255.0 - MEAN[c]) / STD[c]
}

/// Writes one CHW byte image into `out` (32*32*3, NHWC), cropped at `(top, left)` of the
/// image padded by `pad` on every side (padding reads as 0), then mirrored if `flip`.
pub fn write_image(src: &[u8], out: &mut [f32], pad: usize, top: usize, left: usize, flip: bool) {
    debug_assert_eq!(src.len(), IMAGE_BYTES);
    let plane = SIDE * SIDE;
    for y in 0..SIDE {
        let sy = (y + top) as isize - pad as isize;
        for x in 0..SIDE {
            let ox = if flip { SIDE - 1 - x } else { x };
            let sx = (x + left) as isize - pad as isize;
            let inside = (0..SIDE as isize).contains(&sy) && (0..SIDE as isize).contains(&sx);
            let dst = &mut out[(y * SIDE + ox) * 3..(y * SIDE + ox) * 3 + 3];
            for (c, d) in dst.iter_mut().enumerate() {
                let v = if inside {
                    src[c * plane + sy as usize * SIDE + sx as usize]
                } else {
                    0
                };
                *d = normalize(v, c);
            }
        }
    }
}

/// Where a batch sits in a run: its randomness is a function of these alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchKey {
    /// The run's seed.
    pub seed: u64,
    pub epoch: usize,
    pub batch: usize,
}

impl BatchKey {
    pub fn new(seed: u64, epoch: usize, batch: usize) -> Self {
        Self { seed, epoch, batch }
    }
    /// The seed of the batch's own random stream (crops, coin-flip mirrors).
    fn rng_seed(self) -> u64 {
        stream_seed(&[self.seed, self.epoch as u64, self.batch as u64])
    }
    /// Whether image `index` is mirrored this epoch under alternating flips: a coin per image
    /// for the run, inverted in odd epochs.
    fn alternate_flip(self, index: u32) -> bool {
        let first = stream_seed(&[self.seed, index as u64, 0x464C_4950]) & 1 == 1;
        first ^ (self.epoch % 2 == 1)
    }
}

/// One batch ready for the engine.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// NHWC, `[n, 32, 32, 3]`.
    pub x: Vec<f32>,
    pub labels: Vec<u32>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// What a batch is made of, before any pixel is touched: for each image its index, crop
/// position, flip and cutout centre. A backend that keeps the images on its device builds the
/// pixels there from this ([`crate::engine::Backend::augment`], crops and flips only: runs
/// with cutout squares take the loader's path); the CPU builds them on the loader thread.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchPlan {
    /// Per image: `[index, top, left, flip]`.
    pub items: Vec<[u32; 4]>,
    pub labels: Vec<u32>,
    /// Padding of the crop (0: none).
    pub pad: usize,
    /// Per image, with a cutout: the centre `[y, x]` of its square.
    pub holes: Vec<[u32; 2]>,
    /// Side of the cutout square (0: none).
    pub cutout: usize,
}

impl BatchPlan {
    /// The plan for images `indices` as batch `key` of a run.
    pub fn new(images: &Images, indices: &[u32], aug: Augment, key: BatchKey) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(key.rng_seed());
        let mut items = Vec::with_capacity(indices.len());
        let mut holes = Vec::new();
        for &i in indices {
            // Draw in torchvision's order: crop position, then the flip.
            let (top, left) = if aug.crop_pad > 0 {
                let span = 2 * aug.crop_pad + 1;
                (rng.random_range(0..span), rng.random_range(0..span))
            } else {
                (0, 0)
            };
            let flip = match (aug.flip, aug.alternate_flip) {
                (false, _) => false,
                (true, false) => rng.random_bool(0.5),
                (true, true) => key.alternate_flip(i),
            };
            items.push([i, top as u32, left as u32, flip as u32]);
            if aug.cutout > 0 {
                let side = SIDE as u32;
                holes.push([rng.random_range(0..side), rng.random_range(0..side)]);
            }
        }
        Self {
            labels: indices.iter().map(|&i| images.labels[i as usize] as u32).collect(),
            items,
            pad: aug.crop_pad,
            holes,
            cutout: aug.cutout,
        }
    }

    /// The plan's pixels, NHWC and normalised.
    pub fn write(&self, images: &Images) -> Vec<f32> {
        self.write_from(&images.pixels)
    }

    /// The plan's pixels from a dataset's raw bytes (`[n, 3, 32, 32]`).
    pub fn write_from(&self, pixels: &[u8]) -> Vec<f32> {
        let per = SIDE * SIDE * 3;
        let mut x = vec![0.0; self.items.len() * per];
        for (out, &[i, top, left, flip]) in x.chunks_exact_mut(per).zip(&self.items) {
            let i = i as usize;
            write_image(
                &pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES],
                out,
                self.pad,
                top as usize,
                left as usize,
                flip != 0,
            );
        }
        for (out, &[cy, cx]) in x.chunks_exact_mut(per).zip(&self.holes) {
            cut_out(out, self.cutout, cy as usize, cx as usize);
        }
        x
    }
}

/// Zeroes the `side x side` square of `image` (NHWC, 32x32x3) centred at `(cy, cx)`, clipped
/// at the edges (an even side reaches one pixel further up and left, as Cutout's reference code).
fn cut_out(image: &mut [f32], side: usize, cy: usize, cx: usize) {
    let span = |c: usize| c.saturating_sub(side / 2)..(c + side.div_ceil(2)).min(SIDE);
    for y in span(cy) {
        image[(y * SIDE + span(cx).start) * 3..(y * SIDE + span(cx).end) * 3].fill(0.0);
    }
}

/// Builds the batch of images `indices`, augmented as batch `key` of a run.
pub fn make_batch(images: &Images, indices: &[u32], aug: Augment, key: BatchKey) -> Batch {
    let plan = BatchPlan::new(images, indices, aug, key);
    Batch {
        x: plan.write(images),
        labels: plan.labels,
    }
}
