//! Labelled square RGB images as stored: bytes in planes (`[n, 3, side, side]`, the CIFAR
//! binary layout), one label each. Every dataset format is read into this one shape.

/// Colour channels of every image the readers produce (RGB): the one place the tool says it.
pub const CHANNELS: usize = 3;

/// Labelled images, pixels as stored (`[n, CHANNELS, side, side]` bytes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Images {
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
    /// Width and height of every image.
    pub side: usize,
}

impl Images {
    /// No images yet, of `side x side` pixels.
    pub fn new(side: usize) -> Self {
        Self {
            pixels: Vec::new(),
            labels: Vec::new(),
            side,
        }
    }
    /// Bytes of one image: `3 * side * side`.
    pub fn image_bytes(&self) -> usize {
        CHANNELS * self.side * self.side
    }
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image(&self, i: usize) -> &[u8] {
        let b = self.image_bytes();
        &self.pixels[i * b..(i + 1) * b]
    }
    /// Appends one image (`[3, side, side]` bytes).
    pub fn push(&mut self, pixels: &[u8], label: u32) {
        debug_assert_eq!(pixels.len(), self.image_bytes());
        self.pixels.extend_from_slice(pixels);
        self.labels.push(label);
    }
    /// Appends every image of `other` (of the same side).
    pub fn extend(&mut self, other: Images) {
        assert_eq!(self.side, other.side, "images of one set share their size");
        self.pixels.extend(other.pixels);
        self.labels.extend(other.labels);
    }
    /// Splits off the images from `at` on, keeping the first `at` (no copy of the kept part).
    pub fn split_off(&mut self, at: usize) -> Images {
        Images {
            pixels: self.pixels.split_off(at * self.image_bytes()),
            labels: self.labels.split_off(at),
            side: self.side,
        }
    }

    /// The images at `held` (ascending indices) as a second set, the rest kept in order: the
    /// last ones without a copy of the kept part.
    pub fn partition(mut self, held: &[usize]) -> (Images, Images) {
        let n = self.len();
        if held.iter().copied().eq(n - held.len()..n) {
            let tail = self.split_off(n - held.len());
            return (self, tail);
        }
        let (mut kept, mut out) = (Images::new(self.side), Images::new(self.side));
        let mut next = held.iter().peekable();
        for i in 0..n {
            let to = if next.next_if_eq(&&i).is_some() {
                &mut out
            } else {
                &mut kept
            };
            to.push(self.image(i), self.labels[i]);
        }
        (kept, out)
    }

    /// Images `range` as a new set.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Images {
        let b = self.image_bytes();
        Images {
            pixels: self.pixels[range.start * b..range.end * b].to_vec(),
            labels: self.labels[range].to_vec(),
            side: self.side,
        }
    }

    /// Per-channel mean and standard deviation of the pixel values scaled to [0, 1] (what
    /// torchvision's ToTensor gives), over every pixel of every image; summed in f64.
    pub fn channel_stats(&self) -> Normalization {
        let plane = self.side * self.side;
        let mut sum = [0f64; 3];
        let mut sq = [0f64; 3];
        for img in self.pixels.chunks_exact(3 * plane) {
            for c in 0..3 {
                // Integer sums per image are exact; f64 only across images.
                let (s, q) = img[c * plane..(c + 1) * plane]
                    .iter()
                    .fold((0u64, 0u64), |(s, q), &v| (s + v as u64, q + (v as u64) * (v as u64)));
                sum[c] += s as f64;
                sq[c] += q as f64;
            }
        }
        let count = (self.len() * plane).max(1) as f64;
        let mut norm = Normalization::default();
        for c in 0..3 {
            let mean = sum[c] / count / 255.0;
            let var = (sq[c] / count / (255.0 * 255.0) - mean * mean).max(0.0);
            norm.mean[c] = mean as f32;
            norm.std[c] = var.sqrt().max(1e-6) as f32;
        }
        norm
    }
}

/// Per-channel normalisation after scaling bytes to [0, 1]: `(v / 255 - mean) / std`
/// (torchvision's ToTensor then Normalize).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for Normalization {
    /// The identity: mean 0, std 1.
    fn default() -> Self {
        Self {
            mean: [0.0; 3],
            std: [1.0; 3],
        }
    }
}

impl Normalization {
    /// The seed's constants for CIFAR-10.
    pub const CIFAR10: Normalization = Normalization {
        mean: [0.4914, 0.4822, 0.4465],
        std: [0.2023, 0.1994, 0.2010],
    };

    /// Value of one stored byte after ToTensor and Normalize, channel `c`.
    #[inline]
    pub fn apply(&self, v: u8, c: usize) -> f32 {
        (v as f32 / 255.0 - self.mean[c]) / self.std[c]
    }
}
