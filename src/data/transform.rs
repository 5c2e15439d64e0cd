//! The seed's transforms, producing NHWC float batches for the engine:
//! train: RandomCrop(side, padding=4, zero fill) -> RandomHorizontalFlip(0.5) -> ToTensor ->
//! Normalize(mean, std); test: ToTensor -> Normalize. Images are square, of any side; the
//! normalisation is the dataset's.
//!
//! Randomness is drawn per batch from a stream keyed by (seed, epoch, batch), so any batch of
//! any epoch can be rebuilt exactly: a resumed run sees the same images as an unbroken one.

use super::images::{Images, Normalization};
use super::shard::Shard;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Training-time augmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Padding before the random crop of the image's size (0: no crop): black, or with
    /// `reflect` the image mirrored at its edges.
    pub crop_pad: usize,
    /// The crop's padding reflects the image (PyTorch's `reflect` mode, airbench's
    /// translation) instead of black pixels.
    #[serde(default)]
    pub reflect: bool,
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
        reflect: false,
        flip: true,
        alternate_flip: false,
        cutout: 0,
    };
    pub const NONE: Augment = Augment {
        crop_pad: 0,
        reflect: false,
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

/// Where a crop of a `side x side` image padded by `pad` sits: `(top, left)` in the padded
/// image, whether the padding reflects the image (else it is black), and whether the crop is
/// mirrored.
#[derive(Clone, Copy, Debug)]
pub struct Crop {
    pub side: usize,
    pub pad: usize,
    pub reflect: bool,
    pub top: usize,
    pub left: usize,
    pub flip: bool,
}

/// The row or column of a `side`-pixel image that PyTorch's `reflect` padding reads at `i`
/// (the edge pixel is not repeated: -1 reads 1, `side` reads `side - 2`).
pub fn reflect_index(i: isize, side: usize) -> isize {
    let last = side as isize - 1;
    if i < 0 {
        -i
    } else if i > last {
        2 * last - i
    } else {
        i
    }
}

/// Writes one CHW byte image (`[3, side, side]`) into `out` (`[side, side, 3]`, NHWC),
/// cropped as `crop` says (padding reads as 0, or reflects the image) and normalised by `norm`.
pub fn write_image(src: &[u8], out: &mut [f32], crop: Crop, norm: &Normalization) {
    let Crop {
        side,
        pad,
        reflect,
        top,
        left,
        flip,
    } = crop;
    debug_assert_eq!(src.len(), 3 * side * side);
    let plane = side * side;
    for y in 0..side {
        let mut sy = (y + top) as isize - pad as isize;
        if reflect {
            sy = reflect_index(sy, side);
        }
        for x in 0..side {
            let ox = if flip { side - 1 - x } else { x };
            let mut sx = (x + left) as isize - pad as isize;
            if reflect {
                sx = reflect_index(sx, side);
            }
            let inside = (0..side as isize).contains(&sy) && (0..side as isize).contains(&sx);
            let dst = &mut out[(y * side + ox) * 3..(y * side + ox) * 3 + 3];
            for (c, d) in dst.iter_mut().enumerate() {
                let v = if inside {
                    src[c * plane + sy as usize * side + sx as usize]
                } else {
                    0
                };
                *d = norm.apply(v, c);
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
    /// NHWC, `[n, side, side, 3]`.
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
/// pixels there from this (crops and flips only: runs with cutout squares take the loader's
/// path); the CPU builds them on the loader thread.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchPlan {
    /// Per image: `[index, top, left, flip]`.
    pub items: Vec<[u32; 4]>,
    pub labels: Vec<u32>,
    /// Padding of the crop (0: none), and whether it reflects the image.
    pub pad: usize,
    pub reflect: bool,
    /// Per image, with a cutout: the centre `[y, x]` of its square.
    pub holes: Vec<[u32; 2]>,
    /// Side of the cutout square (0: none).
    pub cutout: usize,
    /// Width and height of the images (and of the batch's).
    pub side: usize,
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
                let side = images.side as u32;
                holes.push([rng.random_range(0..side), rng.random_range(0..side)]);
            }
        }
        Self {
            labels: indices.iter().map(|&i| images.labels[i as usize]).collect(),
            items,
            pad: aug.crop_pad,
            reflect: aug.reflect,
            holes,
            cutout: aug.cutout,
            side: images.side,
        }
    }

    /// The part of the batch that `shard` computes: its contiguous slice of the images, each
    /// with the crop, flip and cutout it has in the whole batch (the draws are made for the
    /// whole batch first, so they do not depend on the number of ranks).
    pub fn shard(mut self, shard: Shard) -> Self {
        let part = shard.slice(self.items.len());
        self.items = self.items[part.clone()].to_vec();
        self.labels = self.labels[part.clone()].to_vec();
        if !self.holes.is_empty() {
            self.holes = self.holes[part].to_vec();
        }
        self
    }

    /// The plan's pixels and labels.
    pub fn into_batch(self, images: &Images, norm: &Normalization) -> Batch {
        Batch {
            x: self.write(images, norm),
            labels: self.labels,
        }
    }

    /// The plan's pixels, NHWC and normalised by `norm`.
    pub fn write(&self, images: &Images, norm: &Normalization) -> Vec<f32> {
        let side = self.side;
        let per = side * side * 3;
        let mut x = vec![0.0; self.items.len() * per];
        for (out, &[i, top, left, flip]) in x.chunks_exact_mut(per).zip(&self.items) {
            let crop = Crop {
                side,
                pad: self.pad,
                reflect: self.reflect,
                top: top as usize,
                left: left as usize,
                flip: flip != 0,
            };
            write_image(images.image(i as usize), out, crop, norm);
        }
        for (out, &[cy, cx]) in x.chunks_exact_mut(per).zip(&self.holes) {
            cut_out(out, side, self.cutout, cy as usize, cx as usize);
        }
        x
    }
}

/// Zeroes the `hole x hole` square of `image` (NHWC, `side x side x 3`) centred at `(cy, cx)`,
/// clipped at the edges (an even side reaches one pixel further up and left, as Cutout's
/// reference code).
fn cut_out(image: &mut [f32], side: usize, hole: usize, cy: usize, cx: usize) {
    let span = |c: usize| c.saturating_sub(hole / 2)..(c + hole.div_ceil(2)).min(side);
    for y in span(cy) {
        image[(y * side + span(cx).start) * 3..(y * side + span(cx).end) * 3].fill(0.0);
    }
}

/// Builds the batch of images `indices`, augmented as batch `key` of a run.
pub fn make_batch(images: &Images, indices: &[u32], aug: Augment, key: BatchKey, norm: &Normalization) -> Batch {
    BatchPlan::new(images, indices, aug, key).into_batch(images, norm)
}
