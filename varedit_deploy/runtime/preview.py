"""Progressive previews: the summed codes after a coarse scale, made visible for a millisecond.

Next-scale prediction accumulates its codes into one latent; after scale s that latent is a
real, coarse version of the final picture. Running the VAE decoder on it costs as much as the
final decode, so a preview instead maps each latent pixel's k x k neighbourhood linearly to
the p x p RGB patch the decoder makes of it. The map is fitted once per model by least squares
against the decoder (`preview_fit.py`) and stored in the artifact; applying it is one small
matrix product on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The OpenAI Images API allows up to 3 partial images per edit.
MAX_PREVIEWS = 3


def preview_scales(num_scales: int, count: int) -> tuple[int, ...]:
    """The scales after which `count` previews are shown, spread over the middle of the schedule.

    Scales 0 and 1 are a pixel or four; the last scale is the final image itself.
    """
    candidates = list(range(2, num_scales - 1))
    count = min(max(count, 0), len(candidates))
    if count == 0:
        return ()
    picks = np.round(np.linspace(0, len(candidates) - 1, count)).astype(int)
    return tuple(candidates[i] for i in picks)


def neighbourhoods(summed: np.ndarray, kernel: int) -> np.ndarray:
    """[1, d, H, W] -> [H * W, kernel^2 * d + 1]: each latent pixel's zero-padded neighbourhood and a 1."""
    _, d, h, w = summed.shape
    r = kernel // 2
    padded = np.pad(summed[0], ((0, 0), (r, r), (r, r)))
    shifted = [padded[:, dy:dy + h, dx:dx + w] for dy in range(kernel) for dx in range(kernel)]
    x = np.concatenate(shifted, axis=0).reshape(kernel * kernel * d, h * w).T
    return np.concatenate([x, np.ones((h * w, 1), x.dtype)], axis=1)


def patches(image: np.ndarray, patch: int) -> np.ndarray:
    """Decoded image [1, 3, H*p, W*p] -> [H * W, 3 * p * p], one row per latent pixel."""
    _, c, hp, wp = image.shape
    h, w = hp // patch, wp // patch
    return image[0].reshape(c, h, patch, w, patch).transpose(1, 3, 0, 2, 4).reshape(h * w, c * patch * patch)


@dataclass(frozen=True)
class PreviewProjection:
    weights: np.ndarray  # [kernel^2 * d + 1, 3 * p * p] float32; the last row is the bias
    kernel: int
    patch: int

    def apply(self, summed: np.ndarray) -> np.ndarray:
        """Summed codes [1, d, H, W] -> image [1, 3, H*p, W*p] in [-1, 1], like the decoder's output."""
        _, _, h, w = summed.shape
        p = self.patch
        y = neighbourhoods(np.asarray(summed, np.float32), self.kernel) @ self.weights
        image = y.reshape(h, w, 3, p, p).transpose(2, 0, 3, 1, 4).reshape(1, 3, h * p, w * p)
        return np.clip(image, -1.0, 1.0)

    @classmethod
    def from_weights(cls, weights: np.ndarray, codebook_dim: int, patch: int) -> "PreviewProjection":
        kernel = int(round(((weights.shape[0] - 1) / codebook_dim) ** 0.5))
        if weights.shape != (kernel * kernel * codebook_dim + 1, 3 * patch * patch):
            raise ValueError(f"preview weights of shape {weights.shape} do not fit codebook_dim {codebook_dim}, "
                             f"patch {patch}")
        return cls(weights.astype(np.float32), kernel, patch)
